"""LoRA (LoCon, LoHa, LoKr, DoRA: the setting 'LoRA type'): adapters on the UNet and, for a share of the steps, the
text encoders train; the model stays as it is. A save writes the kohya / LyCORIS-format file the WebUI loads (the model
dir's copy, and one per save in the host's Lora folder); with 'Also export a merged checkpoint' also a checkpoint with
the adapters merged in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...atomic import clean_stale_temps, fault_point
from ...config import TrainConfig
from ...export import export_checkpoint
from ..lora import LoraNetwork, LoraSettings, lora_metadata, lora_prefix, save_lora
from ..lora_merge import merged_components
from .base import MemoryShare, ParamGroup, SavePoint, TrainingMethod, Weights, add_size, cpu_copies

KEY = "lora"  # the resume state's file


class Lora(TrainingMethod):
    name = "lora"

    @property
    def exports_checkpoint(self) -> bool:  # type: ignore[override]
        return self.cfg.lora_merge_export

    @classmethod
    def default_settings(cls) -> dict[str, Any]:
        """The learning rates LoRA is commonly trained with (kohya's sd-scripts and the guides around it: about 1e-4
        for the UNet's adapters, half that for the text encoder's); DreamBooth's 2e-6 moves a zero-initialised
        up-projection too little to change an image."""
        return {"learning_rate": 1e-4, "text_encoder_learning_rate": 5e-5}

    @classmethod
    def memory(cls, cfg: TrainConfig, counts: Mapping[str, Any]) -> MemoryShare:
        # LoHa holds two pairs of a LoRA's size; LoKr less than one (counted as one); DoRA adds a vector per layer
        trained = counts["lora_per_rank"] * cfg.lora_rank * (2 if cfg.lora_type == "loha" else 1)
        return MemoryShare(trained=trained, added=trained, text_encoders=cfg.text_encoder_ratio > 0)

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        cfg, m = self.cfg, self.models
        train_te = text_encoder_steps > 0
        self.check_something_trains(train_te)
        m.vae.requires_grad_(False)
        m.unet.train(cfg.train_unet)
        for te in m.text_encoders:
            te.train(train_te)
        settings = LoraSettings.from_config(cfg, train_text_encoder=train_te)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the LoRA's random init is part of the run: repeatable, resumable
            self.network = LoraNetwork(m, settings, m.family.id).to(self.device)  # freezes the base weights
        groups = [ParamGroup(self.network.parameters_for("unet") if cfg.train_unet else [], cfg.learning_rate),
                  ParamGroup(self.network.parameters_for("text_encoder") if train_te else [],
                             cfg.text_encoder_learning_rate, text_encoder=True)]
        return [g for g in groups if g.params]

    def added_modules(self) -> list[torch.nn.Module]:
        return [self.network]

    # ------------------------------------------------------------------------------------------------ weights
    def trained_weights(self) -> Weights:
        return {KEY: cpu_copies(self.network.kohya_state_dict())}

    def load_weights(self, weights: Weights) -> None:
        self.network.load_kohya_state_dict(weights[KEY])

    def restore(self, weights: Weights) -> None:
        # the text encoders have adapters where the run trained them (a ratio that gave it no step: none): any key
        # that is not the UNet's is a text encoder's
        unet = lora_prefix("unet", self.cfg.family)
        self.setup(1 if any(not k.startswith(unet) for k in weights[KEY]) else 0)
        self.load_weights(weights)

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        size = sum(v.numel() * (2 if v.is_floating_point() else v.element_size())  # saved in fp16
                   for v in weights[KEY].values())
        sizes = {self.model.path / "lora": size}
        add_size(sizes, self.export_folder(self.options.lora_dir), size)
        return sizes

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        """The LoRA file in kohya / WebUI format: the model dir's copy, and one per save in the Lora folder."""
        name = self.model.name
        clean_stale_temps(self.model.path / "lora", re.escape(f"{name}.safetensors"))
        if self.options.lora_dir is not None:
            clean_stale_temps(self.options.lora_dir, re.escape(name) + r"_\d+\.(safetensors|yaml)")
        tags: dict[str, dict[str, int]] = {}  # kohya's ss_tag_frequency: comma-separated tags, lower case
        for folder, captions in at.captions.items():
            counts = tags.setdefault(folder, {})
            for tag in (t.strip().lower() for caption in captions for t in caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        meta = lora_metadata(self.cfg.family, self.network.settings, name, tags, self.cfg.source_sha256,
                             {"ss_steps": str(at.revision), "ss_epoch": str(at.epoch)})
        save_lora(self.model.path / "lora" / f"{name}.safetensors", self.network, meta)
        exported = []
        folder = self.export_folder(self.options.lora_dir)
        if folder is not None:
            dest = folder / f"{name}_{at.step}.safetensors"
            exported.append(save_lora(dest, self.network, {**meta, "ss_output_name": dest.stem}))
        fault_point("save")
        return exported

    def export_checkpoint(self, dest: Path) -> Path:
        merged = merged_components(self.models, self.network)
        return export_checkpoint(self.model, dest, dtype=self.cfg.export_dtype, trained="lora (merged)",
                                 replace=merged)
