"""Every difference between the torch versions we run on, in one place.

The WebUI v1.10.1 pins torch 2.1.2; the standalone profile runs current torch. Code elsewhere asks this module
instead of testing versions or attributes itself, so a newer torch API never reaches a user of the older one.

- ``torch.amp.GradScaler(device)`` exists from torch 2.3; before it, only ``torch.cuda.amp.GradScaler`` (CUDA).
- ``torch.OutOfMemoryError`` exists from torch 2.3 (``torch.cuda.OutOfMemoryError`` before it); the CPU
  allocator raises a plain RuntimeError ("can't allocate memory").
- CPU autocast takes bf16 only before torch 2.3 (entering it with fp16 raises); fp16 CPU autocast and the CPU
  grad scaler came together.
- AdamW's fused kernel (one pass over weight, gradient and moments, for many tensors at once) runs on CUDA in every
  torch we support, on the CPU from torch 2.4.
- A tensor's storage is one Python object for its whole life only in newer torch (2.1 makes a new one at each
  ``untyped_storage()``): only there does a weak reference to it say when the memory is freed.
"""

from __future__ import annotations

import re

import torch

TORCH_VERSION: tuple[int, int] = tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2])  # type: ignore

OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
     if t is not None})
_OOM_TEXTS = ("out of memory", "can't allocate memory")  # CUDA / MPS / HIP, and torch's DefaultCPUAllocator


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says a device (or the CPU allocator) ran out of memory, in any torch version."""
    return isinstance(err, OOM_ERRORS) or any(text in str(err) for text in _OOM_TEXTS)


def autocast_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """The half dtypes ``torch.autocast(device_type, dtype=...)`` accepts in this torch."""
    if device_type == "cpu":
        return (torch.bfloat16, torch.float16) if TORCH_VERSION >= (2, 3) else (torch.bfloat16,)
    return (torch.float16, torch.bfloat16)


def grad_scaler_available(device_type: str) -> bool:
    """Whether a grad scaler (fp16 loss scaling) runs on ``device_type`` in this torch."""
    if device_type == "cuda":
        return True
    return hasattr(torch.amp, "GradScaler") and device_type == "cpu" and TORCH_VERSION >= (2, 3)


def grad_scaler(device_type: str) -> torch.amp.GradScaler:
    """A grad scaler for fp16 training on ``device_type`` (check :func:`grad_scaler_available` first)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type)
    if device_type == "cuda":
        return torch.cuda.amp.GradScaler()
    raise RuntimeError(f"torch {torch.__version__} has no grad scaler for {device_type}")


def storages_keep_their_object() -> bool:
    """Whether ``t.untyped_storage()`` is the same Python object for as long as the storage lives, so a
    ``weakref.ref(storage, callback)`` calls back when the memory is freed (not when the wrapper is dropped)."""
    t = torch.empty(1)
    return t.untyped_storage() is t.untyped_storage()


def fused_adamw_available(device_type: str) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` runs on ``device_type`` in this torch."""
    return device_type == "cuda" and torch.cuda.is_available() or device_type == "cpu" and TORCH_VERSION >= (2, 4)
