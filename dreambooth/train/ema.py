"""An exponential moving average (EMA) of model weights, kept in fp32.

After each optimizer step, ``update`` moves every shadow weight towards its parameter::

    shadow = decay * shadow + (1 - decay) * param

with a fixed ``decay``: no warmup (diffusers' ``EMAModel`` can ramp the decay up over the first steps; we do
not). So with the default 0.9999 the average needs on the order of ``1 / (1 - decay)`` = 10,000 steps to move
away from the weights it started from; pick a smaller decay for short runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


class EMA:
    """fp32 shadow copies of ``parameters``, on ``device`` (default: each parameter's own device)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be within [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow = [p.detach().to(device=device if device is not None else p.device, dtype=torch.float32,
                                         copy=True) for p in parameters]

    def _params(self, parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = list(parameters)
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors but was given {len(params)} parameters")
        return params

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor]) -> None:
        """One EMA step: ``shadow = decay * shadow + (1 - decay) * param`` for every tensor."""
        weight = 1.0 - self.decay
        for s, p in zip(self.shadow, self._params(parameters), strict=True):
            s.lerp_(p.detach().to(device=s.device, dtype=torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the averaged weights into ``parameters`` (cast to their dtype and device)."""
        for s, p in zip(self.shadow, self._params(parameters), strict=True):
            p.copy_(s)

    @contextmanager
    def swapped(self, parameters: Iterable[torch.Tensor], backup_device: torch.device | str = "cpu") -> Iterator[None]:
        """Put the EMA weights into ``parameters`` for the ``with`` block (e.g. previews), then restore them exactly.

        The originals wait on ``backup_device`` (CPU by default, to spare GPU memory); copying back is bitwise.
        """
        params = self._params(parameters)
        with torch.no_grad():
            backup = [p.detach().to(backup_device, copy=True) for p in params]
            self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow weights and update count; the decay stays the one this EMA was built with."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(shadow)} tensors, this model has {len(self.shadow)}")
        for i, (mine, theirs) in enumerate(zip(self.shadow, shadow, strict=True)):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA state tensor {i} has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}")
        saved_decay = state.get("decay", self.decay)
        if saved_decay != self.decay:
            log.info("EMA decay changed from %g (saved) to %g (config); continuing with %g", saved_decay, self.decay,
                     self.decay)
        with torch.no_grad():
            for mine, theirs in zip(self.shadow, shadow, strict=True):
                mine.copy_(theirs)
        self.num_updates = int(state.get("num_updates", 0))
