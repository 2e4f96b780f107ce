"""Peak bytes of the tensors alive on the training device during one step, on any device, split by role.

CUDA reports its own peak (``torch.cuda.max_memory_allocated``); the CPU has nothing like it, and neither says
what the bytes are. :class:`LiveTensorTracker` measures it the same way on every device: a ``TorchDispatchMode``
sees every tensor an aten op takes or returns (forward, autograd's backward, the optimizer: all of it runs below
the mode), and each storage on the device is counted, once, from the moment it is first seen until it is freed.
The tensors alive when the step starts come from a census of the garbage collector's objects (and their
``.grad``). The running sum is exact at every op boundary, so the peak is: where torch keeps one Python object per
storage (2.2+, ``compat.storages_keep_their_object``), a weak reference's callback subtracts a storage the moment
it is freed; on torch 2.1, whenever the sum could pass the peak so far, the storages that died are found first
(``StorageWeakRef``). What it cannot see: scratch memory a kernel allocates and frees inside one op (no op returns
it), and allocator overheads (CUDA's caching and rounding: ``peak_allocated_bytes`` shows those on a GPU).

The split at the peak (:class:`Roles`): weights (every parameter and buffer of the modules on the device, and the
optimizer's own tensors such as fp32 masters), gradients (``.grad`` of the trained tensors and of the optimizer's
tensors at that moment), optimizer state, and the rest (activations, caches, temporaries). Weights and optimizer
state are taken when the step starts and must live through it (checked at its end: ``roles_changed``). Modules
offloaded to the CPU are on the device when the device is the CPU: they are counted apart (``offloaded``) and left
out of the peak, which is then what a GPU would hold. Besides the peak, ``max_other_bytes`` is the most the rest
ever held at one moment (gradients followed as autograd completes them), which is where activations peak: it
need not be at the moment of the overall peak (that is often the optimizer step, with every gradient alive).
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dreambooth.compat import storages_keep_their_object

SPLIT = ("weights", "gradients", "optimizer_state", "other")


def _tensors(obj: object) -> Iterable[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


@dataclass
class Roles:
    """What the tensors of a run are: the modules on the device, the trained tensors, the optimizer, and the modules
    offloaded to the CPU."""

    modules: list[torch.nn.Module]
    trained: list[torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    offloaded: list[torch.nn.Module] = field(default_factory=list)

    def weights(self) -> Iterable[torch.Tensor]:
        for module in self.modules:
            yield from module.parameters()
            yield from module.buffers()
        yield from self.trained
        if self.optimizer is not None:  # fp32 masters (bf16 weights) are the optimizer's own tensors
            for group in self.optimizer.param_groups:
                yield from group["params"]

    def optimizer_state(self) -> Iterable[torch.Tensor]:
        if self.optimizer is not None:
            yield from _tensors(list(self.optimizer.state.values()))

    def offloaded_tensors(self) -> Iterable[torch.Tensor]:
        for module in self.offloaded:
            yield from module.parameters()
            yield from module.buffers()

    def grad_owners(self) -> list[torch.Tensor]:
        owners = list(self.trained)
        if self.optimizer is not None:
            owners += [p for g in self.optimizer.param_groups for p in g["params"]]
        return list({id(t): t for t in owners}.values())


class LiveTensorTracker(TorchDispatchMode):
    """``with LiveTensorTracker(device, roles): <one step>``; then :meth:`result`."""

    def __init__(self, device: torch.device | str, roles: Roles | Callable[[], Roles] | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._roles_source = roles
        self._callbacks = storages_keep_their_object()
        self._live: dict[int, tuple[object, int]] = {}  # StorageImpl address -> (weak ref, bytes)
        self._total = 0  # bytes of _live (with polling: dead entries included until the next purge)
        self._pinned: dict[int, tuple[StorageWeakRef, int]] = {}  # weights, optimizer state, offloaded modules
        self._pinned_total = 0
        self._grads: dict[int, int] = {}  # gradients autograd completed (post-accumulate hooks): key -> bytes
        self._grad_bytes = 0
        self._hooks: list = []
        self.max_other_bytes = 0
        self._owners: list[torch.Tensor] = []
        self.start_bytes = 0
        self.peak_bytes = 0
        self.peak_split: dict[str, int] = dict.fromkeys(SPLIT, 0)
        self.offloaded_bytes = 0
        self.roles_changed = False
        self._static: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ storages
    def _storage(self, t: object) -> torch.UntypedStorage | None:
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            return None
        d, want = t.device, self.device
        if d.type != want.type or want.index is not None and d.index != want.index:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (nested, ...)
            return None

    def _see(self, t: object) -> bool:
        """Count ``t``'s storage if it is new (or has grown); True when the running sum went up."""
        storage = self._storage(t)
        if storage is None:
            return False
        key = storage._cdata
        if key in self._pinned:
            return False
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[1] >= nbytes:
                return False
            self._live[key] = (entry[0], nbytes)  # the same storage, grown (resize_)
            self._total += nbytes - entry[1]
            return True
        ref = weakref.ref(storage, functools.partial(self._freed, key)) if self._callbacks else \
            StorageWeakRef(storage)  # holding it keeps the StorageImpl's address from being reused
        self._live[key] = (ref, nbytes)
        self._total += nbytes
        return True

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self._total -= entry[1]
            self._grad_bytes -= self._grads.pop(key, 0)

    def _grad_done(self, param: torch.Tensor) -> None:
        """A gradient autograd completed: it counts as a gradient, not the rest, from now on."""
        grad = param.grad
        storage = self._storage(grad) if grad is not None else None
        if storage is not None and storage._cdata not in self._grads and storage._cdata not in self._pinned:
            self._see(grad)
            self._grads[storage._cdata] = storage.nbytes()
            self._grad_bytes += storage.nbytes()

    def _purge(self) -> None:
        """Polling (torch 2.1): drop the storages that died since the last purge."""
        if self._callbacks:
            return
        expired = torch.UntypedStorage._expired
        dead = [key for key, (ref, _) in self._live.items() if expired(ref.cdata)]
        for key in dead:
            self._total -= self._live.pop(key)[1]
            self._grad_bytes -= self._grads.pop(key, 0)

    def _pin(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count role tensors' storages as pinned (alive while their roles hold them): bytes newly pinned."""
        total = 0
        for t in tensors:
            storage = self._storage(t)
            if storage is None or storage._cdata in self._pinned:
                continue
            entry = self._live.pop(storage._cdata, None)
            if entry is not None:
                self._total -= entry[1]
            nbytes = storage.nbytes()
            self._pinned[storage._cdata] = (StorageWeakRef(storage), nbytes)
            total += nbytes
        self._pinned_total += total
        return total

    # ------------------------------------------------------------------------------------------------ the mode
    def __enter__(self) -> LiveTensorTracker:
        roles = self._roles_source() if callable(self._roles_source) else self._roles_source
        roles = roles or Roles([], [])
        gc.collect()
        self.offloaded_bytes = self._pin(roles.offloaded_tensors())
        self._static = {"weights": self._pin(roles.weights()), "optimizer_state": self._pin(roles.optimizer_state())}
        self._owners = roles.grad_owners()
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(): some lazy objects warn on __class__
                self._see(obj)
                if obj.is_leaf and obj.requires_grad and obj.grad is not None:
                    self._see(obj.grad)
        for t in self._owners:
            if t.grad is not None:
                self._see(t.grad)
            if t.is_leaf and t.requires_grad:
                self._grad_done(t)
                self._hooks.append(t.register_post_accumulate_grad_hook(self._grad_done))
        self._purge()
        self.start_bytes = self._device_bytes()
        self.max_other_bytes = self._other_bytes()
        self._new_peak()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._grads.clear()
        expired = torch.UntypedStorage._expired
        self.roles_changed = any(n and expired(ref.cdata) for ref, n in self._pinned.values())
        self._live.clear()
        self._pinned.clear()
        self._owners = []

    def _device_bytes(self) -> int:
        return self._pinned_total + self._total - self.offloaded_bytes

    def _other_bytes(self) -> int:
        return self._total - self._grad_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        grew = False
        for t in tree_flatten((args, kwargs))[0]:
            grew = self._see(t) or grew
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            grew = self._see(t) or grew
        if grew and (self._device_bytes() > self.peak_bytes or self._other_bytes() > self.max_other_bytes):
            self._purge()  # polling: the sum may hold storages that died since; it is exact after this
            if self._device_bytes() > self.peak_bytes:
                self._new_peak()
            self.max_other_bytes = max(self.max_other_bytes, self._other_bytes())
        return out

    def _new_peak(self) -> None:
        self.peak_bytes = self._device_bytes()
        seen: set[int] = set()
        gradients = 0
        for t in self._owners:
            grad = t.grad
            storage = self._storage(grad) if grad is not None else None
            if storage is not None and storage._cdata not in seen and storage._cdata not in self._pinned:
                seen.add(storage._cdata)
                gradients += storage.nbytes()
        split = {**self._static, "gradients": gradients}
        split["other"] = self.peak_bytes - sum(split.values())
        self.peak_split = {k: split[k] for k in SPLIT}

    def result(self) -> dict:
        """The row's fields: peak tensor bytes on the device and its split, the bytes alive when the step started,
        and those of offloaded modules (not in the peak)."""
        return {"peak_tensor_bytes": self.peak_bytes,
                **{f"peak_{part}_bytes": self.peak_split[part] for part in SPLIT},
                "max_other_bytes": self.max_other_bytes, "step_start_tensor_bytes": self.start_bytes,
                "offloaded_bytes": self.offloaded_bytes,
                "tracker_roles_changed": self.roles_changed}
