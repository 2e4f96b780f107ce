"""``python -m dreambooth demo``: everything end to end on a tiny model, offline, on a CPU."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .checkpoint_file import read_checkpoint
from .config import Concept, load_config
from .create import create_model
from .export import export_checkpoint
from .inspect_model import describe_model
from .store import model_dir
from .tiny import TINY_RESOLUTION, write_tiny_checkpoint

log = logging.getLogger(__name__)


def make_concept_images(folder: Path, count: int = 6, size: int = TINY_RESOLUTION, seed: int = 0) -> list[Path]:
    """A synthetic subject: a red disc with a yellow dot, on varied backgrounds, with captions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        bg = tuple(rng.randint(40, 220) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30))
        draw.ellipse((cx - r // 3, cy - r // 3, cx + r // 3, cy + r // 3), fill=(250, 220, 40))
        path = folder / f"disc_{i:02d}.png"
        img.save(path)
        path.with_suffix(".txt").write_text(f"a zwx disc, background {i}", encoding="utf-8")
        paths.append(path)
    return paths


def run_demo(out: Path, family: str = "sd1") -> dict[str, Path]:
    """Build a tiny checkpoint and concept, create a model from it, and export it again."""
    out = out.resolve()
    root = out / "models"
    name = f"demo-{family}"
    if model_dir(name, root).path.exists():
        shutil.rmtree(model_dir(name, root).path)
    source = write_tiny_checkpoint(root / "Stable-diffusion" / f"tiny-{family}.safetensors", family)
    print(f"1. tiny {family} checkpoint:   {source}")
    images = make_concept_images(out / "concept")
    print(f"2. synthetic concept:       {len(images)} images in {images[0].parent}")

    md = create_model(source, name, root)
    cfg = load_config(md.path)
    cfg.concepts = [Concept(instance_data_dir=str(images[0].parent), instance_prompt="a photo of zwx disc",
                            instance_token="zwx", class_token="disc", sample_prompt="a photo of zwx disc")]
    cfg.save(md.path)
    info = describe_model(md)
    print(f"3. model dir:               {md.path}")
    print(f"   {info['family_label']}, parameters: "
          + ", ".join(f"{k}={v:,}" for k, v in info["parameters"].items()))

    exported = export_checkpoint(md, root / "Stable-diffusion" / f"{name}.safetensors", dtype="keep")
    original, again = read_checkpoint(source), read_checkpoint(exported)
    same = original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    print(f"4. exported checkpoint:     {exported}")
    print(f"   round trip {'exact' if same else 'DIFFERS'}: {len(again)} tensors")
    if not same:
        raise RuntimeError("the exported checkpoint differs from its source")
    return {"source": source, "model": md.path, "export": exported}
