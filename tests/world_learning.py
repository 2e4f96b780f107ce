"""Shared by the learning tests: train the subject of the synthetic world into the tiny pretrained base model
(bench/quality) with our trainer, and count how often the stock diffusers pipeline then draws it.

The base is a real denoiser of its world, so learning shows as a large, CPU-independent effect: the base draws the
subject in about one sample of a hundred, a method that learnt it in most samples.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from bench.quality import run, stock
from bench.quality.analyse import analyse
from bench.quality.measures import CLASS_PROMPT, SUBJECT
from dreambooth.train.loop import RunOptions, Trainer

BASE = run.BASE_MODEL
SAMPLES = 12
SEED = 5
LEARNT = 0.5  # a run that learnt the subject shows it in at least this share of samples more than the base


@cache
def config_folder() -> Path:
    import tempfile

    return stock.write_config_folder(Path(tempfile.mkdtemp(prefix="world-config-")), stock.file_configs(BASE))


def train(md, root: Path, **opts) -> Trainer:
    """Run our trainer in this process (the worker's code path), exporting under ``root``."""
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, export_dir=root / "Stable-diffusion",
                                     lora_dir=root / "Lora", embeddings_dir=root / "embeddings",
                                     hypernetworks_dir=root / "hypernetworks", **opts))
    trainer.run()
    return trainer


def pipeline(exported: Path | None = None, method: str = "dreambooth"):
    """The stock pipeline of the base, or of what a method exported (loaded as the ecosystem loads it)."""
    if exported is None:
        return stock.load_pipeline(BASE, config_folder())
    return run.loader(method, BASE, exported, config_folder())()


def subject_share(pipe, prompt: str = SUBJECT, count: int = SAMPLES, seed: int = SEED) -> float:
    """The share of samples of ``prompt`` that show the subject."""
    return float(np.mean([analyse(i).subject for i in stock.sample(pipe, prompt, count, seed)]))


@cache
def base_shares() -> tuple[float, float]:
    """(subject prompt, class prompt) shares of the untrained base: the numbers to beat."""
    pipe = pipeline()
    return subject_share(pipe), subject_share(pipe, CLASS_PROMPT.text)
