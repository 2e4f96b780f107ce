"""Learning-rate schedules: a pure multiplier function and the torch scheduler built from it.

Every schedule is a multiplier ``m(step)`` of each param group's own base LR (so the UNet and the text encoder
groups keep their ratio). ``step`` counts optimizer steps from 0; ``W`` is ``warmup_steps``, ``T`` is
``total_steps``, and after warmup ``progress = (step - W) / max(1, T - W)``, clamped to [0, 1].

Warmup (every schedule except plain ``constant``): ``m = step / W`` for ``step < W``, a straight line from 0 to 1.
Then:

* ``constant``: ``m = 1`` at every step; it ignores ``warmup_steps``.
* ``constant_with_warmup``: ``m = 1``.
* ``linear``: ``m = 1 - progress``, from 1 down to 0 at step ``T``. It honours warmup too, as diffusers'
  ``get_scheduler("linear", ...)`` does.
* ``linear_with_warmup``: the same curve as ``linear``; the name only says the warmup out loud.
* ``cosine``: ``m = 0.5 * (1 + cos(pi * progress))``, half a cosine from 1 to 0.
* ``cosine_with_restarts``: ``cycles`` hard restarts: ``m = 0.5 * (1 + cos(pi * ((cycles * progress) % 1)))``
  while ``progress < 1``, jumping back to 1 at each cycle start, and 0 from step ``T`` on.
* ``polynomial``: ``m = (1 - progress) ** power``, down to exactly 0 at step ``T``. (diffusers' version decays to
  ``lr_end = 1e-7`` instead; ours goes to 0.)

``min_ratio`` (of :func:`lr_multiplier` only) lifts the floor of the decay after warmup:
``m = min_ratio + (1 - min_ratio) * m``; at 0 (the default) the formulas above hold as written.

Resuming: the scheduler is a :class:`torch.optim.lr_scheduler.LambdaLR` whose multiplier is rebuilt from the
config, so its ``state_dict`` holds just the step count and base LRs; loading it continues the same curve exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import LR_SCHEDULERS
from ..errors import UserError

log = logging.getLogger(__name__)



def _check(name: str, total_steps: int, warmup_steps: int, cycles: int, power: float) -> None:
    if name not in LR_SCHEDULERS:
        raise UserError(f"unknown learning rate scheduler {name!r}", f"pick one of: {', '.join(LR_SCHEDULERS)}")
    if total_steps < 0 or warmup_steps < 0:
        raise UserError(f"lr scheduler: steps must be >= 0 (total {total_steps}, warmup {warmup_steps})",
                        "fix the warmup steps or the number of epochs")
    if cycles < 1:
        raise UserError(f"lr scheduler: cosine restarts (cycles) must be >= 1, got {cycles}", "set it to 1 or more")
    if power < 0 or not math.isfinite(power):
        raise UserError(f"lr scheduler: polynomial power must be a number >= 0, got {power}", "set it to e.g. 1.0")


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int = 0, cycles: int = 1,
                  power: float = 1.0, min_ratio: float = 0.0) -> float:
    """The factor the base LR is multiplied by at optimizer step ``step`` (formulas in the module docstring)."""
    _check(name, total_steps, warmup_steps, cycles, power)
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return step / warmup_steps
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if name in ("linear", "linear_with_warmup"):
        decay = 1.0 - progress
    elif name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "cosine_with_restarts":
        decay = 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    else:  # polynomial
        decay = (1.0 - progress) ** power
    return min_ratio + (1.0 - min_ratio) * decay


class _ResumableLambdaLR(LambdaLR):
    """LambdaLR that, on load, also writes the saved step's LRs into the optimizer's param groups.

    Plain LambdaLR leaves the groups at whatever its constructor set (the step-0 LR) until the next ``step()``,
    so the first update after a resume would use the wrong LR unless the optimizer state happened to be loaded
    after the scheduler was built. Here the order does not matter.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=True):
            group["lr"] = lr


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
                      cycles: int = 1, power: float = 1.0) -> LambdaLR:
    """A LambdaLR that scales every param group's base LR by :func:`lr_multiplier`.

    Call ``scheduler.step()`` once after each ``optimizer.step()``. Right after construction the groups hold the
    step-0 LR (0 during warmup).
    """
    _check(name, total_steps, warmup_steps, cycles, power)
    if name == "constant" and warmup_steps:
        log.info("lr scheduler 'constant' ignores the %d warmup steps; use constant_with_warmup to warm up",
                 warmup_steps)
    if warmup_steps > total_steps:
        log.warning("lr warmup (%d steps) is longer than the whole run (%d steps): the LR never reaches its value",
                    warmup_steps, total_steps)

    def multiplier(step: int) -> float:
        return lr_multiplier(name, step, total_steps, warmup_steps, cycles, power)

    return _ResumableLambdaLR(optimizer, multiplier)
