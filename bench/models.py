"""Random-weight model dirs in the real layouts, and the synthetic training images every row shares.

``size="full"`` builds the real architecture from the configs shipped in ``dreambooth/assets`` (nothing is
downloaded); ``size="tiny"`` takes the tiny widths of ``dreambooth/tiny.py`` (the CPU sentinel). Either way the
weights go into a model dir's ``working/`` folder exactly as ``dreambooth create`` would write them, so our
trainer and the baseline load the same files.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch

from dreambooth import assets_api, tiny
from dreambooth.config import Concept, TrainConfig
from dreambooth.demo import make_concept_images
from dreambooth.families import get_family
from dreambooth.families.architecture import build_empty
from dreambooth.families.layout import normalize_diffusers_keys
from dreambooth.store import SUBDIRS, ModelDir, model_dir
from dreambooth.working import write_working

log = logging.getLogger(__name__)

PROMPT = "a photo of zwx disc"
INSTANCE_TOKEN, CLASS_TOKEN = "zwx", "disc"


def component_configs(family: str, size: str) -> dict[str, dict]:
    """The diffusers / transformers config of each weight component of ``family`` at ``size`` (full or tiny)."""
    if size == "tiny":
        return tiny.tiny_configs(family)
    if size != "full":
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    return {c: assets_api.family_config(family, c) for c in get_family(family).components}


def random_weights(component: str, config: dict, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes (canonical key names), scaled by fan-in so activations stay finite.

    Norm weights are 1, biases 0, everything else N(0, 1/fan_in): a random model whose loss is finite in fp16,
    which is all a speed and memory benchmark needs.
    """
    module = build_empty(component, config)  # meta device: shapes without memory
    shapes = {k: tuple(v.shape) for k, v in normalize_diffusers_keys(component, module.state_dict()).items()}
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            out[key] = (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)
        elif "norm" in key and key.endswith("weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        else:
            out[key] = torch.zeros(shape, dtype=dtype)
    return out


COMPLETE = "bench_model_complete"  # written last: a model dir with it is whole and is reused (rows in processes)


def write_random_model(root: Path, family: str, size: str, name: str | None = None, seed: int = 0) -> ModelDir:
    """A model dir ``<root>/dreambooth/<name>`` holding a random-weight ``family`` model (fp16 files for full size,
    fp32 for tiny); the trainer loads them as fp32 like any working folder. One written whole before is reused."""
    md = model_dir(name or f"bench-{family}-{size}", root)
    if (md.path / COMPLETE).is_file():
        return md
    if md.path.exists():
        shutil.rmtree(md.path)  # cut off while it was written
    configs = component_configs(family, size)
    dtype = torch.float16 if size == "full" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    md.path.mkdir(parents=True)
    for sub in SUBDIRS:
        (md.path / sub).mkdir()
    components = {}
    for component, config in configs.items():
        log.info("building random %s %s (%s)", size, component, family)
        components[component] = random_weights(component, config, gen, dtype)
    write_working(md.working, family, components, {}, configs)
    del components
    TrainConfig(model_name=md.name, family=family, resolution=get_family(family).resolution).save(md.path)
    (md.path / COMPLETE).write_text("", encoding="utf-8")
    return md


def write_images(folder: Path, count: int, resolution: int) -> Path:
    """``count`` synthetic square images (with captions) at ``resolution``: the one dataset every row trains on
    (written once; a later process of the same run finds them)."""
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        make_concept_images(partial, count=count, size=resolution)
        partial.rename(folder)
    return folder


def concept(images: Path) -> Concept:
    return Concept(instance_data_dir=str(images), instance_prompt=PROMPT, instance_token=INSTANCE_TOKEN,
                   class_token=CLASS_TOKEN, n_samples=0)
