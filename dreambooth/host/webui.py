"""The host adapter inside the AUTOMATIC1111 WebUI: the only module that imports the WebUI's ``modules``.

Import it only inside the WebUI (``scripts/dreambooth_tab.py`` does). ``WebUIHost`` answers the questions the tab
and the API ask (models root, checkpoint list, attention default, ...) from the WebUI's own state, and carries
out what training needs from the WebUI: its model leaves VRAM before a run and comes back after, the run is told in
the WebUI's console and shown in its progress state while the WebUI itself is idle, and the checkpoint list is
refreshed after an export.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from modules import paths_internal, script_callbacks, sd_models, shared  # noqa: I001 - the WebUI's modules

from ..config import ATTENTION
from ..console import ProgressLines
from ..errors import import_failure
from ..store import ModelDir

log = logging.getLogger(__name__)

SECTION = ("dreambooth", "Dreambooth")
SETTINGS_CATEGORY = "training"  # the WebUI's settings heading "Training" (its shared_options registers it)
OPT_MODELS_ROOT = "dreambooth_models_root"
OPT_FREE_VRAM = "dreambooth_free_webui_model"
OPT_ATTENTION = "dreambooth_attention"
OPT_CONSOLE_EVERY = "dreambooth_console_progress_seconds"
CONSOLE_EVERY_DEFAULT = 10

# the WebUI's cross-attention choice -> ours; anything else (Doggettx, InvokeAI, sub-quadratic, V1, None) is default
_ATTENTION = {"xformers": "xformers", "sdp": "sdp", "sdp-no-mem": "sdp"}


def attention_from_webui(choice: str | None, cmd_opts: object) -> str:
    """Our attention for the WebUI's setting: xformers -> xformers, sdp / sdp-no-mem -> SDP, others -> default.

    "Automatic" is what the WebUI would pick: xformers when started with --xformers, else SDP.
    """
    if not choice or choice == "Automatic":
        if getattr(cmd_opts, "xformers", False) or getattr(cmd_opts, "force_enable_xformers", False):
            return "xformers"
        return "sdp"
    return _ATTENTION.get(choice, "default")


def parse_api_auth(value: str | None) -> dict[str, str] | None:
    """The WebUI's ``--api-auth user:pass,user2:pass2`` as {user: password}; None when not set."""
    if not value:
        return None
    credentials = {}
    for pair in value.split(","):
        user, _, password = pair.strip().partition(":")
        if user:
            credentials[user] = password
    return credentials or None


