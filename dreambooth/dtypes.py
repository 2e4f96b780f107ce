"""The config's precision names as torch dtypes (the names themselves are declared in ``config.py``)."""

from __future__ import annotations

import torch

from .errors import UserError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AS_IS = ("keep", "no")  # a file's precision kept as it is; no mixed precision


def torch_dtype(name: str) -> torch.dtype | None:
    """``fp32`` / ``fp16`` / ``bf16`` as a torch dtype; ``keep`` and ``no`` (nothing to cast to) as None."""
    if name in AS_IS:
        return None
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise UserError(f"unknown precision {name!r}", f"use one of: {', '.join((*TORCH_DTYPES, *AS_IS))}") from None
