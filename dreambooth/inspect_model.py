"""What is in a checkpoint or a model dir: family, parameter counts, dtypes, EMA, a summary of the keys."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .checkpoint_file import read_header, read_metadata
from .config import load_config
from .families import get_family
from .families.detect import detect_diffusers_folder, detect_ldm_family, resolve_v_prediction
from .store import ModelDir
from .working import read_working

# single-file key prefix -> component, most specific first
_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("model_ema.", "unet_ema"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
)


def component_of(key: str) -> str:
    for prefix, component in _PREFIXES:
        if key.startswith(prefix):
            return component
    return "other"


def describe_checkpoint(path: Path) -> dict[str, Any]:
    header = read_header(path)
    shapes = {k: shape for k, (shape, _) in header.items()}
    family = resolve_v_prediction(path, detect_ldm_family(shapes), None)
    params: Counter[str] = Counter()
    tensors: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for key, (shape, dtype) in header.items():
        comp = component_of(key)
        params[comp] += math.prod(shape)
        tensors[comp] += 1
        dtypes[dtype] += 1
    return {
        "path": str(path),
        "family": family,
        "family_label": get_family(family).label,
        "tensors": len(header),
        "parameters": dict(params),
        "tensors_per_component": dict(tensors),
        "dtypes": dict(dtypes),
        "ema": tensors.get("unet_ema", 0) > 2,
        "metadata_keys": sorted(read_metadata(path)),
    }


def describe_model(model: ModelDir) -> dict[str, Any]:
    cfg = load_config(model.path)
    components, extras = read_working(model.working, cfg.family)
    dtypes: Counter[str] = Counter(str(t.dtype).removeprefix("torch.") for c in components.values()
                                   for t in c.values())
    return {
        "path": str(model.path),
        "family": cfg.family,
        "family_label": get_family(cfg.family).label,
        "source": cfg.source_checkpoint,
        "steps_trained": cfg.revision,
        "concepts": len(cfg.concepts),
        "parameters": {c: sum(t.numel() for t in tensors.values()) for c, tensors in components.items()},
        "tensors_per_component": {c: len(t) for c, t in components.items()},
        "kept_single_file_keys": len(extras),
        "dtypes": dict(dtypes),
        "ema": "unet_ema" in components,
    }


def describe_folder(path: Path) -> dict[str, Any]:
    family = detect_diffusers_folder(path)
    return {"path": str(path), "family": family, "family_label": get_family(family).label,
            "format": "diffusers folder"}
