"""The latent and text embedding caches, and where the frozen models live while the caches stand in for them.

:class:`LatentCache`: with cached latents each image (per bucket and flip) goes through the VAE once.

:class:`TextEmbeddingCache`: while the text encoder(s) are frozen for a step (not trained, or past the text
encoder step ratio, and no textual inversion), each distinct prompt is encoded once and its hidden states (and
SDXL's pooled output) are reused. The key is the prompt's exact token ids for every tokenizer, so prompts that
vary (shuffled tags, [filewords]) get entries of their own. Each prompt is encoded alone (batch of one), under the
step's autocast, so a cached row equals what the batch encode gives up to float rounding of batched matmuls.
The entries live in RAM, not on the training device, and their bytes are bounded (``TEXT_CACHE_BYTES``, the least
recently used prompt goes first): shuffled tags make a new prompt almost every step, which on the GPU would eat
VRAM without end. A step's rows go to the device together, a copy of well under a megabyte.

:class:`Offloader`: when every latent and text embedding a step needs comes from the caches, the VAE and the
frozen text encoder(s) wait in RAM during training steps and come back to the device for previews and class
images. A prompt missing from the cache while its encoder is offloaded (shuffled tags make new prompts) is encoded
where the encoder is, on the CPU, and the result moved to the device.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..data.dataset import Example, TrainingData
from ..data.prompts import tokenize_prompts
from .conditioning import encode_tokens
from .models import Models

log = logging.getLogger(__name__)

Key = tuple[tuple[int, ...], ...]
# RAM for cached text embeddings: ~9,000 SD 1.x or ~3,300 SDXL prompts in fp16 (half that in fp32), more than the
# distinct prompts of any dataset without shuffled tags
TEXT_CACHE_BYTES = 1 << 30


class LatentCache:
    """The scaled VAE latent (the distribution's mean) of each example; kept when ``enabled`` (cached latents)."""

    def __init__(self, models: Models, data: TrainingData, device: torch.device, enabled: bool) -> None:
        self.models, self.data, self.device, self.enabled = models, data, device, enabled
        self.entries: dict[tuple[Path, tuple[int, int], bool], torch.Tensor] = {}
        self.encodes = 0  # how many images went through the VAE (a cache hit adds none)

    @torch.no_grad()
    def get(self, ex: Example, flip: bool) -> torch.Tensor:
        key = (ex.image, ex.bucket, flip)
        if self.enabled and key in self.entries:
            return self.entries[key]
        pixels = self.data.load_pixels(ex, flip).to(self.device)[None]
        vae = self.models.vae
        pixels = pixels.to(vae.dtype)  # bf16 with bf16 weights; the latent is kept in fp32 either way
        latent = vae.encode(pixels).latent_dist.mode()[0].float() * vae.config.scaling_factor
        self.encodes += 1
        if self.enabled:
            self.entries[key] = latent
        return latent

    def fill(self, hflip: bool) -> None:
        """Every example's latent (and its mirror image's with ``hflip``) up front."""
        for ex in self.data.all_examples():
            for flip in (False, True) if hflip else (False,):
                self.get(ex, flip)


class TextEmbeddingCache:
    """Hidden states (and pooled output) per distinct prompt, in RAM up to ``max_bytes`` (least recently used
    dropped first); :meth:`get` returns them on ``device``."""

    def __init__(self, models: Models, clip_skip: int, autocast: torch.dtype | None, device: torch.device,
                 max_bytes: int = TEXT_CACHE_BYTES) -> None:
        self.models = models
        self.clip_skip = clip_skip
        self.autocast = autocast
        self.device = device
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.nbytes = 0  # of the entries
        self.encodes = 0  # prompts encoded (a hit adds none)
        self.dropped = 0  # entries dropped to stay within max_bytes

    def __len__(self) -> int:
        return len(self.entries)

    def fill(self, prompts: list[str], long_prompts: str) -> None:
        """Encode these prompts now."""
        for prompt in prompts:
            self.get([tokenize_prompts(tokenizer, [prompt], long_prompts)[0] for tokenizer in self.models.tokenizers])

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
        return hidden[0].to("cpu", copy=True), None if pooled is None else pooled[0].to("cpu", copy=True)

    def _add(self, key: Key, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.entries[key] = entry
        self.nbytes += sum(t.numel() * t.element_size() for t in entry if t is not None)
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= sum(t.numel() * t.element_size() for t in old if t is not None)
            if not self.dropped:
                log.info("the text embedding cache holds %d prompts in %.0f MB, its limit: the least recently used "
                         "are dropped and encoded again when they come back", len(self.entries), self.nbytes / 2**20)
            self.dropped += 1

    def get(self, token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``token_ids``: one [B, 77*n] tensor per tokenizer. Returns (hidden [B, ...], pooled [B, P] or None)."""
        rows_h, rows_p = [], []
        for row in range(token_ids[0].shape[0]):
            ids = [t[row] for t in token_ids]
            key = tuple(tuple(i.tolist()) for i in ids)
            entry = self.entries.get(key)
            if entry is None:
                entry = self._encode_row(ids)
                self._add(key, entry)
            else:
                self.entries.move_to_end(key)
            rows_h.append(entry[0])
            rows_p.append(entry[1])
        pooled = None if rows_p[0] is None else torch.stack(rows_p).to(self.device)
        return torch.stack(rows_h).to(self.device), pooled


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


def offload_idle(models: Models, device: torch.device, latents: LatentCache, text: TextEmbeddingCache | None,
                 prompts: Callable[[], list[str]] | None, hflip: bool, long_prompts: str) -> Offloader:
    """Fill the caches up front and move the models they stand in for to the CPU: the VAE when latents are cached,
    the text encoders when text embeddings are cached and the encoders are frozen (``prompts``: what to encode;
    None while the encoders train)."""
    idle: list[torch.nn.Module] = []
    if latents.enabled:
        latents.fill(hflip)
        idle.append(models.vae)
    else:
        log.warning("offloading the VAE needs cached latents (the VAE encodes every step otherwise): it stays")
    if text is None:
        log.warning("offloading the text encoders needs cached text embeddings (and no textual inversion): "
                    "they stay on the device")
    elif prompts is not None:
        text.fill(prompts(), long_prompts)
        idle.extend(models.text_encoders)
    offloader = Offloader(models, device)
    if idle:
        offloader.offload(idle)
    return offloader
