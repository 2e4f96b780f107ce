"""Tiny random-weight models of each family in the real single-file key layout.

Same block structure as the real architectures (every key name is the official one: 12 CLIP-L layers, SDXL's
[1, 2, 10] transformer depths, SD 2.x's 24th OpenCLIP layer...), only the widths are tiny, so the test suite and the
demo run on a CPU in seconds. The files carry their configs in the ``dreambooth.configs`` metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import assets_api
from .families import SD1, SD2, SD2V, SDXL, get_family
from .families.architecture import CONFIGS_METADATA_KEY, build_empty
from .families.layout import join_ldm, normalize_diffusers_keys
from .working import save_tensors

TEXT_WIDTH = 32
TINY_RESOLUTION = 64


def tiny_config(family: str, component: str) -> dict:
    """The family's real config with tiny widths and the same structure.

    Widths keep the real ratios between levels (SD: x1, x2, x4, x4; SDXL: x1, x2, x4), so the blocks that change
    width, and with them the shortcut convolutions, are the same as in the real models.
    """
    cfg = assets_api.family_config(family, component)
    if component == "unet":
        levels = len(cfg["block_out_channels"])
        cfg["block_out_channels"] = [16, 32, 64, 64][:levels]
        cfg["norm_num_groups"] = 8
        cfg["attention_head_dim"] = 8 if family == SD1 else [2, 4, 4, 4][:levels]
        cfg["sample_size"] = TINY_RESOLUTION // 8
        if family == SDXL:
            cfg["cross_attention_dim"] = 2 * TEXT_WIDTH
            cfg["addition_time_embed_dim"] = 8
            cfg["projection_class_embeddings_input_dim"] = TEXT_WIDTH + 6 * 8
        else:
            cfg["cross_attention_dim"] = TEXT_WIDTH
    elif component == "vae":
        cfg["block_out_channels"] = [8, 16, 32, 32]
        cfg["norm_num_groups"] = 8
        cfg["sample_size"] = TINY_RESOLUTION
    elif component in ("text_encoder", "text_encoder_2"):
        cfg.update(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_attention_heads=4,
                   projection_dim=TEXT_WIDTH)
    return cfg


def tiny_configs(family: str) -> dict[str, dict]:
    return {c: tiny_config(family, c) for c in get_family(family).components}


def _random_state(component: str, config: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    module = build_empty(component, config)
    state = normalize_diffusers_keys(component, module.state_dict())
    return {k: torch.randn(v.shape, generator=gen) * (0.02 if v.dim() > 1 else 0.1) + (1.0 if "norm" in k and
            k.endswith("weight") else 0.0) for k, v in state.items()}


def ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The 12 DDPM schedule buffers an ldm checkpoint stores (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return {k: v.float() for k, v in buffers.items()}


def _openclip_block(prefix: str, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
              "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
              "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
              "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    return {prefix + k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def tiny_extras(family: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The single-file keys diffusers has no place for, as a real file of the family has them."""
    position_ids = torch.arange(77, dtype=torch.int64)[None]
    if family == SD1:
        key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
        return {**ldm_schedule_buffers(), key: position_ids}
    if family in (SD2, SD2V):
        # SD 2.x uses the penultimate OpenCLIP layer; the file still holds the last one
        extras = ldm_schedule_buffers()
        extras.update(_openclip_block("cond_stage_model.model.transformer.resblocks.23.", TEXT_WIDTH, gen))
        extras["cond_stage_model.model.text_projection"] = torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=gen) * 0.02
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
        return extras
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": position_ids,
        "conditioner.embedders.1.model.logit_scale": torch.tensor(math.log(1 / 0.07)),
        "denoiser.sigmas": ((1 - ac) / ac).sqrt().float(),
    }


def tiny_state_dict(family: str, seed: int = 0, with_ema: bool = False) -> dict[str, torch.Tensor]:
    """A complete single-file state dict of a tiny ``family`` model (fp32, random weights)."""
    gen = torch.Generator().manual_seed(seed)
    configs = tiny_configs(family)
    components = {c: _random_state(c, cfg, gen) for c, cfg in configs.items()}
    extras = tiny_extras(family, gen)
    if with_ema:
        components["unet_ema"] = {k: v + 0.001 * torch.randn(v.shape, generator=gen)
                                  for k, v in components["unet"].items()}
        extras["model_ema.decay"] = torch.tensor(0.9999)
        extras["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    return join_ldm(components, extras, family)


def write_tiny_checkpoint(path: str | Path, family: str, seed: int = 0, with_ema: bool = False,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny ``family`` checkpoint to ``path`` (.safetensors, or .ckpt via a weights-only-safe torch.save)."""
    path = Path(path)
    state = tiny_state_dict(family, seed, with_ema)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if path.suffix == ".ckpt":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state}, path)
    else:
        save_tensors(path, state, {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(family))})
    assets_api.write_ldm_yaml(family, path)
    return path
