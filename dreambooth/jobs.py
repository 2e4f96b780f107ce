"""Start, watch and stop training runs as separate worker processes.

The caller (the WebUI tab, the HTTP API, the standalone UI) returns at once, and an out-of-memory error or a crash
ends the worker, never the caller. The worker is ``python -m dreambooth train NAME ...`` (the same one the CLI runs);
it talks back through the model dir: ``status.json``, ``logs/`` and ``samples/``. Its stdout and stderr are appended
to ``logs/worker.log``. "Generate samples now" is a job of the same kind (``job="sample"``: ``python -m dreambooth
sample NAME``, :mod:`sample_job`), with the same lock, status and controls.

Locking: :func:`start` takes the model's ``train.lock`` (see :mod:`lock`) before the worker exists and writes the
worker's pid into it, so a second start is refused while that process lives, and the lock goes stale by itself when
the worker ends or crashes. The lock's token reaches the worker in ``$DREAMBOOTH_LOCK_TOKEN``, so a worker that takes
the lock itself (and removes it at its end) takes over this one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import gpus, lock, platform_compat
from .atomic import write_json
from .config import ATTENTION_MODES, load_concepts_file, load_config
from .errors import ConfigError, UserError
from .run_states import ACTIVE_STATES
from .store import ModelDir
from .train.status import CANCEL_FILE, clear_requests_of, read_status, request_cancel, request_pause, request_unpause

log = logging.getLogger(__name__)

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that contains this copy of the package
WORKER_LOG = "worker.log"
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 8000
JOBS = ("train", "sample")  # the worker's commands
WHAT = {"train": "training", "sample": "sampling"}
CANCEL_KILL_AFTER_S = 60.0  # Windows: a worker still loading this long after a cancel is ended (it has no SIGTERM)

_children: dict[int, subprocess.Popen] = {}  # workers started by this process, kept to reap them (no zombies)
_exit_codes: dict[int, int] = {}  # pid -> exit code of the workers reaped so far
_children_lock = threading.Lock()


class AlreadyRunning(UserError):
    """A training of this model is already running."""


class NotRunning(UserError):
    """A pause, resume or cancel for a model that is not training."""


def worker_command(model: ModelDir, *, models_root: Path, resume: bool, device: str | None,
                   export_dir: Path | None, attention_default: str | None, lora_dir: Path | None = None,
                   embeddings_dir: Path | None = None, hypernetworks_dir: Path | None = None,
                   job: str = "train") -> list[str]:
    """The worker's command line (tests replace this to start a stand-in)."""
    cmd = [sys.executable, "-m", "dreambooth", job, model.name, "--models-root", str(models_root)]
    if job == "sample":
        return cmd + (["--device", device] if device else []) + (
            ["--attention-default", attention_default] if attention_default else [])
    if resume:
        cmd.append("--resume")
    if device:
        cmd += ["--device", device]
    if export_dir is not None:
        cmd += ["--export-dir", str(export_dir)]
    if lora_dir is not None:
        cmd += ["--lora-dir", str(lora_dir)]
    if embeddings_dir is not None:
        cmd += ["--embeddings-dir", str(embeddings_dir)]
    if hypernetworks_dir is not None:
        cmd += ["--hypernetworks-dir", str(hypernetworks_dir)]
    if attention_default:
        cmd += ["--attention-default", attention_default]
    return cmd


def _check_config(model: ModelDir, resume: bool, job: str) -> list[str]:
    """Refuse a config the worker would refuse, before a process is started (a training run: ``preflight.py``);
    the notes the run should show."""
    from .preflight import check_run

    cfg = load_config(model.path)
    concepts = load_concepts_file(cfg.concepts_list_file) if cfg.concepts_list_file else cfg.concepts
    if not concepts:
        raise ConfigError(f"model {model.name!r} has no concepts to train",
                          "add a concept with an instance images folder and prompt")
    return check_run(model, cfg, resume) if job == "train" else []


def _check_device_free(model: ModelDir, device: str | None) -> None:
    """Refuse a start on a GPU another model trains on now (the worker takes the device lock itself; this only
    answers at once instead of through a failed run)."""
    chosen = [] if device else gpus.parse(load_config(model.path).gpus)  # the GPUs setting, without a device
    for key in [lock.device_key(f"cuda:{n}") for n in chosen] if chosen else [lock.device_key(device)]:
        busy = lock.device_holder(model.path.parent, key)
        if busy is not None and busy.get("model") != model.name:
            raise AlreadyRunning(f"{key} is busy: model {busy.get('model')!r} is training on it (pid {busy['pid']})",
                                 "wait for that training to finish or cancel it, or pick another GPU")


