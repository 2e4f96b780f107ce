"""The adapter on one layer, one class per LoRA type, in the key layout the WebUI's built-in Lora extension
(``extensions-builtin/Lora``, v1.10.1), ComfyUI and LyCORIS load. Per adapted layer with weight ``W`` (out, in[, kh,
kw]) and ``s = alpha / rank``, the file holds, under the layer's kohya name:

- ``lora`` (LoCon on convolutions): ``lora_down.weight``, ``lora_up.weight``; ``dW = up @ down`` (``network_lora.py``).
- ``dora``: the same plus ``dora_scale`` of shape (1, in[, 1, 1]), a magnitude per input channel; the layer computes
  ``W' = dora_scale * (W + s dW) / ||W + s dW||``, the norm taken per input channel over the output rows (and the
  kernel), as the WebUI's ``network.py`` (``apply_weight_decompose``) and LyCORIS with ``wd_on_output=False`` do.
  (LyCORIS's default, a magnitude per *output* row, is one the WebUI v1.10.1 applies wrongly, so we never write it.)
- ``loha``: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*kh*kw), ``hada_w2_a``, ``hada_w2_b``; ``dW = (w1_a @ w1_b) *
  (w2_a @ w2_b)``, the Hadamard product (``network_hada.py``; no Tucker ``hada_t1/t2`` form).
- ``lokr``: ``lokr_w1`` (a, c) or its factors ``lokr_w1_a`` (a, r) / ``lokr_w1_b`` (r, c), and ``lokr_w2`` (b, d[, kh,
  kw]) or ``lokr_w2_a`` (b, r) / ``lokr_w2_b`` (r, d*kh*kw); ``dW = kron(w1, w2)`` with out = a*b, in = c*d
  (``network_lokr.py``). A factor is stored whole when the rank is at least half its larger side (LyCORIS's rule),
  and with both whole the scale is 1 (the WebUI reads a rank only from ``lokr_w1_b`` / ``lokr_w2_b``), so ``alpha``
  is written as the rank, as LyCORIS writes it.

Every file also holds ``alpha``. With multiplier ``m`` the layer computes ``W + m * (W' - W)`` (``W' = W + s dW`` but
for DoRA), which is what the WebUI does to the weight with the LoRA at strength ``m``. A fresh adapter changes nothing:
``lora_up``, ``hada_w2_a``, and ``lokr_w2`` (or ``lokr_w2_b``) start at zero, ``dora_scale`` at the base's norms.

Why not the ``lycoris-lora`` package: its newest release resolves beside the WebUI's torch 2.1.2 but does not import
there (``torch.library.custom_op`` is torch 2.4+), 3.x would be a pin on an old release, its modules replace a layer's
``forward`` where ours are hooks that come off exactly, and its DoRA default is the layout the WebUI misreads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LORA_TYPES


class Shared:
    """State a network shares with its adapters (a plain object, so adapters do not register the network)."""

    def __init__(self) -> None:
        self.multiplier = 1.0


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``, LyCORIS's split of a LoKr side: a positive ``factor``
    that divides ``dimension`` is one of the two; otherwise ``m`` is the largest divisor at most ``sqrt(dimension)``
    (and at most ``factor`` when it is positive): -1 splits as evenly as possible."""
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    limit = math.isqrt(dimension) if factor < 0 else min(factor, math.isqrt(dimension))
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def column_norms(weight: Tensor) -> Tensor:
    """The norm of each input channel's column of ``weight`` (over the output rows and the kernel), shaped (1, in[, 1,
    1]): DoRA's magnitude, as the WebUI computes it."""
    n_in = weight.shape[1]
    norms = weight.transpose(0, 1).reshape(n_in, -1).norm(dim=1)
    return norms.reshape(1, n_in, *[1] * (weight.ndim - 2))


