"""How a run is started: the host's folders and defaults (:class:`RunOptions`), the device, and the autocast dtype
the config's mixed precision means on that device. Shared by the loop, the training methods and sampling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compat import autocast_dtypes, grad_scaler_available
from ..dtypes import torch_dtype
from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    device: str | None = None  # None: CUDA when available, else CPU
    resume: bool = False
    export_dir: Path | None = None  # where checkpoints are exported (the WebUI's Stable-diffusion folder)
    lora_dir: Path | None = None  # where LoRA files are exported (the WebUI's Lora folder)
    embeddings_dir: Path | None = None  # where embeddings are exported (the WebUI's embeddings folder)
    hypernetworks_dir: Path | None = None  # where hypernetworks are exported (the WebUI's hypernetworks folder)
    attention_default: str = "sdp"  # what "auto" means here; the WebUI adapter passes the WebUI's own choice
    cpu_fp16: bool = False  # fp16 mixed precision on the CPU as on a GPU (autocast + grad scaler), not fp32
    install_signal_handlers: bool = True
    on_progress: Callable[[dict], None] | None = None  # called with the status after each write (host progress)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_for(choice: str, default: str) -> str:
    """The config's attention choice with ``auto`` resolved to the host's default."""
    return default if choice == "auto" else choice


def autocast_dtype(mixed_precision: str, device: torch.device, cpu_fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype, or a clear refusal / fallback where the device cannot do it.

    fp16 on the CPU (the default setting, made for GPUs) trains in fp32 unless ``cpu_fp16`` asks for the GPU's
    fp16 path (autocast + grad scaler) there, which tests use to run that path without a GPU."""
    dtype = torch_dtype(mixed_precision)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16 mixed precision",
                        "set mixed precision to fp16 (or 'no' for full fp32)")
    if dtype is torch.float16 and device.type == "cpu":
        if not cpu_fp16:
            log.warning("fp16 mixed precision needs a GPU; training in fp32 on the CPU")
            return None
        if torch.float16 not in autocast_dtypes("cpu") or not grad_scaler_available("cpu"):
            raise UserError(f"fp16 mixed precision on the CPU needs torch 2.3 or newer (this is {torch.__version__})",
                            "set mixed precision to bf16 or 'no' for the CPU, or train on a GPU")
    return dtype