class WebUIHost:
    """What the tab, the API and the worker launcher need from the WebUI."""

    def __init__(self) -> None:
        self._watchers: dict[Path, threading.Thread] = {}

    # --- places and lists -------------------------------------------------------------------------------------
    def models_root(self) -> Path:
        """Our models root: the setting if the user set one, else the WebUI's models path."""
        custom = getattr(shared.opts, OPT_MODELS_ROOT, "") or ""
        return Path(custom or paths_internal.models_path).expanduser().resolve()

    def checkpoint_dir(self) -> Path:
        """Where the WebUI lists checkpoints: --ckpt-dir if given, else <models>/Stable-diffusion."""
        custom = getattr(shared.cmd_opts, "ckpt_dir", None)
        return Path(custom) if custom else Path(paths_internal.models_path) / "Stable-diffusion"

    def lora_dir(self) -> Path:
        custom = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(custom) if custom else Path(paths_internal.models_path) / "Lora"

    def embeddings_dir(self) -> Path:
        """The WebUI's embeddings folder: --embeddings-dir if given, else <data dir>/embeddings."""
        custom = getattr(shared.cmd_opts, "embeddings_dir", None)
        return Path(custom) if custom else Path(paths_internal.data_path) / "embeddings"

    def hypernetworks_dir(self) -> Path:
        """The WebUI's hypernetworks folder: --hypernetwork-dir if given, else <models>/hypernetworks."""
        custom = getattr(shared.cmd_opts, "hypernetwork_dir", None)
        return Path(custom) if custom else Path(paths_internal.models_path) / "hypernetworks"

    def checkpoints(self) -> dict[str, str]:
        """The WebUI's checkpoint list as it shows it: title (``name [hash]``, or ``name`` for a file it never
        hashed) -> file, in its order."""
        return {title: info.filename for title, info in sd_models.checkpoints_list.items()}

    def checkpoint_path(self, choice: str) -> Path:
        """The file behind a title, or any other name the WebUI knows it by (a title from before the file was
        hashed, its name without the folder, ...); else ``choice`` as a path, relative to the checkpoint folder."""
        aliases = getattr(sd_models, "checkpoint_aliases", None) or sd_models.checkpoints_list
        info = aliases.get(choice)
        if info is not None:
            return Path(info.filename)
        path = Path(choice).expanduser()
        return path if path.is_absolute() else self.checkpoint_dir() / path

    def refresh_checkpoints(self) -> None:
        """List the checkpoint folder again, as the WebUI's own refresh button does (a file put there after the
        WebUI started appears)."""
        sd_models.list_models()

    def loaded_checkpoint(self) -> str | None:
        """The title of the checkpoint the WebUI has loaded, else of the one selected in its settings (without
        loading a model to find out); None when neither is in its list."""
        model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None:
            selected = getattr(shared.opts, "sd_model_checkpoint", None)
            aliases = getattr(sd_models, "checkpoint_aliases", None) or sd_models.checkpoints_list
            info = aliases.get(selected) if selected else None
        if info is None:
            return None
        # the list's own entry for that file: after a refresh or a hash the loaded model's info may be an older one
        titles = [title for title, listed in sd_models.checkpoints_list.items() if listed.filename == info.filename]
        return titles[0] if titles else None

    def attention_default(self) -> str:
        """Our settings page's choice, or (by default) whatever the WebUI itself runs with."""
        chosen = getattr(shared.opts, OPT_ATTENTION, "auto") or "auto"
        if chosen != "auto":
            return chosen
        return attention_from_webui(getattr(shared.opts, "cross_attention_optimization", None), shared.cmd_opts)

    def api_credentials(self) -> dict[str, str] | None:
        return parse_api_auth(getattr(shared.cmd_opts, "api_auth", None))

    def after_export(self, path: Path) -> None:
        """Refresh the WebUI's lists so the new file can be picked at once."""
        self.refresh_lists()
        log.info("refreshed the WebUI's lists after exporting %s", path)

    def refresh_lists(self) -> None:
        """The checkpoint list, and the Lora list of the WebUI's built-in Lora extension when it is loaded."""
        sd_models.list_models()
        reload_hypernetworks = getattr(shared, "reload_hypernetworks", None)
        if callable(reload_hypernetworks):  # the WebUI's hypernetwork list (shared.hypernetworks)
            try:
                reload_hypernetworks()
            except Exception as err:  # noqa: BLE001 - a failing refresh must not break training or export
                log.warning("could not refresh the WebUI's hypernetwork list: %s", err)
        networks = sys.modules.get("networks")  # extensions-builtin/Lora; absent when that extension is off
        if networks is not None and hasattr(networks, "list_available_networks"):
            try:
                networks.list_available_networks()
            except Exception as err:  # noqa: BLE001 - a failing refresh must not break training or export
                log.warning("could not refresh the WebUI's Lora list: %s", err)

    # --- around a training run ----------------------------------------------------------------------------------
    def free_vram(self) -> bool:
        """Move the WebUI's model out of VRAM (unless the setting says no). True if it was moved."""
        if not getattr(shared.opts, OPT_FREE_VRAM, True):
            return False
        if getattr(getattr(sd_models, "model_data", None), "sd_model", None) is None:
            return False
        sd_models.unload_model_weights()
        return True

    def restore_vram(self) -> None:
        """Move the WebUI's model back to its device, as the WebUI's own "reload checkpoint" action does.

        Not ``reload_model_weights()``: it returns at once when the checkpoint is unchanged and leaves the model on
        the CPU. A model the WebUI no longer holds is not loaded again here.
        """
        model = getattr(sd_models.model_data, "sd_model", None)
        if model is not None:
            sd_models.send_model_to_device(model)

    def training_started(self, model: ModelDir, is_running: Callable[[], bool],
                         read_status: Callable[[], dict | None], poll_seconds: float = 1.0,
                         job: str = "training") -> None:
        """Free VRAM now; while the worker runs, say its progress in the WebUI's console and mirror it into the
        WebUI's progress state; bring the model back after.

        ``is_running()`` and ``read_status()`` come from the jobs module; a thread watches the worker. ``job``:
        what the worker does ("training", or "sampling" for "Generate samples now").
        """
        moved = self.free_vram()
        what, job = job, f"dreambooth {model.name}"  # job: the name of our job in shared.state
        every = getattr(shared.opts, OPT_CONSOLE_EVERY, CONSOLE_EVERY_DEFAULT)
        lines = ProgressLines(model.name, every_s=float(every or 0))
        console(f"Dreambooth {model.name}: {what} started (the worker's own log: {model.logs / 'worker.log'})")

        def watch() -> None:
            try:
                while is_running():
                    status = read_status() or {}
                    for line in lines.lines(status):
                        console(line)
                    mirror_progress(job, model.name, status)
                    time.sleep(poll_seconds)
                for line in lines.lines(read_status()):  # the end, or how the worker failed
                    console(line)
            finally:
                if shared.state.job == job:  # never end a job of the WebUI's own
                    shared.state.end()
                if moved:
                    self.restore_vram()
                self.refresh_lists()  # the run's exports (checkpoints, LoRA files) appear at once
                self._watchers.pop(model.path, None)

        thread = threading.Thread(target=watch, name=f"dreambooth-watch-{model.name}", daemon=True)
        self._watchers[model.path] = thread
        thread.start()


