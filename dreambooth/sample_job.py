""""Generate samples now": previews of what a model has trained, made by a worker process as training is.

The tab and the API start it with ``jobs.start(..., job="sample")``, which runs ``python -m dreambooth sample NAME``
(:func:`run_sample_job`): never inside the WebUI's process, so a crash or an out-of-memory error ends the worker
only, the WebUI's model leaves VRAM for it as for a training, and its memory is freed when it ends. Like a training
it holds the model's lock (no training of that model meanwhile) and, on a GPU, the GPU's lock (no training on that
GPU meanwhile), honours a cancel, and says what it made in ``status.json`` (``job: "sample"``).

The images are made as the trainer's previews are (:class:`sample.Sampler`: the config's scheduler, clip skip,
attention and mixed precision). Where the mixed precision is fp16 or bf16 the weights are held in it too: sampling
needs no fp32 master weights, so that halves the memory the trainer's fp32 weights would take (the VAE still decodes
in fp32 or bf16, never fp16: ``sample._decode``). A LoRA, an embedding or a hypernetwork is not in the working
weights: the last save's resume state puts it on them (:func:`saved_method`).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import write_json
from .config import TrainConfig, load_config, resolve_concepts
from .errors import UserError
from .lock import acquire, acquire_device, device_key
from .sample import Sampler, SampleSettings
from .store import ModelDir

if TYPE_CHECKING:
    from .train.methods import TrainingMethod

log = logging.getLogger(__name__)

PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}


class Cancelled(Exception):
    """A cancel was asked for between two images."""


def check_previews(cfg: TrainConfig) -> None:
    """Refuse a job that would make no image (or whose template file is unreadable), before a worker starts."""
    from .sample import sample_prompts

    if not any(sample_prompts(c, c.instance_prompt) for c in resolve_concepts(cfg)):
        raise UserError("no previews to make", "set 'Number of samples' of a concept to 1 or more")


def sample_now(model: ModelDir, cfg: TrainConfig, device: str | None, attention_default: str = "sdp",
               after_each: Any = None) -> list[Path]:
    """Previews of what ``model`` has trained for each concept of ``cfg``, as the trainer makes them (same
    settings, attention and precision), named ``now_step<steps>_<tag>_c<concept>_<n>.png``: its working weights,
    with the last save's LoRA, embedding or hypernetwork on them (:func:`saved_method`). ``after_each()`` runs
    after each image (a cancel check)."""
    from .train.models import load_models, set_attention
    from .train.options import attention_for, autocast_dtype, pick_device

    concepts = resolve_concepts(cfg)
    models = load_models(model.working, cfg.family)
    dev = pick_device(device)
    set_attention(models, attention_for(cfg.attention, attention_default))
    autocast = autocast_dtype(cfg.mixed_precision, dev)
    method = saved_method(model, cfg, models, dev)
    added = method.added_modules() if method is not None else []
    for module in (models.unet, models.vae, *models.text_encoders, *added):
        module.to(dev, dtype=autocast or torch.float32)
    tag = secrets.token_hex(3)
    sampler: Sampler | None = None
    try:
        sampler = Sampler(models, dev, SampleSettings.from_config(cfg, autocast),
                          method.expand_prompt if method is not None else None)
        return sampler.previews(concepts, cfg.resolution or models.family.resolution, model.samples,
                                lambda c, n: f"now_step{cfg.revision:06d}_{tag}_c{c}_{n}",
                                {"step": str(cfg.revision), "epoch": str(cfg.epochs_trained), "model": model.name,
                                 "kind": "manual"}, after_each)
    finally:
        del sampler, models, method, added  # the weights go before the cache is emptied
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def saved_method(model: ModelDir, cfg: TrainConfig, models: Any, device: torch.device) -> TrainingMethod | None:
    """The config's training method with its last save's weights on ``models``, where what it trains lives beside
    the model (LoRA, textual inversion, a hypernetwork: the working weights stay the base's); None for full
    DreamBooth (a save writes the working weights) and for a model with no save yet (nothing trained to show)."""
    from .train.methods import MethodContext, method_class
    from .train.resume import latest_state

    cls = method_class(cfg.method)
    if not cls.trains_beside_model:
        return None
    state = latest_state(model.checkpoints)
    if state is None:
        log.info("%s has no save yet: the previews show the model without %s weights", model.name, cfg.method)
        return None
    method = cls(MethodContext(cfg, models, device, model))
    try:
        method.restore(state.weights)
    except KeyError:
        raise UserError(f"the last save ({state.path.name}) holds no {cfg.method} weights: it was made with "
                        "another training method", f"train this model as {cfg.method} first, or set the method "
                        "it was trained with") from None
    log.info("previews with the %s weights of %s", cfg.method, state.path.name)
    return method


def run_sample_job(model: ModelDir, device: str | None = None, attention_default: str = "sdp") -> dict[str, Any]:
    """The worker's job: the model's lock (taking over the one ``jobs.start`` made for it), the GPU's lock, the
    previews with the saved config, ``status.json`` at the start and the end. Returns the final status."""
    from .train.options import autocast_dtype, pick_device
    from .train.status import Controls

    held = acquire(model.path)
    device_lock = None
    status: dict[str, Any] = {"state": "sampling", "job": "sample", "message": "generating previews",
                              "pid": os.getpid(), "started_at": time.time(), "samples": []}
    try:
        cfg = load_config(model.path)
        dev = pick_device(device)
        key = device_key(str(dev))
        if key is not None:
            device_lock = acquire_device(model.path.parent, key, model.name)
        controls = Controls(model, clear_requests=not held.handed_over)
        status["precision"] = PRECISION_NAMES.get(autocast_dtype(cfg.mixed_precision, dev), "fp32")
        write_json(model.status_path, status)

        def check_cancel() -> None:
            if controls.cancel_requested:
                raise Cancelled

        try:
            written = sample_now(model, cfg, str(dev), attention_default, check_cancel)
            status.update(state="done", message=f"made {len(written)} preview(s) in {model.samples}",
                          samples=[str(p) for p in written])
        except Cancelled:
            status.update(state="cancelled", message="cancelled")
        finally:
            controls.close()
    except UserError as err:
        status.update(state="failed", message=str(err))
        raise
    except Exception as err:
        status.update(state="failed", message=f"{type(err).__name__}: {err}")
        raise
    finally:
        status["updated_at"] = time.time()
        write_json(model.status_path, status)
        if device_lock is not None:
            device_lock.release()
        held.release()
    log.info("%s: %s", model.name, status["message"])
    return status
