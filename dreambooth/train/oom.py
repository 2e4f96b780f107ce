"""Out of memory in a training step: the retry with half the batch (when the config allows it), and the error the
user sees when the run stops: what ran out, and the settings that would need less memory.

:func:`oom_point` is the test hook that raises an out-of-memory error on the CPU, as CUDA would.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..compat import is_out_of_memory
from ..config import TrainConfig
from ..errors import UserError

log = logging.getLogger(__name__)

OOM_ENV = "DREAMBOOTH_OOM_AT"


def oom_point(step: int, batch: int) -> None:
    """Test hook: with ``$DREAMBOOTH_OOM_AT="<step>[:<batch>]"`` a forward pass of step ``<step>`` (1-based) over
    more than ``<batch>`` images (default 0: any) raises an out-of-memory RuntimeError, as CUDA would; so the
    out-of-memory handling is tested on the CPU. Without the variable (always, outside tests) it returns at once."""
    spec = os.environ.get(OOM_ENV)
    if not spec:
        return
    at, _, above = spec.partition(":")
    if step == int(at) and batch > int(above or 0):
        raise RuntimeError(f"CUDA out of memory (injected by ${OOM_ENV} at step {step}, batch {batch})")


def free_memory(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Give the gradients' memory back before anything else, then the allocator's cache."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def retry_smaller(attempt: Callable[[], None], smaller: Callable[[], bool], free: Callable[[], None]) -> None:
    """Run ``attempt``; after an out-of-memory error ``free`` memory and try again while ``smaller()`` made the next
    try smaller (it returns False when it cannot: the error goes on)."""
    while True:
        try:
            attempt()
            return
        except RuntimeError as err:  # torch's OutOfMemoryError is a RuntimeError too
            if not is_out_of_memory(err):
                raise
            free()
            if not smaller():
                raise


@contextmanager
def stop_on_out_of_memory(error: Callable[[BaseException], UserError], free: Callable[[], None]) -> Iterator[None]:
    """An out-of-memory error inside the block frees memory and becomes ``error(err)``: the advice."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        free()
        raise error(err) from err


def can_halve(cfg: TrainConfig, micro_batch: int) -> bool:
    return cfg.oom_retry_smaller_batch and micro_batch > 1 and not cfg.fused_backward_step


def halved(cfg: TrainConfig, micro_batch: int, step: int) -> tuple[int, int, str]:
    """The out-of-memory retry: half the images per pass, twice the passes per step (same effective batch).
    Returns the new images per pass, the gradient accumulation that amounts to, and the message."""
    smaller = max(1, micro_batch // 2)
    accumulation = cfg.gradient_accumulation_steps * math.ceil(cfg.train_batch_size / smaller)
    message = (f"out of memory at step {step + 1} with batch {micro_batch}: going on with batch {smaller} and "
               f"gradient accumulation {accumulation} (the same effective batch)")
    log.warning("%s", message)
    return smaller, accumulation, message


def advice(cfg: TrainConfig, device: torch.device, micro_batch: int, resolution: int, step: int,
           method_tips: list[str]) -> UserError:
    """The out-of-memory error as the user sees it: what ran out, and the settings that need less memory (only
    those not in use already; ``method_tips`` from the training method)."""
    where = "RAM" if device.type == "cpu" else f"{device} memory"
    tips = []
    if micro_batch > 1:
        tips.append(f"a smaller batch size (now {micro_batch}; raise gradient accumulation to keep the "
                    "effective batch, or let the run do that: 'On out of memory, retry with a smaller batch')")
    if not cfg.gradient_checkpointing:
        tips.append("gradient checkpointing on")
    if cfg.optimizer != "adamw_8bit":
        tips.append("8-bit AdamW as the optimizer (adamw_8bit)")
    if not cfg.cache_latents:
        tips.append("cache latents on")
    tips.extend(method_tips)
    if resolution > 256:
        lower = max(256, resolution * 3 // 4 // 64 * 64)
        tips.append(f"a lower resolution (now {resolution} px, e.g. {lower})")
    hint = ("try " + "; ".join(tips) if tips else
            "every memory-saving setting is on already: train on a device with more memory")
    return UserError(f"out of {where} at step {step + 1} (batch {micro_batch}, {resolution} px); training stopped, "
                     "the last save (if any) is intact", f"{hint}; then continue with --resume")
