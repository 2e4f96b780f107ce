"""VAE key map between the ldm ``AutoencoderKL`` (``first_stage_model.``) and diffusers ``AutoencoderKL``.

All three families use the same VAE structure (128 base channels, multipliers 1/2/4/4, two res blocks per level);
only the SDXL weights and scaling factor differ. Two things are not plain renames:

- the decoder's ``up`` list is stored shallowest-first in ldm but deepest-first in diffusers (``up.i`` is
  ``up_blocks.{levels-1-i}``), because ldm indexes decoder levels by resolution while diffusers indexes them in
  execution order;
- the mid-block attention projections are 1x1 convs ``[C, C, 1, 1]`` in ldm and Linear ``[C, C]`` in diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .keys_unet import CONV1X1, KeyMap, rename_module


@dataclass(frozen=True)
class VAEStructure:
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2


SD_VAE = VAEStructure()


def _resnet(ldm: str, diffusers: str, shortcut: bool) -> Iterator[KeyMap]:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        yield from rename_module(f"{ldm}.{name}", f"{diffusers}.{name}")
    if shortcut:
        yield from rename_module(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")


def _mid(ldm: str, diffusers: str) -> Iterator[KeyMap]:
    yield from _resnet(f"{ldm}.block_1", f"{diffusers}.resnets.0", shortcut=False)
    attn_ldm, attn_d = f"{ldm}.attn_1", f"{diffusers}.attentions.0"
    yield from rename_module(f"{attn_ldm}.norm", f"{attn_d}.group_norm")
    for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        yield KeyMap(f"{attn_ldm}.{old}.weight", (f"{attn_d}.{new}.weight",), CONV1X1)
        yield KeyMap(f"{attn_ldm}.{old}.bias", (f"{attn_d}.{new}.bias",))
    yield from _resnet(f"{ldm}.block_2", f"{diffusers}.resnets.1", shortcut=False)


def vae_key_map(s: VAEStructure = SD_VAE) -> list[KeyMap]:
    """Every VAE tensor with its diffusers name (keys relative to ``first_stage_model.`` / ``vae.``)."""
    out: list[KeyMap] = []
    levels = len(s.ch_mult)

    # Encoder: level i takes ch*in_mult[i] channels in and gives ch*ch_mult[i] out (a shortcut where they differ).
    in_mult = (1, *s.ch_mult)
    out += rename_module("encoder.conv_in", "encoder.conv_in")
    for i in range(levels):
        for r in range(s.num_res_blocks):
            out += _resnet(f"encoder.down.{i}.block.{r}", f"encoder.down_blocks.{i}.resnets.{r}",
                           shortcut=r == 0 and in_mult[i] != s.ch_mult[i])
        if i != levels - 1:
            out += rename_module(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    out += _mid("encoder.mid", "encoder.mid_block")
    out += rename_module("encoder.norm_out", "encoder.conv_norm_out")
    out += rename_module("encoder.conv_out", "encoder.conv_out")

    # Decoder: starts at the deepest width and walks the levels from deepest to shallowest.
    out += rename_module("decoder.conv_in", "decoder.conv_in")
    out += _mid("decoder.mid", "decoder.mid_block")
    width = s.ch_mult[-1]
    for i in reversed(range(levels)):
        up = levels - 1 - i
        for r in range(s.num_res_blocks + 1):
            out += _resnet(f"decoder.up.{i}.block.{r}", f"decoder.up_blocks.{up}.resnets.{r}",
                           shortcut=r == 0 and width != s.ch_mult[i])
        width = s.ch_mult[i]
        if i != 0:
            out += rename_module(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    out += rename_module("decoder.norm_out", "decoder.conv_norm_out")
    out += rename_module("decoder.conv_out", "decoder.conv_out")

    out += rename_module("quant_conv", "quant_conv")
    out += rename_module("post_quant_conv", "post_quant_conv")
    return out
