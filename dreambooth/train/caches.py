"""The text embedding cache, and where the frozen models live while the caches stand in for them.

:class:`TextEmbeddingCache`: while the text encoder(s) are frozen for a step (not trained, or past the text
encoder step ratio, and no textual inversion), each distinct prompt is encoded once and its hidden states (and
SDXL's pooled output) are reused. The key is the prompt's exact token ids for every tokenizer, so prompts that
vary (shuffled tags, [filewords]) get entries of their own. Each prompt is encoded alone (batch of one), under the
step's autocast, so a cached row equals what the batch encode gives up to float rounding of batched matmuls.

:class:`Offloader`: when every latent and text embedding a step needs comes from the caches, the VAE and the
frozen text encoder(s) wait in RAM during training steps and come back to the device for previews and class
images. A prompt missing from the cache while its encoder is offloaded (shuffled tags make new prompts) is encoded
where the encoder is, on the CPU, and the result moved to the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from .conditioning import encode_tokens
from .models import Models

log = logging.getLogger(__name__)

Key = tuple[tuple[int, ...], ...]


class TextEmbeddingCache:
    """Hidden states (and pooled output) per distinct prompt, on the training device."""

    def __init__(self, models: Models, clip_skip: int, autocast: torch.dtype | None, device: torch.device) -> None:
        self.models = models
        self.clip_skip = clip_skip
        self.autocast = autocast
        self.device = device
        self.entries: dict[Key, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.encodes = 0  # prompts encoded (a hit adds none)

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def _encode_row(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder_device = next(self.models.text_encoders[0].parameters()).device
        dtype = self.autocast
        if encoder_device.type == "cpu" and dtype is torch.float16:
            dtype = None  # an offloaded encoder on the CPU: fp32 there (the UNet's autocast casts it anyway)
        autocast = torch.autocast(encoder_device.type, dtype=dtype) if dtype else nullcontext()
        with autocast:
            hidden, pooled = encode_tokens(self.models, [i[None] for i in ids], self.clip_skip)
        self.encodes += 1
        return hidden[0].to(self.device), None if pooled is None else pooled[0].to(self.device)

    def get(self, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``token_ids``: one [B, 77*n] tensor per tokenizer. Returns (hidden [B, ...], pooled [B, P] or None)."""
        rows_h, rows_p = [], []
        for row in range(token_ids[0].shape[0]):
            ids = [t[row] for t in token_ids]
            key = tuple(tuple(i.tolist()) for i in ids)
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = self._encode_row(ids)
            rows_h.append(entry[0])
            rows_p.append(entry[1])
        pooled = None if rows_p[0] is None else torch.stack(rows_p)
        return torch.stack(rows_h), pooled


class Offloader:
    """Moves the VAE and the frozen text encoders between the device and the CPU."""

    def __init__(self, models: Models, device: torch.device) -> None:
        self.models = models
        self.device = device
        self.offloaded: list[torch.nn.Module] = []

    def offload(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            if module not in self.offloaded:
                module.to("cpu")
                self.offloaded.append(module)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("offloaded %d frozen modules to the CPU for training steps", len(self.offloaded))

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The offloaded modules on the device for the block (previews, class images), then off again."""
        modules = list(self.offloaded)
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if modules and self.device.type == "cuda":
                torch.cuda.empty_cache()
