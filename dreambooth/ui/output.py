"""What the output panel shows, rendered from the model dir: status line and progress bar, loss chart, newest
previews with their prompts, the worker log's last lines. Plain HTML and SVG, so it looks the same in every gradio
version. No gradio here.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..run_states import ACTIVE_STATES

log = logging.getLogger(__name__)

LOSS_POINTS = 400  # the chart draws at most this many points (the loss log is bucketed to it)
LOG_TAIL_BYTES = 16384


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def message_html(text: str, kind: str = "info") -> str:
    """The one-line result of an action; ``kind`` is info, ok or error."""
    if not text:
        return "<div class='db-message'></div>"
    return f"<div class='db-message db-{kind}'>{html.escape(text, quote=False)}</div>"


def status_html(status: dict[str, Any] | None, running: bool, model: str | None) -> str:
    """Status line, progress bar and ETA. ``data-db-*`` attributes tell the page script whether to keep polling."""
    tick = time.monotonic_ns()
    if status is None:
        state, line = "idle", ("no model selected" if not model else f"{model}: not trained yet")
        status = {}
    else:
        state = str(status.get("state", "?"))
        if state in ACTIVE_STATES and not running:
            state = "stopped"  # the worker is gone without writing an end state (killed)
        line = f"{model}: {state.replace('_', ' ')}"
        if status.get("message"):
            line += f" - {status['message']}"
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    percent = 100.0 * step / total if total else (100.0 if state == "done" else 0.0)
    percent = max(0.0, min(100.0, percent))
    details = []
    if total:
        details.append(f"step {step:,}/{total:,}")
    if status.get("total_epochs"):
        details.append(f"epoch {status.get('epoch', 0)}/{status['total_epochs']}")
    if status.get("smoothed_loss") is not None:
        details.append(f"loss {status['smoothed_loss']:.4g}")
    if status.get("it_per_s"):
        details.append(f"{status['it_per_s']:.3g} it/s")
    if running and status.get("eta_s") is not None:
        details.append(f"ETA {_fmt_duration(status['eta_s'])}")
    if status.get("peak_memory_mb"):
        details.append(_peak_memory_text(status["peak_memory_mb"], status.get("peak_memory_measure")))
    note = f"<div class='db-note'>{html.escape(str(status['note']))}</div>" if status.get("note") else ""
    export = (f"<div class='db-note'>last export: {html.escape(str(status['last_export']))}</div>"
              if status.get("last_export") else "")
    return (f"<div class='db-status db-state-{html.escape(state)}' data-db-state='{html.escape(state)}' "
            f"data-db-running='{1 if running else 0}' data-db-progress='{percent:.1f}' data-db-tick='{tick}'>"
            f"<div class='db-status-line'>{html.escape(line)}</div>"
            f"<div class='db-progress'><div class='db-progress-fill' style='width:{percent:.1f}%'></div>"
            f"<span class='db-progress-text'>{percent:.1f}%</span></div>"
            f"<div class='db-progress-details'>{html.escape(' | '.join(details))}</div>{note}{export}</div>")


def _peak_memory_text(mb: float, measure: str | None) -> str:
    """Says what was measured: the GPU's peak allocated memory, or the training process's own peak RSS (the
    measure names of train/status.py, not imported here: it imports torch)."""
    size = f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:,.0f} MB"
    if measure == "cuda_peak_allocated":
        return f"peak CUDA allocated {size}"
    if measure == "process_peak_rss":
        return f"peak RSS {size} (this process)"
    return f"peak memory {size}"


# ------------------------------------------------------------------------------------------------------ loss chart


@dataclass
class _LossFile:
    offset: int = 0
    points: list[tuple[int, float]] = field(default_factory=list)
    partial: str = ""


class LossLog:
    """Reads ``logs/loss.csv`` incrementally (only what was appended since the last call), per file."""

    def __init__(self) -> None:
        self._files: dict[Path, _LossFile] = {}

    def points(self, path: Path) -> list[tuple[int, float]]:
        try:
            size = path.stat().st_size
        except OSError:
            self._files.pop(path, None)
            return []
        state = self._files.get(path)
        if state is None or size < state.offset:  # new or truncated: read from the start
            state = self._files[path] = _LossFile()
        if size > state.offset:
            with open(path, "rb") as fh:
                fh.seek(state.offset)
                chunk = fh.read(size - state.offset)
            state.offset = size
            text = state.partial + chunk.decode("utf-8", errors="replace")
            lines = text.split("\n")
            state.partial = lines.pop()  # an unfinished last line waits for the rest
            for line in lines:
                parts = line.split(",")
                try:
                    state.points.append((int(parts[0]), float(parts[2])))
                except (IndexError, ValueError):
                    continue  # the header, or a damaged line
        return state.points


def _bucket(points: list[tuple[int, float]], limit: int) -> list[tuple[float, float]]:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) <= limit:
        return [(float(s), v) for s, v in finite]
    size = len(finite) / limit
    out = []
    for i in range(limit):
        chunk = finite[int(i * size):int((i + 1) * size)] or [finite[-1]]
        out.append((sum(s for s, _ in chunk) / len(chunk), sum(v for _, v in chunk) / len(chunk)))
    return out


def loss_svg(points: list[tuple[int, float]], validation: list[tuple[int, float]] | None = None, width: int = 480,
             height: int = 150) -> str:
    """An inline SVG line chart of loss over steps (bucket means when there are many points), with the validation
    loss of each save (``logs/validation.csv``) as a second line of dots when there is one."""
    data = _bucket(points, LOSS_POINTS)
    if len(data) < 2:
        return "<div class='db-loss db-empty'>loss chart: no data yet</div>"
    valid = [(float(s), v) for s, v in validation or [] if math.isfinite(v)]
    pad_l, pad_r, pad_t, pad_b = 44, 8, 8, 20
    xs, ys = [s for s, _ in data + valid], [v for _, v in data + valid]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def px(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return pad_t + (1 - (y - y0) / (y1 - y0)) * ph

    path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(data))
    last = points[-1]
    val_svg = val_caption = ""
    if valid:
        val_path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(valid))
        dots = "".join(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='2.5' class='db-val-dot'/>" for x, y in valid)
        val_svg = f"<path d='{val_path}' class='db-val-line' fill='none' stroke-dasharray='4 3'/>{dots}"
        val_caption = f"; validation loss at step {int(valid[-1][0]):,}: {valid[-1][1]:.4g}"
    return (f"<div class='db-loss'><svg viewBox='0 0 {width} {height}' width='100%' preserveAspectRatio='none' "
            f"role='img' aria-label='loss over steps'>"
            f"<rect x='{pad_l}' y='{pad_t}' width='{pw}' height='{ph}' class='db-loss-bg'/>"
            f"<path d='{path}' class='db-loss-line' fill='none'/>{val_svg}"
            f"<text x='{pad_l - 4}' y='{pad_t + 10}' text-anchor='end' class='db-loss-label'>{y1:.3g}</text>"
            f"<text x='{pad_l - 4}' y='{pad_t + ph}' text-anchor='end' class='db-loss-label'>{y0:.3g}</text>"
            f"<text x='{pad_l}' y='{height - 4}' class='db-loss-label'>step {int(x0)}</text>"
            f"<text x='{width - pad_r}' y='{height - 4}' text-anchor='end' class='db-loss-label'>step {int(x1)}"
            f"</text></svg><div class='db-loss-caption'>loss at step {last[0]:,}: {last[1]:.4g}{val_caption}"
            "</div></div>")


# ------------------------------------------------------------------------------------------------ previews, log


def sample_caption(path: Path) -> str:
    """``step N: <prompt>`` from a preview's PNG text (written by sample.save_sample), else its file name."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            text = img.info.get("dreambooth") or ""
            parameters = img.info.get("parameters") or ""
        if text:
            data = json.loads(text)
            prompt = data.get("request", {}).get("prompt", "")
            step = data.get("extra", {}).get("step")
            return f"step {step}: {prompt}" if step is not None else prompt
        if parameters:
            return parameters.splitlines()[0]
    except (OSError, ValueError, AttributeError) as err:
        log.debug("cannot read the caption of %s: %s", path, err)
    return path.name


def newest_samples(folder: Path, limit: int = 8) -> list[Path]:
    """The newest ``limit`` preview images, newest first."""
    if not folder.is_dir():
        return []
    files = []
    for f in folder.iterdir():
        if f.suffix.lower() == ".png" and not f.name.startswith("."):
            try:
                files.append((f.stat().st_mtime_ns, f.name, f))
            except OSError:
                continue  # replaced meanwhile
    files.sort(reverse=True)
    return [f for _, _, f in files[:limit]]


def load_previews(paths: list[Path]) -> list[tuple[Any, str]]:
    """``(PIL image, caption)`` for each readable preview (images are loaded so the file can change on disk)."""
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                out.append((img.copy(), sample_caption(path)))
        except OSError as err:
            log.debug("skipping preview %s: %s", path, err)
    return out


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
