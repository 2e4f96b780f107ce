"""Each step's :class:`~.step.Batch` from its examples: flips, latents (cached or encoded now), prompts with tag
shuffling and caption dropout, token ids, the cached text conditioning while the text encoders are frozen, and the
loss masks. The step's random draws (flips, shuffles, dropouts) come from the ``rng`` it is given.

In a data-parallel run each process makes only its rows of the global batch, but draws the flips and prompts of the
whole batch, so every example gets the draws it gets in one process and the random streams stay in step.
"""

from __future__ import annotations

import logging
import random

import torch

from ..config import TrainConfig
from ..data.dataset import Example, TrainingData
from ..data.masks import LossMasks
from ..data.prompts import tokenize_prompts
from .caches import LatentCache, TextEmbeddingCache
from .methods import TrainingMethod
from .models import Models
from .step import Batch

log = logging.getLogger(__name__)


class BatchMaker:
    """Batches of one run; ``text_encoder_steps``: from that step on the text encoders are frozen and the text
    embedding cache (when there is one) stands in for them."""

    def __init__(self, cfg: TrainConfig, models: Models, data: TrainingData, latents: LatentCache,
                 method: TrainingMethod, text_cache: TextEmbeddingCache | None, text_encoder_steps: int) -> None:
        self.cfg, self.models, self.data, self.latents, self.method = cfg, models, data, latents, method
        self.text_cache, self.text_encoder_steps = text_cache, text_encoder_steps
        self.masks = LossMasks(data) if cfg.masked_loss else None

    def make(self, whole: list[Example], rng: random.Random, step: int, rows: slice | None = None) -> Batch:
        """The batch of ``whole``'s ``rows`` (None: all of them) at ``step`` (0-based: the step being made)."""
        cfg = self.cfg
        rows = rows or slice(0, len(whole))
        flips = [cfg.hflip and rng.random() < 0.5 for _ in whole]
        prompts = [self.method.expand_prompt(self.data.prompt_for(
            ex, shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens, rng=rng, caption_dropout=cfg.caption_dropout,
            tag_dropout=cfg.caption_tag_dropout)) for ex in whole]
        examples, flips, prompts = whole[rows], flips[rows], prompts[rows]
        latents = torch.stack([self.latents.get(ex, flip) for ex, flip in zip(examples, flips, strict=True)])
        if cfg.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        token_ids, encoded = self.conditioning(prompts, step)
        is_class = torch.tensor([ex.is_class for ex in examples])
        mask = None if self.masks is None else self.masks.get(examples, flips, latents.shape[-2:], latents.device)
        return Batch(latents, token_ids, is_class, [ex.bucket for ex in examples], encoded, mask=mask,
                     drawn_for=len(whole), first_row=rows.start or 0)

    def written_prompts(self, examples: list[Example]) -> list[str]:
        """The examples' prompts as written: no shuffling, no dropout (validation, cache filling)."""
        rng = random.Random(0)  # unused without shuffling and dropout; the training RNG streams are not touched
        return [self.method.expand_prompt(self.data.prompt_for(ex, shuffle=False, keep_tokens=self.cfg.keep_tokens,
                                                               rng=rng)) for ex in examples]

    def conditioning(self, prompts: list[str], step: int
                     ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None]:
        """Token ids per tokenizer, and the cached text conditioning when the text encoders are frozen at ``step``
        (None: the step encodes the token ids itself)."""
        token_ids = []
        for tokenizer in self.models.tokenizers:
            ids, warnings = tokenize_prompts(tokenizer, prompts, self.cfg.long_prompts)
            for warning in warnings:
                log.warning("%s", warning)
            token_ids.append(ids)
        encoded = None
        if self.text_cache is not None and step >= self.text_encoder_steps:
            encoded = self.text_cache.get(token_ids)  # the text encoders are frozen for this step
        return token_ids, encoded