def _layer_op(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer``'s own operation (its stride, padding...) with another weight and no bias."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, None)
    return nn.functional.linear(x, weight)


class Adapter(nn.Module):
    """What all types share: the kohya name, ``alpha`` (a buffer, saved), the scale, dropout on the adapter's input
    while training, the multiplier, and the forward hook that adds the adapter's output to the layer's."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float, shared: Shared) -> None:
        super().__init__()
        self.lora_name = name
        self.rank = rank
        self.dropout = dropout
        self._shared = shared
        self.register_buffer("alpha", torch.tensor(float(alpha), device=base.weight.device))
        self.scale = self.scale_for(float(alpha))

    def scale_for(self, alpha: float) -> float:
        return alpha / self.rank

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.scale = self.scale_for(float(self.alpha))  # a loaded file brings its own alpha

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _input(self, x: Tensor, dropout: bool) -> Tensor:
        h = x if x.dtype == self._param_dtype() else x.to(self._param_dtype())
        if dropout and self.dropout > 0:
            h = nn.functional.dropout(h, p=self.dropout, training=True)
        return h

    def updown(self) -> Tensor:
        """The unscaled weight change ``dW`` (the layer's weight shape, or its first two dimensions flattened)."""
        raise NotImplementedError

    def path(self, layer: nn.Module, x: Tensor, dropout: bool) -> Tensor:
        """``s * dW`` applied to ``x`` by the layer's operation (no multiplier)."""
        weight = self.updown().reshape(layer.weight.shape) * self.scale
        return _layer_op(layer, self._input(x, dropout), weight)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        multiplier = self._shared.multiplier
        if multiplier == 0:
            return output
        x = args[0] if args else kwargs["input"]
        # dropout only while both the network and the adapted model are training (previews put the model in eval)
        return output + (self.path(module, x, self.training and module.training) * multiplier).to(output.dtype)

    def pre_hook(self) -> Any:
        """A forward pre-hook ``(module, args, kwargs)`` the layer needs too, or None."""
        return None

    def delta_weight(self, weight: Tensor) -> Tensor:
        """What this adapter adds to the layer's ``weight`` (``W' - W`` times the multiplier), in its shape: the
        WebUI's patch of the weight, and a merged checkpoint's."""
        return self.updown().reshape(weight.shape) * (self.scale * self._shared.multiplier)


class LoraModule(Adapter):
    """LoRA / LoCon: ``up(down(x)) * s``; with ``decompose`` DoRA: the layer's input scaled per channel by
    ``dora_scale / ||W + s up @ down||`` before the layer and the LoRA path (the same as scaling the weight's columns;
    the norm is not differentiated, as the DoRA paper's section 4.3 does)."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float, shared: Shared,
                 dtype: torch.dtype, decompose: bool = False) -> None:
        super().__init__(name, base, rank, alpha, dropout, shared)
        factory: dict[str, Any] = {"device": base.weight.device, "dtype": dtype}
        if isinstance(base, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                                  base.dilation, bias=False, padding_mode=base.padding_mode, **factory)
            self.lora_up: nn.Module = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dora_scale: nn.Parameter | None = None
        if decompose:
            with torch.no_grad():
                self.dora_scale = nn.Parameter(column_norms(base.weight.float()).to(dtype))

    def updown(self) -> Tensor:
        up, down = self.lora_up.weight, self.lora_down.weight
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def path(self, layer: nn.Module, x: Tensor, dropout: bool) -> Tensor:
        return self.lora_up(self.lora_down(self._input(x, dropout))) * self.scale

    def _ratio(self, weight: Tensor, x: Tensor) -> Tensor:
        """DoRA's ``dora_scale / ||W + s dW||`` per input channel, shaped to multiply ``x`` (channels last for a
        linear layer, second for a convolution)."""
        assert self.dora_scale is not None
        with torch.no_grad():
            norms = column_norms(weight.float() + self.updown().float() * self.scale)
        ratio = (self.dora_scale / norms.to(self.dora_scale.dtype)).flatten()
        return ratio.reshape(-1, *[1] * (x.ndim - 2)) if weight.ndim == 4 else ratio

    def pre_hook(self) -> Any:
        return self._scale_input if self.dora_scale is not None else None

    def _scale_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """DoRA at multiplier 1 (training): the layer and the LoRA path see the scaled input, one layer call."""
        if self._shared.multiplier != 1:
            return None
        x = args[0] if args else kwargs["input"]
        scaled = x * self._ratio(module.weight, x).to(x.dtype)
        return ((scaled, *args[1:]), kwargs) if args else (args, {**kwargs, "input": scaled})

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        multiplier = self._shared.multiplier
        if self.dora_scale is None or multiplier in (0, 1):  # DoRA at 1: the pre-hook has scaled the input already
            return super().hook(module, args, kwargs, output)
        # DoRA at another strength: the base output moved that share of the way to the decomposed one
        x = args[0] if args else kwargs["input"]
        scaled = x * self._ratio(module.weight, x).to(x.dtype)
        decomposed = module.forward(scaled) + self.path(module, scaled, self.training and module.training).to(
            output.dtype)
        return output + (decomposed - output) * multiplier

    def delta_weight(self, weight: Tensor) -> Tensor:
        if self.dora_scale is None:
            return super().delta_weight(weight)
        base = weight.float()
        merged = base + self.updown().float().reshape(weight.shape) * self.scale
        decomposed = merged * (self.dora_scale.float() / column_norms(merged))
        return (decomposed - base) * self._shared.multiplier


class LohaModule(Adapter):
    """LoHa: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b)``, rank ``r`` pairs whose product reaches rank ``r**2``. Initialised
    as LyCORIS does: ``w1_a`` ~ N(0, 0.1), ``w1_b`` and ``w2_b`` ~ N(0, 1), ``w2_a`` zero."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float, shared: Shared,
                 dtype: torch.dtype) -> None:
        super().__init__(name, base, rank, alpha, dropout, shared)
        factory: dict[str, Any] = {"device": base.weight.device, "dtype": dtype}
        n_out, n_in = base.weight.shape[0], base.weight[0].numel()  # a convolution's kernel goes into the columns
        self.hada_w1_a = nn.Parameter(torch.empty(n_out, rank, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, n_in, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(n_out, rank, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, n_in, **factory))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def updown(self) -> Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)


