"""Per-parameter optimizer steps: the optimizer step fused into backward, and the bf16 weight modes.

:class:`ParamwiseOptimizer` is one ordinary optimizer (AdamW, Lion, ...) per trained parameter behind one
``torch.optim.Optimizer`` face: the LR scheduler sets the LRs of its param groups, ``state_dict`` /
``load_state_dict`` save and restore every parameter's state in the ordinary format (all inner optimizers share
the face's ``state``), and :meth:`step_param` updates one parameter. Each inner optimizer updates a *slot*:

* the parameter itself (fp32 weights);
* its fp32 master (``bf16_master``): the bf16 gradient is copied into the master's ``.grad``, the master is
  updated, and the bf16 weight gets the master rounded to nearest;
* a holder whose data is a transient fp32 copy of the weight (``bf16_stochastic``): the update is computed in
  fp32 for this one parameter only, written back with stochastic rounding, and the copy is dropped.

:func:`install_fused_step` hooks :meth:`step_param` into backward with ``register_post_accumulate_grad_hook``: as
soon as a parameter's gradient is complete its update runs and the gradient is freed, so no full gradient buffer
ever exists. That is only the normal step when one backward makes the whole gradient and nothing needs all the
gradients at once: see :func:`check_fused` for what it refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..config import GLOBAL_OPTIMIZERS
from ..errors import UserError
from .precision import WeightPrecision

log = logging.getLogger(__name__)



def check_fused(*, grad_accumulation: int, max_grad_norm: float, uses_grad_scaler: bool, optimizer: str) -> None:
    """Refuse the fused backward step with a setting it cannot honour, naming that setting."""
    problems = []
    if grad_accumulation != 1:
        problems.append((f"gradient accumulation steps is {grad_accumulation}: the step would run before the "
                         "gradients of the other batches are added", "set gradient accumulation steps to 1"))
    if max_grad_norm > 0:
        problems.append((f"max gradient norm is {max_grad_norm:g}: clipping to a global norm needs every gradient "
                         "at once", "set max gradient norm to 0"))
    if uses_grad_scaler:
        problems.append(("fp16 mixed precision on a GPU scales the loss and must check every gradient for "
                         "overflow before any step", "use bf16 mixed precision (or 'no')"))
    if optimizer in GLOBAL_OPTIMIZERS:
        problems.append((f"the {optimizer} optimizer estimates its step size from all parameters together",
                         "pick adamw, adamw_8bit, lion or adafactor"))
    if problems:
        message, hint = problems[0]
        raise UserError(f"the optimizer step in backward cannot be used: {message}",
                        f"{hint}, or turn 'Optimizer step in backward' off")


class ParamwiseOptimizer(torch.optim.Optimizer):
    """One inner optimizer per trained parameter; see the module docstring."""

    def __init__(self, param_groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer],
                 precision: WeightPrecision) -> None:
        self.precision = precision
        self.stochastic = precision.mode == "bf16_stochastic"
        self.real: list[list[torch.nn.Parameter]] = [list(g["params"]) for g in param_groups]
        face_groups = []
        for group, params in zip(param_groups, self.real, strict=True):
            face_groups.append({**group, "params": [self._slot(p) for p in params]})
        super().__init__(face_groups, {})
        self.inner: dict[torch.nn.Parameter, tuple[torch.optim.Optimizer, dict, torch.Tensor, int]] = {}
        index = 0
        for group, face, params in zip(param_groups, self.param_groups, self.real, strict=True):
            for slot, p in zip(face["params"], params, strict=True):
                opt = make([{**{k: v for k, v in group.items() if k != "params"}, "params": [slot]}])
                opt.state = self.state  # one state for all: state_dict holds everything, in the ordinary format
                self.inner[p] = (opt, face, slot, index)
                index += 1
        self.fused = False  # install_fused_step: each update runs inside backward, one parameter at a time
        self.whole: torch.optim.Optimizer | None = None
        if not self.stochastic:  # the ordinary step: one optimizer over every slot (multi-tensor kernels)
            self.whole = make([{**{k: v for k, v in g.items() if k != "params"}, "params": face["params"]}
                               for g, face in zip(param_groups, self.param_groups, strict=True)])
            self.whole.state = self.state

    def _slot(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.stochastic:
            return torch.empty(0, dtype=torch.float32, device=p.device)  # data filled only during its update
        return self.precision.value(p)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for params in self.real for p in params]

    @torch.no_grad()
    def step_param(self, p: torch.nn.Parameter) -> None:
        """Update one parameter from its gradient (which the caller frees afterwards)."""
        if p.grad is None:
            return
        opt, face, slot, index = self.inner[p]
        opt.param_groups[0]["lr"] = face["lr"]
        if slot is p:
            opt.step()
            return
        if self.stochastic:
            slot.data = p.detach().float()
        slot.grad = p.grad.to(torch.float32)
        opt.step()
        slot.grad = None
        self.precision.write_back(p, slot, index)
        if self.stochastic:
            slot.data = torch.empty(0, dtype=torch.float32, device=p.device)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient (none has one after a fused backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.whole is not None and not self.fused:
            self._step_whole()
        else:
            for p in self.params:
                self.step_param(p)
        return loss

    @torch.no_grad()
    def _step_whole(self) -> None:
        """Every gradient into its slot, one step of the whole optimizer, each updated slot written back: the same
        updates as :meth:`step_param` one by one, in a few multi-tensor kernels instead of a few per parameter."""
        assert self.whole is not None
        for whole_group, face in zip(self.whole.param_groups, self.param_groups, strict=True):
            whole_group["lr"] = face["lr"]
        moved = [(p, self.inner[p][2], self.inner[p][3]) for p in self.params
                 if p.grad is not None and self.inner[p][2] is not p]
        for p, slot, _ in moved:
            slot.grad = p.grad.to(torch.float32)
        self.whole.step()
        for p, slot, index in moved:
            slot.grad = None
            self.precision.write_back(p, slot, index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype; 8-bit optimizers (bitsandbytes) keep uint8
        # moments beside fp32 quantization maps: give each state tensor back the dtype it was saved with
        faces = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            loaded = self.state[faces[index]]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and loaded[key].dtype != value.dtype:
                    loaded[key] = value.to(device=loaded[key].device)
        for opt, *_ in self.inner.values():
            opt.state = self.state  # loading replaced the shared state object
        if self.whole is not None:
            self.whole.state = self.state


def install_fused_step(optimizer: ParamwiseOptimizer) -> list[Any]:
    """Run each parameter's update inside backward, as its gradient completes, then free that gradient."""

    optimizer.fused = True

    def hook(p: torch.Tensor) -> None:
        optimizer.step_param(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in optimizer.params]
