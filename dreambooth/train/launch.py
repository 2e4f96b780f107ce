"""Start a data-parallel run: N processes of the same worker (``python -m dreambooth train ...``) through torch's
own launcher, ``torch.distributed.run`` (what ``torchrun`` and ``accelerate launch --multi_gpu`` run), and wait.

This process only launches and waits; rank 0 of the processes takes the model's lock and writes everything. One
case is left to this process: when rank 0 could not say how the run ended (rank 0 itself was killed, or the launcher
ended it after another process died while rank 0 waited on a GPU), it marks the run failed in ``status.json`` once
every process has ended, naming the process that died and how. So a run never stays "running" after its end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import platform_compat
from ..atomic import write_json
from ..gpus import Plan
from ..run_states import ACTIVE_STATES
from ..store import ModelDir
from .distributed import RESUME_HINT
from .status import CANCEL_FILE, read_status

log = logging.getLogger(__name__)

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds this copy of the package


def launcher_args(plan: Plan, worker_argv: list[str]) -> list[str]:
    """torchrun's arguments for the run: one machine, ``plan.processes`` workers, no restarts (a failed run stops;
    ``--resume`` continues it), each worker ``python -m dreambooth <worker_argv>``."""
    return ["--standalone", "--nnodes", "1", "--nproc_per_node", str(plan.processes), "--max_restarts", "0",
            "--monitor_interval", "1", "--module", "dreambooth", *worker_argv]


def run(model: ModelDir, plan: Plan, worker_argv: list[str]) -> int:
    """Train ``model`` in ``plan.processes`` processes; return the exit code for the command line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torch_run

    args = get_args_parser().parse_args(launcher_args(plan, worker_argv))
    where = f"GPUs {plan.visible_devices()}" if plan.on_gpus else "the CPU"
    log.info("training %s in %d processes on %s", model.name, plan.processes, where)
    failure: tuple[int, int, int | None] | None = None  # (rank, exit code, pid) of the process that failed first
    stopped_by: str | None = None
    try:
        with _environment(_worker_env(plan)):
            torch_run(args)
    except ChildFailedError as err:
        failure = _first_failure(err)
    except SignalException as err:
        stopped_by = getattr(err.sigval, "name", str(err.sigval))
    return _conclude(model, plan, failure, stopped_by)


def _worker_env(plan: Plan) -> dict[str, str]:
    env = {"PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), *[p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]])}
    if plan.on_gpus:
        env["CUDA_VISIBLE_DEVICES"] = plan.visible_devices() or ""
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out (torchrun would give each process one)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.processes))
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while the launcher starts the workers (they inherit it), then as before."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_failure(err: Any) -> tuple[int, int, int | None] | None:
    """(rank, exit code, pid) of the failed process that explains the run's end: one killed by a signal first (the
    others end because of it), else the earliest."""
    failures = getattr(err, "failures", None) or {}
    if not failures:
        return None
    killed = [r for r, f in failures.items() if getattr(f, "exitcode", 0) < 0]
    rank = min(killed) if killed else err.get_first_failure()[0]
    found = failures[rank]
    return int(rank), int(found.exitcode), getattr(found, "pid", None)


def _how(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"ended with exit code {code}"


def _conclude(model: ModelDir, plan: Plan, failure: tuple[int, int, int | None] | None, stopped_by: str | None
              ) -> int:
    """The exit code; and the run's end in ``status.json`` when the status still says it runs (rank 0 could not
    write it) and its writer is gone."""
    status = read_status(model) or {}
    pid = status.get("pid")
    ours = isinstance(pid, int) and (pid == os.getpid() or not platform_compat.pid_alive(pid))
    if status.get("state") in ACTIVE_STATES and ours:
        if stopped_by is not None or (model.path / CANCEL_FILE).exists() or status.get("cancel_requested"):
            by = stopped_by or "a cancel"
            state, message = "cancelled", f"cancelled (the training processes were stopped by {by})"
        elif failure is not None:
            rank, code, failed_pid = failure
            who = f"training process {rank + 1} of {plan.processes}" + (f" (pid {failed_pid})" if failed_pid else "")
            state, message = "failed", (f"{who} {_how(code)} while {status.get('state')}; training stopped, the last "
                                        "save (if any) is intact")
        else:
            state, message = "failed", f"the training processes ended while {status.get('state')}"
        write_json(model.status_path, {**status, "state": state, "message": message, "updated_at": time.time()})
        if state == "failed":
            print(f"error: {message}\nhint: {RESUME_HINT}", file=sys.stderr)
        return 0 if state == "cancelled" else 1
    if stopped_by is not None:
        return 130
    state = status.get("state")
    if failure is None:
        return 0 if state in ("done", "cancelled") else 1
    return 0 if state in ("done", "cancelled") else (failure[1] if failure[0] == 0 and failure[1] > 0 else 1)
