"""Hypernetwork (the WebUI's, legacy): a (k, v) pair of small MLPs on the attention inputs of the text
conditioning's width is all that trains (the models stay frozen); the UNet's hooks make previews use it too. A save
writes the WebUI's ``.pt`` (the model dir's copy, and one per save in the host's hypernetworks folder)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...atomic import clean_stale_temps, fault_point
from ...config import TrainConfig
from ..hypernetwork import Hypernetwork, HypernetworkSettings, parse_layer_structure, save_hypernetwork
from .base import MemoryShare, ParamGroup, SavePoint, TrainingMethod, Weights, add_size, cpu_copies, tensor_bytes

KEY = "hypernetwork"  # the resume state's file


class HypernetworkMethod(TrainingMethod):
    name = "hypernetwork"

    @classmethod
    def memory(cls, cfg: TrainConfig, counts: Mapping[str, Any]) -> MemoryShare:
        widths = [int(counts["context"] * s) for s in parse_layer_structure(cfg.hypernetwork_layer_structure)]
        norm = 2 if cfg.hypernetwork_layer_norm else 0
        trained = 2 * sum(a * b + b + norm * b for a, b in zip(widths, widths[1:], strict=False))  # k and v
        return MemoryShare(trained=trained, added=trained)

    def text_encoder_steps(self, planned: int) -> int:
        return 0

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        cfg, m = self.cfg, self.models
        settings = HypernetworkSettings.from_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the random init is part of the run: repeatable, resumable
            network = Hypernetwork([int(m.unet.config.cross_attention_dim)], settings)
        self.network = network.to(self.device).attach(m.unet, (m.vae, *m.text_encoders))
        m.unet.train()  # dropout in the hypernetwork follows the UNet's mode (previews switch it to eval)
        for te in m.text_encoders:
            te.eval()
        return [ParamGroup(list(self.network.parameters()), cfg.learning_rate)]

    # ------------------------------------------------------------------------------------------------ weights
    def trained_weights(self) -> Weights:
        return {KEY: cpu_copies(self.network.state_dict(), clone=True)}

    def load_weights(self, weights: Weights) -> None:
        self.network.load_state_dict(weights[KEY])

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        size = tensor_bytes(weights)
        sizes = {self.model.path / "hypernetwork": size}
        add_size(sizes, self.export_folder(self.options.hypernetworks_dir), size)
        return sizes

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        cfg, name = self.cfg, self.model.name
        clean_stale_temps(self.model.path / "hypernetwork", re.escape(f"{name}.pt"))
        if self.options.hypernetworks_dir is not None:
            clean_stale_temps(self.options.hypernetworks_dir, re.escape(name) + r"_\d+\.pt")
        info = dict(step=at.revision, checkpoint_hash=cfg.source_sha256,
                    checkpoint_name=Path(cfg.source_checkpoint).stem if cfg.source_checkpoint else "")
        save_hypernetwork(self.model.path / "hypernetwork" / f"{name}.pt", self.network, name=name, **info)
        exported = []
        folder = self.export_folder(self.options.hypernetworks_dir)
        if folder is not None:
            dest = folder / f"{name}_{at.step}.pt"
            exported.append(save_hypernetwork(dest, self.network, name=dest.stem, **info))
        fault_point("save")
        return exported
