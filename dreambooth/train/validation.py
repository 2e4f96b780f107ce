"""The validation loss: how well the model predicts the noise (or velocity) on images it never trains on.

It is measured at each save, before the save is written (its resume state keeps the history), on every concept's
validation images (a validation folder, and the instance images held out of training) at fixed noise and timesteps,
so the numbers of one run compare from save to save. Each value goes to ``status.json``, to
``logs/validation.csv`` (one row per save, with the files that save exported) and into the tab's loss chart. With
"Keep the best N saves" the exports of the other saves are deleted; with "Stop when validation loss has not improved
for K saves" the run ends (as done) after the K-th such save. Measuring draws nothing from the training's random
streams and runs every module in eval mode, so it changes nothing about the training itself.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import platform_compat
from ..atomic import write_text
from ..config import Concept, TrainConfig, check_applies
from ..data.dataset import Example, TrainingData
from ..errors import UserError
from .batch import BatchMaker
from .caches import LatentCache
from .conditioning import encode_tokens, sdxl_time_ids
from .evaluate import TIMESTEPS
from .models import Models
from .status import StatusWriter
from .validation_log import LOG_COLUMNS, LOG_NAME, read_log

log = logging.getLogger(__name__)

NOISE_SEED = 0  # the same noise in every run, whatever the training seed: runs compare too


def check_validation(cfg: TrainConfig, concepts: Sequence[Concept]) -> None:
    """Refuse "keep the best saves" / "stop early" without a validation set (before any time is spent), and keeping
    the best saves with a method whose saves do not export files of their own."""
    if not any(c.validation_data_dir.strip() or c.validation_holdout > 0 for c in concepts) and (
            cfg.keep_best_saves or cfg.early_stop_saves):
        what = "keep the best saves" if cfg.keep_best_saves else "stop early"
        raise UserError(f"'{what}' needs a validation set, and no concept has one",
                        "set a concept's 'Validation images folder' or 'Hold out N instance images for "
                        "validation', or set the option to 0")
    check_applies(cfg, "keep_best_saves", 0)


class StoppedEarly(Exception):
    """Raised after a save when the validation loss has not improved for the configured number of saves."""


@dataclass
class Record:
    """One save's validation loss, and the files it exported (emptied when they are deleted as not among the
    best)."""

    step: int
    epoch: int
    loss: float
    exported: list[str] = field(default_factory=list)


@dataclass
class _Chunk:
    examples: list[Example]  # of one bucket
    latents: torch.Tensor  # [B, 4, h, w] on the device
    noises: torch.Tensor  # [len(TIMESTEPS), B, 4, h, w] on the device


@contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every module (and submodule) in eval mode for the block (no dropout draws), each mode restored after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Validation:
    """The validation set of one run and the history of its losses."""

    def __init__(self, cfg: TrainConfig, data: TrainingData, models: Models, device: torch.device,
                 status: StatusWriter, autocast: torch.dtype | None, modules: Sequence[torch.nn.Module],
                 logs: Path | None) -> None:
        """``logs``: the model's logs folder; None in a process other than rank 0 (which measures and writes)."""
        self.cfg, self.models, self.status, self.autocast = cfg, models, status, autocast
        self.modules = [models.unet, *models.text_encoders, *modules]
        self.path = logs / LOG_NAME if logs is not None else None
        self.records: list[Record] = []
        examples = [ex for items in data.validation for ex in items] if logs is not None else []
        self.enabled = bool(examples)
        self.chunks = self._prepare(examples, data, device) if self.enabled else []
        if self.enabled:
            log.info("validation set: %d images", len(examples))

    def _prepare(self, examples: list[Example], data: TrainingData, device: torch.device) -> list[_Chunk]:
        """Latents (through the VAE once, now, before any model is offloaded) and fixed noise per image, in chunks
        of one bucket and at most the batch size. Each image's noise is drawn in the examples' order, so it is the
        same however the images are chunked."""
        encoder = LatentCache(self.models, data, device, enabled=False)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        prepared = []
        for ex in examples:
            latent = encoder.get(ex, False)
            noise = torch.randn((len(TIMESTEPS), *latent.shape), generator=generator).to(latent.device)
            prepared.append((ex, latent, noise))
        by_bucket: dict[tuple[int, int], list[tuple[Example, torch.Tensor, torch.Tensor]]] = {}
        for item in prepared:
            by_bucket.setdefault(item[0].bucket, []).append(item)
        size = max(1, self.cfg.train_batch_size)
        chunks = []
        for items in by_bucket.values():
            for start in range(0, len(items), size):
                part = items[start:start + size]
                chunks.append(_Chunk([ex for ex, _, _ in part], torch.stack([lat for _, lat, _ in part]),
                                     torch.stack([noise for _, _, noise in part], dim=1)))
        return chunks

    # ------------------------------------------------------------------------------------------------ measuring
    @torch.no_grad()
    def measure(self, step: int, epoch: int, batches: BatchMaker) -> float | None:
        """The validation loss now (the mean squared error over every image and timestep), recorded for the save
        at ``step``; None without a validation set."""
        if not self.enabled:
            return None
        models, scheduler = self.models, self.models.noise_scheduler
        total, count = 0.0, 0
        device = self.chunks[0].latents.device
        autocast = torch.autocast(device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with eval_mode(self.modules), autocast:
            for chunk in self.chunks:
                token_ids, encoded = batches.conditioning(batches.written_prompts(chunk.examples), step)
                hidden, pooled = encoded if encoded is not None else encode_tokens(models, token_ids,
                                                                                    self.cfg.clip_skip)
                added = None
                if models.is_sdxl:
                    sizes = [ex.bucket for ex in chunk.examples]
                    added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(sizes, device, hidden.dtype)}
                for t, noise in zip(TIMESTEPS, chunk.noises, strict=True):
                    steps = torch.full((len(chunk.examples),), t, device=device, dtype=torch.long)
                    noisy = scheduler.add_noise(chunk.latents, noise, steps)
                    target = scheduler.get_velocity(chunk.latents, noise, steps) \
                        if models.prediction_type == "v_prediction" else noise
                    pred = models.unet(noisy, steps, hidden, added_cond_kwargs=added).sample
                    total += float(F.mse_loss(pred.float(), target.float(), reduction="sum")) / noise[0].numel()
                    count += len(chunk.examples)
        loss = total / count
        self.records = [r for r in self.records if r.step < step] + [Record(step, epoch, loss)]
        best = self.best()
        log.info("validation loss at step %d: %.6g (best %.6g at step %d)", step, loss, best.loss, best.step)
        self.status.update(validation_loss=loss, best_validation_loss=best.loss, best_validation_step=best.step)
        return loss

    def best(self) -> Record:
        """The save with the lowest validation loss (the earliest of equals)."""
        return min(self.records, key=lambda r: (r.loss, r.step))

    # ------------------------------------------------------------------------------------------------ saves
    def saved(self, step: int, exported: list[Path]) -> None:
        """The save at ``step`` wrote ``exported``: keep only the best saves' exports (when asked), log the row."""
        record = next((r for r in self.records if r.step == step), None)
        if record is None:
            return
        record.exported = [str(p) for p in exported]
        if self.cfg.keep_best_saves > 0:
            self._keep_best(self.cfg.keep_best_saves)
        self.write_log()

    def _keep_best(self, keep: int) -> None:
        ranked = sorted((r for r in self.records if r.exported), key=lambda r: (r.loss, r.step))
        kept = {path for r in ranked[:keep] for path in r.exported}
        for record in ranked[keep:]:
            for path in (Path(p) for p in record.exported if p not in kept):
                for file in (path, path.with_suffix(".yaml")) if path.suffix == ".safetensors" else (path,):
                    try:
                        platform_compat.unlink(file, missing_ok=True)
                    except OSError as err:  # e.g. held open by the WebUI on Windows: keep it, go on training
                        log.warning("cannot delete %s (not among the best %d saves): %s", file, keep, err)
            log.info("deleted the exports of the save at step %d (validation loss %.6g; not among the best %d)",
                     record.step, record.loss, keep)
            record.exported = []
        self.status.update(kept_saves=[r.step for r in ranked[:keep]])

    def stop_if_stale(self) -> None:
        """Raise :class:`StoppedEarly` when the last ``early_stop_saves`` saves brought no new lowest loss."""
        patience = self.cfg.early_stop_saves
        if not self.enabled or patience <= 0 or not self.records:
            return
        best = self.best()
        since = sum(1 for r in self.records if r.step > best.step)
        if since >= patience:
            raise StoppedEarly(f"stopped early at step {self.records[-1].step}: the validation loss has not improved "
                               f"for {since} saves (best {best.loss:.4g} at step {best.step})")

    # ------------------------------------------------------------------------------------------------ resume, log
    def state_dict(self) -> dict[str, Any]:
        return {"validation": [(r.step, r.epoch, r.loss) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [Record(int(s), int(e), float(v)) for s, e, v in state.get("validation", [])]

    def start_log(self, resumed: bool, trained_before: int) -> None:
        """A resumed run keeps the rows up to its resumed step (with the exports they name), a fresh run keeps an
        earlier run's ``validation.csv`` as ``validation_until_step_<N>.csv`` and starts its own (as the loss
        log)."""
        if self.path is None:
            return  # not this process's log
        if resumed:
            exported = {row[0]: row[1] for row in read_log(self.path, with_exports=True)}
            for record in self.records:
                record.exported = exported.get(record.step, [])
            if self.records or self.path.exists():
                self.write_log()
        elif read_log(self.path):
            kept = self.path.with_name(f"validation_until_step_{trained_before}.csv")
            n = 1
            while kept.exists():
                n += 1
                kept = self.path.with_name(f"validation_until_step_{trained_before}_{n}.csv")
            platform_compat.replace(self.path, kept)

    def write_log(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LOG_COLUMNS)
        for r in self.records:
            writer.writerow([r.step, r.epoch, f"{r.loss:.6g}", ";".join(r.exported)])
        write_text(self.path, buffer.getvalue())

