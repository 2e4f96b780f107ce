"""The host adapter without a WebUI: plain defaults under the models root."""

from __future__ import annotations

import os
from pathlib import Path

from ..store import models_root as _models_root


def models_root(override: str | os.PathLike[str] | None = None) -> Path:
    return _models_root(override)


def checkpoint_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where exported checkpoints go: ``<models root>/Stable-diffusion``, as in the WebUI's layout."""
    return models_root(override) / "Stable-diffusion"


def lora_dir(override: str | os.PathLike[str] | None = None) -> Path:
    return models_root(override) / "Lora"
