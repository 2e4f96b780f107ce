"""How a training run talks to the outside: ``status.json``, the loss log, TensorBoard, and control requests.

The worker writes; the tab, the API and the CLI read. Control goes the other way through small files in the model
dir (``cancel.request``, ``pause.request``), so any process can ask, and SIGTERM/SIGINT ask for a cancel too.
A request counts from the moment it is made, also while the worker is still starting: ``jobs.start`` removes the
requests of an earlier run before it starts the worker, and only a run started without it (a trainer run directly)
removes them itself when it starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from .. import platform_compat
from ..atomic import write_json, write_text
from ..store import ModelDir

log = logging.getLogger(__name__)

CANCEL_FILE = "cancel.request"
LOSS_HEADER = "step,epoch,loss,lr\n"
PAUSE_FILE = "pause.request"
# what ``peak_memory_mb`` in status.json measures (``peak_memory_measure``)
PEAK_CUDA_ALLOCATED = "cuda_peak_allocated"  # torch's peak allocated memory of the training GPU
PEAK_PROCESS_RSS = "process_peak_rss"  # the worker process's own peak resident memory (CPU and other devices)


class Cancelled(Exception):
    """Raised at a step boundary when the user asked to cancel."""


def request_cancel(model: ModelDir) -> None:
    (model.path / CANCEL_FILE).touch()


def request_pause(model: ModelDir) -> None:
    (model.path / PAUSE_FILE).touch()


def request_unpause(model: ModelDir) -> None:
    platform_compat.unlink(model.path / PAUSE_FILE, missing_ok=True)


def read_status(model: ModelDir) -> dict[str, Any] | None:
    try:
        return json.loads(platform_compat.read_bytes(model.status_path).decode("utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(peak MB, what it measures): CUDA's peak allocated memory of the training GPU, else this process's own peak
    RSS (None where it cannot be read). Never the ``ru_maxrss`` a worker inherits from the WebUI that started it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, PEAK_CUDA_ALLOCATED
    rss = platform_compat.peak_rss_bytes()
    return (rss / 2**20 if rss is not None else None), PEAK_PROCESS_RSS


def clear_requests_of(model: ModelDir) -> None:
    """Remove the cancel and pause requests (of a run that is over, or before a new one starts)."""
    for name in (CANCEL_FILE, PAUSE_FILE):
        platform_compat.unlink(model.path / name, missing_ok=True)


class Controls:
    """Cancel and pause requests: files in the model dir, plus SIGTERM / SIGINT (and Ctrl-Break on Windows) for cancel.

    ``clear_requests``: remove requests found at the start, as an earlier run's. A worker that ``jobs.start`` launched
    passes False: the launcher removed those before the worker existed, so whatever is there now was asked of this
    run while it was starting (a pause right after the start holds the run before its first step).
    """

    def __init__(self, model: ModelDir, install_signal_handlers: bool = True, clear_requests: bool = True) -> None:
        self.model = model
        self._signalled = False
        self._previous: dict[int, Any] = {}
        if clear_requests:
            clear_requests_of(model)
        if install_signal_handlers:
            for sig in platform_compat.cancel_signals():
                try:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread: files still work
                    pass

    def _on_signal(self, signum: int, frame: object) -> None:
        log.warning("signal %d: cancelling at the next step boundary", signum)
        self._signalled = True

    @property
    def cancel_requested(self) -> bool:
        return self._signalled or (self.model.path / CANCEL_FILE).exists()

    @property
    def pause_requested(self) -> bool:
        return (self.model.path / PAUSE_FILE).exists()

    def close(self) -> None:
        """Remove the request files and give the signals back to whoever had them before the run."""
        clear_requests_of(self.model)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StatusWriter:
    """Writes ``status.json`` (atomically, at most every ``interval`` s unless forced) and the loss log."""

    def __init__(self, model: ModelDir, device: torch.device, interval: float = 0.5) -> None:
        self.model = model
        self.device = device
        self.interval = interval
        self.status: dict[str, Any] = {"state": "starting", "message": "", "pid": os.getpid(),
                                       "started_at": time.time(), "samples": []}
        self._last_write = 0.0
        model.logs.mkdir(parents=True, exist_ok=True)
        self._loss_path = model.logs / "loss.csv"
        self._loss_log = self._open_loss_log()
        self._tb = _tensorboard(model.logs)

    def _open_loss_log(self) -> Any:
        fh = open(self._loss_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if fh.tell() == 0:
            fh.write(LOSS_HEADER)
        return fh

    def truncate_loss_log(self, step: int) -> int:
        """Keep only the loss rows of steps up to ``step`` (a resume from there logs the later steps again), so
        each step is in ``loss.csv`` once. The file is rewritten atomically; returns how many rows were dropped.

        A row that is not ``step,epoch,loss,lr`` (a line cut off by a crash) is dropped as well.
        """
        self._loss_log.close()
        try:
            lines = self._loss_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        kept = [line for line in lines[1:] if _loss_row_step(line) is not None and _loss_row_step(line) <= step]
        dropped = max(0, len(lines) - 1) - len(kept)
        if dropped:
            write_text(self._loss_path, LOSS_HEADER + "".join(f"{line}\n" for line in kept))
            log.info("loss.csv: dropped %d row(s) after the resumed step %d", dropped, step)
        self._loss_log = self._open_loss_log()
        return dropped

    def start_new_loss_log(self, trained_before: int, no_resume_state_in: Path | None = None) -> Path | None:
        """A fresh (not resumed) run logs its own steps from 1: an earlier run's ``loss.csv`` that has rows is kept
        as ``loss_until_step_<trained_before>.csv`` (``_2``, ... if taken) and ``loss.csv`` starts empty, so no
        step number appears twice in it. Returns the kept file, if any. ``no_resume_state_in``: a resume was asked
        for and that folder has no readable resume state; the run's notes say so."""
        self._loss_log.close()
        try:
            has_rows = len(self._loss_path.read_text(encoding="utf-8", errors="replace").splitlines()) > 1
        except FileNotFoundError:
            has_rows = False
        kept = None
        if has_rows:
            kept = self._loss_path.with_name(f"loss_until_step_{trained_before}.csv")
            n = 1
            while kept.exists():
                n += 1
                kept = self._loss_path.with_name(f"loss_until_step_{trained_before}_{n}.csv")
            platform_compat.replace(self._loss_path, kept)  # a rename: the old log is whole in one place or the other
            log.info("loss.csv of the earlier run kept as %s", kept.name)
        self._loss_log = self._open_loss_log()
        if no_resume_state_in is not None:
            self.note(f"resume: no readable resume state in {no_resume_state_in}, so this run started from the "
                      "working weights at step 0" + (f"; the earlier loss log is kept as {kept.name}" if kept else ""))
        return kept

    def log_loss(self, step: int, epoch: int, loss: float, lrs: list[float]) -> None:
        self._loss_log.write(f"{step},{epoch},{loss:.6g},{';'.join(f'{lr:.6g}' for lr in lrs)}\n")
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            for i, lr in enumerate(lrs):
                self._tb.add_scalar(f"lr/group{i}", lr, step)

    def due(self) -> bool:
        """Whether a non-forced update would be written now."""
        return time.time() - self._last_write >= self.interval

    def update(self, force: bool = False, **fields: Any) -> None:
        self.status.update(fields)
        now = time.time()
        if not force and now - self._last_write < self.interval:
            return
        self.status["updated_at"] = now
        peak, measure = peak_memory(self.device)
        self.status["peak_memory_mb"] = round(peak, 1) if peak is not None else None
        self.status["peak_memory_measure"] = measure
        self._loss_log.flush()
        write_json(self.model.status_path, self.status)
        self._last_write = now

    def note(self, text: str | None) -> None:
        """Add ``text`` (if any) to the run's notes (shown under the status line until the run ends)."""
        if not text:
            return
        old = self.status.get("note")
        self.update(force=True, note=f"{old}; {text}" if old else text)

    def close(self) -> None:
        self._loss_log.close()
        if self._tb is not None:
            self._tb.close()


def _loss_row_step(line: str) -> int | None:
    """The step of a complete ``step,epoch,loss,lr`` row, else None."""
    parts = line.split(",")
    if len(parts) != 4 or not all(parts):
        return None
    try:
        float(parts[2])
        return int(parts[0])
    except ValueError:
        return None


def _tensorboard(folder: Path) -> Any:
    """A SummaryWriter when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard missing or broken: logging goes to loss.csv only
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"))
