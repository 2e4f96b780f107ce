"""UNet key map between the ldm/sgm ``openaimodel.UNetModel`` layout and diffusers ``UNet2DConditionModel``.

The map is derived from a handful of structural parameters (levels, res blocks per level, transformer depth per
level) instead of being written out, because SDXL alone has 1680 UNet tensors and a derived map cannot drift from
the structure it describes.

This module also defines :class:`KeyMap`, the entry type shared by the VAE and CLIP maps: one ldm key on one side,
one or three diffusers keys on the other, plus the tensor operation that links them. Keys in a ``KeyMap`` are
relative to the component (no ``model.diffusion_model.`` / ``unet.`` prefix); ``layout.py`` adds the prefixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

# Tensor operations linking the two sides. Every one is a view or a plain reference on the way to diffusers, and
# exactly invertible (bitwise) on the way back; only QKV needs a copy (torch.cat) when joining.
RENAME = "rename"  # same tensor, new name
CONV1X1 = "conv1x1"  # ldm Conv2d 1x1 weight [O, I, 1, 1]  <->  diffusers Linear weight [O, I]
QKV = "qkv"  # ldm fused in_proj [3D, ...]  <->  diffusers q/k/v [D, ...] (three keys, in that order)
TRANSPOSE = "transpose"  # ldm [A, B] used as x @ W  <->  diffusers Linear weight [B, A]
OPS = (RENAME, CONV1X1, QKV, TRANSPOSE)


class KeyMap(NamedTuple):
    """One ldm key and the diffusers key(s) that hold the same numbers."""

    ldm: str
    diffusers: tuple[str, ...]
    op: str = RENAME


_PARAMS = ("weight", "bias")


def rename_module(ldm: str, diffusers: str, params: tuple[str, ...] = _PARAMS) -> Iterator[KeyMap]:
    """All parameters of one module whose only difference is the module path."""
    for p in params:
        yield KeyMap(f"{ldm}.{p}", (f"{diffusers}.{p}",))


@dataclass(frozen=True)
class UNetStructure:
    """The parameters that decide which tensors an ldm UNet has (channel counts do not matter for names,
    except where they decide whether a resnet needs a 1x1 shortcut conv)."""

    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # per level; 0 means the level has no SpatialTransformer
    mid_transformer_depth: int
    label_emb: bool  # SDXL: the "text_time" vector conditioning (label_emb.0.{0,2} -> add_embedding.linear_{1,2})

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per level")


# SD 1.x and SD 2.x share the key structure (SD2 differs only in shapes: linear proj_in/out, 1024-d context).
SD_UNET = UNetStructure(channel_mult=(1, 2, 4, 4), num_res_blocks=2, transformer_depth=(1, 1, 1, 0),
                        mid_transformer_depth=1, label_emb=False)
SDXL_UNET = UNetStructure(channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 10),
                          mid_transformer_depth=10, label_emb=True)

# ResBlock (ldm) -> ResnetBlock2D (diffusers). Index positions follow the ldm nn.Sequential layout:
# in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv].
_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)

# The inside of a BasicTransformerBlock has the same names in both layouts (diffusers kept the ldm names).
_BLOCK_PARAMS = (
    *(f"attn{a}.to_{p}.weight" for a in (1, 2) for p in ("q", "k", "v")),
    "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias",
    "ff.net.2.weight", "ff.net.2.bias",
    *(f"norm{n}.{p}" for n in (1, 2, 3) for p in _PARAMS),
)


def _resnet(ldm: str, diffusers: str, shortcut: bool) -> Iterator[KeyMap]:
    for old, new in _RESNET:
        yield from rename_module(f"{ldm}.{old}", f"{diffusers}.{new}")
    if shortcut:
        yield from rename_module(f"{ldm}.skip_connection", f"{diffusers}.conv_shortcut")


def _transformer(ldm: str, diffusers: str, depth: int) -> Iterator[KeyMap]:
    for name in ("norm", "proj_in", "proj_out"):
        yield from rename_module(f"{ldm}.{name}", f"{diffusers}.{name}")
    for i in range(depth):
        for p in _BLOCK_PARAMS:
            yield KeyMap(f"{ldm}.transformer_blocks.{i}.{p}", (f"{diffusers}.transformer_blocks.{i}.{p}",))


def unet_key_map(s: UNetStructure) -> list[KeyMap]:
    """Every UNet tensor of the given structure, in ldm order, with its diffusers name.

    ldm numbers the encoder as one flat ``input_blocks`` list (conv_in, then per level ``num_res_blocks`` ResBlocks,
    each optionally followed by a transformer, then one Downsample except on the last level) and the decoder as a
    flat ``output_blocks`` list (per level, deepest first, ``num_res_blocks + 1`` ResBlocks with optional
    transformer, the last one of every level but the shallowest also holding the Upsample).
    """
    out: list[KeyMap] = []
    levels = len(s.channel_mult)

    out += rename_module("time_embed.0", "time_embedding.linear_1")
    out += rename_module("time_embed.2", "time_embedding.linear_2")
    if s.label_emb:
        out += rename_module("label_emb.0.0", "add_embedding.linear_1")
        out += rename_module("label_emb.0.2", "add_embedding.linear_2")
    out += rename_module("input_blocks.0.0", "conv_in")

    idx = 0
    for level, (mult, depth) in enumerate(zip(s.channel_mult, s.transformer_depth, strict=True)):
        prev_mult = s.channel_mult[level - 1] if level else 1  # conv_in outputs model_channels (mult 1)
        for r in range(s.num_res_blocks):
            idx += 1
            down = f"down_blocks.{level}"
            out += _resnet(f"input_blocks.{idx}.0", f"{down}.resnets.{r}", shortcut=r == 0 and mult != prev_mult)
            if depth:
                out += _transformer(f"input_blocks.{idx}.1", f"{down}.attentions.{r}", depth)
        if level != levels - 1:
            idx += 1
            out += rename_module(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv")

    out += _resnet("middle_block.0", "mid_block.resnets.0", shortcut=False)
    out += _transformer("middle_block.1", "mid_block.attentions.0", s.mid_transformer_depth)
    out += _resnet("middle_block.2", "mid_block.resnets.1", shortcut=False)

    idx = -1
    for up, level in enumerate(reversed(range(levels))):
        depth = s.transformer_depth[level]
        for r in range(s.num_res_blocks + 1):
            idx += 1
            # Decoder resnets always take the concatenated skip input, so in != out and the 1x1 shortcut exists.
            out += _resnet(f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{r}", shortcut=True)
            if depth:
                out += _transformer(f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{r}", depth)
            if r == s.num_res_blocks and level != 0:
                slot = 2 if depth else 1
                out += rename_module(f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv")

    out += rename_module("out.0", "conv_norm_out")
    out += rename_module("out.2", "conv_out")
    return out
