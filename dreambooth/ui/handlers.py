"""What the Dreambooth tab's buttons do, in plain Python: :class:`TabHandlers` takes control values and returns
output values, so every action is tested without a browser. ``tab.py`` lays the tab out and wires these in.

Training runs in a worker process started through ``jobs``; the handlers only start it and read its status. A
problem the user can fix (a :class:`UserError`) comes back as one line for the message bar, never a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..config import METHODS, Concept, TrainConfig, load_config
from ..errors import UserError, import_failure
from ..families import FAMILIES
from ..store import ModelDir, list_models, open_model
from ..train.validation_log import LOG_NAME as VALIDATION_LOG
from ..train.validation_log import read_log
from . import compat
from .form import CONCEPT_PANELS, Control, all_controls, config_to_values, estimate_steps, values_to_config
from .output import LossLog, load_previews, log_tail, loss_svg, message_html, newest_samples, status_html

log = logging.getLogger(__name__)

NO_PROFILE = "(keep my settings)"
PROFILE_CHOICES = (NO_PROFILE, "fits in 6 GB", "fits in 8 GB", "fastest")  # profiles.PROFILES, without importing it
GALLERY_SIZE = 8  # newest previews shown
LOG_LINES = 12  # rows of the worker-log box; the page script keeps it scrolled to its newest line
LOG_TAIL_LINES = 200  # lines of the worker log sent to it (the earlier ones are a scroll up)


class Host(Protocol):
    """What the tab needs from its host (the WebUI adapter or the standalone one).

    ``checkpoints()`` lists the source checkpoints: paths (relative to ``checkpoint_dir()`` unless absolute), or a
    mapping of the titles to show to their files (the WebUI's ``name [hash]`` titles).

    Optional: ``device() -> str | None`` (the worker's torch device; None picks CUDA when available),
    ``checkpoint_path(choice) -> Path`` (the file behind an entry of ``checkpoints()``), ``refresh_checkpoints()``
    (list the checkpoint folder again before ``checkpoints()`` is asked) and ``training_started(model,
    is_running=..., read_status=...)`` (called after a worker started, as the HTTP API does).
    """

    def models_root(self) -> Path: ...

    def checkpoint_dir(self) -> Path: ...

    def checkpoints(self) -> list[str] | Mapping[str, str]: ...

    def loaded_checkpoint(self) -> str | None: ...

    def attention_default(self) -> str: ...

    def after_export(self, path: Path) -> None: ...


def _jobs() -> Any:
    try:
        from .. import jobs
    except ImportError as err:  # names what really failed, e.g. a module this system lacks, not a missing jobs.py
        log.debug("importing the jobs module failed", exc_info=True)  # each status refresh asks again
        raise UserError(f"training is not available: importing the jobs module failed with {import_failure(err)}",
                        "please report this line as a bug of the extension") from err
    return jobs


def _error_text(err: BaseException) -> str:
    if isinstance(err, UserError):
        return f"error: {err}"
    return f"unexpected {type(err).__name__}: {err} (the console log has the details)"


def guarded(n_outputs: int, no_change: Callable[[], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn any exception of a handler into an error line in its first output; the other outputs stay as they are.

    A UserError shows its message and hint; anything else its type and message, with the traceback in the log only.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def handler(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:  # noqa: BLE001 - shown to the user as one line, never as a traceback
                if not isinstance(err, UserError):
                    log.exception("Dreambooth tab: %s failed", fn.__name__)
                else:
                    log.info("%s: %s", fn.__name__, err)
                error = message_html(_error_text(err), "error")
                if n_outputs == 1:
                    return error
                return [error] + [no_change() for _ in range(n_outputs - 1)]

        return handler

    return wrap


class TabHandlers:
    """What the tab's buttons do, in plain Python: arguments are control values, results are output values.

    Every handler returns its message line first. ``no_change`` is the value that leaves an output as it is
    (``gr.update()`` in the tab).
    """

    def __init__(self, host: Host, panels: int = CONCEPT_PANELS, no_change: Callable[[], Any] | None = None) -> None:
        self.host = host
        self.controls: list[Control] = all_controls(panels)
        self.no_change = no_change or (lambda: None)
        self.loss_log = LossLog()
        self._loss_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ helpers
    def model(self, name: str | None) -> ModelDir:
        if not name or not str(name).strip():
            raise UserError("no model is selected", "pick a model in the Model list, or create one")
        return open_model(str(name).strip(), self.host.models_root())

    def device(self) -> str | None:
        device = getattr(self.host, "device", None)
        return device() if callable(device) else device

    def checkpoint_choices(self) -> list[str]:
        """What the source list shows: the host's titles, or its paths."""
        return list(self.host.checkpoints())

    def _listed_path(self, choice: str, listed: list[str] | Mapping[str, str] | None = None) -> Path:
        listed = self.host.checkpoints() if listed is None else listed
        if isinstance(listed, Mapping) and choice in listed:
            return Path(listed[choice])
        resolve = getattr(self.host, "checkpoint_path", None)
        if callable(resolve):
            return Path(resolve(choice))
        path = Path(choice).expanduser()
        return path if path.is_absolute() else Path(self.host.checkpoint_dir()) / path

    def checkpoint_path(self, choice: str) -> Path:
        """The source file for an entry of the checkpoint list, or a path typed by hand inside the checkpoint
        folder; anything else is refused, as by the HTTP API, so the tab never reads other files of the machine."""
        entries = self.host.checkpoints()
        path = self._listed_path(choice, entries).resolve()
        root = Path(self.host.checkpoint_dir()).resolve()
        listed = {self._listed_path(c, entries).resolve() for c in entries}
        if path not in listed and (path == root or not path.is_relative_to(root)):
            raise UserError(f"{choice} is not in the checkpoint folder {root}",
                            "pick a checkpoint from the list, or put the file into that folder")
        return path

    def form_config(self, md: ModelDir, values: tuple[Any, ...] | list[Any]) -> TrainConfig:
        """The model's saved config with the form's values (nothing is written)."""
        return values_to_config(list(values), self.controls, load_config(md.path))

    def choose_method(self, previous: str | None, *values: Any) -> list[Any]:
        """[message, *control values, method]: the form after its training method changed from ``previous``; the
        settings still at ``previous``'s defaults show the new method's (nothing is written)."""
        from ..train.methods import apply_method_defaults

        cfg = values_to_config(list(values), self.controls, TrainConfig())
        cfg.method_defaults = previous if previous in METHODS else TrainConfig().method
        changes = apply_method_defaults(cfg)
        method = cfg.method.replace("_", " ")
        text = (f"training method {method}: its defaults for the settings you had not changed: {'; '.join(changes)}"
                if changes else f"training method {method}")
        return [message_html(text, "ok"), *config_to_values(cfg, self.controls), cfg.method]

    def info(self, md: ModelDir, cfg: TrainConfig) -> str:
        from ..families import get_family

        source = Path(cfg.source_checkpoint).name if cfg.source_checkpoint else "?"
        return (f"<div class='db-model-info'>{get_family(cfg.family).label} model, created from "
                f"{_escape(source)}; trained {cfg.revision:,} steps / {cfg.epochs_trained:,} epochs. "
                f"Folder: {_escape(str(md.path))}</div>")

    def config_steps_html(self, cfg: TrainConfig) -> str:
        estimate = estimate_steps(cfg.concepts, cfg.epochs, cfg.train_batch_size, cfg.gradient_accumulation_steps,
                                  cfg.concepts_list_file)
        return steps_html(estimate.text)

    def apply_profile(self, name: str | None, profile: str | None, *values: Any) -> list[Any]:
        """[memory line, *control values]: the form with a memory profile's settings applied (nothing is written),
        and the peak memory of training with them on the device training will use: "measured" where the
        full-size benchmark ran exactly that configuration, else "estimated". No profile picked: the form as it
        is."""
        from ..profiles import apply_profile, estimate_memory, profile_summary

        base = load_config(self.model(name).path) if name and str(name).strip() else TrainConfig()
        cfg = values_to_config(list(values), self.controls, base)
        device_type = self.device_type()
        if profile and profile in PROFILE_CHOICES[1:]:
            text = profile_summary(cfg, profile, device_type)
            cfg = apply_profile(cfg, profile)
        else:
            text = estimate_memory(cfg, device_type=device_type).text()
        return [memory_html(text), *config_to_values(cfg, self.controls)]

    def device_type(self) -> str:
        """The kind of device training will run on: the host's choice, else CUDA when there is one."""
        from ..profiles import default_device_type

        device = self.device()
        return str(device).split(":")[0] if device else default_device_type()

    # ------------------------------------------------------------------------------------------------ models
    def model_choices(self) -> list[str]:
        return list_models(self.host.models_root())

    def refresh_models(self, current: str | None) -> Any:
        """New choices; the value is left alone (a pick made meanwhile stays) unless its model is gone."""
        choices = self.model_choices()
        if current and current not in choices:
            return compat.update(choices=choices, value=None)
        return compat.update(choices=choices)

    def refresh_checkpoints(self, current: str | None) -> Any:
        """The host's list read again (new files appear); with nothing picked yet, the checkpoint the host has
        loaded is picked."""
        refresh = getattr(self.host, "refresh_checkpoints", None)
        if callable(refresh):
            refresh()
        choices = self.checkpoint_choices()
        loaded = self.host.loaded_checkpoint()
        if not current and loaded:
            return compat.update(choices=choices, value=loaded)
        return compat.update(choices=choices)

    def load(self, name: str | None) -> list[Any]:
        """[message, model info, step count, *control values] of the model's saved config."""
        md = self.model(name)
        cfg = load_config(md.path)
        note = ""
        if len(cfg.concepts) > CONCEPT_PANELS:
            note = (f"; concepts {CONCEPT_PANELS + 1}-{len(cfg.concepts)} are not shown and are kept as they are "
                    "(use a concepts list file to edit many concepts)")
        return [message_html(f"loaded the settings of {md.name}{note}", "ok"), self.info(md, cfg),
                self.config_steps_html(cfg), *config_to_values(cfg, self.controls)]

    def prediction_type(self, name: str | None) -> str | None:
        """What the model's UNet predicts ("epsilon" / "v_prediction"; None without a readable model), so the tab
        hides the settings that need the other kind."""
        try:
            family = FAMILIES.get(load_config(self.model(name).path).family) if name else None
        except UserError:
            return None
        return family.prediction_type if family is not None else None

    def import_kohya(self, name: str | None, source: str, reg_folder: str) -> list[Any]:
        """[message, model info, step count, *control values] after filling the concepts from a kohya dataset."""
        from ..data.kohya import import_kohya

        md = self.model(name)
        if _jobs().running(md):
            raise UserError(f"{md.name} is training; its concepts cannot change now", "wait for the training to end")
        result = import_kohya(md, source, reg_folder or None)
        cfg = load_config(md.path)
        text = result.summary() + "".join(f"; note: {n}" for n in result.notes)
        if len(cfg.concepts) > CONCEPT_PANELS:
            text += f"; concepts {CONCEPT_PANELS + 1}-{len(cfg.concepts)} are kept but not shown"
        return [message_html(text, "ok"), self.info(md, cfg), self.config_steps_html(cfg),
                *config_to_values(cfg, self.controls)]

    def save(self, name: str | None, *values: Any) -> str:
        md = self.model(name)
        cfg = self.form_config(md, values)
        cfg.save(md.path)
        return message_html(f"saved the settings of {md.name} to {md.config_path}", "ok")

    def create(self, source: str | None, model_type: str, extract_ema: bool, name: str | None) -> list[Any]:
        """[message, model info, step count, model list update, *control values] of the new model."""
        from ..create import create_model

        if not source:
            raise UserError("no source checkpoint is selected", "pick one in the Source checkpoint list")
        name = (name or "").strip()
        if not name:
            raise UserError("the new model has no name", "enter a name such as 'my-dog-v1'")
        family = None if model_type in (None, "", "auto") else model_type
        md = create_model(self.checkpoint_path(source), name, self.host.models_root(), family=family,
                          extract_ema=bool(extract_ema))
        cfg = load_config(md.path)
        return [message_html(f"created {md.name} in {md.path}", "ok"), self.info(md, cfg), self.config_steps_html(cfg),
                compat.update(choices=self.model_choices(), value=md.name), *config_to_values(cfg, self.controls)]

    # ------------------------------------------------------------------------------------------------ training
    def train(self, name: str | None, resume: bool, *values: Any) -> list[Any]:
        """Save the form, start the worker, return at once: [message, status]."""
        md = self.model(name)
        jobs = _jobs()
        cfg = self.form_config(md, values)
        cfg.save(md.path)
        jobs.start(md, models_root=self.host.models_root(), resume=bool(resume), device=self.device(),
                   export_dir=self.host.checkpoint_dir(), attention_default=self.host.attention_default(),
                   lora_dir=self.host.lora_dir() if hasattr(self.host, "lora_dir") else None,
                   embeddings_dir=self.host.embeddings_dir() if hasattr(self.host, "embeddings_dir") else None,
                   hypernetworks_dir=self.host.hypernetworks_dir() if hasattr(self.host, "hypernetworks_dir")
                   else None)
        started = getattr(self.host, "training_started", None)
        if callable(started):  # e.g. the WebUI frees VRAM and mirrors the progress into its own progress bar
            started(md, is_running=lambda: jobs.running(md), read_status=lambda: jobs.status(md))
        note = (jobs.read_status(md) or {}).get("note")  # what the checks before the start noticed
        starting = {"state": "starting", "message": "starting the worker", "note": note}
        return [message_html(f"training {md.name} started{' (resuming)' if resume else ''}"
                             + (f"; {note}" if note else ""), "ok"), status_html(starting, True, md.name)]

    def cancel(self, name: str | None) -> str:
        md = self.model(name)
        jobs = _jobs()
        if not jobs.running(md):
            raise UserError(f"no training of {md.name} is running", "there is nothing to cancel")
        jobs.cancel(md)
        return message_html(f"cancel requested: {md.name} stops at the next step"
                            f"{' and saves' if load_config(md.path).save_on_cancel else ''}", "ok")

    def pause(self, name: str | None) -> list[Any]:
        """Pause, or go on when paused: [message, button label]."""
        from ..train.status import PAUSE_FILE

        md = self.model(name)
        jobs = _jobs()
        if not jobs.running(md):
            raise UserError(f"no training of {md.name} is running", "start one with Train")
        if (md.path / PAUSE_FILE).exists():
            jobs.unpause(md)
            return [message_html(f"{md.name} goes on", "ok"), compat.update(value="Pause")]
        jobs.pause(md)
        return [message_html(f"pause requested: {md.name} pauses at the next step", "ok"),
                compat.update(value="Resume")]

    def export(self, name: str | None, *values: Any) -> str:
        """Export the working weights now, with the form's precision and EMA choice."""
        from ..export import export_checkpoint

        md = self.model(name)
        cfg = self.form_config(md, values)
        ema = "main" if cfg.export_ema and (md.working / "unet_ema").is_dir() else "none"
        dest = self.host.checkpoint_dir() / f"{md.name}_{cfg.revision}.safetensors"
        path = export_checkpoint(md, dest, dtype=cfg.export_dtype, ema=ema)
        self.host.after_export(path)
        return message_html(f"exported {path} ({cfg.export_dtype}{', EMA weights' if ema == 'main' else ''})", "ok")

    def sample(self, name: str | None, *values: Any) -> str:
        """Save the form and start a worker that makes previews of the working weights with its concepts and sample
        settings (``jobs.start(job="sample")``, as a training starts); return at once. The status and the gallery
        show the result."""
        md = self.model(name)
        jobs = _jobs()
        if jobs.running(md):
            raise UserError(f"{md.name} is busy (training, or making previews)",
                            "previews are made at the preview interval while it trains")
        cfg = self.form_config(md, values)
        from ..sample_job import check_previews

        check_previews(cfg)
        cfg.save(md.path)
        jobs.start(md, models_root=self.host.models_root(), device=self.device(),
                   attention_default=self.host.attention_default(), job="sample")
        started = getattr(self.host, "training_started", None)
        if callable(started):  # the WebUI's model leaves VRAM while the worker samples, as for a training
            started(md, is_running=lambda: jobs.running(md), read_status=lambda: jobs.status(md), job="sampling")
        return message_html(f"generating previews of {md.name} in a worker: they appear in the gallery", "ok")

    def steps(self, epochs: Any, batch: Any, accumulation: Any, list_file: Any, *concept_values: Any) -> str:
        """The live step count from the step-relevant controls: per panel (folder, repeats, class images per)."""
        concepts = []
        for i in range(0, len(concept_values) - 2, 3):
            folder, repeats, class_per = concept_values[i:i + 3]
            try:
                concepts.append(Concept(instance_data_dir=str(folder or ""), repeats=int(repeats or 0),
                                        num_class_images_per=int(class_per or 0)))
            except (TypeError, ValueError):
                continue
        try:
            estimate = estimate_steps(concepts, int(epochs or 0), int(batch or 1), int(accumulation or 1),
                                      str(list_file or ""))
        except (TypeError, ValueError) as err:
            return steps_html(f"cannot count steps: {err}")
        return steps_html(estimate.text)

    # ------------------------------------------------------------------------------------------------ output
    def poll(self, name: str | None, seen: dict[str, Any] | None) -> list[Any]:
        """[status, loss chart, gallery, worker log, pause label, seen] for the selected model.

        The gallery and the log are sent only when they changed (``seen`` remembers them per browser session), so
        a log scrolled back to read stays put; a new export reported by the worker is handed to the host once.
        """
        seen = dict(seen or {})
        if not name:
            seen.pop("log", None)
            return [status_html(None, False, None), loss_svg([]), self.no_change(), "", compat.update(value="Pause"),
                    seen]
        try:
            md = self.model(name)
        except UserError as err:
            seen.pop("log", None)
            return [message_html(str(err), "error"), loss_svg([]), self.no_change(), "", self.no_change(), seen]
        status, running = self._status(md)
        with self._loss_lock:
            points = list(self.loss_log.points(md.logs / "loss.csv"))
        validation = read_log(md.logs / VALIDATION_LOG)
        samples = newest_samples(md.samples, GALLERY_SIZE)
        signature = [md.name] + [f"{p.name}:{p.stat().st_mtime_ns}" for p in samples if p.exists()]
        gallery = self.no_change()
        if signature != seen.get("samples"):
            gallery = compat.gallery_value(load_previews(samples))
            seen["samples"] = signature
        export = (status or {}).get("last_export")
        if export and export != seen.get("export"):
            seen["export"] = export
            try:
                self.host.after_export(Path(export))
            except Exception:  # noqa: BLE001 - a host refresh failing must not break the status display
                log.exception("after_export(%s) failed", export)
        text = log_tail(md.logs / "worker.log", LOG_TAIL_LINES)
        worker_log = self.no_change()
        log_signature = [md.name, hashlib.sha1(text.encode("utf-8")).hexdigest()]
        if log_signature != seen.get("log"):
            worker_log, seen["log"] = text, log_signature
        paused = status is not None and status.get("state") == "paused"
        return [status_html(status, running, md.name), loss_svg(points, validation), gallery, worker_log,
                compat.update(value="Resume" if paused else "Pause"), seen]

    def _status(self, md: ModelDir) -> tuple[dict[str, Any] | None, bool]:
        try:
            jobs = _jobs()
        except UserError:
            from ..train.status import read_status

            return read_status(md), False
        current = dict(jobs.status(md) or {})
        running = bool(current.pop("running", False))
        if "state" not in current:
            return ({"state": "starting"} if running else None), running
        return current, running


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def memory_html(text: str) -> str:
    return f"<div class='db-memory'>{_escape(text)}</div>"


def steps_html(text: str) -> str:
    return f"<div class='db-steps'>Total: {_escape(text)}</div>"
