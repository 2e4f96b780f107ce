"""The host adapter without a WebUI: plain defaults under the models root."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..store import models_root as _models_root

log = logging.getLogger(__name__)


def models_root(override: str | os.PathLike[str] | None = None) -> Path:
    return _models_root(override)


def checkpoint_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where exported checkpoints go: ``<models root>/Stable-diffusion``, as in the WebUI's layout."""
    return models_root(override) / "Stable-diffusion"


def lora_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return models_root(override) / "Lora"


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def checkpoints(override: str | os.PathLike[str] | None = None) -> list[str]:
    """The checkpoint files in ``<models root>/Stable-diffusion`` (subfolders too), as paths relative to it."""
    folder = checkpoint_dir(override)
    if not folder.is_dir():
        return []
    found = [p.relative_to(folder) for p in folder.rglob("*")
             if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()]
    return sorted(str(p) for p in found if not any(part.startswith(".") for part in p.parts))


def checkpoint_path(choice: str, override: str | os.PathLike[str] | None = None) -> Path:
    """The file behind an entry of :func:`checkpoints` (or a full path typed by hand)."""
    path = Path(choice).expanduser()
    return path if path.is_absolute() else checkpoint_dir(override) / path


def loaded_checkpoint() -> str | None:
    """Without a WebUI no checkpoint is loaded."""
    return None


def attention_default() -> str:
    """What the 'auto' attention setting means without a WebUI: PyTorch's scaled dot product attention."""
    return "sdp"


def after_export(path: Path) -> None:
    """Nothing to refresh without a WebUI."""
    log.info("exported %s", path)


@dataclass(frozen=True)
class StandaloneHost:
    """The host the tab talks to in ``python -m dreambooth ui``: plain folders under one models root."""

    root: str | os.PathLike[str] | None = None
    worker_device: str | None = None  # None: CUDA when available, else the CPU

    def models_root(self) -> Path:
        return models_root(self.root)

    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.root)

    def checkpoints(self) -> list[str]:
        return checkpoints(self.root)

    def checkpoint_path(self, choice: str) -> Path:
        return checkpoint_path(choice, self.root)

    def lora_dir(self) -> Path:
        return lora_dir(self.root)

    def embeddings_dir(self) -> Path:
        return models_root(self.root) / "embeddings"

    def hypernetworks_dir(self) -> Path:
        return models_root(self.root) / "hypernetworks"

    def loaded_checkpoint(self) -> str | None:
        return loaded_checkpoint()

    def attention_default(self) -> str:
        return attention_default()

    def after_export(self, path: Path) -> None:
        after_export(path)

    def device(self) -> str | None:
        return self.worker_device
