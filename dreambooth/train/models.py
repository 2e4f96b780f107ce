"""Load the trainable modules of a model dir's ``working/`` folder and set their attention implementation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ATTENTION_MODES
from ..errors import UserError
from ..families import SDXL, Family, get_family
from ..families.layout import normalize_diffusers_keys

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Everything the step needs. ``text_encoders``/``tokenizers`` hold one (SD) or two (SDXL) entries."""

    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object
    scheduler_config: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family.id == SDXL

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def modules_for_pipeline(self) -> dict[str, object]:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoders[0],
                   "tokenizer": self.tokenizers[0]}
        if self.is_sdxl:
            modules.update(text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1])
        return modules


TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def _load_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


def load_models(working: Path, family: str) -> Models:
    """Load unet, vae, text encoder(s), tokenizer(s) and the noise scheduler from ``working/`` (on the CPU, fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    fam = get_family(family)
    unet = UNet2DConditionModel.from_pretrained(working / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(working / "vae", torch_dtype=torch.float32)
    names = [n for n in TEXT_ENCODER_NAMES if n in fam.components]
    text_encoders = [_load_text_encoder(working / n) for n in names]
    tokenizers = [CLIPTokenizer.from_pretrained(working / t) for t in fam.tokenizers]
    scheduler_config = json.loads((working / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    return Models(fam, unet, vae, text_encoders, tokenizers, noise_scheduler, scheduler_config)


def canonical_state(component: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights under our canonical (transformers-4 / diffusers) names, detached, on the CPU."""
    return {k: v.detach().cpu() for k, v in normalize_diffusers_keys(component, module.state_dict()).items()}


def load_canonical(component: str, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load canonically named weights into ``module``, whatever names this library version gives its keys."""
    own_name = {}
    for key, value in module.state_dict().items():
        for canonical in normalize_diffusers_keys(component, {key: value}):
            own_name[canonical] = key
    missing = set(own_name) - set(state)
    if missing:
        raise UserError(f"saved {component} weights lack {len(missing)} tensors (e.g. {sorted(missing)[0]})",
                        "the resume state is damaged; delete it to fall back to an older one")
    module.load_state_dict({own_name[k]: v for k, v in state.items() if k in own_name}, strict=False)


def set_attention(models: Models, mode: str) -> str:
    """Put ``mode`` into every attention layer of the UNet and VAE. Returns the mode actually used.

    default: diffusers' classic attention (plain matmul + softmax); sdp: torch's scaled_dot_product_attention;
    xformers: xformers' memory-efficient kernel, when the WebUI has xformers (we never install it).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise UserError(f"unknown memory attention {mode!r}", f"use one of: {', '.join(ATTENTION_MODES)}")
    if mode == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable"
            raise UserError(f"xformers attention was chosen but xformers cannot be imported ({err})",
                            "pick SDP attention (as fast on current torch), or start the WebUI with --xformers"
                            ) from None
        for module in (models.unet, models.vae):
            module.enable_xformers_memory_efficient_attention()
        return mode
    processor = AttnProcessor2_0 if mode == "sdp" else AttnProcessor
    for module in (models.unet, models.vae):
        module.set_attn_processor(processor())
    return mode
