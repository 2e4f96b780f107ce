"""The host adapter inside the AUTOMATIC1111 WebUI: the only module that imports the WebUI's ``modules``.

Import it only inside the WebUI (``scripts/dreambooth_tab.py`` does). It answers the same questions as
``standalone`` from the WebUI's own state: its models path, its checkpoint and Lora folders, its settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from modules import paths_internal, script_callbacks, shared  # noqa: I001 - the WebUI's modules

log = logging.getLogger(__name__)

SECTION = ("dreambooth", "Dreambooth")
OPT_MODELS_ROOT = "dreambooth_models_root"
OPT_FREE_VRAM = "dreambooth_free_webui_model"


def models_root() -> Path:
    """Our models root: the setting if the user set one, else the WebUI's models path."""
    custom = getattr(shared.opts, OPT_MODELS_ROOT, "") or ""
    return Path(custom or paths_internal.models_path).expanduser().resolve()


def checkpoint_dir() -> Path:
    """Where the WebUI lists checkpoints: --ckpt-dir if given, else <models>/Stable-diffusion."""
    custom = getattr(shared.cmd_opts, "ckpt_dir", None)
    return Path(custom) if custom else Path(paths_internal.models_path) / "Stable-diffusion"


def lora_dir() -> Path:
    custom = getattr(shared.cmd_opts, "lora_dir", None)
    return Path(custom) if custom else Path(paths_internal.models_path) / "Lora"


def on_ui_settings() -> None:
    shared.opts.add_option(OPT_MODELS_ROOT, shared.OptionInfo(
        "", "Dreambooth models root (empty: the WebUI's models folder; model dirs go in <root>/dreambooth)",
        section=SECTION))
    shared.opts.add_option(OPT_FREE_VRAM, shared.OptionInfo(
        True, "Move the WebUI's loaded model out of VRAM while training", section=SECTION))


def register() -> None:
    """Register callbacks with the WebUI. Called once when the WebUI imports our scripts/ entry."""
    script_callbacks.on_ui_settings(on_ui_settings)
