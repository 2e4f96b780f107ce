"""Concise console lines for a run, from successive ``status.json`` snapshots: for the WebUI's console, where users
watch what happens (the worker's own output goes to ``logs/worker.log``).

:class:`ProgressLines` remembers what it has said, so each event (a new state or message, an export, the end) is
said once however often the status is read, and a progress line (step, loss, it/s, ETA) at most every
``every_s`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .run_states import FINAL_STATES

# states whose message changes as they go (one per batch of class images): said at most every ``every_s`` seconds
PROGRESS_MESSAGE_STATES = ("generating_class_images",)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "?"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(status: dict[str, Any]) -> str:
    """``step 120/800 (15%), epoch 3/20, loss 0.1234, 1.52 it/s, ETA 7:26`` from what the status holds."""
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    parts = [f"step {step:,}/{total:,} ({100 * step // total}%)" if total else f"step {step:,}"]
    if status.get("total_epochs"):
        parts.append(f"epoch {status.get('epoch', 0)}/{status['total_epochs']}")
    loss = status.get("smoothed_loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
    if status.get("it_per_s"):
        parts.append(f"{status['it_per_s']:.3g} it/s")
    if status.get("eta_s") is not None:
        parts.append(f"ETA {_duration(status['eta_s'])}")
    return ", ".join(parts)


class ProgressLines:
    """What to print for one run, given its status each time it is read."""

    def __init__(self, name: str, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = f"Dreambooth {name}: "
        self.every_s = every_s
        self._clock = clock
        self._state: str | None = None
        self._message = ""
        self._export: str | None = None
        self._note: str | None = None
        self._step: int | None = None
        self._progress_at: float | None = None
        self._message_at: float | None = None
        self.ended = False

    def lines(self, status: dict[str, Any] | None) -> list[str]:
        """The new lines for this snapshot (none when nothing new happened)."""
        if not status or self.ended:
            return []
        now = self._clock()
        state, message = str(status.get("state") or ""), str(status.get("message") or "")
        out = []
        if state != self._state:
            if state == "running":  # its progress lines say it; "saved at step 40", "resumed" are said as they are
                out += [message] if message else []
            else:
                out.append(state.replace("_", " ") + (f" - {message}" if message else ""))
            self._state, self._message, self._message_at = state, message, now
        elif message != self._message and (state not in PROGRESS_MESSAGE_STATES
                                           or self._progress_due(self._message_at, now)):
            if message:
                out.append(message)
            self._message, self._message_at = message, now
        note = status.get("note")
        if note and note != self._note:
            out.append(f"note: {note}")
        self._note = note or self._note
        export = status.get("last_export")
        if export and export != self._export:
            out.append(f"exported {export}")
        self._export = export or self._export
        step = status.get("step")
        if state in FINAL_STATES:
            self.ended = True
            if isinstance(step, int) and status.get("total_steps"):
                out.append(progress_text({k: v for k, v in status.items() if k != "eta_s"}))
        elif state == "running" and isinstance(step, int) and step != self._step and self._progress_due(
                self._progress_at, now):
            out.append(progress_text(status))
            self._step, self._progress_at = step, now
        return [self.prefix + line for line in out]

    def _progress_due(self, last: float | None, now: float) -> bool:
        """Progress is said at most every ``every_s`` seconds, and never with ``every_s`` 0."""
        return self.every_s > 0 and (last is None or now - last >= self.every_s)
