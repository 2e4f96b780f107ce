"""Low-VRAM profiles ("fits in 6 GB", "fits in 8 GB", "fastest") and the peak training memory of a config: measured
where the full-size benchmark measured that configuration, else estimated from a model fitted to those measurements.

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

:func:`estimate_memory` adds up what a step holds at its peak, for the settings that will really run on the device
(fp16 trains in fp32 on a CPU; 8-bit AdamW only where bitsandbytes runs it, ``optimizers.adamw_8bit_problem``):
the weights of every module on the device (and fp32 masters, EMA), the optimizer state, the update's scratch
buffers, and the larger of two moments: the activations' peak (in forward / backward) or every gradient at once
(the optimizer step; one bucket's with the step fused into backward). Weights, gradients and states are counted
from the architectures' parameter counts. The activations are a line in the training image's pixels per class
(family, full UNet or frozen base, checkpointing, 16- or 32-bit compute), fitted to the peaks that
``python -m bench --matrix cpu-full`` measured at 256 and 384 px (``bench/fit.py`` writes
``assets/memory_measured.json``); other classes use per-pixel constants from public figures.

The tab says "measured" when that benchmark ran exactly this configuration (same memory-relevant settings and
resolution), else "estimated" (and "extrapolated" beyond the measured resolutions). Either way it counts tensors:
a GPU adds its CUDA context (~0.3-0.5 GB) and the caching allocator's slack.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .families import get_family

GB = 2**30
MEASURED_FILE = Path(__file__).resolve().parent / "assets" / "memory_measured.json"


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

# parameters per module (the published architectures); LoRA: trained parameters per unit of rank on our default
# targets (lora.py: every layer of the UNet's transformer blocks); the largest single parameter (it bounds the
# update's buckets and the per-parameter optimizer's temporaries); context: the width of the text conditioning
PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoders": [123_060_480], "lora_per_rank": 423_936,
            "largest": 29_491_200, "context": 768},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoders": [340_387_840], "lora_per_rank": 432_128,
            "largest": 29_491_200, "context": 1024},
    "sd2v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoders": [340_387_840], "lora_per_rank": 432_128,
             "largest": 29_491_200, "context": 1024},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoders": [123_060_480, 694_659_841],
             "lora_per_rank": 2_659_840, "largest": 29_491_200, "context": 2048},
}
# activation bytes per pixel (of the training resolution's square) of one sample under 16-bit compute, from public
# figures: the classes the benchmark has not measured
ACTIVATION_BYTES_PER_PIXEL = {  # (without, with gradient checkpointing)
    "sd1": (9_500, 1_900), "sd2": (9_500, 1_900), "sd2v": (9_500, 1_900), "sdxl": (15_300, 2_300),
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "lion": 4, "adafactor": 1, "dadaptation": 16, "prodigy": 16}
BUCKET_ELEMENTS = 1 << 22  # fused.BUCKET_ELEMENTS (not imported: the tab should not load torch's optimizers)
PENDING_BUCKETS = 5  # buckets whose gradients wait for the rest of their bucket in a fused backward (measured ~4)
UPDATE_SCRATCH_BYTES = {"bf16_stochastic": 14, "bf16_master": 4, "fp32": 0}  # per element of the largest bucket


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # bytes per part at the peak
    measured: float | None = None  # the benchmark's peak for exactly this configuration, if it ran it
    basis: str = ""  # where the activations come from
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.measured if self.measured is not None else sum(self.parts.values())

    def text(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GB)
        if self.measured is not None:
            head = f"measured peak training memory: {self.total / GB:.1f} GB (estimate's parts: {shown} GB)"
        else:
            head = f"estimated peak training memory: {self.total / GB:.1f} GB ({shown} GB)"
        tail = "; ".join([self.basis, *self.notes] if self.basis else self.notes)
        return f"{head}; {tail}" if tail else head


def apply_profile(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` with the profile's settings; everything else kept."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise UserError(f"unknown memory profile {name!r}", f"pick one of: {', '.join(PROFILES)}") from None
    return dataclasses.replace(cfg, **profile.settings)


def default_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def effective_optimizer(cfg: TrainConfig, device_type: str) -> str:
    """The optimizer that will run: 8-bit AdamW only where bitsandbytes runs it on ``device_type``, else AdamW."""
    if cfg.optimizer != "adamw_8bit":
        return cfg.optimizer
    from .train.optimizers import adamw_8bit_problem

    return "adamw_8bit" if adamw_8bit_problem(device_type) is None else "adamw"


def compute_width(cfg: TrainConfig, device_type: str) -> str:
    """The precision the UNet computes in: fp16 mixed precision trains in fp32 on a CPU."""
    if cfg.mixed_precision == "fp16" and device_type == "cpu":
        return "fp32"
    return "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision


def memory_signature(cfg: TrainConfig, device_type: str, optimizer: str | None = None) -> dict[str, Any]:
    """What decides a step's peak memory, as it will really run on ``device_type`` (``optimizer``: the one that
    ran, when it is known). Two configs with the same signature hold the same tensors."""
    te_trains = cfg.text_encoder_ratio > 0 and cfg.method not in ("textual_inversion", "hypernetwork")
    return {
        "family": cfg.family, "method": cfg.method, "lora_rank": cfg.lora_rank if cfg.method == "lora" else 0,
        "lora_conv_rank": cfg.lora_conv_rank if cfg.method == "lora" else 0,
        "resolution": cfg.resolution or get_family(cfg.family).resolution, "batch": cfg.train_batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing, "weight_precision": cfg.weight_precision,
        "fused_backward_step": cfg.fused_backward_step, "optimizer": optimizer or effective_optimizer(cfg, device_type),
        "compute": compute_width(cfg, device_type), "vae_on_device": not (cfg.offload_frozen_models and
                                                                           cfg.cache_latents),
        "text_encoders_on_device": te_trains or cfg.method == "textual_inversion" or not (
            cfg.offload_frozen_models and cfg.cache_text_embeddings),
        "text_encoder_trains": te_trains, "train_unet": cfg.train_unet,
        "ema": cfg.use_ema and cfg.method == "dreambooth" and cfg.train_unet,
        "set_grads_to_none": cfg.set_grads_to_none,
    }


def activation_class(sig: dict[str, Any]) -> str:
    """Which fitted line the activations of ``sig`` follow: family, full UNet or frozen base, checkpointing,
    16- or 32-bit compute."""
    kind = "full" if sig["method"] == "dreambooth" and sig["train_unet"] else "frozen"
    return (f"{sig['family']}/{kind}/{'ckpt' if sig['gradient_checkpointing'] else 'nockpt'}/"
            f"{'32' if sig['compute'] == 'fp32' else '16'}")


@lru_cache(maxsize=1)
def _measured() -> dict[str, Any]:
    if not MEASURED_FILE.is_file():
        return {"activations": {}, "rows": []}
    return json.loads(MEASURED_FILE.read_text(encoding="utf-8"))


def estimate_memory(cfg: TrainConfig, params: dict[str, Any] | None = None, device_type: str | None = None,
                    optimizer: str | None = None) -> MemoryEstimate:
    """Peak device memory of a training step with ``cfg`` on ``device_type`` (default: CUDA when available), see the
    module docstring. ``params``: parameter counts like :data:`PARAMS`' entries (default: the published ones of
    ``cfg.family``); ``optimizer``: the optimizer that runs, when known (default: what will run on the device)."""
    device_type = device_type or default_device_type()
    sig = memory_signature(cfg, device_type, optimizer)
    counts = params or PARAMS[cfg.family]
    parts, notes = _parts(cfg, sig, counts, device_type)
    activations, basis = _activations(sig)
    opt = sig["optimizer"]
    if opt != cfg.optimizer:
        notes.append(f"{opt} counted: {cfg.optimizer} does not run on {device_type} here")
    full_grads, grads = parts.pop("_full_gradients"), parts.pop("gradients")
    transient = parts.pop("_optimizer_transient")
    autocast_copies = parts.pop("_autocast_copies")
    in_backward = activations + autocast_copies + (full_grads if not sig["set_grads_to_none"] else 0)
    in_step = grads + transient
    if in_backward >= in_step:
        parts["activations"] = activations
        if autocast_copies:
            parts["16-bit weight copies"] = autocast_copies
        if not sig["set_grads_to_none"]:
            parts["gradients (kept between steps)"] = full_grads
    else:
        parts["gradients"] = grads
        if transient:
            parts["optimizer temporaries"] = transient
    estimate = MemoryEstimate(parts, basis=basis, notes=notes)
    for row in _measured()["rows"]:
        if row["signature"] == sig:
            estimate.measured = float(row["peak_tensor_bytes"])
            estimate.basis = f"measured by {_measured().get('source', 'the cpu-full benchmark')}"
    return estimate


def _parts(cfg: TrainConfig, sig: dict[str, Any], counts: dict[str, Any], device_type: str
           ) -> tuple[dict[str, float], list[str]]:
    """Weights, states, gradients and the update's buffers (bytes), before the phase decides which show."""
    from .train.methods import method_class  # torch: only when an estimate is asked for

    wb = 2 if cfg.weight_precision != "fp32" else 4
    te_params = sum(counts["text_encoders"])
    share = method_class(cfg.method).memory(cfg, counts)
    trained = share.trained
    paramwise = cfg.weight_precision != "fp32" or cfg.fused_backward_step
    bucket = update_bucket(cfg, counts)
    parts: dict[str, float] = {
        "unet": counts["unet"] * wb,
        "vae": counts["vae"] * wb if sig["vae_on_device"] else 0,
        "text encoders": te_params * wb if sig["text_encoders_on_device"] else 0,
    }
    if share.added:
        parts[cfg.method.replace("_", " ")] = share.added * wb
    if cfg.weight_precision == "bf16_master":
        parts["fp32 masters"] = trained * 4
    if share.ema:
        parts["ema"] = share.ema * 4
    parts["optimizer state"] = _state_bytes(sig["optimizer"], trained)
    if paramwise:
        parts["update buffers"] = UPDATE_SCRATCH_BYTES[cfg.weight_precision] * min(bucket, trained)
    parts["_full_gradients"] = trained * wb
    parts["gradients"] = min(trained, PENDING_BUCKETS * bucket) * wb if cfg.fused_backward_step else trained * wb
    # torch's AdamW without a fused kernel for the device (the CPU before torch 2.4) makes temporaries per tensor
    fused_kernel = sig["optimizer"] != "adamw" or _fused_adamw(device_type)
    parts["_optimizer_transient"] = 0 if paramwise or fused_kernel else 8 * min(counts.get("largest", 0), trained)
    weights_16_under_autocast = sig["compute"] != "fp32" and wb == 4 and cfg.method == "dreambooth"
    parts["_autocast_copies"] = 2 * trained if weights_16_under_autocast else 0
    return parts, []


