"""Resume states: everything needed to continue a run exactly where it was saved.

One folder per save, ``checkpoints/step_<N>/``, built under a temporary name and renamed into place, so it either
exists complete or not at all. It holds the trained weights (safetensors) and ``trainer_state.pt`` (optimizer,
LR schedule, EMA, RNG states, step, epoch, position in the epoch), read back with torch's weights-only loader.
If the newest state cannot be read (a power cut, a full disk: a truncated ``trainer_state.pt`` or weight file), the
one before it is used, with a warning. Old states are renamed to a temporary name before they are deleted, so a
crash mid-delete leaves no half-deleted state behind, only a temporary folder that the next save or resume removes.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .. import platform_compat
from ..atomic import TMP_MARK, atomic_dir, clean_stale_temps
from ..working import save_tensors

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class ResumeState:
    path: Path
    step: int
    trainer: dict[str, Any]  # optimizer, lr_scheduler, ema, rng, epoch, batch_in_epoch, ...
    weights: dict[str, dict[str, torch.Tensor]]  # component -> state dict


def save_state(checkpoints: Path, step: int, trainer: dict[str, Any],
               weights: dict[str, dict[str, torch.Tensor]], keep: int) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically and delete all but the newest ``keep`` states."""
    target = checkpoints / f"step_{step:08d}"
    clean_stale_temps(checkpoints)  # left by a crash; this run holds the model's lock, nobody else writes here
    if target.exists():
        remove_state(target)
    with atomic_dir(target) as tmp:
        for component, state in weights.items():
            save_tensors(tmp / f"{component}.safetensors", state)
        torch.save(trainer, tmp / STATE_FILE)
    for old in list_states(checkpoints)[:-keep]:
        remove_state(old)
    return target


def remove_state(path: Path) -> None:
    """Delete a resume-state folder: renamed away first (atomic), so it is never seen half deleted."""
    doomed = path.with_name(f".{path.name}{TMP_MARK}deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    platform_compat.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_states(checkpoints: Path) -> list[Path]:
    """Resume-state folders, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_state(path: Path) -> ResumeState:
    """Read one resume state; raises when any of its files is missing, truncated or does not fit the others."""
    trainer = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    weights = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != int(trainer["step"]):
        raise ValueError(f"{STATE_FILE} says step {trainer['step']}, the folder step {int(match.group(1))}")
    if not weights:
        raise ValueError("it holds no weight file")
    return ResumeState(path, int(trainer["step"]), trainer, weights)


def latest_state(checkpoints: Path) -> ResumeState | None:
    """The newest readable resume state; unreadable newer ones are reported and skipped."""
    clean_stale_temps(checkpoints)
    for path in reversed(list_states(checkpoints)):
        try:
            return load_state(path)
        except Exception as err:  # noqa: BLE001 - any damage means: fall back to the previous state
            log.warning("resume state %s cannot be read (%s: %s); falling back to the one before it", path.name,
                        type(err).__name__, err)
    return None
