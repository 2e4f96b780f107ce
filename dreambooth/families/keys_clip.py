"""Text-encoder key maps: HF CLIP-L (SD1, SDXL encoder 1) and OpenCLIP (SD2 ViT-H, SDXL encoder 2 ViT-bigG).

- CLIP-L is stored in ldm as a transformers ``CLIPTextModel`` already, so only the file prefix changes
  (``cond_stage_model.transformer.`` / ``conditioner.embedders.0.transformer.`` -> ``text_encoder.``).
  ``text_model.embeddings.position_ids`` is deliberately not mapped: it is a constant ``arange(77)`` buffer that
  transformers >= 4.31 no longer saves, so it stays in the single-file extras.
- OpenCLIP uses ``nn.MultiheadAttention`` with one fused ``in_proj`` (q, k, v stacked along dim 0) and its own
  module names; diffusers loads it into a transformers CLIP model with separate q/k/v projections.
  ``text_projection`` is a raw matrix applied as ``x @ P``; the transformers Linear stores ``P.T``.
- SD2 conditions on the penultimate layer, so diffusers' SD2 text encoder has only 23 of the 24 layers; the last
  resblock, ``text_projection`` and ``logit_scale`` have no place in diffusers and stay in the extras.
"""

from __future__ import annotations

from collections.abc import Iterator

from .keys_unet import QKV, TRANSPOSE, KeyMap, rename_module

# Structural sizes of the text towers (only layer counts matter for names).
CLIP_L_LAYERS = 12
OPEN_CLIP_H_LAYERS = 24  # SD2 file; diffusers keeps OPEN_CLIP_H_LAYERS - 1
OPEN_CLIP_BIGG_LAYERS = 32  # SDXL text_encoder_2

_HF_LAYER_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
)


def hf_clip_key_map(num_layers: int = CLIP_L_LAYERS) -> list[KeyMap]:
    """transformers CLIPTextModel keys; identical on both sides once the file prefix is removed."""
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(num_layers):
        for m in _HF_LAYER_MODULES:
            keys += [f"text_model.encoder.layers.{i}.{m}.weight", f"text_model.encoder.layers.{i}.{m}.bias"]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return [KeyMap(k, (k,)) for k in keys]


_OPEN_CLIP_LAYER = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _open_clip_layer(i: int) -> Iterator[KeyMap]:
    ldm, d = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
    for p in ("weight", "bias"):
        yield KeyMap(f"{ldm}.attn.in_proj_{p}",
                     tuple(f"{d}.self_attn.{x}_proj.{p}" for x in ("q", "k", "v")), QKV)
    for old, new in _OPEN_CLIP_LAYER:
        yield from rename_module(f"{ldm}.{old}", f"{d}.{new}")


def open_clip_key_map(num_layers: int, with_projection: bool) -> list[KeyMap]:
    """OpenCLIP text tower keys (relative to ``...model.``) for the first ``num_layers`` resblocks.

    ``with_projection``: map ``text_projection`` to the transposed ``text_projection.weight`` of a
    ``CLIPTextModelWithProjection`` (SDXL); without it the projection is left to the extras (SD2).
    """
    out = [
        KeyMap("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
        KeyMap("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    ]
    for i in range(num_layers):
        out += _open_clip_layer(i)
    out += rename_module("ln_final", "text_model.final_layer_norm")
    if with_projection:
        out.append(KeyMap("text_projection", ("text_projection.weight",), TRANSPOSE))
    return out
