"""The architecture side of a family: component configs, and a shape check of weights against them.

Real checkpoints of a family all share one set of configs (shipped in ``dreambooth/assets``). Files this project
writes also carry their configs in the safetensors metadata (``dreambooth.configs``), which is how a small test
model of a family round-trips with its own widths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import torch

from .. import assets_api
from ..errors import CheckpointError
from . import get_family
from .layout import normalize_diffusers_keys

log = logging.getLogger(__name__)

CONFIGS_METADATA_KEY = "dreambooth.configs"


def default_configs(family: str) -> dict[str, dict]:
    return {c: assets_api.family_config(family, c) for c in get_family(family).components}


def configs_from_metadata(metadata: Mapping[str, str], family: str) -> dict[str, dict] | None:
    """Component configs stored by our own export, or None when the file has none."""
    raw = metadata.get(CONFIGS_METADATA_KEY)
    if raw is None:
        return None
    try:
        configs = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"the file's {CONFIGS_METADATA_KEY} metadata is not valid JSON: {err}",
                              "re-export the model") from None
    missing = [c for c in get_family(family).components if not isinstance(configs.get(c), dict)]
    if missing:
        raise CheckpointError(f"the file's {CONFIGS_METADATA_KEY} metadata lacks {', '.join(missing)}",
                              "re-export the model")
    return {c: configs[c] for c in get_family(family).components}


def build_empty(component: str, config: dict) -> torch.nn.Module:
    """The component's module on the meta device: shapes without memory."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if component in ("unet", "unet_ema"):
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.get(
            "architectures", []) else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def expected_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    module = build_empty(component, config)
    state = normalize_diffusers_keys(component if component != "unet_ema" else "unet", module.state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}


def check_shapes(component: str, config: dict, tensors: Mapping[str, torch.Tensor], family_label: str) -> None:
    """Refuse weights that do not fit the architecture: names the first mismatching, missing and extra keys."""
    expected = expected_shapes(component, config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if not (missing or extra or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors have the wrong shape (e.g. {k} is {list(tensors[k].shape)}, "
                     f"expected {list(expected[k])})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    raise CheckpointError(f"the {component} weights do not fit the {family_label} architecture: "
                          + "; ".join(parts), "check that the model type is right and the file is not damaged")
