"""A step's batch from its examples: the random flips and prompts (tag shuffling), the latents, the token ids and,
with the text embedding cache, the encoded prompts.

In a data-parallel run each process makes only its rows of the global batch, but draws the flips and prompts of the
whole batch, so every example gets the draws it gets in one process and the random streams stay in step.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from ..data.dataset import Example, TrainingData
from ..data.prompts import tokenize_prompts
from .caches import LatentCache, TextEmbeddingCache
from .step import Batch

log = logging.getLogger(__name__)


def make_batch(cfg: TrainConfig, whole: list[Example], rows: slice, rng: random.Random, data: TrainingData,
               expand_prompt: Callable[[str], str], latents: LatentCache, tokenizers: list[Any],
               text_cache: TextEmbeddingCache | None) -> Batch:
    """The batch of ``whole``'s ``rows``; ``text_cache``: the text encoders are frozen this step, their cached output
    stands in (None: the step encodes the token ids)."""
    flips = [cfg.hflip and rng.random() < 0.5 for _ in whole]
    prompts = [expand_prompt(data.prompt_for(ex, shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens, rng=rng))
               for ex in whole]
    examples, flips, prompts = whole[rows], flips[rows], prompts[rows]
    stacked = torch.stack([latents.get(ex, flip) for ex, flip in zip(examples, flips, strict=True)])
    if cfg.channels_last:
        stacked = stacked.contiguous(memory_format=torch.channels_last)
    token_ids = []
    for tokenizer in tokenizers:
        ids, warnings = tokenize_prompts(tokenizer, prompts, cfg.long_prompts)
        for warning in warnings:
            log.warning("%s", warning)
        token_ids.append(ids)
    is_class = torch.tensor([ex.is_class for ex in examples])
    encoded = text_cache.get(token_ids) if text_cache is not None else None
    return Batch(stacked, token_ids, is_class, [ex.bucket for ex in examples], encoded, len(whole), rows.start or 0)