class LokrModule(Adapter):
    """LoKr: ``dW = kron(w1, w2)``, the output and input sides split by :func:`factorization`; ``w1`` is the small
    factor (kept whole unless ``decompose_both`` and the rank is below half its larger side), ``w2`` the large one
    (low-rank unless the rank is at least half its larger side). Initialised as LyCORIS does: ``w1`` (or its factors)
    and ``w2_a`` kaiming-uniform, ``w2`` (or ``w2_b``) zero."""

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float, shared: Shared,
                 dtype: torch.dtype, factor: int = -1, decompose_both: bool = False) -> None:
        shape = tuple(base.weight.shape)
        (a, b), (c, d) = factorization(shape[0], factor), factorization(shape[1], factor)
        split_w1 = decompose_both and rank < max(a, c) / 2
        split_w2 = rank < max(b, d) / 2
        stored_alpha = float(alpha if split_w1 or split_w2 else rank)
        super().__init__(name, base, rank, stored_alpha, dropout, shared)
        self.kernel = shape[2:]
        factory: dict[str, Any] = {"device": base.weight.device, "dtype": dtype}
        if split_w1:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c, **factory))
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **factory))
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if split_w2:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, **factory))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d * math.prod(self.kernel), **factory))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *self.kernel, **factory))
        self.scale = self.scale_for(stored_alpha)  # now that the factors say which are whole

    def scale_for(self, alpha: float) -> float:
        # the WebUI and ComfyUI take the rank from lokr_w1_b or lokr_w2_b; with both factors whole the scale is 1
        factored = hasattr(self, "lokr_w1_b") or hasattr(self, "lokr_w2_b")
        return alpha / self.rank if factored else 1.0

    def updown(self) -> Tensor:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.lokr_w2_a.shape[0], -1, *self.kernel)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)


def make_adapter(kind: str, name: str, layer: nn.Module, rank: int, alpha: float, dropout: float, shared: Shared,
                 dtype: torch.dtype, lokr_factor: int = -1, lokr_decompose_both: bool = False) -> Adapter:
    """The adapter of LoRA type ``kind`` (``config.LORA_TYPES``) for ``layer``."""
    if kind not in LORA_TYPES:
        raise ValueError(f"unknown LoRA type {kind!r}, expected one of {LORA_TYPES}")
    if kind == "loha":
        return LohaModule(name, layer, rank, alpha, dropout, shared, dtype)
    if kind == "lokr":
        return LokrModule(name, layer, rank, alpha, dropout, shared, dtype, lokr_factor, lokr_decompose_both)
    return LoraModule(name, layer, rank, alpha, dropout, shared, dtype, decompose=kind == "dora")