def update_bucket(cfg: TrainConfig, counts: dict[str, Any]) -> int:
    """Elements of the largest bucket of the per-bucket update (fused.py): at least BUCKET_ELEMENTS, or the largest
    trained parameter (full training's largest convolution; an adapter's are small)."""
    largest = counts.get("largest", 0) if cfg.method == "dreambooth" else 0
    return max(BUCKET_ELEMENTS, largest)


def _fused_adamw(device_type: str) -> bool:
    """Whether AdamW runs its fused kernel there (else torch's loop makes temporaries per tensor)."""
    from .compat import TORCH_VERSION

    return device_type == "cuda" or device_type == "cpu" and TORCH_VERSION >= (2, 4)


def _state_bytes(optimizer: str, trained: int) -> float:
    if optimizer == "adamw_8bit":  # two uint8 states + an fp32 absmax per 256 (bitsandbytes' blockwise 8-bit)
        return trained * (2 + 8 / 256)
    return trained * OPTIMIZER_STATE_BYTES.get(optimizer, 8)


def _activations(sig: dict[str, Any]) -> tuple[float, str]:
    """Activation bytes at the step's peak, and where the figure comes from."""
    cls = activation_class(sig)
    pixels = sig["resolution"] ** 2 * sig["batch"]
    fitted = _measured()["activations"].get(cls)
    if fitted is not None:
        value = fitted["constant"] + fitted["per_pixel"] * pixels
        resolutions = fitted["resolutions"]
        if sig["resolution"] > max(resolutions):
            return value, (f"activations extrapolated from the measured {' and '.join(map(str, resolutions))} px "
                           f"(a line in the pixels)")
        return value, f"activations fitted to the measured {' and '.join(map(str, resolutions))} px"
    without, with_ckpt = ACTIVATION_BYTES_PER_PIXEL[sig["family"]]
    per_pixel = (with_ckpt if sig["gradient_checkpointing"] else without) * (2 if sig["compute"] == "fp32" else 1)
    return per_pixel * pixels, "activations from public figures (not measured here)"


def profile_summary(cfg: TrainConfig, name: str, device_type: str | None = None) -> str:
    """One line for the tab: the profile's choices and the peak memory with it applied (measured or estimated)."""
    applied = apply_profile(cfg, name)
    return f"{name}: {PROFILES[name].why}. {estimate_memory(applied, device_type=device_type).text()}"
