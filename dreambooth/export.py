"""Write a model dir back out as a single-file ``.safetensors`` checkpoint the WebUI loads.

Key names are the original single-file (ldm/sgm) ones; the keys diffusers has no place for come back from
``working/ldm_extras.safetensors``, so an untrained model exports bitwise-identical to its source. A ``.yaml`` is
written beside SD 2.x v-prediction files, since that is how the WebUI learns they predict v.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from . import __version__, assets_api
from .config import EMA_EXPORTS, FILE_DTYPES, TrainConfig, load_config
from .dtypes import torch_dtype
from .errors import UserError
from .families import SD1, SD2, SD2V, get_family
from .families.architecture import CONFIGS_METADATA_KEY
from .families.layout import join_ldm
from .store import ModelDir, validate_name
from .working import read_configs, read_working, save_tensors

log = logging.getLogger(__name__)

# EMA (config.EMA_EXPORTS): none: no EMA; main: the EMA weights as the UNet (needs EMA);
# both: the UNet plus, when the model has them, the EMA weights as model_ema.* (the training layout)
_IMPLEMENTATION = {
    SD1: "https://github.com/CompVis/stable-diffusion",
    SD2: "https://github.com/Stability-AI/stablediffusion",
    SD2V: "https://github.com/Stability-AI/stablediffusion",
}
_EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")


def build_metadata(cfg: TrainConfig, trained: str) -> dict[str, str]:
    """modelspec keys plus what was trained, how long, from what, on which prompts."""
    fam = get_family(cfg.family)
    res = cfg.resolution or fam.resolution
    concepts = [{"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt,
                 "instance_token": c.instance_token, "class_token": c.class_token} for c in cfg.concepts]
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.modelspec_architecture,
        "modelspec.implementation": _IMPLEMENTATION.get(fam.id, "https://github.com/Stability-AI/generative-models"),
        "modelspec.title": cfg.model_name,
        "modelspec.date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if fam.prediction_type == "v_prediction" else "epsilon",
        "dreambooth.version": __version__,
        "dreambooth.trained": trained,
        "dreambooth.steps": str(cfg.revision),
        "dreambooth.epochs": str(cfg.epochs_trained),
        "dreambooth.family": fam.id,
        "dreambooth.base_model": Path(cfg.source_checkpoint).name,
        "dreambooth.base_sha256": cfg.source_sha256,
        "dreambooth.concepts": json.dumps(concepts, ensure_ascii=False),
    }


def export_state_dict(model: ModelDir, cfg: TrainConfig, dtype: str = "fp16", ema: str = "none",
                      replace: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The single-file state dict of ``model``'s working weights; ``replace`` gives components (canonical names, as in
    ``working/``) to write instead of the working ones (e.g. with a LoRA merged in)."""
    if dtype not in FILE_DTYPES:
        raise UserError(f"unknown export precision {dtype!r}", f"use one of: {', '.join(FILE_DTYPES)}")
    if ema not in EMA_EXPORTS:
        raise UserError(f"unknown EMA choice {ema!r}", f"use one of: {', '.join(EMA_EXPORTS)}")
    components, extras = read_working(model.working, cfg.family)
    for component, state in (replace or {}).items():
        if component not in components:
            raise ValueError(f"{component} is not a component of this model")
        missing = set(components[component]) - set(state)
        if missing:
            raise ValueError(f"the replacement {component} lacks {len(missing)} tensors (e.g. {sorted(missing)[0]})")
        components[component] = dict(state)
    if ema == "main" and "unet_ema" not in components:
        raise UserError(f"model {model.name!r} has no EMA weights", "export without EMA, or train with EMA on")
    if ema == "main":
        components["unet"] = components.pop("unet_ema")
    if ema in ("none", "main"):
        components.pop("unet_ema", None)
        extras = {k: v for k, v in extras.items() if k not in _EMA_SCALARS}
    state = join_ldm(components, extras, cfg.family)
    cast = torch_dtype(dtype)
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    return state


def default_export_name(cfg: TrainConfig, step: int | None = None) -> str:
    return f"{cfg.model_name}_{step}.safetensors" if step is not None else f"{cfg.model_name}.safetensors"


def export_checkpoint(model: ModelDir, dest: str | os.PathLike[str], *, dtype: str = "fp16", ema: str = "none",
                      trained: str = "dreambooth",
                      replace: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write ``model`` to ``dest`` (a ``.safetensors`` path, or a folder to put ``<name>.safetensors`` in)."""
    cfg = load_config(model.path)
    dest = Path(dest)
    if dest.suffix != ".safetensors":
        dest = dest / default_export_name(cfg)
    validate_name(dest.name)
    state = export_state_dict(model, cfg, dtype, ema, replace)
    metadata = build_metadata(cfg, trained)
    metadata[CONFIGS_METADATA_KEY] = json.dumps(read_configs(model.working, get_family(cfg.family).components))
    save_tensors(dest, state, metadata)
    assets_api.write_ldm_yaml(cfg.family, dest)
    log.info("exported %s (%d tensors, %s)", dest, len(state), dtype)
    return dest
