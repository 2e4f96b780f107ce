"""Optimizer steps over parts of the parameters: the optimizer step fused into backward, and the bf16 weight modes.

:class:`ParamwiseOptimizer` puts ordinary optimizers (AdamW, Lion, ...) behind one ``torch.optim.Optimizer`` face:
the LR scheduler sets the LRs of its param groups, ``state_dict`` / ``load_state_dict`` save and restore every
parameter's state in the ordinary format (every inner optimizer shares the face's ``state``). Each parameter is
updated through a *slot*:

* the parameter itself (fp32 weights);
* its fp32 master (``bf16_master``): the bf16 gradient is copied into the master's ``.grad``, the master is
  updated, and the bf16 weight gets the master rounded to nearest;
* a holder whose data is a transient fp32 copy of the weight (``bf16_stochastic``): the update is computed in
  fp32, written back with stochastic rounding, and the copy is dropped.

The parameters are split into *buckets* of consecutive parameters of one param group, each at most
:data:`BUCKET_ELEMENTS` elements (or one parameter, if larger), with an inner optimizer over the bucket's slots:
an update is a few multi-tensor kernels per bucket (and the fp32 copies of one bucket at a time), not a few
launches and a Python optimizer step per parameter. The updates are the ones :meth:`step_param` makes one parameter
at a time (the same optimizer math; the same random bits for stochastic rounding: each parameter keeps its own
stream).

:func:`install_fused_step` runs the updates inside backward (``register_post_accumulate_grad_hook``): once every
parameter of a bucket has its gradient, the bucket is updated and its gradients freed, so no full gradient buffer
ever exists (at most one bucket's). That is only the normal step when one backward makes the whole gradient and
nothing needs all the gradients at once: see :func:`check_fused` for what it refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import GLOBAL_OPTIMIZERS
from ..errors import UserError
from .precision import WeightPrecision, is_dense, padded_size, stochastic_write_back

log = logging.getLogger(__name__)

BUCKET_ELEMENTS = 1 << 22  # 4M elements: the fp32 copies of a bucket (bf16 weights) take 16 MB each


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


@dataclass
class Bucket:
    """Consecutive parameters of one param group, updated together by one inner optimizer over their slots."""

    params: list[torch.nn.Parameter]
    slots: list[torch.Tensor]
    indices: list[int]  # each parameter's place among all: its stochastic rounding stream
    face: dict  # the face's param group (its LR)
    optimizer: torch.optim.Optimizer
    ready: int = 0  # parameters whose gradient backward has completed in this step (fused step)
    members: set[int] = field(default_factory=set)


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Inner optimizers over buckets of the trained parameters (and one per parameter); see the module docstring."""

    def __init__(self, param_groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer],
                 precision: WeightPrecision, bucket_elements: int = BUCKET_ELEMENTS) -> None:
        self.precision = precision
        self.stochastic = precision.mode == "bf16_stochastic"
        self.real: list[list[torch.nn.Parameter]] = [list(g["params"]) for g in param_groups]
        face_groups = []
        for group, params in zip(param_groups, self.real, strict=True):
            face_groups.append({**group, "params": [self._slot(p) for p in params]})
        super().__init__(face_groups, {})
        self.inner: dict[torch.nn.Parameter, tuple[torch.optim.Optimizer, dict, torch.Tensor, int]] = {}
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        index = 0
        for group, face, params in zip(param_groups, self.param_groups, self.real, strict=True):
            settings = {k: v for k, v in group.items() if k != "params"}
            chunk: list[tuple[torch.nn.Parameter, torch.Tensor, int]] = []
            for slot, p in zip(face["params"], params, strict=True):
                opt = make([{**settings, "params": [slot]}])  # step_param's: one parameter
                opt.state = self.state  # one state for all: state_dict holds everything, in the ordinary format
                self.inner[p] = (opt, face, slot, index)
                if chunk and sum(q.numel() for q, _, _ in chunk) + p.numel() > bucket_elements:
                    self._add_bucket(chunk, face, settings, make)  # no bucket outgrows max(limit, one parameter)
                    chunk = []
                chunk.append((p, slot, index))
                index += 1
            if chunk:
                self._add_bucket(chunk, face, settings, make)
        for bucket in self.buckets:  # the inner optimizers' kernel flags (fused AdamW): loading a state puts each
            for key in ("fused", "capturable"):  # "step" where that kernel wants it (on the GPU for fused)
                if key in bucket.optimizer.param_groups[0]:
                    bucket.face.setdefault(key, bucket.optimizer.param_groups[0][key])
        self.fused = False  # install_fused_step: each bucket is updated inside backward, once its gradients are done
        self._scratch: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _add_bucket(self, chunk: list, face: dict, settings: dict,
                    make: Callable[[list[dict]], torch.optim.Optimizer]) -> None:
        params, slots, indices = (list(x) for x in zip(*chunk, strict=True))
        opt = make([{**settings, "params": slots}])
        opt.state = self.state
        bucket = Bucket(params, slots, indices, face, opt, members={id(p) for p in params})
        self.buckets.append(bucket)
        for p in params:
            self.bucket_of[p] = bucket

    def scratch(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements, kept between buckets and steps: the bucket updates reuse one
        largest-bucket's worth of memory instead of fresh memory each time (page faults and zeroing on a CPU)."""
        key = (name, torch.device(device))
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._scratch[key] = torch.empty(max(numel, self.largest_bucket()), dtype=dtype, device=device)
        return buffer[:numel]

    def largest_bucket(self) -> int:
        return max(sum(padded_size(p.numel()) for p in b.params) for b in self.buckets)

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

    @torch.no_grad()
    def step_bucket(self, bucket: Bucket) -> None:
        """Update the parameters of ``bucket`` that have a gradient, together (the caller frees the gradients)."""
        chosen = [(p, slot, index) for p, slot, index in zip(bucket.params, bucket.slots, bucket.indices, strict=True)
                  if p.grad is not None]
        if not chosen:
            return
        for inner_group in bucket.optimizer.param_groups:
            inner_group["lr"] = bucket.face["lr"]
        if chosen[0][1] is chosen[0][0]:  # fp32 weights: the slots are the parameters
            bucket.optimizer.step()
            return
        if not all(is_dense(p) and is_dense(p.grad) for p, _, _ in chosen):  # no flat copy of a strided view
            for p, _, _ in chosen:
                self.step_param(p)
            return
        params, slots, indices = (list(x) for x in zip(*chosen, strict=True))
        device = params[0].device
        rooms = [padded_size(p.numel()) for p in params]
        flat = None
        if self.stochastic:  # the group's fp32 copies, side by side: one pass of rounding over all of them
            flat = self.scratch("values", sum(rooms), torch.float32, device)
            for slot, room, p in zip(slots, flat.split(rooms), params, strict=True):
                slot.data = room.as_strided(p.shape, p.stride())  # the parameter's layout (channels-last too)
                slot.copy_(p.detach())
        grads = self.scratch("grads", sum(rooms), torch.float32, device)
        for slot, room, p in zip(slots, grads.split(rooms), params, strict=True):
            slot.grad = room.as_strided(p.shape, p.grad.stride())
            slot.grad.copy_(p.grad)
        bucket.optimizer.step()
        for slot in slots:
            slot.grad = None
        if flat is None:
            for p, slot in zip(params, slots, strict=True):
                p.copy_(slot)  # bf16_master: the master rounded to nearest
            return
        stochastic_write_back(params, flat, [self.precision.round_seed(index) for index in indices],
                              self.scratch("noise", sum(rooms) * 3 // 2, torch.int32, device))
        for slot, p in zip(slots, params, strict=True):
            slot.data = torch.empty(0, dtype=torch.float32, device=p.device)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient, bucket by bucket (after a fused backward: those whose bucket
        did not complete in backward, e.g. beside a parameter that got no gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self.buckets:
            self.step_bucket(bucket)
            if self.fused:
                bucket.ready = 0
                for p in bucket.params:
                    p.grad = None
        return loss

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
        for bucket in self.buckets:
            bucket.optimizer.state = self.state


def install_fused_step(optimizer: ParamwiseOptimizer) -> list[Any]:
    """Run the updates inside backward: each bucket's as soon as its last gradient is complete, then free them."""

    optimizer.fused = True

    def hook(p: torch.Tensor) -> None:
        bucket = optimizer.bucket_of[p]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            optimizer.step_bucket(bucket)
            bucket.ready = 0
            for q in bucket.params:
                q.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in optimizer.params]
