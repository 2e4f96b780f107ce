"""Full DreamBooth: the model's own UNet weights train (and, for a share of the steps, the text encoders'); a save
writes them into ``working/`` and exports a single-file checkpoint. The only method with an EMA of the UNet. Its
defaults are the config's own (learning rate 2e-6, text encoder 1e-6: full fine-tuning of every weight)."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...atomic import clean_stale_temps, fault_point
from ...config import TrainConfig
from ...export import export_checkpoint
from ...working import WEIGHT_NAMES, save_tensors
from ..ema import EMA
from ..models import TEXT_ENCODER_NAMES, canonical_state, load_canonical
from .base import MemoryShare, ParamGroup, SavePoint, TrainingMethod, Weights, tensor_bytes

log = logging.getLogger(__name__)


class DreamBooth(TrainingMethod):
    name = "dreambooth"
    exports_checkpoint = True
    trains_beside_model = False  # each save writes the trained weights as the working weights

    @classmethod
    def memory(cls, cfg: TrainConfig, counts: Mapping[str, Any]) -> MemoryShare:
        unet = counts["unet"] if cfg.train_unet else 0
        text = sum(counts["text_encoders"]) if cfg.text_encoder_ratio > 0 else 0
        return MemoryShare(trained=unet + text, text_encoders=bool(text),
                           ema=counts["unet"] if cfg.use_ema and cfg.train_unet else 0)

    def memory_tips(self) -> list[str]:
        return ["LoRA instead of full training (method lora)"]

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        cfg, m = self.cfg, self.models
        train_te = text_encoder_steps > 0
        self.check_something_trains(train_te)
        self.ema: EMA | None = None
        self.modules: dict[str, torch.nn.Module] = {"unet": m.unet} if cfg.train_unet else {}
        if train_te:
            self.modules.update(zip(TEXT_ENCODER_NAMES, m.text_encoders, strict=False))
        m.vae.requires_grad_(False)
        m.unet.train(cfg.train_unet)
        m.unet.requires_grad_(cfg.train_unet)
        for te in m.text_encoders:
            te.train(train_te)
            te.requires_grad_(train_te)
            if train_te and cfg.freeze_clip_normalization:
                for name, p in te.named_parameters():
                    if "layer_norm" in name:
                        p.requires_grad_(False)
        groups = [ParamGroup([p for p in m.unet.parameters() if p.requires_grad], cfg.learning_rate),
                  ParamGroup([p for te in m.text_encoders for p in te.parameters() if p.requires_grad],
                             cfg.text_encoder_learning_rate, text_encoder=True)]
        return [g for g in groups if g.params]

    def ready(self) -> None:
        if self.cfg.use_ema and self.cfg.train_unet:
            self.ema = EMA(self.models.unet.parameters(), self.cfg.ema_decay)
        elif self.cfg.use_ema:
            super().ready()  # the warning: EMA is off

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.models.unet.parameters())

    # ------------------------------------------------------------------------------------------------ weights
    def trained_weights(self) -> Weights:
        weights = {c: canonical_state(c, m) for c, m in self.modules.items()}
        if self.ema is not None:
            with self.ema.swapped(self.models.unet.parameters()):
                weights["unet_ema"] = {k: v.clone() for k, v in canonical_state("unet", self.models.unet).items()}
        return weights

    def load_weights(self, weights: Weights) -> None:
        for component, module in self.modules.items():
            load_canonical(component, module, weights[component])

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        return {self.model.working: tensor_bytes(weights)}

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        """The trained components into ``working/`` (the EMA UNet into ``working/unet_ema``)."""
        working = self.model.working
        for component, state in weights.items():
            folder = working / component
            if component == "unet_ema" and not folder.is_dir():
                folder.mkdir()
                shutil.copy2(working / "unet" / "config.json", folder / "config.json")
            name = f"{WEIGHT_NAMES[component]}.safetensors"
            clean_stale_temps(folder, re.escape(name))
            save_tensors(folder / name, state)
            fault_point("save")
        return []

    def export_checkpoint(self, dest: Path) -> Path:
        ema = "main" if self.cfg.export_ema and self.ema is not None else "none"
        return export_checkpoint(self.model, dest, dtype=self.cfg.export_dtype, ema=ema, trained="dreambooth")
