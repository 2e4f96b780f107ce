"""Data-parallel training: one run in N processes (one per GPU with NCCL, or N on the CPU with gloo), started by
torch's launcher (``train/launch.py``; ``torchrun`` or ``accelerate launch`` work the same way).

Every process runs the whole run: the same config, models, data order and random draws. A batch of the run is the
*global* batch (batch size x processes); each process takes its rows of it (:meth:`Ranks.pieces`), draws the noise
and augmentation of the whole batch and keeps its rows', and weights its loss by its share of the whole batch, so the
gradients summed over the processes (:meth:`Ranks.sum_`) are the whole batch's: the step, the step count and the
learning-rate schedule are those of one process at the global batch. Buckets stay whole: a batch holds one bucket.

Only rank 0 writes: status, loss log, previews, saves, resume states, exports; it holds the model's lock and the
locks of every GPU in use. The others never write into the model dir: they get :class:`QuietStatus` and
:class:`ProcessSignals` here, and the loop's rank-0-only parts are marked by ``ranks.main`` / :meth:`Ranks.by_main`
(the locks, class images, crash repair, ``_end_of_epoch``'s previews / saves / pauses, reports, the cancel save).

How they stay together: at every point where the run may take another way (each step's cancel / pause, each step's
outcome, the end of a rank-0-only part such as class images or a save, the end of the run) all processes
:meth:`Ranks.agree` on one code (go, pause, cancel, retry smaller, stop). A process that fails anywhere says so at
the next agreement every other process reaches (:meth:`Ranks.stop`), so all end with one message, which rank 0
writes. A process killed outright breaks the group: the others see a closed connection and end (:class:`PeerLost`),
and the launcher ends whatever is left. :class:`SingleProcess` is the same interface for one process: it does
nothing, and a one-process run never starts torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import platform_compat
from ..compat import is_out_of_memory
from ..errors import UserError
from ..store import ModelDir
from .options import pick_device
from .resume import ResumeState, latest_state, load_state
from .status import Cancelled, Controls, StatusWriter

log = logging.getLogger(__name__)

GO, PAUSE, CANCEL, RETRY, STOP = range(5)  # what the processes agree on; the highest code any process sends wins
CONTROL_TIMEOUT = datetime.timedelta(hours=24)  # others wait this long for rank 0's class images, previews, saves
BUCKET_BYTES = 64 * 2**20  # gradients are summed in flat buckets of at most this size
RESUME_HINT = "see logs/worker.log; then continue with --resume (with the same or another number of processes)"


class Stopped(UserError):
    """Another process stopped the run; the message is its own."""


class PeerLost(UserError):
    """Another process ended without a word (killed, out of memory, crashed): the group is broken."""


class OutOfMemoryElsewhere(RuntimeError):
    """Another process ran out of memory in this step: every process retries it smaller, or stops, together."""


def launched() -> bool:
    """Whether this process is one of several started by torch's launcher (``$WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_environment(device: str | None = None) -> SingleProcess:
    """The processes of this run: :class:`Ranks` under torch's launcher (``device``: "cpu" for the CPU, else each
    process's GPU), else :class:`SingleProcess`."""
    return Ranks(device) if launched() else SingleProcess()


def global_batch(batch_size: int, processes: int, saved: Mapping[str, Any] | None) -> tuple[int, str]:
    """The run's global batch, and a note when it is not ``batch_size x processes``: a run resumed with another
    number of processes keeps the global batch it was saved with (its steps, schedule and position stay valid; each
    process takes its share of it)."""
    planned = batch_size * processes
    then = int(saved.get("processes", 1)) if saved else processes
    if then == processes:
        return planned, ""
    batch = int(saved.get("global_batch", batch_size * then)) if saved else planned
    return batch, (f"resumed with {processes} process(es) a run saved with {then}: it keeps its global batch of "
                   f"{batch}, {math.ceil(batch / processes)} image(s) per process and step, and goes on as planned")


def _backends(*groups: Any) -> list[Any]:
    """The backends of ``groups`` (gloo's, NCCL's), to be freed after the groups themselves.

    torch 2.1 frees a group's backend while the caller holds the GIL, and waits there for the backend's worker
    threads; a gloo worker thread that still holds the last collective's tensors needs the GIL to let them go: a
    deadlock at the end of the run (1 run in 10 on a loaded 2-core CPU). A backend whose last reference is dropped
    from Python instead is freed by its own binding, which releases the GIL while it waits for its threads."""
    found = []
    for group in groups:
        for kind in ("cpu", "cuda"):
            with contextlib.suppress(Exception):  # no backend for that device (or a torch without _get_backend)
                found.append(group._get_backend(torch.device(kind)))
    return found


