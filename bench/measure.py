"""Timing and memory of one benchmark row: step times without a host sync per step, peak device memory."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dreambooth.compat import is_out_of_memory
from dreambooth.platform_compat import peak_rss_bytes

from .memory import LiveTensorTracker, Roles


class Enough(Exception):
    """Raised by the clock once the measured steps are done (it ends our trainer's loop from inside)."""


@dataclass
class StepClock:
    """Times ``warmup`` + ``steps`` optimizer steps, and tracks the tensors of the last warm-up step.

    On a GPU each step is bracketed by CUDA events (recorded on the stream, no host sync); the device is synchronised
    only after the first step (time to first step), at the end of the warm-up and at the end, so the window's wall
    time is what a training run sees. On the CPU steps are timed with ``perf_counter``.

    The last warm-up step (the caches are full and the optimizer has its state by then) runs inside a
    :class:`LiveTensorTracker` when ``roles`` is set (the loop under test sets it once its models and optimizer
    exist): its peak tensor bytes and their split. The tracker's bookkeeping slows that step down; it is outside the
    measured window. ``steps=0``: memory only, no timing.
    """

    device: torch.device
    warmup: int
    steps: int
    roles: Callable[[], Roles] | None = None
    tracker: LiveTensorTracker | None = None
    started: float = field(default_factory=time.perf_counter)  # the row's start: before any model is loaded
    done: int = 0
    first_step_s: float | None = None
    window_s: float | None = None
    _events: list[tuple] = field(default_factory=list)
    _cpu_times: list[float] = field(default_factory=list)
    _window_start: float = 0.0
    _step_start: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def before_step(self) -> None:
        if self.done == self.warmup - 1 and self.roles is not None:
            self._sync()
            self.tracker = LiveTensorTracker(self.device, self.roles)
            self.tracker.__enter__()
        if self.done == self.warmup:
            self._sync()
            self._window_start = time.perf_counter()
        if self.done >= self.warmup:
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                self._events.append((start, None))
            else:
                self._step_start = time.perf_counter()

    def after_step(self) -> bool:
        """Count a finished step; True when every measured step is done."""
        if self.tracker is not None and self.done == self.warmup - 1:
            self._sync()
            self.tracker.__exit__(None, None, None)
        if self.done >= self.warmup:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events[-1] = (self._events[-1][0], end)
            else:
                self._cpu_times.append(time.perf_counter() - self._step_start)
        self.done += 1
        if self.done == 1:
            self._sync()
            self.first_step_s = time.perf_counter() - self.started
        if self.done == self.warmup + self.steps:
            self._sync()
            self.window_s = time.perf_counter() - self._window_start if self.steps else None
            return True
        return False

    def close(self) -> None:
        """Leave the tracker if the step it tracked ended in an error (the mode must not outlive the row)."""
        if self.tracker is not None and self.done == self.warmup - 1:
            self.tracker.__exit__(None, None, None)
            self.tracker = None

    def step_times(self) -> list[float]:
        if self.cuda:
            return [start.elapsed_time(end) / 1000 for start, end in self._events]
        return list(self._cpu_times)

    def result(self, batch: int) -> dict:
        times = self.step_times()
        out = {"samples_per_s": None, "step_time_s": None, "step_time_min_s": None, "step_time_max_s": None,
               "time_to_first_step_s": self.first_step_s, "warmup_steps": self.warmup, "measured_steps": self.steps}
        if self.steps:
            if not times or not self.window_s:
                raise RuntimeError("the clock measured no steps")
            out.update(samples_per_s=self.steps * batch / self.window_s, step_time_s=statistics.median(times),
                       step_time_min_s=min(times), step_time_max_s=max(times))
        if self.tracker is not None:
            out.update(self.tracker.result())
        return out

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def free_memory(device: torch.device) -> None:
    """Give back what the previous row held, and start this row's peak from here (a GPU's; the CPU has no per-row
    peak, and a full garbage collection there costs more than the tiny models' steps)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak allocated / reserved bytes since :func:`free_memory`; None on the CPU (no per-row peak exists there:
    the process's RSS high-water mark never comes down between rows), with the process's peak RSS for context."""
    if device.type == "cuda":
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "process_peak_rss_bytes": peak_rss_bytes()}


def is_oom(err: BaseException | None) -> bool:
    """Whether ``err`` or what caused it is an out-of-memory error (our trainer re-raises one as a UserError)."""
    while err is not None:
        if is_out_of_memory(err) or "out of memory" in str(err).lower():
            return True
        err = err.__cause__
    return False
