"""A LoRA merged into the model's weights, for a full checkpoint export, without touching the model.

:func:`merged_components` gives, per component the network adapts (``unet``, ``text_encoder``, ``text_encoder_2``),
its canonical state dict (the names of ``working/``) with each adapted layer's weight plus its adapter's change (plain
LoRA: ``up @ down * alpha / rank * multiplier``; :meth:`Adapter.delta_weight` of any type, the same sum
:meth:`LoraNetwork.merge_into` makes in place). The
models stay as they are and keep training; only the adapted layers' weights are new tensors, the rest is shared.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..families.layout import normalize_diffusers_keys
from .lora import TEXT_COMPONENTS, LoraNetwork


@torch.no_grad()
def merged_components(models: object, network: LoraNetwork) -> dict[str, dict[str, Tensor]]:
    """``{component: canonical state dict with the LoRA merged}`` for the components the LoRA adapts (CPU)."""
    roots: dict[str, nn.Module] = {"unet": models.unet}  # type: ignore[attr-defined]
    roots.update(zip(TEXT_COMPONENTS, models.text_encoders, strict=False))  # type: ignore[attr-defined]
    deltas = {id(layer.weight): network.lora_modules[name].delta_weight(layer.weight)
              for name, layer in network.adapted_layers().items()}
    out: dict[str, dict[str, Tensor]] = {}
    for component, root in roots.items():
        state = root.state_dict(keep_vars=True)
        touched = False
        merged: dict[str, Tensor] = {}
        for key, value in state.items():
            delta = deltas.get(id(value))
            if delta is not None:
                value = (value.float() + delta.float().to(value.device)).to(value.dtype)
                touched = True
            merged[key] = value.detach().cpu()
        if touched:
            out[component] = normalize_diffusers_keys(component, merged)
    return out
