"""Atomic file writes: write to a temporary name in the same folder, fsync, rename into place. Files and folders
get the normal mode (0666 / 0777 less the umask), as any file the user creates.

A crash or a full disk mid-write leaves the previous file untouched and at most a stray
``*.tmp-*`` file, which :func:`clean_stale_temps` removes.

:func:`fault_point` is a test hook for the crash tests (``tools/fault_injection.py``); it does nothing unless
``$DREAMBOOTH_FAULT_AT`` is set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import platform_compat

TMP_MARK = ".tmp-"
FILE_MODE = 0o666  # less the umask: what open() gives a new file
DIR_MODE = 0o777  # less the umask: what mkdir gives a new folder
FAULT_ENV = "DREAMBOOTH_FAULT_AT"
_fault_counts: dict[str, int] = {}


def fault_point(*names: str) -> None:
    """Test hook: with ``$DREAMBOOTH_FAULT_AT="<point>:<n>[,<point>:<n>...]"`` this process kills itself with
    SIGKILL the n-th time it passes ``<point>`` (each name counts separately), so a crash test can cut a run off
    at an exact moment; ``<point>:<n>@<rank>`` only in that process of a data-parallel run (``$RANK``). Without the
    variable (always, outside crash tests) it returns at once.

    Points: ``write`` and ``write<suffix>`` (``write.safetensors``, ``write.png``, ``write.json``, ...): every
    atomic file write, after the data is in the temporary file and before it is renamed into place; the trainer's
    ``step`` (mid optimizer step), ``save`` (between the parts of a save), ``preview`` (a preview image made, not
    yet written) and ``class`` (after each batch of class images).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    wanted = {part.strip() for part in spec.split(",")}
    for name in names:
        count = _fault_counts[name] = _fault_counts.get(name, 0) + 1
        if wanted & {f"{name}:{count}", f"{name}:{count}@{os.environ.get('RANK', '0')}"}:
            os.write(2, f"fault injection: killing pid {os.getpid()} at {name}:{count}\n".encode())
            platform_compat.kill(os.getpid())


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask
    try:
        yield tmp
        fault_point("write", f"write{target.suffix}")
        if tmp.is_file():
            _normal_modes(tmp, mode)
        _fsync_file(tmp)
        platform_compat.replace(tmp, target)  # retried on Windows while a reader holds target open
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_temp(target: Path, create: Callable[[Path], None]) -> Path:
    """A new temporary name beside ``target``, created by ``create(path)`` (which must fail if it exists).

    Not ``mkstemp`` / ``mkdtemp``: they create with mode 0600 / 0700, which the rename would give the final file,
    so a WebUI or file server running as another user could not read it. Created with 0666 / 0777, the umask
    gives the normal mode, as for any file the user creates.
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}{TMP_MARK}{secrets.token_hex(4)}"
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")


def _normal_modes(path: Path, mode: int) -> None:
    """Give ``path`` the normal ``mode`` again where a writer did not: safetensors 0.5+ writes its files 0600
    (through a temporary file of its own), whatever the file it replaces had. Not on Windows (no such modes)."""
    if os.name != "posix" or path.is_symlink():
        return
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_with(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically create ``target`` with ``writer(tmp_path)`` (for library savers that take a path)."""
    with atomic_path(target) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder under a temporary name and rename it into place at the end.

    ``target`` must not exist. On any error the temporary folder is removed, so nothing half-made is left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target, lambda path: os.mkdir(path, DIR_MODE))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0777 less the umask
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            _normal_modes(path, mode if path.is_dir() else mode & FILE_MODE)
        platform_compat.rename(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_target(name: str) -> str | None:
    """The name of the file a temporary entry was meant to become (``.x.json.tmp-ab12`` -> ``x.json``), or None
    for a name that is not one of our temporary names."""
    if not name.startswith(".") or TMP_MARK not in name:
        return None
    return name[1:name.rindex(TMP_MARK)]


def clean_stale_temps(folder: str | os.PathLike[str], pattern: str | re.Pattern[str] | None = None) -> list[Path]:
    """Remove temporary files and folders left by a crash in ``folder`` (not recursive).

    ``pattern``: only those whose target name (see :func:`temp_target`) fully matches it; for folders that other
    processes write into as well (the WebUI's model folders), so that their writes in progress are left alone.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        target = temp_target(entry.name)
        if target is not None and (pattern is None or re.fullmatch(pattern, target)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _fsync_file(path: Path) -> None:
    if path.is_dir():
        return
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
