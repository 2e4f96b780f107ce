"""Every difference between the operating systems we run on, in one place.

Most WebUI users run Windows; CI runs Linux. Code elsewhere asks this module instead of testing ``sys.platform`` or
importing a Unix-only module (``resource``, ``fcntl``, ...) itself, so nothing Unix-only sits on a path the WebUI
entry, the tab, the API, the job launcher or the worker takes. It is apart from ``compat.py`` (torch versions)
because that one imports torch, and the lock, the atomic writes and the launcher run in the WebUI's process, which
must not import torch at start. Every function reads ``sys.platform`` when called, so a test can ask it as Windows.

What Windows does differently, and what we do about it:

- ``os.kill(pid, sig)`` with any signal but CTRL_C_EVENT / CTRL_BREAK_EVENT calls TerminateProcess: it kills. "Is it
  alive" asks OpenProcess / GetExitCodeProcess instead, and a cancel is the request file the worker polls (a kill
  only after a timeout, see ``jobs.cancel``), never a signal.
- A file another process holds open cannot be renamed onto, renamed or deleted (PermissionError; the tab reading
  ``status.json`` while the worker replaces it, a virus scanner opening a new file): such calls are retried briefly.
- No ``resource`` and no ``/proc``: peak memory comes from GetProcessMemoryInfo, process start times from
  GetProcessTimes. A new process group is ``creationflags=CREATE_NEW_PROCESS_GROUP``, not ``start_new_session``.
- Device names (CON, NUL, COM1, ...) cannot be file names, with any extension.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CREATE_NEW_PROCESS_GROUP = 0x00000200  # subprocess.CREATE_NEW_PROCESS_GROUP, which exists only on Windows
SHARING_RETRY_SECONDS = 3.0  # how long a rename / delete / read blocked by another process's open handle is retried
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                                  *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))})


def is_windows() -> bool:
    return sys.platform == "win32"


# ---------------------------------------------------------------------------------------------------------------
# processes


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and has not exited) on this machine. Never sends it a signal."""
    if pid <= 0:
        return False
    if is_windows():
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0 only checks; on Windows this call would kill
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """A process that has exited but was not reaped yet (Linux ``/proc``); ``os.kill(pid, 0)`` still succeeds on it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return text[text.rindex(")") + 2:].split()[0] in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def process_start_ticks(pid: int) -> int | None:
    """An integer that changes when ``pid`` is reused by another process: when it started (Linux: clock ticks since
    boot; Windows: its creation FILETIME). None where that cannot be read."""
    if is_windows():
        return _windows_creation_time(pid)
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may hold spaces
    except (ValueError, IndexError):
        return None


def process_started_at(pid: int) -> float | None:
    """When ``pid`` started, as a Unix time; None where that cannot be read."""
    ticks = process_start_ticks(pid)
    if ticks is None:
        return None
    if is_windows():
        return ticks / 1e7 - 11_644_473_600  # FILETIME: 100 ns units since 1601-01-01
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError, AttributeError):
        return None


def new_process_group() -> dict[str, Any]:
    """``subprocess.Popen`` arguments that start a child in its own process group, so a Ctrl-C in the host's console
    does not reach it."""
    if is_windows():
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def signals_stop_gracefully() -> bool:
    """Whether SIGTERM asks a process to stop (its handler runs). On Windows ``os.kill`` terminates it outright."""
    return not is_windows()


def kill(pid: int) -> None:
    """End ``pid`` at once (SIGKILL; TerminateProcess on Windows). Raises OSError when it cannot."""
    os.kill(pid, signal.SIGTERM if is_windows() else signal.SIGKILL)


def cancel_signals() -> tuple[int, ...]:
    """The signals a training takes as "cancel at the next step": SIGTERM and Ctrl-C, and Ctrl-Break on Windows."""
    names = ("SIGTERM", "SIGINT", "SIGBREAK") if is_windows() else ("SIGTERM", "SIGINT")
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


def peak_rss_bytes() -> int | None:
    """This process's own peak resident memory, in bytes; None where it cannot be read.

    Linux: ``VmHWM`` of ``/proc/self/status``, not ``ru_maxrss``, which a process started by a bigger one (the WebUI)
    inherits across exec. Windows: PeakWorkingSetSize. macOS: ``ru_maxrss`` (bytes there).
    """
    if is_windows():
        return _windows_peak_working_set()
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
        except (OSError, ValueError, IndexError):
            pass
        return None
    if sys.platform == "darwin":
        try:
            import resource
        except ImportError:
            return None
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return None


# ---------------------------------------------------------------------------------------------------------------
# files


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace``, retried for a moment on Windows while another process holds ``dst`` (or ``src``) open."""
    _retry_sharing(os.replace, src, dst, what=f"replace {dst}")


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.rename`` (files or folders), retried for a moment on Windows while a file in it is held open."""
    _retry_sharing(os.rename, src, dst, what=f"rename {src}")


def unlink(path: str | os.PathLike[str], missing_ok: bool = False) -> None:
    """Delete a file, retried for a moment on Windows while another process holds it open."""
    try:
        _retry_sharing(os.unlink, path, what=f"delete {path}")
    except FileNotFoundError:
        if not missing_ok:
            raise


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes, retried for a moment on Windows while it is being replaced (a reader then gets
    PermissionError, not the old or the new file)."""
    return _retry_sharing(Path(path).read_bytes, what=f"read {path}")


