"""Textual inversion: a new word whose vectors are all that trains (everything else stays frozen); a save writes
the embedding file the WebUI loads, named after the word (the WebUI triggers it by the file name)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...atomic import clean_stale_temps, fault_point
from ...config import TrainConfig
from ...errors import UserError
from ..embedding import EmbeddingSettings, TextualInversion, save_embedding
from .base import MemoryShare, ParamGroup, SavePoint, TrainingMethod, Weights, add_size, cpu_copies, tensor_bytes

KEY = "embedding"  # the resume state's file
TOKEN_WIDTH = 768  # the estimate's vector width (SD 1.x's; the others' words are as small next to their models)


class TextualInversionMethod(TrainingMethod):
    name = "textual_inversion"
    trains_conditioning = True  # the new word's vectors go through the text encoders every step

    @classmethod
    def memory(cls, cfg: TrainConfig, counts: Mapping[str, Any]) -> MemoryShare:
        return MemoryShare(trained=TOKEN_WIDTH * cfg.embedding_vectors, text_encoders=True)

    def text_encoder_steps(self, planned: int) -> int:
        return 0  # the text encoders stay frozen; gradients reach only the new vectors

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        cfg = self.cfg
        if not cfg.embedding_token:
            raise UserError("textual inversion needs the word to train", "set 'Embedding word', e.g. zwx-style")
        self.embedding = TextualInversion(self.models, EmbeddingSettings.from_config(cfg)).to(self.device)
        return [ParamGroup(self.embedding.parameters(), cfg.learning_rate)]

    def expand_prompt(self, prompt: str) -> str:
        return self.embedding.prompt(prompt)  # the new word stands for all of its vectors

    def after_step(self) -> None:
        self.embedding.after_step()

    # ------------------------------------------------------------------------------------------------ weights
    def trained_weights(self) -> Weights:
        return {KEY: cpu_copies(self.embedding.state_dict())}

    def load_weights(self, weights: Weights) -> None:
        self.embedding.load_state_dict(weights[KEY])

    def _file_name(self) -> str:
        return f"{self.embedding.token}.safetensors"

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        size = tensor_bytes(weights)
        sizes = {self.model.path / "embeddings": size}
        add_size(sizes, self.export_folder(self.options.embeddings_dir), size)
        return sizes

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        name = self._file_name()
        for folder in (self.model.path / "embeddings", self.options.embeddings_dir):
            if folder is not None:
                clean_stale_temps(folder, re.escape(name))
        save_embedding(self.model.path / "embeddings" / name, self.embedding, at.revision, self.cfg.family)
        exported = []
        folder = self.export_folder(self.options.embeddings_dir)
        if folder is not None:
            exported.append(save_embedding(folder / name, self.embedding, at.revision, self.cfg.family))
        fault_point("save")
        return exported
