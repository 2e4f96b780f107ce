"""Saves, crash recovery and disk-space checks.

A save writes, in this order: the resume state (trained weights, optimizer, schedule, RNG), then the training
method's files (the working weights, a LoRA, an embedding, ...), the config's progress, and the checkpoint export.
The free disk space is checked before anything is written, and every file is written atomically, so a save refused
or cut off leaves the previous one intact. A run resumed from a save that was cut off after its resume state writes
the rest of that save (:meth:`Saver.recover`). ``atomic.fault_point`` calls mark the moments the crash tests
(``tools/fault_injection.py``) cut a run off at; they do nothing outside those tests.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..atomic import clean_stale_temps, fault_point
from ..config import TrainConfig, load_config, save_progress
from ..dtypes import torch_dtype
from ..errors import UserError
from ..store import ModelDir
from .methods import SavePoint, TrainingMethod, Weights
from .methods.base import add_size, tensor_bytes
from .options import RunOptions
from .resume import save_state
from .status import StatusWriter

log = logging.getLogger(__name__)

NAN_HINT = ("lower the learning rate, use bf16 instead of fp16 mixed precision, or turn gradient clipping on; "
            "then resume from the last save")
DISK_MARGIN = 1.1  # a save needs the bytes of what it writes plus this margin (headers, file system overhead)
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


class Saver:
    """The saves of one run."""

    def __init__(self, model: ModelDir, cfg: TrainConfig, options: RunOptions, method: TrainingMethod,
                 status: StatusWriter) -> None:
        self.model = model
        self.cfg = cfg
        self.options = options
        self.method = method
        self.status = status
        self.previous: int | None = None  # the step of this run's last save (or of the resume state it began from)

    def check_first_save(self, weights: Weights, trainer_state: dict[str, Any], optimizer: Any) -> str:
        """Before the first step: refuse a run whose first save the disks cannot hold (its steps would be trained
        and lost), and say what a save costs. Before its first step the optimizer holds no state: that part is
        estimated from its parameters (``profiles.OPTIMIZER_STATE_BYTES``)."""
        from ..profiles import OPTIMIZER_STATE_BYTES

        sizes = self.sizes(weights, 0, trainer_state)
        if not getattr(optimizer, "state", None):
            per_weight = OPTIMIZER_STATE_BYTES.get(self.cfg.optimizer, 8)
            trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
            add_size(sizes, self.model.checkpoints, per_weight * trained)
        check_disk_space(sizes, None, self.previous)
        parts = ", ".join(f"{format_bytes(n)} {'of resume state in' if f == self.model.checkpoints else 'into'} {f}"
                          for f, n in sizes.items())
        self.status.update(save_bytes=sum(sizes.values()))
        log.info("a save writes about %s: %s", format_bytes(sum(sizes.values())), parts)
        return f"a save writes about {format_bytes(sum(sizes.values()))} ({parts})"

    def save(self, at: SavePoint, weights: Callable[[], Weights], trainer_state: Callable[[], dict[str, Any]]
             ) -> list[Path]:
        """A resume state, the method's files, the config's progress and the export, all atomic; ``weights`` and
        ``trainer_state`` are asked for once the status says the run is saving. Returns the files exported into the
        host's folders."""
        self.status.update(force=True, state="saving", message=f"saving at step {at.step}")
        trained = weights()
        broken = next((f"{c}.{k}" for c, state in trained.items() for k, v in state.items()
                       if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if broken is not None:
            raise UserError(f"the weights are no longer finite at step {at.step} ({broken}); nothing was saved",
                            NAN_HINT)
        state = trainer_state()
        check_disk_space(self.sizes(trained, at.step, state), at.step, self.previous)
        save_state(self.model.checkpoints, at.step, state, trained, self.cfg.keep_resume_states)
        fault_point("save")  # test hook: the new resume state is in place, the rest is not
        exported = self._write_outputs(trained, at)
        self.previous = at.step
        self.status.update(force=True, state="running", message=f"saved at step {at.step}")
        return exported

    def recover(self, at: SavePoint, weights: Callable[[], Weights]) -> bool:
        """After a resume from a save that was cut off after its resume state (a crash, a kill), write that save's
        other parts now, so working weights, progress and exports are those of the resumed step. True when it did.
        """
        recorded = load_config(self.model.path).revision
        export = self.export_path(at.step)
        if recorded > at.revision or recorded == at.revision and (export is None or export.exists()):
            return False  # that save is complete (or a later one wrote the outputs and only its resume state is lost)
        log.warning("the save at step %d was cut off after its resume state; writing the rest of it", at.step)
        self.status.update(force=True, state="saving", message=f"completing the save at step {at.step}")
        trained = weights()
        check_disk_space(self.sizes(trained, at.step), at.step, at.step)  # its resume state is the earlier save
        self._write_outputs(trained, at)
        self.status.update(force=True, state="running", message=f"saved at step {at.step}")
        return True

    def _write_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        """The parts of a save after the resume state: the method's files, progress, export. Returns the files
        exported into the host's folders."""
        exported = list(self.method.save_outputs(weights, at))
        for path in exported:
            self.status.update(last_export=str(path))
        save_progress(self.model.path, at.revision, at.epoch)
        fault_point("save")
        dest = self.export_path(at.step)
        if dest is not None:
            clean_stale_temps(dest.parent, re.escape(self.model.name) + r"_\d+\.(safetensors|yaml)")
            exported.append(self.method.export_checkpoint(dest))
            self.status.update(last_export=str(exported[-1]))
        return exported

    def export_path(self, step: int) -> Path | None:
        """Where this step's checkpoint export goes (when the method exports one and exports are on), else None."""
        if not self.cfg.save_checkpoint or self.options.export_dir is None or not self.method.exports_checkpoint:
            return None
        return self.options.export_dir / f"{self.model.name}_{step}.safetensors"

    def sizes(self, weights: Weights, step: int, trainer_state: dict[str, Any] | None = None) -> dict[Path, int]:
        """Bytes a save is about to write, per folder: resume state (with ``trainer_state``), the method's files,
        export."""
        sizes: dict[Path, int] = {}
        if trainer_state is not None:
            sizes[self.model.checkpoints] = tensor_bytes(weights) + tensor_bytes(trainer_state)
        for folder, size in self.method.output_sizes(weights).items():
            add_size(sizes, folder, size)
        export = self.export_path(step)
        if export is not None:
            add_size(sizes, export.parent, self._export_bytes())
        return sizes

    def _export_bytes(self) -> int:
        """The size of a checkpoint export, from the working files' headers (no tensor is read)."""
        target = torch_dtype(self.cfg.export_dtype)
        total = 0
        for path in self.model.working.glob("*.safetensors"):
            total += _safetensors_bytes(path, target)
        for path in self.model.working.glob("*/*.safetensors"):
            if path.parent.name != "unet_ema":  # the EMA UNet replaces the UNet in an export, never adds to it
                total += _safetensors_bytes(path, target)
        return total


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random generators' states for a resume state: the CPU's, and the GPU's (dropout there draws from it)."""
    return {"rng_torch": torch.get_rng_state(),
            "rng_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_device") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_device"], device)


def check_disk_space(sizes: dict[Path, int], step: int | None, previous: int | None = None) -> None:
    """Refuse a save the disks cannot hold, before anything of it is written. ``step``: the save's (None: the
    check before the run, for its first save); ``previous``: the step of the run's last save, if it has one."""
    by_disk: dict[int, tuple[Path, int, list[Path]]] = {}
    for folder, size in sizes.items():
        existing = _existing_ancestor(folder)
        device = os.stat(existing).st_dev
        _, total, folders = by_disk.get(device, (existing, 0, []))
        by_disk[device] = (existing, total + size, [*folders, folder])
    for existing, size, folders in by_disk.values():
        needed = int(size * DISK_MARGIN)
        free = shutil.disk_usage(existing).free
        if needed > free:
            where = ", ".join(str(f) for f in folders)
            short = f"free at least {format_bytes(needed - free)} there (old exports, old resume states)"
            what = (f"the save needs about {format_bytes(needed)} on the disk of {where}, and {format_bytes(free)} "
                    "is free")
            if step is None:
                raise UserError(f"not enough free disk space for this run's first save: {what}; nothing was trained",
                                f"{short}, or turn 'Export a checkpoint at each save' off; then start it again")
            if previous is None:
                raise UserError(f"not enough free disk space to save at step {step}: {what}; nothing of this save "
                                "was written, and this run has no earlier save: its steps are not saved",
                                f"{short}, then train again")
            raise UserError(f"not enough free disk space to save at step {step}: {what}; nothing of this save was "
                            f"written, the previous save (step {previous}) is intact",
                            f"{short}, or lower 'Resume states to keep'; then continue with --resume")


def _safetensors_bytes(path: Path, cast: torch.dtype | None) -> int:
    """The data size of a safetensors file with its floating tensors cast to ``cast`` (None: as they are)."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            dtype = part.get_dtype()
            size = _SAFETENSORS_BYTES.get(dtype, 4)
            if cast is not None and dtype.startswith(("F", "BF")):
                size = cast.itemsize
            total += math.prod(part.get_shape()) * size
    return total


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
