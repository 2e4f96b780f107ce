"""The model store: ``<models root>/dreambooth/<name>/`` and what lives in it.

A model dir holds ``db_config.json``, ``working/`` (diffusers-format weights plus ``ldm_extras.safetensors``,
the single-file keys diffusers has no place for), ``samples/``, ``logs/``, ``checkpoints/`` (resume states)
and ``backups/``. Names are one safe path component; anything that could reach outside the root is refused.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .platform_compat import reserved_on_windows

MODELS_ROOT_ENV = "DREAMBOOTH_MODELS_ROOT"
STORE_FOLDER = "dreambooth"
SUBDIRS = ("working", "samples", "logs", "checkpoints", "backups")
MAX_NAME_LENGTH = 100

_FORBIDDEN_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


def models_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The models root: an explicit override, else $DREAMBOOTH_MODELS_ROOT, else ./models (standalone).

    Inside the WebUI the host adapter passes the WebUI's own models path as the override.
    """
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(MODELS_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "models").resolve()


def validate_name(name: object) -> str:
    """Return ``name`` if it is one safe path component, else raise StoreError saying what is wrong."""
    hint = "use letters, digits, spaces, '-', '_' or '.', e.g. 'my-dog-v1'"
    if not isinstance(name, str):
        raise StoreError(f"model name must be text, got {type(name).__name__}", hint)
    if not name.strip():
        raise StoreError("model name is empty", hint)
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"model name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}", hint)
    if name in (".", ".."):
        raise StoreError(f"model name {name!r} is not allowed", hint)
    bad = _FORBIDDEN_CHARS.search(name)
    if bad:
        what = "a path separator" if bad.group() in "/\\" else f"the character {bad.group()!r}"
        raise StoreError(f"model name {name!r} contains {what}", hint)
    if ".." in name:
        raise StoreError(f"model name {name!r} contains '..'", hint)
    if name != name.strip() or name.startswith(".") or name.endswith("."):
        raise StoreError(f"model name {name!r} starts or ends with a space or a dot", hint)
    if reserved_on_windows(name):
        raise StoreError(f"model name {name!r} is a reserved device name on Windows", hint)
    if unicodedata.normalize("NFC", name) != name:
        raise StoreError(f"model name {name!r} is not in Unicode normal form", "retype the name")
    return name


@dataclass(frozen=True)
class ModelDir:
    """Paths of one model dir. Creating the object touches nothing on disk."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "db_config.json"

    @property
    def working(self) -> Path:
        return self.path / "working"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def backups(self) -> Path:
        return self.path / "backups"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    def class_images(self, index: int, class_data_dir: str = "") -> Path:
        """The class images of the ``index``-th concept: its own folder, else one in the model dir."""
        return Path(class_data_dir) if class_data_dir else self.path / "classes" / f"concept_{index}"

    def exists(self) -> bool:
        return self.config_path.is_file() and self.working.is_dir()


def store_dir(root: str | os.PathLike[str] | None = None) -> Path:
    return models_root(root) / STORE_FOLDER


def model_dir(name: str, root: str | os.PathLike[str] | None = None) -> ModelDir:
    """The dir for ``name`` (validated), guaranteed to lie inside the store (symlinks resolved)."""
    validate_name(name)
    base = store_dir(root)
    path = base / name
    resolved_base = base.resolve()
    if path.is_symlink() or path.exists() and path.resolve().parent != resolved_base:
        raise StoreError(f"model dir {path} is a link that points outside {resolved_base}",
                         "remove the link; model dirs must live inside the store")
    return ModelDir(path)


def open_model(name: str, root: str | os.PathLike[str] | None = None) -> ModelDir:
    """An existing model dir, or StoreError listing what exists."""
    md = model_dir(name, root)
    if not md.exists():
        known = list_models(root)
        hint = f"known models: {', '.join(known)}" if known else "create one with `python -m dreambooth create`"
        raise StoreError(f"no model named {name!r} in {store_dir(root)}", hint)
    return md


def list_models(root: str | os.PathLike[str] | None = None) -> list[str]:
    base = store_dir(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if not p.name.startswith(".") and ModelDir(p).exists() and not p.is_symlink())
