"""Model FLOPs of one training sample, the device's measured peak FLOP/s, and its datasheet peak.

FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real forward and backward
of the UNet at batch 1. The count is of the *model's* work, the same for every way of running it (the MFU
convention): attention is counted through diffusers' plain attention (torch's fused CPU kernel is invisible to the
counter), and gradient checkpointing's recomputation is not counted. Full fine-tuning counts the weight gradients;
LoRA does not (the base weights are frozen; the gradient still flows back through every layer, and the LoRA's own
small matmuls are left out).
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreambooth.compat import OOM_ERRORS

log = logging.getLogger(__name__)

# dense bf16 tensor-core peak in FLOP/s by device name (fp16 for cards without bf16); substrings, first match wins
DATASHEET_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("T4", 65e12),
)


def datasheet_peak(device_name: str) -> float | None:
    for key, peak in DATASHEET_PEAK:
        if key in device_name:
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure_peak_flops(device: torch.device, seconds: float | None = None) -> tuple[float, str]:
    """The best matmul throughput this device reaches now: bf16 8192^3 on a GPU, fp32 on the CPU.

    Returns (FLOP/s, how it was measured). The best of several timed repetitions is taken, so a busy moment lowers
    it as little as possible.
    """
    if device.type == "cuda":
        n, dtype, what = 8192, torch.bfloat16, "bf16"
    else:
        n, dtype, what = 512, torch.float32, "fp32"
    if seconds is None:
        seconds = 2.0 if device.type == "cuda" else 0.3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flop = 2 * n**3
    for _ in range(3):  # warm-up: kernel selection, clocks
        a @ b
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        iters = 10 if device.type == "cuda" else 2
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, iters * flop / (time.perf_counter() - start))
        reps += 1
    del a, b
    return best, f"{what} matmul {n}x{n}x{n}, best of {reps}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_inputs(unet_config: dict, resolution: int, batch: int, device: torch.device, dtype: torch.dtype,
                sdxl: bool) -> tuple[tuple, dict]:
    """Inputs of the right shapes for one UNet call at ``resolution`` (77 text tokens)."""
    side = resolution // 8
    latents = torch.randn(batch, unet_config.get("in_channels", 4), side, side, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    hidden = torch.randn(batch, 77, unet_config["cross_attention_dim"], device=device, dtype=dtype)
    kwargs: dict = {}
    if sdxl:
        pooled = (unet_config["projection_class_embeddings_input_dim"]
                  - 6 * unet_config["addition_time_embed_dim"])
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.full((batch, 6), float(resolution), device=device,
                                                              dtype=dtype)}
    return (latents, timesteps, hidden), kwargs


def count_unet_flops(unet_config: dict, resolution: int, method: str, sdxl: bool, device: torch.device) -> int:
    """Forward + backward FLOPs of one sample through a UNet of ``unet_config`` (batch 1), on ``device``.

    A GPU counts in bf16 (the count does not depend on the dtype), the CPU in fp32; the ``meta`` device gives the
    same count without memory or time.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    unet.set_attn_processor(AttnProcessor())
    full = method == "dreambooth"
    unet.requires_grad_(full)
    args, kwargs = unet_inputs(config, resolution, 1, device, dtype, sdxl)
    if not full:
        args[0].requires_grad_(True)  # frozen weights: the gradient still runs back through every layer
    with FlopCounterMode(display=False) as counter:
        out = unet(*args, **kwargs).sample
        out.float().square().mean().backward()
    del unet, out, args, kwargs
    return int(counter.get_total_flops())


def flops_per_sample(unet_config: dict, resolution: int, method: str, sdxl: bool, device: torch.device) -> tuple[
        int, str]:
    """``count_unet_flops`` on ``device``; where the device runs out of memory, the same count on ``meta``."""
    try:
        return count_unet_flops(unet_config, resolution, method, sdxl, device), device.type
    except OOM_ERRORS:
        log.warning("out of memory counting FLOPs on %s; counting on the meta device", device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return count_unet_flops(unet_config, resolution, method, sdxl, torch.device("meta")), "meta"
