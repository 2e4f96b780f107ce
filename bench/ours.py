"""Our trainer, timed: the real ``Trainer`` (setup, data, caches, step, reporting) with a clock around each
optimizer step, and nothing else changed.

A subclass hooks ``_optimizer_step`` (the clock's CUDA events go on the stream before and after it; the loop ends
from inside once the measured steps are done) and turns ``_end_of_epoch`` off (previews and saves are not part
of a step). Everything else, including when the loss is read back from the device, is the trainer's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreambooth.config import TrainConfig, coerce, field_specs, load_config
from dreambooth.errors import ConfigError
from dreambooth.store import ModelDir
from dreambooth.train.loop import RunOptions, Trainer

from .matrix import Case
from .measure import Enough, StepClock
from .memory import Roles
from .models import concept

log = logging.getLogger(__name__)

SEED = 1234


def harness_settings(case: Case) -> dict[str, object]:
    """What every row of ours sets, whatever the profile: the case's shape and a run that only steps."""
    settings: dict[str, object] = {
        "method": case.method, "train_batch_size": case.batch, "resolution": case.resolution,
        "learning_rate": 5e-6, "lr_scheduler": "constant", "lr_warmup_steps": 0, "seed": SEED,
        "epochs": 100000, "save_every_n_epochs": 0, "preview_every_n_epochs": 0, "save_checkpoint": False,
        "save_on_cancel": False, "enable_buckets": False, "text_encoder_ratio": 0.0, "gradient_accumulation_steps": 1,
    }
    if case.method == "lora":
        settings.update(lora_rank=case.lora_rank, lora_alpha=float(case.lora_rank))  # alpha = rank, as diffusers
    return settings


def unavailable_settings(overrides: dict[str, object]) -> list[str]:
    """The overrides this version's TrainConfig cannot take: a missing field, or a value it does not offer.

    A row with any of them is reported as unavailable rather than run without the setting.
    """
    specs = {s.name: s for s in field_specs(TrainConfig)}
    missing = []
    for name, value in overrides.items():
        if name not in specs:
            missing.append(name)
            continue
        try:
            coerce(name, specs[name], value)
        except ConfigError:
            missing.append(f"{name}={value!r}")
    return missing


class TimedTrainer(Trainer):
    """``Trainer`` with a clock around each optimizer step; previews and saves off."""

    def __init__(self, model: ModelDir, options: RunOptions, clock: StepClock) -> None:
        self.clock = clock
        super().__init__(model, options)

    def _optimizer_step(self, group: list) -> None:
        self.clock.roles = self._roles
        self.clock.before_step()
        super()._optimizer_step(group)
        if self.clock.after_step():
            raise Enough()

    def _end_of_epoch(self) -> None:
        """A benchmark measures steps: no previews, saves or pauses between epochs."""

    def _roles(self) -> Roles:
        m = self.models
        modules = [m.unet, m.vae, *m.text_encoders, *self.method.added_modules()]
        offloaded = list(self.offloader.offloaded) if self.offloader is not None else []
        return Roles(modules, list(self.trained_params), self.optimizer, offloaded)


def optimizer_ran(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer that really updates the weights (inside a ParamwiseOptimizer: its buckets'), by class name."""
    buckets = getattr(optimizer, "buckets", None)
    inner = buckets[0].optimizer if buckets else optimizer
    name = type(inner).__name__
    return {"AdamW": "adamw", "AdamW8bit": "adamw_8bit"}.get(name, name) + (" (per bucket)" if buckets else "")


def run_ours(md: ModelDir, case: Case, overrides: dict[str, object], images: Path, device: torch.device,
             clock: StepClock) -> dict:
    """Train ``md`` with the case's shape and ``overrides`` until ``clock`` has its steps; the timing and notes."""
    cfg = load_config(md.path)
    for spec in field_specs(TrainConfig):  # every setting at its default first: rows share the model dir, and one
        if spec.ui:                          # row's profile must not carry over into the next
            setattr(cfg, spec.name, spec.default)
    for name, value in {**harness_settings(case), **overrides}.items():
        setattr(cfg, name, value)
    cfg.concepts = [concept(images)]
    cfg.save(md.path)
    trainer = TimedTrainer(md, RunOptions(device=str(device), install_signal_handlers=False), clock)
    try:
        trainer._setup()
        try:
            trainer._train()
        except Enough:
            pass
        else:
            raise RuntimeError(f"the run ended after {clock.done} steps, before the clock had its steps")
        pending = getattr(trainer, "pending_losses", [])
        last_loss = float(pending[-1][2]) if pending else trainer.status.status.get("loss")
        notes = [f"attention {trainer.attention}", f"optimizer {optimizer_ran(trainer.optimizer)}"]
        if trainer.status.status.get("note"):
            notes.append(str(trainer.status.status["note"]))
        return {**clock.result(case.batch), "last_loss": last_loss, "notes": notes,
                "optimizer_ran": optimizer_ran(trainer.optimizer)}
    finally:
        trainer.controls.close()
        trainer.status.close()
        trainer.lock.release()
        del trainer