def reserved_on_windows(name: str) -> bool:
    """Whether ``name`` (a file or folder name) is a Windows device name such as ``CON`` or ``nul.txt``."""
    return name.split(".")[0].strip().upper() in WINDOWS_DEVICE_NAMES


def _retry_sharing(call: Callable[..., T], *args: Any, what: str) -> T:
    """``call(*args)``; on Windows a PermissionError (another process has the file open) is retried until
    SHARING_RETRY_SECONDS have passed, then raised with a message that says so. Elsewhere it is raised at once."""
    deadline = time.monotonic() + SHARING_RETRY_SECONDS
    pause = 0.01
    while True:
        try:
            return call(*args)
        except PermissionError as err:
            if not is_windows():
                raise
            if time.monotonic() >= deadline:
                raise PermissionError(err.errno or errno.EACCES,
                                      f"could not {what}: another program keeps it open (on Windows a file in use "
                                      f"cannot be replaced or deleted); close that program and try again",
                                      err.filename) from err
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Windows through ctypes (imported only there)

_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259
_ERROR_ACCESS_DENIED = 5


def _kernel32() -> Any:
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    k32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    k32.GetExitCodeProcess.restype = wintypes.BOOL
    k32.GetProcessTimes.argtypes = (wintypes.HANDLE, *[ctypes.POINTER(wintypes.FILETIME)] * 4)
    k32.GetProcessTimes.restype = wintypes.BOOL
    k32.GetCurrentProcess.restype = wintypes.HANDLE
    k32.CloseHandle.argtypes = (wintypes.HANDLE,)
    return k32


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    k32 = _kernel32()
    handle = k32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return ctypes.get_last_error() == _ERROR_ACCESS_DENIED  # exists, but protected; else no such process
    try:
        code = wintypes.DWORD()
        if not k32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == _STILL_ACTIVE
    finally:
        k32.CloseHandle(handle)


def _windows_creation_time(pid: int) -> int | None:
    try:
        import ctypes
        from ctypes import wintypes

        k32 = _kernel32()
        handle = k32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            return None
        try:
            times = [wintypes.FILETIME() for _ in range(4)]
            if not k32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
                return None
            return (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime
        finally:
            k32.CloseHandle(handle)
    except (OSError, AttributeError, ValueError):
        return None


def _windows_peak_working_set() -> int | None:
    try:
        import ctypes
        from ctypes import wintypes

        class ProcessMemoryCounters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                        ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                        ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                        ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                        ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

        psapi = ctypes.WinDLL("psapi", use_last_error=True)  # type: ignore[attr-defined]
        psapi.GetProcessMemoryInfo.argtypes = (wintypes.HANDLE, ctypes.POINTER(ProcessMemoryCounters),
                                               wintypes.DWORD)
        psapi.GetProcessMemoryInfo.restype = wintypes.BOOL
        counters = ProcessMemoryCounters()
        counters.cb = ctypes.sizeof(counters)
        if not psapi.GetProcessMemoryInfo(_kernel32().GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None
        return int(counters.PeakWorkingSetSize)
    except (OSError, AttributeError, ValueError):
        return None
