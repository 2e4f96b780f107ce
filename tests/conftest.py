"""Shared fixtures: tiny checkpoints of each family, written once per test session."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402

from dreambooth.config import Concept, load_config  # noqa: E402
from dreambooth.create import create_model  # noqa: E402
from dreambooth.demo import make_concept_images  # noqa: E402
from dreambooth.store import ModelDir  # noqa: E402
from dreambooth.tiny import TINY_RESOLUTION, write_tiny_checkpoint  # noqa: E402

if TYPE_CHECKING:
    from dreambooth.train.loop import Trainer

# tiny models gain nothing from threads, and two OpenMP threads on a busy 2-core machine spin each other to a crawl
torch.set_num_threads(1)

REFERENCE = Path(__file__).resolve().parent / "reference"
REFERENCE_LDM = {"sd1": "sd15_ldm_keys.tsv", "sd2": "sd21v_ldm_keys.tsv", "sd2v": "sd21v_ldm_keys.tsv",
                 "sdxl": "sdxl_base_ldm_keys.tsv"}


def reference_keys(name: str) -> list[str]:
    lines = (REFERENCE / name).read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir):
    """tiny_checkpoint(family, with_ema=False, suffix='.safetensors') -> path, cached per session."""
    cache: dict[tuple, Path] = {}

    def make(family: str, with_ema: bool = False, suffix: str = ".safetensors") -> Path:
        key = (family, with_ema, suffix)
        if key not in cache:
            folder = tiny_dir / f"{family}{'-ema' if with_ema else ''}"
            cache[key] = write_tiny_checkpoint(folder / f"tiny-{family}{suffix}", family, with_ema=with_ema)
        return cache[key]

    return make


def make_training_model(root: Path, source: Path, name: str = "m", images: int = 4, concept: dict | None = None,
                        **settings) -> ModelDir:
    """A model dir from ``source`` with one synthetic concept and fast settings; ``settings`` override the config."""
    md = create_model(source, name, root)
    folder = root / f"concept-{name}"
    make_concept_images(folder, count=images)
    cfg = load_config(md.path)
    fields = dict(instance_data_dir=str(folder), instance_prompt="a photo of zwx disc", instance_token="zwx",
                  class_token="disc", n_samples=1, sample_steps=1, sample_seed=7)
    cfg.concepts = [Concept(**{**fields, **(concept or {})})]
    defaults = dict(resolution=TINY_RESOLUTION, epochs=2, save_every_n_epochs=0, preview_every_n_epochs=0,
                    mixed_precision="no", learning_rate=1e-3, lr_scheduler="constant", gradient_checkpointing=False,
                    save_checkpoint=False)
    for key, value in {**defaults, **settings}.items():
        setattr(cfg, key, value)
    cfg.save(md.path)
    return md


def train_here(md: ModelDir, **opts) -> Trainer:
    """Train ``md`` in this process on the CPU (no signal handlers: pytest keeps its own), and return the trainer."""
    from dreambooth.train.loop import RunOptions, Trainer

    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, **opts))
    trainer.run()
    return trainer


def unet_weights(md: ModelDir) -> dict[str, torch.Tensor]:
    """The trained UNet's weights in the model's ``working/`` folder."""
    from safetensors.torch import load_file

    return load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))


def working_files(md) -> dict[Path, bytes]:
    """Every file of the model's ``working/`` folder and its bytes (to show training left the model unchanged)."""
    return {p.relative_to(md.working): p.read_bytes() for p in md.working.rglob("*") if p.is_file()}


@contextmanager
def cancelled_at(step: int):
    """Within this block a training run is cancelled at ``step`` (as if the user pressed Cancel then)."""
    from dreambooth.train import loop

    original = loop.Trainer._check_controls

    def check(self):
        if self.step == step:
            raise loop.Cancelled()
        original(self)

    loop.Trainer._check_controls = check
    try:
        yield
    finally:
        loop.Trainer._check_controls = original
