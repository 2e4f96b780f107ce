"""Shared fixtures: tiny checkpoints of each family, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

from dreambooth.tiny import write_tiny_checkpoint  # noqa: E402

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
