"""The training lock of a model dir: ``train.lock``, one JSON object naming the process that trains the model.

The file is created atomically (``O_CREAT | O_EXCL``), so of two processes that start a run at the same moment only
one gets it. A lock survives a crash of its holder; it counts as *stale* once its process is gone (or its pid now
belongs to another process, which the process start time written beside the pid reveals on Linux), and the next
:func:`acquire` takes a stale or unreadable lock over with a warning. A lock held by a live process is refused with
:class:`Locked`.

Hand-over to a worker: the launcher (:mod:`jobs`) acquires the lock before it starts the worker process, writes the
worker's pid into it, and passes the lock's ``token`` in ``$DREAMBOOTH_LOCK_TOKEN``; a worker that calls
:func:`acquire` itself takes over a lock carrying the token it was given, without a warning.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .atomic import write_json
from .errors import StoreError

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
# processes


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux ``/proc``); None where that cannot be read."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may hold spaces
    except (ValueError, IndexError):
        return None


def process_started_at(pid: int) -> float | None:
    """When ``pid`` started, as a Unix time (Linux ``/proc``); None where that cannot be read."""
    ticks = process_start_ticks(pid)
    if ticks is None:
        return None
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _is_zombie(pid: int) -> bool:
    """A process that has exited but was not reaped yet (Linux); os.kill(pid, 0) still succeeds on it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie) on this machine."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return not _is_zombie(pid)


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


# ---------------------------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it is unreadable or not a lock (garbled, half-written, wrong types)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
    """A held ``train.lock``. Release it with :meth:`release` or by leaving the ``with`` block."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info

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
        self.path.unlink(missing_ok=True)

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
    handed = token if token is not None else os.environ.get(TOKEN_ENV) or None
    for _ in range(attempts):
        info = _content(os.getpid(), handed or secrets.token_hex(16))
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
            return Lock(path, info)
        if current is not None and _live(current):
            name = Path(model_dir_path).name
            where = "" if current.get("host") in (None, socket.gethostname()) else f" on {current['host']}"
            raise Locked(f"model {name!r} is already training (pid {current['pid']}{where})",
                         f"wait for it to finish or cancel it; if no training runs, delete {path}", current)
        if current is None:
            if not path.exists():
                continue  # released between our two looks: try again
            age = _age(path)
            if age is not None and age < 2.0:
                time.sleep(0.2)  # possibly being written right now by another acquire: look again
                if _read(path) is not None or not path.exists():
                    continue
            log.warning("taking over the unreadable training lock %s", path)
        else:
            log.warning("taking over the stale training lock %s of pid %s (started %s), which is no longer running",
                        path, current["pid"], time.strftime("%Y-%m-%d %H:%M:%S",
                                                            time.localtime(current.get("started_at") or 0)))
        _remove_if_unchanged(path, current)
    raise StoreError(f"could not take the training lock {path}: it keeps changing",
                     "another process is starting a training of this model; try again")


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _remove_if_unchanged(path: Path, seen: dict[str, Any] | None) -> None:
    """Remove a stale lock, unless another process replaced it since we looked (then the next round decides)."""
    if _read(path) != seen:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
