"""Reading and writing the diffusers-format weights of a model dir's ``working/`` folder.

We write the weight files ourselves (safetensors, canonical transformers-4 key names) instead of going through
``save_pretrained``, so a create is a pure tensor copy: no model is instantiated, nothing is re-initialised, and the
bytes are exactly those of the source. diffusers and transformers (old and new) load these folders as usual.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import assets_api
from .atomic import write_json, write_with
from .checkpoint_file import read_checkpoint
from .errors import CheckpointError
from .families import get_family
from .families.layout import normalize_diffusers_keys

log = logging.getLogger(__name__)

EXTRAS_FILE = "ldm_extras.safetensors"
WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "unet_ema": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
CONFIG_COMPONENT = {"unet_ema": "unet"}  # unet_ema shares the UNet's config


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write a safetensors file. Tensors that share storage (views from a split) are copied apart."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    meta = {"format": "pt", **(metadata or {})}  # transformers 4.30 refuses safetensors files without "format"
    write_with(path, lambda tmp: save_file(out, str(tmp), metadata=meta))


def write_working(dest: Path, family: str, components: Mapping[str, Mapping[str, torch.Tensor]],
                  extras: Mapping[str, torch.Tensor], configs: Mapping[str, dict]) -> None:
    """Write a complete diffusers pipeline folder (weights, configs, tokenizers, scheduler) plus the extras.

    ``configs`` maps each weight component (``unet_ema`` uses ``unet``'s) to its diffusers/transformers config.
    """
    fam = get_family(family)
    dest.mkdir(parents=True, exist_ok=True)
    for component, tensors in components.items():
        folder = dest / component
        folder.mkdir(exist_ok=True)
        write_json(folder / "config.json", configs[CONFIG_COMPONENT.get(component, component)])
        save_tensors(folder / f"{WEIGHT_NAMES[component]}.safetensors", tensors)
    for name in fam.tokenizers:
        assets_api.write_tokenizer(family, name, dest / name)
    assets_api.write_component_config(family, "scheduler", dest / "scheduler")
    assets_api.write_model_index(family, dest)
    save_tensors(dest / EXTRAS_FILE, extras)


def weight_files(folder: Path, base: str) -> list[Path]:
    """The weight file(s) of one component folder: single safetensors, sharded safetensors, fp16 variant, or .bin."""
    candidates = [f"{base}.safetensors", f"{base}.fp16.safetensors"]
    for name in candidates:
        if (folder / name).is_file():
            return [folder / name]
    for index_name in (f"{base}.safetensors.index.json", f"{base}.fp16.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index: {err}", "re-save the model") from None
            return [folder / s for s in shards]
    for name in (f"{base}.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def read_component(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """Load one component's weights from a diffusers folder, with canonical key names."""
    files = weight_files(folder, WEIGHT_NAMES.get(component, "diffusion_pytorch_model"))
    if not files:
        raise CheckpointError(f"no weights found for {component} in {folder}",
                              "the folder should hold diffusion_pytorch_model.safetensors or model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f} of {component} is missing", "copy the complete model folder")
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else read_checkpoint(f))
    return normalize_diffusers_keys(CONFIG_COMPONENT.get(component, component), state)


def read_configs(folder: Path, components: tuple[str, ...]) -> dict[str, dict]:
    """The config.json of each component of a diffusers folder."""
    configs = {}
    for c in components:
        path = folder / c / "config.json"
        try:
            configs[c] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing", "the model folder is incomplete; copy it again") from None
        except (UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}", "restore the file") from None
    return configs


def read_working(working: Path, family: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """All weight components of ``working/`` (``unet_ema`` too when present) and the kept single-file extras."""
    fam = get_family(family)
    components = {c: read_component(working / c, c) for c in fam.components}
    if (working / "unet_ema").is_dir():
        components["unet_ema"] = read_component(working / "unet_ema", "unet_ema")
    extras_path = working / EXTRAS_FILE
    extras = load_file(str(extras_path)) if extras_path.is_file() else {}
    return components, extras