def _worker_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)  # it would keep the working dir (our package's parent) off sys.path
    parts = [str(PACKAGE_PARENT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env[lock.TOKEN_ENV] = token
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows what happened up to a crash
    return env


def start(model: ModelDir, *, models_root: Path, resume: bool = False, device: str | None = None,
          export_dir: Path | None = None, attention_default: str | None = None, lora_dir: Path | None = None,
          embeddings_dir: Path | None = None, hypernetworks_dir: Path | None = None, job: str = "train") -> int:
    """Start a worker that trains ``model`` (``job="sample"``: makes its previews now); return its pid at once.

    The config and the concepts are checked first (``preflight.py``), so a bad one is refused before any process
    starts. Raises AlreadyRunning while another worker trains this model. ``status.json`` says ``starting`` when
    this returns, with the checks' notes in its ``note``.
    """
    _reap()
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    if attention_default is not None and attention_default not in ATTENTION_MODES:  # the worker's --attention-default
        raise UserError(f"attention default {attention_default!r} is not one of {', '.join(ATTENTION_MODES)}",
                        "fix the host's attention setting")
    _check_device_free(model, device)
    try:
        held = lock.acquire(model.path)
    except lock.Locked as err:
        busy = WHAT.get((read_status(model) or {}).get("job"), "training")  # a training, or a sampling job
        raise AlreadyRunning(f"{model.name!r} is already {busy} (pid {err.holder['pid']})",
                             "wait for it to finish, or cancel it first") from None
    other = _unlocked_trainer_pid(model)
    if other is not None and other != os.getpid():
        held.release()
        raise AlreadyRunning(f"{model.name!r} is already training (pid {other})",
                             "wait for it to finish, or cancel it first")
    try:
        notes = _check_config(model, resume, job)  # under the lock: one start scans the images, a second is refused
        clear_requests_of(model)  # meant for an earlier run; the worker keeps whatever is asked from now on
        cmd = worker_command(model, models_root=Path(models_root), resume=resume, device=device,
                             export_dir=export_dir, attention_default=attention_default, lora_dir=lora_dir,
                             embeddings_dir=embeddings_dir, hypernetworks_dir=hypernetworks_dir, job=job)
        model.logs.mkdir(parents=True, exist_ok=True)
        started = time.time()
        write_json(model.status_path, {"state": "starting", "message": f"starting the {WHAT[job]} process",
                                       "pid": None, "started_at": started, "samples": [], "resume": resume,
                                       "launch_token": held.token, "job": job, "note": "; ".join(notes)})
        with open(model.logs / WORKER_LOG, "ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log_file.flush()
            # its own process group: Ctrl-C in the host's terminal does not reach the worker
            proc = subprocess.Popen(cmd, cwd=str(PACKAGE_PARENT), stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, env=_worker_env(held.token),
                                    **platform_compat.new_process_group())
    except BaseException as err:
        held.release()
        if isinstance(err, OSError):
            _write_failed(model, f"could not start the {WHAT[job]} process: {err}")
            raise UserError(f"could not start the {WHAT[job]} process: {err}", "see the host's log") from err
        raise
    with _children_lock:
        _children[proc.pid] = proc
    held.hand_over(proc.pid)
    current = read_status(model)
    if current is not None and current.get("launch_token") == held.token and current.get("pid") is None:
        current["pid"] = proc.pid
        write_json(model.status_path, current)
    log.info("started %s of %s (pid %d)", WHAT[job], model.name, proc.pid)
    return proc.pid


def _write_failed(model: ModelDir, message: str) -> None:
    write_json(model.status_path, {"state": "failed", "message": message, "pid": None, "samples": [],
                                   "updated_at": time.time()})


def _reap() -> None:
    """Collect the exit status of workers that ended, so they do not linger as zombies."""
    with _children_lock:
        for pid, proc in list(_children.items()):
            code = proc.poll()
            if code is not None:
                _exit_codes[pid] = code
                del _children[pid]


def exit_code(pid: int, wait: float = 0.0) -> int | None:
    """The exit code of a worker this process started and that has ended (None if unknown or still running).

    ``wait``: seconds to wait for it. A worker whose main thread has ended counts as dead at once, but its exit
    code comes only when its last thread is gone (a moment later, after torch's threads).
    """
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None and wait > 0:
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    _reap()
    return _exit_codes.get(pid)


def worker_pid(model: ModelDir) -> int | None:
    """The pid of the live process that trains ``model`` (the holder of ``train.lock``, else see
    :func:`_unlocked_trainer_pid`), or None."""
    _reap()
    info = lock.holder(model.path)
    return int(info["pid"]) if info is not None else _unlocked_trainer_pid(model)


def _unlocked_trainer_pid(model: ModelDir) -> int | None:
    """For a run that did not take the lock (a trainer started directly, e.g. ``python -m dreambooth train`` in a
    terminal): the process ``status.json`` names while it says the run is active, if that process still runs and
    started before the run did (so a reused pid does not count)."""
    current = read_status(model) or {}
    pid, started = current.get("pid"), current.get("started_at")
    if current.get("state") not in ACTIVE_STATES or not isinstance(pid, int) or not platform_compat.pid_alive(pid):
        return None
    began = platform_compat.process_started_at(pid)
    if began is not None and isinstance(started, (int, float)) and began > started + 5:
        return None
    return pid


def running(model: ModelDir) -> bool:
    """Whether a live process trains ``model`` (a worker started by any process, or a trainer run directly)."""
    return worker_pid(model) is not None


def log_tail(model: ModelDir, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of ``logs/worker.log`` (at most LOG_TAIL_CHARS characters)."""
    path = model.logs / WORKER_LOG
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4 * LOG_TAIL_CHARS))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-LOG_TAIL_CHARS:]


def status(model: ModelDir) -> dict[str, Any]:
    """``status.json`` plus ``running``. A worker that died while its status still said it was active is
    reported as ``failed`` (or ``cancelled`` when a cancel was asked for), with the tail of ``logs/worker.log``."""
    is_running = running(model)
    current = read_status(model)
    if current is None:
        return {"state": "idle", "message": "not trained yet", "running": is_running}
    current = {k: v for k, v in current.items() if k != "launch_token"}
    current["running"] = is_running
    if not is_running and current.get("state") in ACTIVE_STATES:
        pid = current.get("pid")
        if (model.path / CANCEL_FILE).exists() or current.get("cancel_requested"):
            current.update(state="cancelled", message=f"cancelled (the training process ended while "
                                                      f"{current.get('state')})")
        else:
            code = exit_code(pid, wait=2.0) if isinstance(pid, int) else None
            how = f"with exit code {code}" if code is not None else "unexpectedly"
            current.update(state="failed", message=f"the training process (pid {pid}) ended {how} while "
                                                   f"{current.get('state')}; see {model.logs / WORKER_LOG}")
            current["log_tail"] = log_tail(model)
    elif current.get("state") == "failed":
        current["log_tail"] = log_tail(model)
    return current


def _require_running(model: ModelDir, what: str) -> int:
    pid = worker_pid(model)
    if pid is None:
        raise NotRunning(f"cannot {what} {model.name!r}: it is not training", "start a training first")
    return pid


def cancel(model: ModelDir) -> None:
    """Ask the worker to stop at the next step (it saves first if the config says so)."""
    pid = _require_running(model, "cancel")
    request_cancel(model)
    current = read_status(model) or {}
    if current.get("state") == "starting":
        # The worker honours the request from its first step on, but loading a model takes a while. On Linux and
        # macOS SIGTERM cancels at once (before its handler is installed it ends the process); on Windows os.kill
        # would terminate the worker outright, so it gets time to begin and is ended only if it is still loading
        # after CANCEL_KILL_AFTER_S. The mark in status.json tells status() that such an end was a cancel; once the
        # worker writes its own status it reports the cancel itself.
        write_json(model.status_path, {**current, "cancel_requested": True})
        if platform_compat.signals_stop_gracefully():
            _signal(pid, signal.SIGTERM)
        else:
            _end_if_still_starting(model, pid, CANCEL_KILL_AFTER_S)


def _end_if_still_starting(model: ModelDir, pid: int, after: float) -> None:
    """A thread that ends worker ``pid`` if it has neither ended nor begun its run ``after`` seconds from now (a
    worker that began reads the cancel request at its next step and stops by itself, saving if it should)."""

    def still_starting() -> bool:
        return worker_pid(model) == pid and (read_status(model) or {}).get("state") == "starting"

    def watch() -> None:
        end = time.monotonic() + after
        while time.monotonic() < end:
            if not still_starting():
                return
            time.sleep(0.2)
        if still_starting():
            log.warning("cancel: the training process of %s (pid %d) is still starting after %.0f s; ending it",
                        model.name, pid, after)
            try:
                platform_compat.kill(pid)
            except OSError as err:
                log.warning("could not end pid %d: %s", pid, err)

    threading.Thread(target=watch, name=f"dreambooth-cancel-{model.name}", daemon=True).start()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as err:
        log.warning("could not signal pid %d: %s", pid, err)


def pause(model: ModelDir) -> None:
    """Ask the worker to pause at the next step boundary (a sampling job has none: refused)."""
    _require_running(model, "pause")
    if (read_status(model) or {}).get("job") == "sample":
        raise NotRunning(f"{model.name!r} is making previews, which cannot pause", "cancel it, or let it finish")
    request_pause(model)


def unpause(model: ModelDir) -> None:
    """Let a paused worker go on."""
    _require_running(model, "resume")
    request_unpause(model)


def wait(model: ModelDir, timeout: float, poll: float = 0.2) -> dict[str, Any]:
    """Poll until the worker has ended (or ``timeout`` seconds passed); return :func:`status` then."""
    end = time.monotonic() + timeout
    while True:
        current = status(model)
        if not current["running"] or time.monotonic() >= end:
            return current
        time.sleep(poll)