def console(line: str) -> None:
    """One line in the WebUI's console. print, not logging: the WebUI shows no INFO records unless started with
    --loglevel, and its own messages are printed too."""
    print(line, flush=True)


def mirror_progress(job: str, name: str, status: dict) -> bool:
    """Show a run's progress in the WebUI's progress state (``/sdapi/v1/progress``, the progress bar) while the
    WebUI is idle; True if shown.

    ``shared.state`` belongs to whatever the WebUI generates: while it runs a job of its own (``state.job`` set by
    its ``begin``) nothing is written, so a txt2img keeps its own progress; the run takes the state again once
    the WebUI is idle (``job`` empty, ``job_count`` 0).
    """
    state = shared.state
    if state.job != job:
        if state.job or state.job_count:
            return False
        state.begin(job=job)
    if state.job != job:  # the WebUI began a job of its own meanwhile
        return False
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    loss = status.get("smoothed_loss")
    state.job_count, state.job_no = 1, 0
    state.sampling_steps, state.sampling_step = total, step
    state.textinfo = (f"Dreambooth {name}: step {step}/{total}" + (f", loss {loss:.4f}" if isinstance(loss, float)
                                                                    else ""))
    return True


def on_ui_settings() -> None:
    """Our settings on a page of their own, "Dreambooth", listed under the WebUI's "Training" heading."""
    options = {
        OPT_MODELS_ROOT: shared.OptionInfo(
            "", "Dreambooth models root (empty: the WebUI's models folder; model dirs go in <root>/dreambooth)"),
        OPT_FREE_VRAM: shared.OptionInfo(True, "Move the WebUI's loaded model out of VRAM while training"),
        OPT_ATTENTION: shared.OptionInfo(
            "auto", "Default memory attention for training ('auto' follows the WebUI's cross attention optimization)",
            component=_dropdown(), component_args={"choices": list(ATTENTION)}),
        OPT_CONSOLE_EVERY: shared.OptionInfo(
            CONSOLE_EVERY_DEFAULT, "Seconds between training progress lines in the console (step, loss, it/s, "
            "ETA; 0: only the start, saves, exports and the end)"),
    }
    for key, info in options.items():
        info.section = SECTION
        if hasattr(info, "category_id"):  # WebUI 1.6+: without a category the page is listed under "Uncategorized"
            info.category_id = SETTINGS_CATEGORY
        shared.opts.add_option(key, info)


def _dropdown() -> object:
    from ..ui import compat  # the WebUI's own gradio, through our one gradio-version module

    return compat.gradio().Dropdown


_host: WebUIHost | None = None  # one per WebUI process: its watcher threads outlive a page reload


def host() -> WebUIHost:
    global _host
    if _host is None:
        _host = WebUIHost()
    return _host


def on_ui_tabs() -> list[tuple[object, str, str]]:
    from ..ui.tab import build_tab  # gradio and the UI load only when the WebUI builds its tabs

    return [(build_tab(host()), "Dreambooth", "dreambooth")]


def on_app_started(demo: object, app: object) -> None:
    """The HTTP API under /dreambooth/ (also with --nowebui, when ``demo`` is None); honours --api-auth."""
    try:
        from ..api import add_routes
    except ImportError as err:  # the WebUI prints the traceback; this line says what it means for us
        log.error("Dreambooth: the HTTP API is not available: %s", import_failure(err))
        raise

    add_routes(app, host())


def register() -> None:
    """Register callbacks with the WebUI. Called once when the WebUI imports our scripts/ entry."""
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
