"""The ecosystem's side: a checkpoint loaded and sampled the way a diffusers user would, with none of our code.

A single-file checkpoint is read by diffusers' own ``StableDiffusionPipeline.from_single_file`` (its converter, not
ours), given a local config folder with the file's component configs (there is no hub here). Add-ons are applied
the way the WebUI applies them, by small readers written here from the file formats: a kohya LoRA is merged into
the weights (``W += multiplier * alpha / rank * up @ down``), a textual-inversion embedding goes through diffusers'
``load_textual_inversion``, and a WebUI hypernetwork feeds every attention's key and value inputs through its
``x + mlp(x) * strength`` modules. Sampling is the stock pipeline's call (its own scheduler, classifier-free
guidance), in batches, from one seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dreambooth import assets_api
from dreambooth.atomic import write_json

CONFIGS_KEY = "dreambooth.configs"  # the component configs our tiny files carry in their metadata
GUIDANCE = 7.5
STEPS = 20


def file_configs(checkpoint: Path) -> dict[str, dict]:
    """The component configs stored in a tiny checkpoint's metadata."""
    with safe_open(str(checkpoint), "pt") as fh:
        meta = fh.metadata() or {}
    if CONFIGS_KEY not in meta:
        raise ValueError(f"{checkpoint} carries no {CONFIGS_KEY} metadata (not a tiny model of this project)")
    return json.loads(meta[CONFIGS_KEY])


def write_config_folder(folder: Path, configs: dict[str, dict]) -> Path:
    """A diffusers pipeline folder without weights: model_index, component configs, scheduler, tokenizer."""
    for component in ("unet", "vae", "text_encoder"):
        write_json(folder / component / "config.json", configs[component])
    write_json(folder / "scheduler" / "scheduler_config.json", assets_api.family_config("sd1", "scheduler"))
    assets_api.write_tokenizer("sd1", "tokenizer", folder / "tokenizer")
    assets_api.write_model_index("sd1", folder)
    return folder


def load_pipeline(checkpoint: Path, config_folder: Path):
    """diffusers' stock pipeline for a single-file checkpoint, converted by diffusers itself."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config_folder),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt: str, count: int, seed: int, batch: int = 16, steps: int = STEPS) -> list[np.ndarray]:
    """``count`` uint8 [64, 64, 3] images of ``prompt`` from the stock pipeline call, seeded."""
    images: list[np.ndarray] = []
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    while len(images) < count:
        n = min(batch, count - len(images))
        out = pipe([prompt] * n, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   generator=generator, output_type="np").images
        images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return images


# --- a kohya LoRA, merged ----------------------------------------------------------------------------------------

def merge_kohya_lora(pipe, lora_file: Path, multiplier: float = 1.0) -> int:
    """Merge a kohya-format LoRA (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``, ``lora_up``, ``alpha``) into
    the pipeline's weights, as the WebUI's Lora extension computes it. Returns how many layers it changed."""
    state = load_file(str(lora_file))
    targets: dict[str, nn.Module] = {}
    for prefix, root in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, module in root.named_modules():
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers >= 5: CLIPTextModel has no text_model level; the keys do
            if isinstance(module, nn.Linear | nn.Conv2d):
                targets[prefix + name.replace(".", "_")] = module
    bases = sorted({k.split(".")[0] for k in state})
    unknown = [b for b in bases if b not in targets]
    if unknown:
        raise ValueError(f"{lora_file.name}: {len(unknown)} LoRA layers match no module (e.g. {unknown[0]})")
    for base in bases:
        module, down, up = targets[base], state[f"{base}.lora_down.weight"].float(), state[
            f"{base}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(state[f"{base}.alpha"]) if f"{base}.alpha" in state else rank
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / rank) * multiplier
        with torch.no_grad():
            module.weight += delta.reshape(module.weight.shape).to(module.weight.dtype)
    return len(bases)


# --- a WebUI hypernetwork, hooked ---------------------------------------------------------------------------------

_ACTIVATIONS = {"linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
                "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish}


def _webui_mlp(state: dict[str, torch.Tensor], dim: int, structure: list[float], dropouts: list[float],
               activation: str, layer_norm: bool, activate_output: bool) -> nn.Sequential:
    """The WebUI's ``HypernetworkModule.linear`` rebuilt from the file's description (dropout is a no-op at use)."""
    layers: list[nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(nn.Linear(int(dim * structure[i]), int(dim * structure[i + 1])))
        last = i == len(structure) - 2
        if _ACTIVATIONS.get(activation) is not None and (not last or activate_output):
            layers.append(_ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(nn.LayerNorm(int(dim * structure[i + 1])))
        # the WebUI inserts a Dropout here when the dropout structure asks for one; it holds no weights, and its
        # index shifts the state-dict keys of the layers after it
        if float(dropouts[i + 1]) > 0:
            layers.append(nn.Dropout(0.0))
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return mlp.eval()


def hook_hypernetwork(pipe, hn_file: Path, strength: float = 1.0) -> int:
    """Apply a WebUI hypernetwork ``.pt`` to the pipeline's UNet: in every attention whose context width the file
    has a pair for, ``to_k`` sees ``x + k_mlp(x) * strength`` and ``to_v`` ``x + v_mlp(x) * strength``. Returns the
    number of hooked projections."""
    data: dict[Any, Any] = torch.load(hn_file, map_location="cpu", weights_only=True)
    structure = [float(v) for v in data.get("layer_structure") or [1, 2, 1]]
    dropouts = data.get("dropout_structure") or [0.0] * len(structure)
    pairs = {}
    for width in (k for k in data if isinstance(k, int)):
        pairs[width] = [_webui_mlp(sd, width, structure, dropouts, data.get("activation_func") or "linear",
                                   bool(data.get("is_layer_norm")), bool(data.get("activate_output", True)))
                        for sd in data[width]]
    hooked = 0
    for module in pipe.unet.modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if not isinstance(to_k, nn.Linear) or to_k.in_features not in pairs:
            continue
        for layer, mlp in ((to_k, pairs[to_k.in_features][0]), (to_v, pairs[to_k.in_features][1])):
            layer.register_forward_pre_hook(
                lambda _m, args, mlp=mlp: (args[0] + mlp(args[0]) * strength, *args[1:]))
            hooked += 1
    return hooked


def load_embedding(pipe, embedding_file: Path, word: str) -> None:
    """A WebUI textual-inversion file, loaded by diffusers and triggered by ``word``."""
    pipe.load_textual_inversion(str(embedding_file), token=word)