class QuietStatus:
    """The status of a process other than rank 0: kept in memory, never written (rank 0 writes the run's)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def update(self, force: bool = False, **fields: Any) -> None:
        self.status.update(fields)

    def due(self) -> bool:
        return False

    def log_loss(self, step: int, epoch: int, loss: float, lrs: list[float]) -> None:
        pass

    def truncate_loss_log(self, step: int) -> int:
        return 0

    def start_new_loss_log(self, trained_before: int, no_resume_state_in: Path | None = None) -> Path | None:
        return None

    def note(self, text: str | None) -> None:
        if text:
            self.status["note"] = f"{self.status['note']}; {text}" if self.status.get("note") else text

    def close(self) -> None:
        pass


class ProcessSignals:
    """Cancel signals of a process other than rank 0: asked for at the next agreement; no request files (those are
    rank 0's to read and remove)."""

    pause_requested = False

    def __init__(self, install_signal_handlers: bool) -> None:
        self.cancel_requested = False
        self._previous: dict[int, Any] = {}
        if install_signal_handlers:
            for sig in platform_compat.cancel_signals():
                with contextlib.suppress(ValueError):  # not the main thread
                    self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.cancel_requested = True

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class SingleProcess:
    """A run in one process: every method is the plain thing (no torch.distributed at all)."""

    rank, world = 0, 1
    main = True

    def device(self, requested: str | None) -> torch.device:
        return pick_device(requested)

    def other_gpus(self) -> list[str]:
        """The run's GPUs besides this process's own, whose locks rank 0 holds too."""
        return []

    def controls(self, model: ModelDir, install_signal_handlers: bool, clear_requests: bool) -> Any:
        return Controls(model, install_signal_handlers, clear_requests=clear_requests)

    def status_writer(self, model: ModelDir, device: torch.device) -> Any:
        return StatusWriter(model, device)

    def status_fields(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def agree(self, code: int, wait: float = 0.0) -> int:
        if wait:
            time.sleep(wait)
        return code

    def check_controls(self, controls: Any, status: Any) -> None:
        """Cancel or pause at a step boundary: rank 0's request files, or a signal to any process (all agree on
        it); raises :class:`Cancelled`, holds the run while paused."""
        request = self.agree(_request(controls))
        if request == PAUSE:
            status.update(force=True, state="paused", message="paused by the user")
            while (request := self.agree(_request(controls), wait=0.2)) == PAUSE:
                pass
            if request != CANCEL:
                status.update(force=True, state="running", message="resumed")
        if request == CANCEL:
            raise Cancelled()

    def stop(self, code: int = STOP, error: BaseException | None = None) -> None:
        """Tell the other processes this one stops (none here)."""

    def together(self, attempt: Callable[[], None]) -> None:
        attempt()

    def by_main(self, part: Callable[[], Any]) -> None:
        """A part of the run only rank 0 does (class images); the others wait for it."""
        part()

    def resume_state(self, checkpoints: Path) -> ResumeState | None:
        return latest_state(checkpoints)

    def pieces(self, batch: Sequence[Any], micro_batch: int) -> Iterator[tuple[Sequence[Any], slice, float]]:
        """This process's pieces of a batch of the run, each as (the examples its random draws are made for, its
        rows of them, its weight: its share of the batch), ``micro_batch`` images at most per piece."""
        for start in range(0, len(batch), micro_batch):
            piece = batch[start:start + micro_batch]
            yield piece, slice(None), len(piece) / len(batch)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors (gradients, losses) over the processes, in place."""

    def check_same(self, params: list[torch.Tensor]) -> None:
        """Refuse to train when the processes do not start from the same weights."""

    def state(self, batch: int) -> dict[str, Any]:
        """What a resume state records of the run's shape (:func:`global_batch` reads it)."""
        return {"processes": self.world, "global_batch": batch}


class Ranks(SingleProcess):
    """This process's part of a data-parallel run, from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""

    def __init__(self, device: str | None = None) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.main = self.rank == 0
        self.stop_known = False  # every process knows the run stops: no agreement needed to say so
        self.broken = False  # a process is gone: no more collectives
        self.control: Any = None  # the gloo group of the agreements (the default group on the CPU)
        self.pids: list[tuple[int, str]] = []
        if device and device.strip().lower().startswith("cpu"):
            self._device = torch.device("cpu")
        elif not torch.cuda.is_available():
            raise UserError(f"started as {self.world} processes, and this machine has no CUDA GPU",
                            "train on the CPU with --device cpu, or with one process")
        else:
            self._device = torch.device("cuda", self.local_rank)  # each process sees the GPUs of its machine

    # ------------------------------------------------------------------------------------------------ setup
    def device(self, requested: str | None) -> torch.device:
        return self._device

    def other_gpus(self) -> list[str]:
        if self._device.type != "cuda":
            return []
        return [f"cuda:{i}" for i in range(self.local_world) if i != self.local_rank]  # this machine's

    def controls(self, model: ModelDir, install_signal_handlers: bool, clear_requests: bool) -> Any:
        if self.main:
            return Controls(model, install_signal_handlers, clear_requests=clear_requests)
        return ProcessSignals(install_signal_handlers)

    def status_writer(self, model: ModelDir, device: torch.device) -> Any:
        return StatusWriter(model, device) if self.main else QuietStatus()

    def status_fields(self) -> dict[str, Any]:
        return {"processes": self.world, "pids": [pid for pid, _ in self.pids]}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The process group for the run; a process that fails tells the others, and all end together."""
        import torch.distributed as dist

        device = self._device
        # NCCL on GPUs where torch has it; gloo on the CPU, and on GPUs without NCCL (Windows builds)
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # gloo carries the agreements, where the others may wait long for rank 0; NCCL keeps its own timeout
        dist.init_process_group(backend, **({"timeout": CONTROL_TIMEOUT} if backend == "gloo" else {}))
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend != "gloo" else None
        try:
            self.pids = [(int(p), str(h)) for p, h in self._gather((os.getpid(), socket.gethostname()))]
            log.info("process %d of %d (%s, pid %d)", self.rank + 1, self.world, device, os.getpid())
            yield
        except BaseException as err:
            self.stop(STOP, err)
            raise
        finally:
            self._finish()
            backends = _backends(*[g for g in (dist.group.WORLD, self.control) if g is not None])
            self.control = None  # no reference to a group is left but torch's own, which the next line drops
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            backends.clear()  # the last references to the backends: they end with the GIL released

    # ------------------------------------------------------------------------------------------------ agreeing
    def _gather(self, item: Any) -> list[Any]:
        """Every process's ``item`` (in rank order), over the gloo group; a process that is gone raises PeerLost."""
        import torch.distributed as dist

        if self.broken:
            raise PeerLost("a training process ended unexpectedly; training stopped", RESUME_HINT)
        items: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(items, item, group=self.control)
        except RuntimeError as err:
            self.broken = True
            raise PeerLost(self._lost(err), RESUME_HINT) from err
        return items

    def _lost(self, err: BaseException) -> str:
        host = socket.gethostname()
        gone = [i for i, (pid, h) in enumerate(self.pids) if h == host and not platform_compat.pid_alive(pid)]
        who = (", ".join(f"{i + 1} (pid {self.pids[i][0]})" for i in gone) if gone else "")
        what = f"training process {who} of {self.world}" if who else "another training process"
        return (f"{what} ended unexpectedly (killed, out of memory or crashed); training stopped, the last save (if "
                f"any) is intact [{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}]")

    def _exchange(self, code: int, error: BaseException | None = None, payload: Any = None
                  ) -> tuple[int, list[Any]]:
        message = hint = None
        if error is not None:
            message = error.message if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            hint = error.hint if isinstance(error, UserError) else RESUME_HINT
        items = self._gather((code, message, hint, payload))
        agreed = max(item[0] for item in items)
        if agreed in (CANCEL, STOP):
            self.stop_known = True
        if agreed == STOP and code != STOP:  # another process stopped: its message is the run's
            first = next(i for i, item in enumerate(items) if item[0] == STOP)
            _, message, hint, _ = items[first]
            raise Stopped(f"training process {first + 1} of {self.world} stopped the run: {message}",
                          hint or RESUME_HINT)
        return agreed, items

    def agree(self, code: int, wait: float = 0.0) -> int:
        """Every process's code, the highest wins: rank 0's cancel or pause, a signal's cancel on any process."""
        if wait:
            time.sleep(wait)
        return self._exchange(code)[0]

    def stop(self, code: int = STOP, error: BaseException | None = None) -> None:
        """This process leaves the run (a failure, or rank 0's own cancel): the others hear it at their next
        agreement. Nothing to say when they know already, or when the group is broken."""
        if self.stop_known or self.broken:
            return
        if code == CANCEL:
            self._exchange(CANCEL)  # a lost process raises PeerLost: then the run failed, it was not cancelled
            return
        with contextlib.suppress(Exception):
            self._exchange(STOP, error)

    def _finish(self) -> None:
        """The last agreement: rank 0 has written everything when the others go. A process that stops while the
        others finish (rank 0's last save failing) says so first, then finishes too: wait for that."""
        with contextlib.suppress(PeerLost):
            while not self.broken and any(item[0] != GO for item in self._gather((GO, None, None, None))):
                pass

    def together(self, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` (a step's forward and backward) here; then all processes go on, retry smaller (someone ran
        out of memory) or stop (someone failed), together."""
        error: Exception | None = None
        try:
            attempt()
        except Exception as err:  # noqa: BLE001 - every process must hear of it before anyone goes on
            error = err
        code = GO if error is None else RETRY if is_out_of_memory(error) else STOP
        agreed, items = self._exchange(code, error)
        if agreed == GO:
            return
        if error is not None:
            raise error
        first = next(i for i, item in enumerate(items) if item[0] == RETRY)
        raise OutOfMemoryElsewhere(f"training process {first + 1} of {self.world} ran out of memory: {items[first][1]}")

    def by_main(self, part: Callable[[], Any]) -> None:
        if self.main:
            part()
        self._exchange(GO)

    def resume_state(self, checkpoints: Path) -> ResumeState | None:
        """Rank 0 finds the newest readable state (and removes what a crash left); the others read the same one."""
        state = latest_state(checkpoints) if self.main else None
        _, items = self._exchange(GO, payload=str(state.path) if state is not None else None)
        path = items[0][3]
        if self.main or path is None:
            return state
        return load_state(Path(path))

    # ------------------------------------------------------------------------------------------------ the step
    def rows(self, n: int) -> tuple[int, int]:
        """This process's rows of a batch of ``n``: consecutive, as even as can be (the first ones get the rest)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def pieces(self, batch: Sequence[Any], micro_batch: int) -> Iterator[tuple[Sequence[Any], slice, float]]:
        start, end = self.rows(len(batch))
        if start == end:  # a batch smaller than the processes: its row 0 at weight 0 keeps the draws in step
            yield batch, slice(0, 1), 0.0
        for first in range(start, end, micro_batch):
            last = min(first + micro_batch, end)
            yield batch, slice(first, last), (last - first) / len(batch)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum over the processes in place, in flat buckets per device and dtype (half precision summed in fp32)."""
        import torch.distributed as dist

        kinds: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            kinds.setdefault((t.device, t.dtype), []).append(t)
        for (_, dtype), group in kinds.items():
            wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            for bucket in _buckets(group, BUCKET_BYTES // torch.empty((), dtype=wide).element_size()):
                flat = torch.cat([t.reshape(-1).to(wide) for t in bucket])
                try:
                    dist.all_reduce(flat)
                except RuntimeError as err:
                    self.broken = True
                    raise PeerLost(self._lost(err), RESUME_HINT) from err
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def check_same(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            mark = [float(torch.stack([p.detach().double().sum() for p in params]).sum()),
                    float(torch.stack([p.detach().double().square().sum() for p in params]).sum())] if params else []
        _, items = self._exchange(GO, payload=(len(params), mark))
        if any(item[3] != items[0][3] for item in items):
            raise UserError("the training processes did not start from the same weights (a model file that changed "
                            "while they loaded it, or processes started from different folders)",
                            "start the training again; all processes must see the same model dir")


def _request(controls: Any) -> int:
    return CANCEL if controls.cancel_requested else PAUSE if controls.pause_requested else GO


def _buckets(tensors: list[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    count = 0
    for t in tensors:
        if bucket and count + t.numel() > size:
            yield bucket
            bucket, count = [], 0
        bucket.append(t)
        count += t.numel()
    if bucket:
        yield bucket
