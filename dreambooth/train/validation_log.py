"""``logs/validation.csv``: one row per save (step, epoch, validation loss, the files that save exported). Read by
the trainer on resume and by the tab's loss chart, so this module imports no torch."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

LOG_NAME = "validation.csv"
LOG_COLUMNS = ("step", "epoch", "validation_loss", "exported")


def read_log(path: Path, with_exports: bool = False) -> list[tuple[int, Any]]:
    """``(step, validation loss)`` per row of a ``validation.csv`` (``(step, [exported files])`` with
    ``with_exports``); [] when there is none. Damaged rows are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for row in list(csv.reader(io.StringIO(text)))[1:]:
        try:
            rows.append((int(row[0]), [p for p in row[3].split(";") if p] if with_exports else float(row[2])))
        except (IndexError, ValueError):
            continue
    return rows
