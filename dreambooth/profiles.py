"""Low-VRAM profiles ("fits in 6 GB", "fits in 8 GB", "fastest") and an *estimate* of peak training memory.

A profile is a set of TrainConfig values; applying it overwrites only those fields. What each picks and why:

* **fits in 6 GB** - the least memory that still trains the full UNet: latents and text embeddings cached and the
  VAE and text encoder offloaded to RAM (they are idle once cached); bf16 weights with stochastic rounding (no
  fp32 copy: 2 bytes per weight); the optimizer step fused into backward (no gradient buffer), which needs
  gradient accumulation 1 and no global-norm clipping (max gradient norm 0); gradient checkpointing; 8-bit AdamW
  (2 bytes of state per weight; falls back to AdamW where bitsandbytes cannot run); SDP attention; batch 1; the
  text encoder is not trained (its weights, gradients and states would not fit).
* **fits in 8 GB** - like 6 GB but keeps the ordinary step (gradients in bf16, 2 bytes per weight), so gradient
  clipping (max norm 1) and gradient accumulation stay available; channels-last for speed.
* **fastest** - for a large GPU: no gradient checkpointing (no recompute), bf16 weights with an fp32 master (exact
  AdamW updates), fused-free ordinary AdamW, channels-last, torch.compile, caches on, nothing offloaded (previews
  start at once). Batch size is left to the user.

:func:`estimate_memory` sums, per dtype: the weights of every module on the device, the gradients and optimizer
states of the trained weights, the fp32 masters, the EMA copy, and activations as a per-family constant x
resolution^2 x batch (the constants are bytes per pixel of one sample under 16-bit autocast, with and without
gradient checkpointing, measured from public SD 1.5 / SDXL figures; twice that in fp32). It is an **estimate**:
allocator fragmentation, the CUDA context and attention kernels' workspaces add to what a GPU shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .families import get_family

GB = 2**30


@dataclass(frozen=True)
class Profile:
    name: str
    settings: dict[str, Any]
    why: str


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("fits in 6 GB", dict(
        cache_latents=True, cache_text_embeddings=True, offload_frozen_models=True, mixed_precision="bf16",
        weight_precision="bf16_stochastic", fused_backward_step=True, gradient_accumulation_steps=1,
        max_grad_norm=0.0, gradient_checkpointing=True, optimizer="adamw_8bit", attention="sdp", train_batch_size=1,
        text_encoder_ratio=0.0, use_ema=False, channels_last=True, compile_unet=False),
        "caches + offload, bf16 weights with stochastic rounding, optimizer step in backward, gradient "
        "checkpointing, 8-bit AdamW, batch 1, no text encoder training"),
    Profile("fits in 8 GB", dict(
        cache_latents=True, cache_text_embeddings=True, offload_frozen_models=True, mixed_precision="bf16",
        weight_precision="bf16_stochastic", fused_backward_step=False, max_grad_norm=1.0,
        gradient_checkpointing=True, optimizer="adamw_8bit", attention="sdp", train_batch_size=1,
        text_encoder_ratio=0.0, use_ema=False, channels_last=True, compile_unet=False),
        "like 6 GB but with the ordinary step: gradient clipping and accumulation available"),
    Profile("fastest", dict(
        cache_latents=True, cache_text_embeddings=True, offload_frozen_models=False, mixed_precision="bf16",
        weight_precision="bf16_master", fused_backward_step=False, gradient_checkpointing=False, optimizer="adamw",
        attention="sdp", channels_last=True, compile_unet=True),
        "no recomputation, bf16 weights with fp32 masters, channels-last, torch.compile; needs a large GPU"),
)}

# parameters per module (the published architectures); LoRA: trained parameters per unit of rank (UNet attention
# and feed-forward layers, kohya's default targets), approximate; context: the width of the text conditioning
PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoders": [123_060_480], "lora_per_rank": 797_184,
            "context": 768},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoders": [340_387_840], "lora_per_rank": 797_184,
            "context": 1024},
    "sd2v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoders": [340_387_840], "lora_per_rank": 797_184,
             "context": 1024},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoders": [123_060_480, 694_659_841],
             "lora_per_rank": 2_904_064, "context": 2048},
}
# activation bytes per pixel (of the training resolution's square) of one sample under 16-bit autocast
ACTIVATION_BYTES_PER_PIXEL = {  # (without, with gradient checkpointing)
    "sd1": (9_500, 1_900), "sd2": (9_500, 1_900), "sd2v": (9_500, 1_900), "sdxl": (15_300, 2_300),
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "lion": 4, "adafactor": 1, "dadaptation": 16, "prodigy": 16}


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # bytes per part

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def text(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GB)
        return f"estimated peak training memory: {self.total / GB:.1f} GB ({shown} GB)"


def apply_profile(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` with the profile's settings; everything else kept."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise UserError(f"unknown memory profile {name!r}", f"pick one of: {', '.join(PROFILES)}") from None
    return dataclasses.replace(cfg, **profile.settings)


def estimate_memory(cfg: TrainConfig, params: dict[str, Any] | None = None) -> MemoryEstimate:
    """Estimated peak device memory of training with ``cfg`` (see the module docstring). ``params``: parameter
    counts like :data:`PARAMS`' entries (default: the published ones of ``cfg.family``)."""
    from .train.methods import method_class  # torch: only when an estimate is asked for

    counts = params or PARAMS[cfg.family]
    resolution = cfg.resolution or get_family(cfg.family).resolution
    bf16 = cfg.weight_precision != "fp32"
    weight_bytes = 2 if bf16 else 4
    share = method_class(cfg.method).memory(cfg, counts)
    trained = share.trained
    offload = cfg.offload_frozen_models
    vae_on_device = not (offload and cfg.cache_latents)
    te_on_device = share.text_encoders or not (offload and cfg.cache_text_embeddings)
    parts = {
        "unet": counts["unet"] * weight_bytes,
        "vae": counts["vae"] * weight_bytes if vae_on_device else 0,
        "text encoders": sum(counts["text_encoders"]) * weight_bytes if te_on_device else 0,
    }
    if share.added:
        parts[cfg.method] = share.added * weight_bytes
    parts["gradients"] = 0 if cfg.fused_backward_step else trained * weight_bytes
    parts["optimizer"] = trained * OPTIMIZER_STATE_BYTES.get(cfg.optimizer, 8)
    if cfg.weight_precision == "bf16_master":
        parts["fp32 masters"] = trained * 4
    if share.ema:
        parts["ema"] = share.ema * 4
    without, with_ckpt = ACTIVATION_BYTES_PER_PIXEL[cfg.family]
    per_pixel = with_ckpt if cfg.gradient_checkpointing else without
    if cfg.mixed_precision == "no":
        per_pixel *= 2
    parts["activations"] = per_pixel * resolution * resolution * cfg.train_batch_size
    return MemoryEstimate(parts)


def profile_summary(cfg: TrainConfig, name: str) -> str:
    """One line for the tab: the profile's choices and the estimate with it applied."""
    applied = apply_profile(cfg, name)
    return f"{name}: {PROFILES[name].why}. {estimate_memory(applied).text()}"
