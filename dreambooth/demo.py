"""``python -m dreambooth demo``: create, train and export a tiny model end to end, offline, on a CPU."""

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
from .data.images import list_images
from .export import export_checkpoint
from .inspect_model import describe_model
from .store import model_dir
from .tiny import TINY_RESOLUTION, write_tiny_checkpoint
from .train.evaluate import evaluation_loss
from .train.loop import RunOptions, Trainer
from .train.models import load_models

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


def run_demo(out: Path, family: str = "sd1", epochs: int = 15) -> dict[str, object]:
    """Build a tiny checkpoint and concept, create a model, train it, and report what it learned."""
    torch.set_num_threads(1)  # a tiny model gains nothing from threads
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
    exported = export_checkpoint(md, out / "roundtrip.safetensors", dtype="keep")
    original, again = read_checkpoint(source), read_checkpoint(exported)
    same = original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    exported.unlink()
    info = describe_model(md)
    print(f"3. model dir:               {md.path}")
    print(f"   {info['family_label']}, parameters: " + ", ".join(f"{k}={v:,}" for k, v in info["parameters"].items()))
    print(f"   checkpoint -> model -> checkpoint round trip {'exact' if same else 'DIFFERS'} ({len(again)} tensors)")
    if not same:
        raise RuntimeError("the exported checkpoint differs from its source")

    cfg = load_config(md.path)
    cfg.concepts = [Concept(instance_data_dir=str(images[0].parent), instance_prompt="a photo of zwx disc",
                            instance_token="zwx", class_token="disc", sample_prompt="a photo of zwx disc",
                            n_samples=2, sample_steps=10, sample_seed=1)]
    cfg.resolution, cfg.epochs, cfg.learning_rate, cfg.lr_scheduler = TINY_RESOLUTION, epochs, 1e-3, "constant"
    cfg.mixed_precision, cfg.gradient_checkpointing, cfg.preview_every_n_epochs = "no", False, 5
    cfg.save_every_n_epochs, cfg.save_checkpoint, cfg.export_dtype = 0, True, "fp16"
    cfg.save(md.path)
    model_images = list_images(images[0].parent)
    before = evaluation_loss(load_models(md.working, family), model_images, cfg.concepts[0].instance_prompt,
                             TINY_RESOLUTION)
    print(f"4. training {epochs} epochs on the CPU...")
    trainer = Trainer(md, RunOptions(device="cpu", export_dir=root / "Stable-diffusion"))
    status = trainer.run()
    after = evaluation_loss(load_models(md.working, family), model_images, cfg.concepts[0].instance_prompt,
                            TINY_RESOLUTION)
    drop = (before - after) / before
    print(f"   {status['state']} after {status['step']} steps ({status['it_per_s']} it/s)")
    print(f"5. previews:                {md.samples} ({len(list(md.samples.glob('*.png')))} images)")
    print(f"   exported checkpoint:     {status.get('last_export')}")
    print(f"   learned: evaluation loss on the instance images {before:.4f} -> {after:.4f} ({drop:.0%} lower)")
    return {"source": source, "model": md.path, "export": status.get("last_export"), "loss_before": before,
            "loss_after": after}
