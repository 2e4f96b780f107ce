"""The training lock of a model dir: ``train.lock``, one JSON object naming the process that trains the model.

The file is created atomically (``O_CREAT | O_EXCL``), so of two processes that start a run at the same moment only
one gets it. A lock survives a crash of its holder; it counts as *stale* once its process is gone (or its pid now
belongs to another process, which the process start time written beside the pid reveals on Linux and Windows), and
the next :func:`acquire` takes a stale or unreadable lock over with a warning. A lock held by a live process is
refused with :class:`Locked`.

Hand-over to a worker: the launcher (:mod:`jobs`) acquires the lock before it starts the worker process, writes the
worker's pid into it, and passes the lock's ``token`` in ``$DREAMBOOTH_LOCK_TOKEN``; a worker that calls
:func:`acquire` itself takes over a lock carrying the token it was given, without a warning.

The same mechanism locks a GPU: :func:`acquire_device` (``<store>/.locks/<device>.lock``), one training per GPU.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from .atomic import write_json
from .errors import StoreError
from .platform_compat import pid_alive, process_start_ticks, read_bytes, unlink

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
TOKEN_ENV = "DREAMBOOTH_LOCK_TOKEN"


class Locked(StoreError):
    """The model is being trained by a live process; ``holder`` is the lock's content."""

    def __init__(self, message: str, hint: str, holder: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.holder = holder


def lock_path(model_dir_path: str | os.PathLike[str]) -> Path:
    return Path(model_dir_path) / LOCK_FILE


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it is unreadable or not a lock (garbled, half-written, wrong types)."""
    try:
        data = json.loads(read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or isinstance(data.get("pid"), bool):
        return None
    return data


def _live(info: dict[str, Any]) -> bool:
    """Whether the process a lock names still runs. A lock from another machine cannot be checked: it counts."""
    host = info.get("host")
    if host and host != socket.gethostname():
        return True
    pid = info["pid"]
    if not pid_alive(pid):
        return False
    ticks = info.get("start_ticks")
    if isinstance(ticks, int):
        now = process_start_ticks(pid)
        if now is not None and now != ticks:
            return False  # the pid was reused by an unrelated process
    return True


def holder(model_dir_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock's content ({pid, started_at, host, ...}) when a live process holds it, else None."""
    info = _read(lock_path(model_dir_path))
    if info is None or not _live(info):
        return None
    return info


def _content(pid: int, token: str) -> dict[str, Any]:
    return {"pid": pid, "started_at": time.time(), "host": socket.gethostname(),
            "start_ticks": process_start_ticks(pid), "token": token}


# ---------------------------------------------------------------------------------------------------------------
# acquiring


class Lock:
    """A held ``train.lock``. Release it with :meth:`release` or by leaving the ``with`` block.

    ``handed_over``: this process took over the lock a launcher made for it (the token it was given), so the launcher
    prepared the run (see ``jobs.start``).
    """

    def __init__(self, path: Path, info: dict[str, Any], handed_over: bool = False) -> None:
        self.path = path
        self.info = info
        self.handed_over = handed_over

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def token(self) -> str:
        return str(self.info["token"])

    def hand_over(self, pid: int) -> None:
        """Write ``pid`` (a worker started by this process) as the holder; the token stays."""
        self.info = {**_content(pid, self.token), "handed_over_by": os.getpid()}
        write_json(self.path, self.info)  # an atomic rename: the file exists all the time

    def release(self) -> None:
        """Remove the lock if it is still ours (same token); a lock taken over by someone else is left alone."""
        current = _read(self.path)
        if current is not None and current.get("token") != self.token:
            log.warning("%s now belongs to pid %s; not removing it", self.path, current.get("pid"))
            return
        unlink(self.path, missing_ok=True)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def acquire(model_dir_path: str | os.PathLike[str], *, token: str | None = None, attempts: int = 5) -> Lock:
    """Take the training lock of a model dir, or raise :class:`Locked` naming the live holder.

    A stale lock (its process is gone) or an unreadable one is taken over with a warning. A lock that carries
    ``token`` (by default ``$DREAMBOOTH_LOCK_TOKEN``: the launcher handed it to this worker) is taken over quietly.
    """
    path = lock_path(model_dir_path)
    name = Path(model_dir_path).name

    def refuse(current: dict[str, Any], where: str) -> Locked:
        return Locked(f"model {name!r} is already training (pid {current['pid']}{where})",
                      f"wait for it to finish or cancel it; if no training runs, delete {path}", current)

    handed = token if token is not None else os.environ.get(TOKEN_ENV) or None
    return _acquire(path, handed, attempts, {}, refuse, "training lock")


def _acquire(path: Path, handed: str | None, attempts: int, extra: dict[str, Any],
             refuse: Callable[[dict[str, Any], str], Locked], what: str) -> Lock:
    """Create the lock file ``path`` (content: this process, plus ``extra``), taking over a stale or unreadable
    one and one that carries the token ``handed``; a live holder's lock raises ``refuse(holder, where)``."""
    for _ in range(attempts):
        info = {**_content(os.getpid(), handed or secrets.token_hex(16)), **extra}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(info, fh)
                fh.flush()
                os.fsync(fh.fileno())
            return Lock(path, info)

        current = _read(path)
        if current is not None and handed and current.get("token") == handed:
            write_json(path, info)
            return Lock(path, info, handed_over=True)
        if current is not None and _live(current):
            where = "" if current.get("host") in (None, socket.gethostname()) else f" on {current['host']}"
            raise refuse(current, where)
        if current is None:
            if not path.exists():
                continue  # released between our two looks: try again
            age = _age(path)
            if age is not None and age < 2.0:
                time.sleep(0.2)  # possibly being written right now by another acquire: look again
                if _read(path) is not None or not path.exists():
                    continue
            log.warning("taking over the unreadable %s %s", what, path)
        else:
            log.warning("taking over the stale %s %s of pid %s (started %s), which is no longer running",
                        what, path, current["pid"], time.strftime("%Y-%m-%d %H:%M:%S",
                                                                  time.localtime(current.get("started_at") or 0)))
        _remove_if_unchanged(path, current)
    raise StoreError(f"could not take the {what} {path}: it keeps changing",
                     "another process is starting a training there; try again")


# ---------------------------------------------------------------------------------------------------------------
# one training per GPU
#
# Besides its model dir's lock, a worker on a GPU takes ``<store>/.locks/<device>.lock`` (the store is
# ``<models root>/dreambooth``), so two trainings never share one GPU's memory: the second is refused, naming the
# model that trains there. CPU runs take no device lock: they share the machine's RAM and cores like any other
# program, and the per-model lock already keeps one run per model.

LOCKS_FOLDER = ".locks"


def device_key(device: str | None) -> str | None:
    """The physical device a torch device string trains on (``cuda:0``, ``mps:0``), or None for the CPU.

    ``cuda`` without an index is the current CUDA device (0 when CUDA cannot be asked); with
    ``$CUDA_VISIBLE_DEVICES`` set, the index is mapped through it, so two processes that see different subsets of
    the GPUs still lock the same physical one.
    """
    if device is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device = "cuda"
    kind, _, index = str(device).strip().lower().partition(":")
    if kind == "cpu" or not kind:
        return None
    if not index:
        index = "0"
        if kind == "cuda":
            import torch

            if torch.cuda.is_available():
                index = str(torch.cuda.current_device())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if kind == "cuda" and visible and index.isdigit():
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if int(index) < len(parts):
            index = parts[int(index)]
    return f"{kind}:{index}"


def device_lock_path(store: str | os.PathLike[str], key: str) -> Path:
    return Path(store) / LOCKS_FOLDER / (re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock")


def device_holder(store: str | os.PathLike[str], key: str | None) -> dict[str, Any] | None:
    """The device lock's content ({pid, model, device, ...}) while a live process trains on ``key``, else None."""
    if key is None:
        return None
    info = _read(device_lock_path(store, key))
    if info is None or not _live(info):
        return None
    return info


def acquire_device(store: str | os.PathLike[str], key: str, model_name: str, *, attempts: int = 5) -> Lock:
    """Take the lock of the device ``key`` (see :func:`device_key`) for a training of ``model_name``, or raise
    :class:`Locked` naming the model that trains there. A stale one (its process is gone) is taken over."""
    path = device_lock_path(store, key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def refuse(current: dict[str, Any], where: str) -> Locked:
        other = current.get("model") or "another model"
        return Locked(f"{key} is busy: model {other!r} is training on it (pid {current['pid']}{where})",
                      f"wait for that training to finish or cancel it, or train on another GPU (device setting, "
                      f"e.g. --device cuda:1); if nothing trains there, delete {path}", current)

    return _acquire(path, None, attempts, {"model": model_name, "device": key}, refuse, "device lock")


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _remove_if_unchanged(path: Path, seen: dict[str, Any] | None) -> None:
    """Remove a stale lock, unless another process replaced it since we looked (then the next round decides)."""
    if _read(path) != seen:
        return
    unlink(path, missing_ok=True)
