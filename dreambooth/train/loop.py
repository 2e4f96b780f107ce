"""The training run: data, models, optimizer and schedule set up from the config, then epochs of steps with
previews, saves and pauses at their intervals, reported through ``status.json``.

``Trainer.run`` reads as an outline; each part is a method or a module of its own. The step's loss is in
``step.py``.

Reliability: a save checks the free disk space first and writes every file atomically, resume state first; a run
resumed from a save that was cut off after its resume state writes the rest of that save. An out-of-memory error
stops the run with the settings that would need less memory. ``atomic.fault_point`` calls mark the moments the
crash tests (``tools/fault_injection.py``) cut a run off at; they do nothing outside those tests.

Speed and memory (each switchable in the config's performance group; the parts live in their own modules):
latents and text embeddings cached (``caches.py``), the VAE and frozen text encoders offloaded to the CPU when the
caches make them idle, channels-last UNet, bf16 weights with an fp32 master or stochastic rounding
(``precision.py``), the optimizer step fused into backward (``fused.py``), pinned-memory batches and an optional
``torch.compile`` of the UNet (``speed.py``).

No host sync per step: the step path reads no tensor value on the host (no ``.item()``, ``float(tensor)``,
``bool(tensor)``); losses stay on the device in ``pending_losses`` and are read once per status write
(:meth:`Trainer._report`). Cache keys are token ids and image paths, which live on the host already.

Previews do not disturb the training memory: every gradient is freed first, sampling runs under ``no_grad`` in
the training autocast dtype, offloaded modules come to the device only for the previews and leave again, and
the latent / text caches are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic import clean_stale_temps, fault_point
from ..compat import autocast_dtypes, grad_scaler, grad_scaler_available, is_out_of_memory
from ..config import WEIGHT_METHODS, Concept, TrainConfig, load_concepts_file, load_config, save_progress
from ..data.captions import build_prompt
from ..data.dataset import Example, TrainingData
from ..data.images import IMAGE_EXTENSIONS, list_images
from ..data.prompts import tokenize_prompts
from ..dtypes import torch_dtype
from ..errors import UserError
from ..export import export_checkpoint
from ..families import get_family
from ..lock import acquire, acquire_device, device_key
from ..sample import (
    SampleRequest,
    build_pipeline,
    generate,
    generate_class_images,
    make_scheduler,
    sample_prompts,
    save_sample,
)
from ..store import ModelDir
from ..working import WEIGHT_NAMES, save_tensors
from .caches import Offloader, TextEmbeddingCache
from .ema import EMA
from .embedding import EmbeddingSettings, TextualInversion, save_embedding
from .fused import GLOBAL_OPTIMIZERS, ParamwiseOptimizer, check_fused, install_fused_step
from .hypernetwork import Hypernetwork, HypernetworkSettings, save_hypernetwork
from .lora import LoraNetwork, LoraSettings, lora_metadata, save_lora
from .lora_merge import merged_components
from .models import TEXT_ENCODER_NAMES, canonical_state, load_canonical, load_models, set_attention
from .optimizers import OptimizerSettings, make_optimizer
from .precision import WeightPrecision, check_weight_precision
from .resume import latest_state, save_state
from .schedules import make_lr_scheduler
from .speed import compile_unet, to_device, use_pinned_memory
from .status import Controls, StatusWriter
from .step import Batch, StepSettings, compute_loss

log = logging.getLogger(__name__)

NAN_HINT = ("lower the learning rate, use bf16 instead of fp16 mixed precision, or turn gradient clipping on; "
            "then resume from the last save")
DISK_MARGIN = 1.1  # a save needs the bytes of what it writes plus this margin (headers, file system overhead)
OOM_ENV = "DREAMBOOTH_OOM_AT"
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}


class Cancelled(Exception):
    """Raised at a step boundary when the user asked to cancel."""


@dataclass
class RunOptions:
    device: str | None = None  # None: CUDA when available, else CPU
    resume: bool = False
    export_dir: Path | None = None  # where checkpoints are exported (the WebUI's Stable-diffusion folder)
    lora_dir: Path | None = None  # where LoRA files are exported (the WebUI's Lora folder)
    embeddings_dir: Path | None = None  # where embeddings are exported (the WebUI's embeddings folder)
    hypernetworks_dir: Path | None = None  # where hypernetworks are exported (the WebUI's hypernetworks folder)
    attention_default: str = "sdp"  # what "auto" means here; the WebUI adapter passes the WebUI's own choice
    cpu_fp16: bool = False  # fp16 mixed precision on the CPU as on a GPU (autocast + grad scaler), not fp32
    install_signal_handlers: bool = True
    on_progress: Callable[[dict], None] | None = None  # called with the status after each write (host progress)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_concepts(cfg: TrainConfig) -> list[Concept]:
    concepts = load_concepts_file(cfg.concepts_list_file) if cfg.concepts_list_file else cfg.concepts
    if not concepts:
        raise UserError("no concepts to train", "add a concept with an instance images folder and prompt")
    return concepts


def class_dir_for(model: ModelDir, index: int, concept: Concept) -> Path:
    return Path(concept.class_data_dir) if concept.class_data_dir else model.path / "classes" / f"concept_{index}"


def autocast_dtype(mixed_precision: str, device: torch.device, cpu_fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype, or a clear refusal / fallback where the device cannot do it.

    fp16 on the CPU (the default setting, made for GPUs) trains in fp32 unless ``cpu_fp16`` asks for the GPU's
    fp16 path (autocast + grad scaler) there, which tests use to run that path without a GPU."""
    dtype = torch_dtype(mixed_precision)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16 mixed precision",
                        "set mixed precision to fp16 (or 'no' for full fp32)")
    if dtype is torch.float16 and device.type == "cpu":
        if not cpu_fp16:
            log.warning("fp16 mixed precision needs a GPU; training in fp32 on the CPU")
            return None
        if torch.float16 not in autocast_dtypes("cpu") or not grad_scaler_available("cpu"):
            raise UserError(f"fp16 mixed precision on the CPU needs torch 2.3 or newer (this is {torch.__version__})",
                            "set mixed precision to bf16 or 'no' for the CPU, or train on a GPU")
    return dtype


class Trainer:
    """One training run of one model dir."""

    def __init__(self, model: ModelDir, options: RunOptions | None = None) -> None:
        self.model = model
        self.opts = options or RunOptions()
        self.cfg = load_config(model.path)
        # one run per model dir; takes over the lock jobs.start handed to this worker ($DREAMBOOTH_LOCK_TOKEN)
        self.lock = acquire(model.path)
        self.device_lock = None
        try:
            self.device = pick_device(self.opts.device)
            key = device_key(str(self.device))  # one training per GPU; None on the CPU
            if key is not None:
                self.device_lock = acquire_device(model.path.parent, key, model.name)
            if self.device.type == "cpu":
                torch.set_flush_denormal(True)  # tiny values otherwise slow CPU math down by orders of magnitude
            self.controls = Controls(model, self.opts.install_signal_handlers)
            self.status = StatusWriter(model, self.device)
        except BaseException:
            self._release_locks()
            raise
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.micro_batch = self.cfg.train_batch_size  # images per forward pass; an out-of-memory retry halves it
        self.latent_cache: dict[tuple[Path, tuple[int, int], bool], torch.Tensor] = {}
        self.vae_encodes = 0  # how many images went through the VAE (a cache hit adds none)
        self.base_revision = self.cfg.revision  # steps trained before this run
        self.network: LoraNetwork | None = None
        self.embedding: TextualInversion | None = None
        self.hypernetwork: Hypernetwork | None = None
        self.saves: list[int] = []
        self.previews: list[int] = []
        self.text_cache: TextEmbeddingCache | None = None
        self.offloader: Offloader | None = None
        self.precision = WeightPrecision("fp32", self.cfg.seed)

    # ------------------------------------------------------------------------------------------------ outline
    def run(self) -> dict:
        try:
            try:
                self._setup()
                self._recover_from_crash()
                self._train()
            except Cancelled:
                if self.cfg.save_on_cancel and self.step > 0:
                    self._save()  # a failing save here ends as "failed", below
                self._finish("cancelled", f"cancelled at step {self.step}")
            else:
                lowered = "" if self.micro_batch == self.cfg.train_batch_size else \
                    f" (with batch {self.micro_batch} after running out of memory)"
                self._finish("done", f"training complete{lowered}")
        except UserError as err:
            self._finish("failed", str(err))
            raise
        except Exception as err:
            self._finish("failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            self.controls.close()
            self.status.close()
            self._release_locks()
        return self.status.status

    def _release_locks(self) -> None:
        if self.device_lock is not None:
            self.device_lock.release()
        self.lock.release()

    def _setup(self) -> None:
        cfg = self.cfg
        self.concepts = resolve_concepts(cfg)
        self.resolution = cfg.resolution or get_family(cfg.family).resolution
        self._check_instance_images()
        self.models = load_models(self.model.working, cfg.family)
        self.autocast = autocast_dtype(cfg.mixed_precision, self.device, self.opts.cpu_fp16)
        attention = self.opts.attention_default if cfg.attention == "auto" else cfg.attention
        self.attention = set_attention(self.models, attention)
        self._to_device()
        self._generate_class_images()
        class_dirs = [class_dir_for(self.model, i, c) if c.num_class_images_per > 0 else None
                      for i, c in enumerate(self.concepts)]
        self.data = TrainingData(self.concepts, self.resolution, enable_buckets=cfg.enable_buckets, seed=cfg.seed,
                                 class_dirs=class_dirs, bucket_step=8 if self.resolution < 256 else 64)
        self.steps_per_epoch = self.data.steps_per_epoch(cfg.train_batch_size, cfg.gradient_accumulation_steps)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.text_encoder_steps = math.floor(cfg.text_encoder_ratio * self.total_steps)
        self._set_trainable()
        self._apply_speed_settings()
        self._make_optimizer()
        if self.opts.resume:
            self._load_resume_state()
            self.status.truncate_loss_log(self.step)  # the steps after it are trained (and logged) again
        else:
            self.status.start_new_loss_log(self.base_revision)  # this run's steps count from 1 again
        self._prepare_caches()
        log.info("training %s: %d epochs x %d steps = %d steps", self.model.name, cfg.epochs, self.steps_per_epoch,
                 self.total_steps)
        self.status.update(force=True, state="running", total_steps=self.total_steps, total_epochs=cfg.epochs,
                           step=self.step, epoch=self.epoch, attention=self.attention)

    def _check_instance_images(self) -> None:
        """Refuse missing folders and unusable images or captions before the models load (seconds, on a big model);
        the class images are checked once they exist."""
        concepts = [dataclasses.replace(c, num_class_images_per=0) for c in self.concepts]
        data = TrainingData(concepts, self.resolution, enable_buckets=self.cfg.enable_buckets, seed=self.cfg.seed)
        for ex in data.all_examples():
            concept = concepts[ex.concept]
            if not build_prompt(ex.caption_template, ex.caption, concept.instance_token, concept.class_token):
                raise UserError(f"the training prompt of {ex.image} is empty (the prompt {ex.caption_template!r} "
                                f"with its caption {ex.caption!r})",
                                "write the captions into the .txt files beside the images, or set an instance "
                                "prompt or instance token")

    def _train(self) -> None:
        cfg = self.cfg
        self.started = time.time()
        self.start_step = self.step
        self.pending_losses: list[tuple[int, int, torch.Tensor, list[float]]] = []
        while self.epoch < cfg.epochs:
            batches = self.data.epoch_batches(self.epoch, cfg.train_batch_size)
            groups = [batches[i:i + cfg.gradient_accumulation_steps]
                      for i in range(0, len(batches), cfg.gradient_accumulation_steps)]
            while self.batch_in_epoch < len(groups):
                self._check_controls()
                self._optimizer_step(groups[self.batch_in_epoch])
                self.batch_in_epoch += 1
                self.step += 1
                self._report()
            self.epoch += 1
            self.batch_in_epoch = 0
            self._end_of_epoch()

    def _end_of_epoch(self) -> None:
        cfg, epoch = self.cfg, self.epoch
        last = epoch == cfg.epochs
        if cfg.preview_every_n_epochs and (epoch % cfg.preview_every_n_epochs == 0 or last):
            self._preview()
        if last or cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
            self._save()
        if cfg.pause_every_n_epochs and epoch % cfg.pause_every_n_epochs == 0 and not last:
            self._sleep(cfg.pause_seconds, f"pausing {cfg.pause_seconds:g} s after epoch {epoch}")

    # ------------------------------------------------------------------------------------------------ setup
    def _to_device(self) -> None:
        m = self.models
        for module in (m.unet, m.vae, *m.text_encoders):
            module.to(self.device)
        if self.cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if self.cfg.text_encoder_ratio > 0:
                for te in m.text_encoders:
                    te.gradient_checkpointing_enable()

    def _set_trainable(self) -> None:
        """Decide what trains: the UNet and text encoder weights (DreamBooth) or a LoRA on top of them."""
        cfg, m = self.cfg, self.models
        train_te = self.text_encoder_steps > 0
        if cfg.method == "textual_inversion":
            self._setup_embedding()
            return
        if cfg.method == "hypernetwork":
            self._setup_hypernetwork()
            return
        if not cfg.train_unet and not train_te:
            raise UserError("nothing to train: the UNet is off and the text encoder step ratio is 0",
                            "turn 'Train UNet' on or set a text encoder step ratio above 0")
        m.vae.requires_grad_(False)
        m.unet.train(cfg.train_unet)
        for te in m.text_encoders:
            te.train(train_te)
        if cfg.method == "lora":
            settings = LoraSettings.from_config(cfg, train_text_encoder=train_te)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the LoRA's random init is part of the run: repeatable, resumable
                self.network = LoraNetwork(m, settings, m.family.id).to(self.device)  # freezes the base weights
            self.unet_params = self.network.parameters_for("unet") if cfg.train_unet else []
            self.te_params = self.network.parameters_for("text_encoder") if train_te else []
            return
        m.unet.requires_grad_(cfg.train_unet)
        for te in m.text_encoders:
            te.requires_grad_(train_te)
            if train_te and cfg.freeze_clip_normalization:
                for name, p in te.named_parameters():
                    if "layer_norm" in name:
                        p.requires_grad_(False)
        self.unet_params = [p for p in m.unet.parameters() if p.requires_grad]
        self.te_params = [p for te in m.text_encoders for p in te.parameters() if p.requires_grad]

    def _apply_speed_settings(self) -> None:
        """Memory format, weight precision and compiling, once the trained parameters are known."""
        cfg, m = self.cfg, self.models
        self.pinned = use_pinned_memory(cfg.pin_memory, self.device)
        check_weight_precision(cfg.weight_precision, cfg.mixed_precision, self.device)
        if cfg.weight_precision != "fp32" and cfg.method not in WEIGHT_METHODS:
            raise UserError(f"weight precision {cfg.weight_precision} applies to DreamBooth and LoRA training",
                            f"set weight precision to fp32 for {cfg.method.replace('_', ' ')}")
        if cfg.channels_last:
            m.unet.to(memory_format=torch.channels_last)
        self.precision = WeightPrecision(cfg.weight_precision, cfg.seed)
        modules = [m.unet, m.vae, *m.text_encoders] + ([self.network] if self.network is not None else [])
        self.precision.cast_modules(modules, [*self.unet_params, *self.te_params])
        if cfg.compile_unet:
            note = compile_unet(m.unet)
            if note:
                self.status.update(note=note)

    def _prepare_caches(self) -> None:
        """The text embedding cache; with offloading, fill the caches up front and move the idle models off."""
        cfg, m = self.cfg, self.models
        if cfg.cache_text_embeddings and self.embedding is None:
            self.text_cache = TextEmbeddingCache(m, cfg.clip_skip, self.autocast, self.device)
        if not cfg.offload_frozen_models:
            return
        if not cfg.cache_latents:
            log.warning("offloading the VAE needs cached latents (the VAE encodes every step otherwise): it stays")
        idle: list[torch.nn.Module] = []
        if cfg.cache_latents:
            self.status.update(force=True, state="caching", message="caching latents")
            flips = (False, True) if cfg.hflip else (False,)
            for ex in self.data.all_examples():
                for flip in flips:
                    self._latent(ex, flip)
            idle.append(m.vae)
        if self.text_cache is not None:
            te_frozen = self.step >= self.text_encoder_steps
            if te_frozen:
                self._fill_text_cache()
                idle.extend(m.text_encoders)
        else:
            log.warning("offloading the text encoders needs cached text embeddings (and no textual inversion): "
                        "they stay on the device")
        self.offloader = Offloader(m, self.device)
        if idle:
            self.offloader.offload(idle)

    def _fill_text_cache(self) -> None:
        """Every example's prompt as written (shuffled tags make new prompts, encoded when they come)."""
        rng = random.Random(0)  # unused without shuffling; the training RNG streams are not touched
        for ex in self.data.all_examples():
            prompt = self._expand(self.data.prompt_for(ex, shuffle=False, keep_tokens=self.cfg.keep_tokens, rng=rng))
            ids = [tokenize_prompts(tokenizer, [prompt], self.cfg.long_prompts)[0]
                   for tokenizer in self.models.tokenizers]
            self.text_cache.get(ids)

    def _setup_embedding(self) -> None:
        """Textual inversion: a new word whose vectors are all that trains (everything else stays frozen)."""
        cfg = self.cfg
        if not cfg.embedding_token:
            raise UserError("textual inversion needs the word to train", "set 'Embedding word', e.g. zwx-style")
        self.embedding = TextualInversion(self.models, EmbeddingSettings.from_config(cfg)).to(self.device)
        self.text_encoder_steps = 0  # the text encoders stay frozen; gradients reach only the new vectors
        self.unet_params, self.te_params = self.embedding.parameters(), []

    def _setup_hypernetwork(self) -> None:
        """Hypernetwork: a (k, v) pair of small MLPs on the attention inputs of the text conditioning's width is all
        that trains (the models stay frozen); the UNet's hooks make previews use it too."""
        cfg, m = self.cfg, self.models
        settings = HypernetworkSettings.from_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the random init is part of the run: repeatable, resumable
            network = Hypernetwork([int(m.unet.config.cross_attention_dim)], settings)
        self.hypernetwork = network.to(self.device).attach(m.unet, (m.vae, *m.text_encoders))
        m.unet.train()  # dropout in the hypernetwork follows the UNet's mode (previews switch it to eval)
        for te in m.text_encoders:
            te.eval()
        self.text_encoder_steps = 0
        self.unet_params, self.te_params = list(self.hypernetwork.parameters()), []

    def _make_optimizer(self) -> None:
        cfg, m = self.cfg, self.models
        groups = []
        if self.unet_params:
            groups.append({"params": self.unet_params, "lr": cfg.learning_rate})
        if self.te_params:
            groups.append({"params": self.te_params, "lr": cfg.text_encoder_learning_rate})
        settings = OptimizerSettings.from_config(cfg)
        self.optimizer, note = make_optimizer(groups, settings)
        if note:
            log.warning("%s", note)
            self.status.update(note=note)
        self.trained_params = [p for g in groups for p in g["params"]]
        uses_scaler = self.autocast is torch.float16  # fp16 needs loss scaling, on a GPU and on the CPU alike
        if cfg.fused_backward_step:
            check_fused(grad_accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
                        uses_grad_scaler=uses_scaler, optimizer=cfg.optimizer)
        if cfg.fused_backward_step or self.precision.bf16:
            self.optimizer = self._paramwise_optimizer(groups, settings, note)
        if cfg.fused_backward_step:
            install_fused_step(self.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg.lr_scheduler, self.total_steps,
                                              cfg.lr_warmup_steps, cfg.lr_cycles, cfg.lr_power)
        self.ema = None
        if cfg.use_ema and cfg.train_unet and self._addon is None:
            self.ema = EMA(m.unet.parameters(), cfg.ema_decay)
        elif cfg.use_ema:
            log.warning("EMA applies to full DreamBooth training of the UNet; it is off for this run")
        self.scaler = grad_scaler(self.device.type) if uses_scaler else None

    def _paramwise_optimizer(self, groups: list[dict], settings: OptimizerSettings, note: str | None
                             ) -> ParamwiseOptimizer:
        """One optimizer per parameter (fused backward step, bf16 weights), with the same state_dict format."""
        if self.cfg.optimizer in GLOBAL_OPTIMIZERS:
            raise UserError(f"{self.cfg.optimizer} estimates its step size from all parameters together and cannot "
                            "update them one at a time (bf16 weights, optimizer step in backward)",
                            "pick adamw, adamw_8bit, lion or adafactor, or set weight precision fp32 and turn "
                            "'Optimizer step in backward' off")
        if note and settings.name == "adamw_8bit":  # the fallback is decided (and reported) once, above
            settings = dataclasses.replace(settings, name="adamw")
        return ParamwiseOptimizer(groups, lambda g: make_optimizer(g, settings)[0], self.precision)

    def _generate_class_images(self) -> None:
        for index, concept in enumerate(self.concepts):
            if concept.num_class_images_per <= 0:
                continue
            instances = len(list_images(concept.instance_data_dir))
            needed = concept.num_class_images_per * instances
            folder = class_dir_for(self.model, index, concept)
            existing = [p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS] if folder.is_dir() \
                else []
            clean_stale_temps(folder, r"class_\d+_\d+(_[0-9a-f]+)?\.png")  # images cut off by a crash
            if len(existing) >= needed:
                continue
            self.status.update(force=True, state="generating_class_images",
                               message=f"generating {needed - len(existing)} class images for concept {index}")
            scheduler = make_scheduler(self.cfg.sample_scheduler, self.models.scheduler_config)
            pipe = build_pipeline(self.models.family.id, self.models.modules_for_pipeline(), scheduler)

            def progress(done: int, total: int, index: int = index) -> None:
                self.status.update(message=f"generated {done} of {total} class images for concept {index}")
                fault_point("class")

            generate_class_images(pipe, concept, folder, needed, scheduler=self.cfg.sample_scheduler,
                                  width=self.resolution, height=self.resolution, seed=self.cfg.seed,
                                  progress=progress)

    def _load_resume_state(self) -> None:
        state = latest_state(self.model.checkpoints)
        if state is None:
            log.warning("no resume state in %s: starting from the working weights", self.model.checkpoints)
            return
        with self.precision.full_precision():  # bf16 weights: the fp32 values (masters) are what was saved
            if self.network is not None:
                self.network.load_kohya_state_dict(state.weights["lora"])
            elif self.embedding is not None:
                self.embedding.load_state_dict(state.weights["embedding"])
            elif self.hypernetwork is not None:
                self.hypernetwork.load_state_dict(state.weights["hypernetwork"])
            else:
                for component, module in self._trained_modules().items():
                    load_canonical(component, module, state.weights[component])
        t = state.trainer
        self.optimizer.load_state_dict(t["optimizer"])
        self.lr_scheduler.load_state_dict(t["lr_scheduler"])
        if self.ema is not None and t.get("ema") is not None:
            self.ema.load_state_dict(t["ema"])
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.base_revision = t["base_revision"]
        torch.set_rng_state(t["rng_torch"])
        log.info("resumed from %s at step %d (epoch %d)", state.path.name, self.step, self.epoch)

    # ------------------------------------------------------------------------------------------------ stepping
    def _optimizer_step(self, group: list[list[Example]]) -> None:
        cfg = self.cfg
        train_te = self.embedding is not None or self.step < self.text_encoder_steps
        if self.text_encoder_steps and self.step == self.text_encoder_steps:
            self._stop_text_encoder()
        settings = StepSettings.from_config(cfg, train_text_encoder=train_te, autocast_dtype=self.autocast)
        lrs = [g["lr"] for g in self.optimizer.param_groups]  # the LRs this step uses
        self.precision.step = self.step  # stochastic rounding draws from (seed, step)
        logged = len(self.pending_losses)
        while True:
            try:
                self._backward(group, settings, lrs)
                break
            except RuntimeError as err:  # torch's OutOfMemoryError is a RuntimeError too
                if not is_out_of_memory(err):
                    raise
                self._free_after_out_of_memory()
                if not cfg.oom_retry_smaller_batch or self.micro_batch <= 1 or cfg.fused_backward_step:
                    raise self._out_of_memory_error(err) from err
                del self.pending_losses[logged:]
                self._halve_batch()  # and make this step again with the same examples
        try:
            fault_point("step")  # test hook: gradients made, weights not yet updated
            params = [p for p in self.trained_params if p.grad is not None]  # none after a fused backward
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if cfg.max_grad_norm > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            self._free_after_out_of_memory()
            raise self._out_of_memory_error(err) from err
        self.lr_scheduler.step()
        if self.embedding is not None:
            self.embedding.after_step()
        self.optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
        if self.ema is not None:
            self.ema.update(self.models.unet.parameters())

    def _backward(self, group: list[list[Example]], settings: StepSettings, lrs: list[float]) -> None:
        """Gradients of one optimizer step: each batch of ``group`` in pieces of at most ``micro_batch`` images
        (fewer than the batch only after an out-of-memory retry), each piece's loss weighted by its share, so the
        gradient is the batch mean's either way."""
        seed = self.cfg.seed * 1_000_003 + self.step
        generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        for examples in group:
            batch_loss = 0.0
            for start in range(0, len(examples), self.micro_batch):
                piece = examples[start:start + self.micro_batch]
                oom_point(self.step + 1, len(piece))
                loss, _ = compute_loss(self.models, self._make_batch(piece, rng), settings, generator)
                loss = loss * (len(piece) / len(examples))
                (self.scaler.scale(loss / len(group)) if self.scaler else loss / len(group)).backward()
                batch_loss = batch_loss + loss.detach()
            self.pending_losses.append((self.step + 1, self.epoch, batch_loss, lrs))

    def _free_after_out_of_memory(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # give the gradients' memory back before anything else
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _halve_batch(self) -> None:
        """The out-of-memory retry: half the images per pass, twice the passes per step (same effective batch)."""
        cfg, old = self.cfg, self.micro_batch
        self.micro_batch = max(1, old // 2)
        accumulation = cfg.gradient_accumulation_steps * math.ceil(cfg.train_batch_size / self.micro_batch)
        message = (f"out of memory at step {self.step + 1} with batch {old}: going on with batch "
                   f"{self.micro_batch} and gradient accumulation {accumulation} (the same effective batch)")
        log.warning("%s", message)
        self.status.update(force=True, message=message, train_batch_size=self.micro_batch,
                           gradient_accumulation_steps=accumulation)

    def _out_of_memory_error(self, err: BaseException) -> UserError:
        """The out-of-memory error as the user sees it: what ran out, and the settings that need less memory (only
        those not in use already)."""
        cfg = self.cfg
        where = "RAM" if self.device.type == "cpu" else f"{self.device} memory"
        tips = []
        if self.micro_batch > 1:
            tips.append(f"a smaller batch size (now {self.micro_batch}; raise gradient accumulation to keep the "
                        "effective batch, or let the run do that: 'On out of memory, retry with a smaller batch')")
        if not cfg.gradient_checkpointing:
            tips.append("gradient checkpointing on")
        if cfg.optimizer != "adamw_8bit":
            tips.append("8-bit AdamW as the optimizer (adamw_8bit)")
        if not cfg.cache_latents:
            tips.append("cache latents on")
        if cfg.method == "dreambooth":
            tips.append("LoRA instead of full training (method lora)")
        if self.resolution > 256:
            lower = max(256, self.resolution * 3 // 4 // 64 * 64)
            tips.append(f"a lower resolution (now {self.resolution} px, e.g. {lower})")
        hint = ("try " + "; ".join(tips) if tips else
                "every memory-saving setting is on already: train on a device with more memory")
        return UserError(f"out of {where} at step {self.step + 1} (batch {self.micro_batch}, "
                         f"{self.resolution} px); training stopped, the last save (if any) is intact",
                         f"{hint}; then continue with --resume")

    def _stop_text_encoder(self) -> None:
        """The text encoder's share of the steps is over: freeze its trained parameters and drop their gradients."""
        for te in self.models.text_encoders:
            te.eval()
        for p in self.te_params:
            p.requires_grad_(False)
            p.grad = None
        log.info("text encoder training stopped at step %d", self.step)
        if self.offloader is not None and self.text_cache is not None:
            self.offloader.offload(list(self.models.text_encoders))  # frozen from now on: the cache stands in

    def _make_batch(self, examples: list[Example], rng: random.Random) -> Batch:
        cfg = self.cfg
        flips = [cfg.hflip and rng.random() < 0.5 for _ in examples]
        latents = torch.stack([self._latent(ex, flip) for ex, flip in zip(examples, flips, strict=True)])
        if cfg.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        prompts = [self._expand(self.data.prompt_for(ex, shuffle=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                                     rng=rng)) for ex in examples]
        token_ids = []
        for tokenizer in self.models.tokenizers:
            ids, warnings = tokenize_prompts(tokenizer, prompts, cfg.long_prompts)
            for warning in warnings:
                log.warning("%s", warning)
            token_ids.append(ids)
        is_class = torch.tensor([ex.is_class for ex in examples])
        encoded = None
        if self.text_cache is not None and self.embedding is None and self.step >= self.text_encoder_steps:
            encoded = self.text_cache.get(token_ids)  # the text encoders are frozen for this step
        return Batch(latents, token_ids, is_class, [ex.bucket for ex in examples], encoded)

    def _expand(self, prompt: str) -> str:
        """With textual inversion, the new word stands for all of its vectors."""
        return self.embedding.prompt(prompt) if self.embedding is not None else prompt

    @torch.no_grad()
    def _latent(self, ex: Example, flip: bool) -> torch.Tensor:
        """The scaled VAE latent of one image (the distribution's mean), from the cache when latents are cached."""
        key = (ex.image, ex.bucket, flip)
        if self.cfg.cache_latents and key in self.latent_cache:
            return self.latent_cache[key]
        pixels = to_device(self.data.load_pixels(ex, flip), self.device, self.pinned)[None]
        vae = self.models.vae
        pixels = pixels.to(vae.dtype)  # bf16 with bf16 weights; the latent is kept in fp32 either way
        latent = vae.encode(pixels).latent_dist.mode()[0].float() * vae.config.scaling_factor
        self.vae_encodes += 1
        if self.cfg.cache_latents:
            self.latent_cache[key] = latent
        return latent

    # ------------------------------------------------------------------------------------------------ events
    @property
    def _addon(self) -> LoraNetwork | TextualInversion | Hypernetwork | None:
        """What trains instead of the model's own weights (LoRA, embedding, hypernetwork), or None (DreamBooth)."""
        return next((a for a in (self.network, self.embedding, self.hypernetwork) if a is not None), None)

    def _trained_modules(self) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {}
        if self.cfg.train_unet:
            out["unet"] = self.models.unet
        if self.text_encoder_steps > 0:
            out.update(zip(TEXT_ENCODER_NAMES, self.models.text_encoders, strict=False))
        return out

    def _trained_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        with self.precision.full_precision():  # bf16 weights are saved from their fp32 values (masters)
            return self._trained_weights_now()

    def _trained_weights_now(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.network is not None:
            return {"lora": {k: v.detach().cpu() for k, v in self.network.kohya_state_dict().items()}}
        if self.embedding is not None:
            return {"embedding": {k: v.detach().cpu() for k, v in self.embedding.state_dict().items()}}
        if self.hypernetwork is not None:
            return {"hypernetwork": {k: v.detach().cpu().clone() for k, v in self.hypernetwork.state_dict().items()}}
        weights = {c: canonical_state(c, m) for c, m in self._trained_modules().items()}
        if self.ema is not None:
            with self.ema.swapped(self.models.unet.parameters()):
                weights["unet_ema"] = {k: v.clone() for k, v in canonical_state("unet", self.models.unet).items()}
        return weights

    def _save(self) -> None:
        """A resume state, the working weights, the config's progress, and the chosen export, all atomic.

        The free disk space is checked first, and the resume state is written first: a save cut off later is
        completed by the next resume (see :meth:`_recover_from_crash`).
        """
        self.status.update(force=True, state="saving", message=f"saving at step {self.step}")
        weights = self._trained_weights()
        broken = next((f"{c}.{k}" for c, state in weights.items() for k, v in state.items()
                       if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if broken is not None:
            raise UserError(f"the weights are no longer finite at step {self.step} ({broken}); nothing was saved",
                            NAN_HINT)
        self._check_disk_space(self._save_sizes(weights, with_state=True))
        trainer_state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None, "rng_torch": torch.get_rng_state(),
            "base_revision": self.base_revision,
        }
        save_state(self.model.checkpoints, self.step, trainer_state, weights, self.cfg.keep_resume_states)
        fault_point("save")  # test hook: the new resume state is in place, the rest is not
        self._save_outputs(weights)
        self.saves.append(self.step)
        self.status.update(force=True, state="running", message=f"saved at step {self.step}")

    def _save_outputs(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The parts of a save after the resume state: working weights (or the LoRA files), progress, export."""
        if self.network is not None:
            clean_stale_temps(self.model.path / "lora", re.escape(f"{self.model.name}.safetensors"))
            if self.opts.lora_dir is not None:
                clean_stale_temps(self.opts.lora_dir, self._export_pattern())
            self._save_lora()
            fault_point("save")
        if self.embedding is not None:
            name = re.escape(f"{self.embedding.token}.safetensors")
            for folder in (self.model.path / "embeddings", self.opts.embeddings_dir):
                if folder is not None:
                    clean_stale_temps(folder, name)
            self._save_embedding()
            fault_point("save")
        if self.hypernetwork is not None:
            clean_stale_temps(self.model.path / "hypernetwork", re.escape(f"{self.model.name}.pt"))
            if self.opts.hypernetworks_dir is not None:
                clean_stale_temps(self.opts.hypernetworks_dir, re.escape(self.model.name) + r"_\d+\.pt")
            self._save_hypernetwork()
            fault_point("save")
        for component, state in ({} if self._addon is not None else weights).items():
            folder = self.model.working / component
            if component == "unet_ema" and not folder.is_dir():
                folder.mkdir()
                shutil.copy2(self.model.working / "unet" / "config.json", folder / "config.json")
            name = f"{WEIGHT_NAMES[component]}.safetensors"
            clean_stale_temps(folder, re.escape(name))
            save_tensors(folder / name, state)
            fault_point("save")
        save_progress(self.model.path, self.base_revision + self.step, self.epoch)
        fault_point("save")
        dest = self._export_path()
        if dest is not None:
            clean_stale_temps(dest.parent, self._export_pattern())
            merged = merged_components(self.models, self.network) if self.network is not None else None
            export_checkpoint(self.model, dest, dtype=self.cfg.export_dtype,
                              ema="main" if self.cfg.export_ema and self.ema is not None else "none",
                              trained="lora (merged)" if merged is not None else "dreambooth", replace=merged)
            self.status.update(last_export=str(dest))

    def _export_path(self) -> Path | None:
        """Where this step's checkpoint export goes (full training, or LoRA merged into it, with exports on), else
        None."""
        if not self.cfg.save_checkpoint or self.opts.export_dir is None:
            return None
        if self._addon is not None and not (self.network is not None and self.cfg.lora_merge_export):
            return None
        return self.opts.export_dir / f"{self.model.name}_{self.step}.safetensors"

    def _export_pattern(self) -> str:
        """The names of this model's exports, for cleaning up in folders other processes write to as well."""
        return re.escape(self.model.name) + r"_\d+\.(safetensors|yaml)"

    def _recover_from_crash(self) -> None:
        """Remove what a crashed run left half-written in the model dir; after a resume from a save that was cut off
        after its resume state (a crash, a kill), write that save's other parts now, so working weights, progress
        and exports are those of the resumed step."""
        clean_stale_temps(self.model.path, r"db_config\.json|status\.json")
        if not self.opts.resume or self.step == 0:
            return
        recorded, resumed = load_config(self.model.path).revision, self.base_revision + self.step
        export = self._export_path()
        if recorded > resumed or recorded == resumed and (export is None or export.exists()):
            return  # that save is complete (or a later one wrote the outputs and only its resume state is lost)
        log.warning("the save at step %d was cut off after its resume state; writing the rest of it", self.step)
        self.status.update(force=True, state="saving", message=f"completing the save at step {self.step}")
        weights = self._trained_weights()
        self._check_disk_space(self._save_sizes(weights, with_state=False))
        self._save_outputs(weights)
        self.saves.append(self.step)
        self.status.update(force=True, state="running", message=f"saved at step {self.step}")

    def _save_sizes(self, weights: dict[str, dict[str, torch.Tensor]], with_state: bool) -> dict[Path, int]:
        """Bytes a save is about to write, per folder: resume state (weights, optimizer, EMA), working weights or
        LoRA files, export."""
        cfg, sizes = self.cfg, {}
        weight_bytes = _tensor_bytes(weights)
        if with_state:
            state_bytes = weight_bytes + _tensor_bytes(self.optimizer.state_dict())
            sizes[self.model.checkpoints] = state_bytes + (_tensor_bytes(self.ema.state_dict()) if self.ema else 0)
        if self.network is not None:
            lora_bytes = sum(v.numel() * (2 if v.is_floating_point() else v.element_size())  # saved in fp16
                             for v in weights["lora"].values())
            sizes[self.model.path / "lora"] = lora_bytes
            if cfg.save_checkpoint and self.opts.lora_dir is not None:
                sizes[self.opts.lora_dir] = sizes.get(self.opts.lora_dir, 0) + lora_bytes
        elif self.embedding is not None:
            sizes[self.model.path / "embeddings"] = weight_bytes
            if cfg.save_checkpoint and self.opts.embeddings_dir is not None:
                sizes[self.opts.embeddings_dir] = sizes.get(self.opts.embeddings_dir, 0) + weight_bytes
        elif self.hypernetwork is not None:
            sizes[self.model.path / "hypernetwork"] = weight_bytes
            if cfg.save_checkpoint and self.opts.hypernetworks_dir is not None:
                sizes[self.opts.hypernetworks_dir] = sizes.get(self.opts.hypernetworks_dir, 0) + weight_bytes
        else:
            sizes[self.model.working] = weight_bytes
        export = self._export_path()
        if export is not None:
            sizes[export.parent] = sizes.get(export.parent, 0) + self._export_bytes()
        return sizes

    def _export_bytes(self) -> int:
        """The size of a checkpoint export, from the working files' headers (no tensor is read)."""
        target = torch_dtype(self.cfg.export_dtype)
        total = 0
        for path in self.model.working.glob("*.safetensors"):
            total += _safetensors_bytes(path, target)
        for path in self.model.working.glob("*/*.safetensors"):
            if path.parent.name != "unet_ema":  # the EMA UNet replaces the UNet in an export, never adds to it
                total += _safetensors_bytes(path, target)
        return total

    def _check_disk_space(self, sizes: dict[Path, int]) -> None:
        """Refuse a save the disks cannot hold, before anything of it is written."""
        by_disk: dict[int, tuple[Path, int, list[Path]]] = {}
        for folder, size in sizes.items():
            existing = _existing_ancestor(folder)
            device = os.stat(existing).st_dev
            _, total, folders = by_disk.get(device, (existing, 0, []))
            by_disk[device] = (existing, total + size, [*folders, folder])
        for existing, size, folders in by_disk.values():
            needed = int(size * DISK_MARGIN)
            free = shutil.disk_usage(existing).free
            if needed > free:
                where = ", ".join(str(f) for f in folders)
                raise UserError(f"not enough free disk space to save at step {self.step}: the save needs about "
                                f"{_format_bytes(needed)} on the disk of {where}, and {_format_bytes(free)} is free; "
                                "nothing of this save was written, the previous save is intact",
                                f"free at least {_format_bytes(needed - free)} there (old exports, old resume "
                                "states), or lower 'Resume states to keep'; then continue with --resume")

    def _save_lora(self) -> None:
        """The LoRA file in kohya / WebUI format: the model dir's copy, and one per save in the Lora folder."""
        cfg = self.cfg
        tags: dict[str, dict[str, int]] = {}
        for ex in self.data.all_examples():
            folder = tags.setdefault(ex.image.parent.name, {})
            for tag in (t.strip() for t in ex.caption.split(",")):
                if tag:
                    folder[tag] = folder.get(tag, 0) + 1
        meta = lora_metadata(cfg.family, self.network.settings, self.model.name, tags, cfg.source_sha256,
                             {"ss_steps": str(self.base_revision + self.step), "ss_epoch": str(self.epoch)})
        save_lora(self.model.path / "lora" / f"{self.model.name}.safetensors", self.network, meta)
        if cfg.save_checkpoint and self.opts.lora_dir is not None:
            dest = self.opts.lora_dir / f"{self.model.name}_{self.step}.safetensors"
            save_lora(dest, self.network, {**meta, "ss_output_name": dest.stem})
            self.status.update(last_export=str(dest))

    def _save_embedding(self) -> None:
        """The embedding file the WebUI loads, named after the word (the WebUI triggers it by the file name)."""
        name = f"{self.embedding.token}.safetensors"
        step = self.base_revision + self.step
        save_embedding(self.model.path / "embeddings" / name, self.embedding, step, self.cfg.family)
        if self.cfg.save_checkpoint and self.opts.embeddings_dir is not None:
            save_embedding(self.opts.embeddings_dir / name, self.embedding, step, self.cfg.family)
            self.status.update(last_export=str(self.opts.embeddings_dir / name))

    def _save_hypernetwork(self) -> None:
        """The WebUI hypernetwork file: the model dir's copy, and one per save in the hypernetworks folder."""
        cfg = self.cfg
        info = dict(step=self.base_revision + self.step, checkpoint_hash=cfg.source_sha256,
                    checkpoint_name=Path(cfg.source_checkpoint).stem if cfg.source_checkpoint else "")
        save_hypernetwork(self.model.path / "hypernetwork" / f"{self.model.name}.pt", self.hypernetwork,
                          name=self.model.name, **info)
        if cfg.save_checkpoint and self.opts.hypernetworks_dir is not None:
            dest = self.opts.hypernetworks_dir / f"{self.model.name}_{self.step}.pt"
            save_hypernetwork(dest, self.hypernetwork, name=dest.stem, **info)
            self.status.update(last_export=str(dest))

    def _preview(self) -> None:
        for p in self.trained_params:
            p.grad = None  # free every gradient before sampling (set_grads_to_none off keeps zeroed ones otherwise)
        on_device = self.offloader.on_device() if self.offloader is not None else contextlib.nullcontext()
        autocast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else \
            contextlib.nullcontext()
        with on_device, autocast:
            self._make_previews()

    def _make_previews(self) -> None:
        cfg, m = self.cfg, self.models
        scheduler = make_scheduler(cfg.sample_scheduler, m.scheduler_config)
        pipe = build_pipeline(m.family.id, m.modules_for_pipeline(), scheduler)
        clean_stale_temps(self.model.samples, r"step\d+_c\d+_\d+\.png")  # previews cut off by a crash
        written = []
        for index, concept in enumerate(self.concepts):
            for n, prompt in enumerate(sample_prompts(concept, concept.instance_prompt)):
                seed = concept.sample_seed if concept.sample_seed >= 0 else random.randrange(2**32)
                req = SampleRequest(self._expand(prompt), concept.sample_negative_prompt, seed + n,
                                    concept.sample_steps, concept.sample_guidance_scale, self.resolution,
                                    self.resolution, cfg.sample_scheduler)
                image = generate(pipe, req, self.device)
                fault_point("preview")  # test hook: an image made, not yet written
                stem = f"step{self.step:06d}_c{index}_{n}"
                written.append(save_sample(image, self.model.samples, stem, req,
                                           {"step": str(self.step), "epoch": str(self.epoch),
                                            "model": self.model.name}))
        self.previews.append(self.step)
        self.status.update(force=True, samples=[str(p) for p in written])

    def _report(self) -> None:
        now = time.time()
        if not self.status.due() and self.step < self.total_steps:
            return
        losses = [(s, e, float(t), lrs) for s, e, t, lrs in self.pending_losses]  # the one host sync per report
        self.pending_losses.clear()
        bad = next(((s, value) for s, _, value, _ in losses if not math.isfinite(value)), None)
        if bad is not None:
            raise UserError(f"the loss became {bad[1]} at step {bad[0]}; training stopped, the last save (if any) "
                            "is intact", NAN_HINT)
        for s, e, value, lrs in losses:
            self.status.log_loss(s, e, value, lrs)
        lrs = self.lr_scheduler.get_last_lr()
        smoothed = self.status.status.get("smoothed_loss")
        for _, _, value, _ in losses:
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        done = self.step - self.start_step
        rate = done / max(now - self.started, 1e-9)
        self.status.update(state="running", step=self.step, epoch=self.epoch,
                           loss=losses[-1][2] if losses else None, smoothed_loss=smoothed, lr=lrs,
                           it_per_s=round(rate, 3), eta_s=round((self.total_steps - self.step) / rate, 1)
                           if rate > 0 else None)
        if self.opts.on_progress:
            self.opts.on_progress(self.status.status)

    def _check_controls(self) -> None:
        if self.controls.cancel_requested:
            raise Cancelled()
        if self.controls.pause_requested:
            self.status.update(force=True, state="paused", message="paused by the user")
            while self.controls.pause_requested:
                if self.controls.cancel_requested:
                    raise Cancelled()
                time.sleep(0.2)
            self.status.update(force=True, state="running", message="resumed")

    def _sleep(self, seconds: float, message: str) -> None:
        self.status.update(force=True, state="paused", message=message)
        end = time.time() + seconds
        while time.time() < end:
            if self.controls.cancel_requested:
                raise Cancelled()
            time.sleep(min(0.1, max(0.0, end - time.time())))
        self.status.update(force=True, state="running", message="")

    def _finish(self, state: str, message: str) -> None:
        self.status.update(force=True, state=state, message=message, step=self.step, epoch=self.epoch)
        log.info("%s: %s", state, message)


def oom_point(step: int, batch: int) -> None:
    """Test hook: with ``$DREAMBOOTH_OOM_AT="<step>[:<batch>]"`` a forward pass of step ``<step>`` (1-based) over
    more than ``<batch>`` images (default 0: any) raises an out-of-memory RuntimeError, as CUDA would; so the
    out-of-memory handling is tested on the CPU. Without the variable (always, outside tests) it returns at once."""
    spec = os.environ.get(OOM_ENV)
    if not spec:
        return
    at, _, above = spec.partition(":")
    if step == int(at) and batch > int(above or 0):
        raise RuntimeError(f"CUDA out of memory (injected by ${OOM_ENV} at step {step}, batch {batch})")


def _tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _safetensors_bytes(path: Path, cast: torch.dtype | None) -> int:
    """The data size of a safetensors file with its floating tensors cast to ``cast`` (None: as they are)."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            dtype = part.get_dtype()
            size = _SAFETENSORS_BYTES.get(dtype, 4)
            if cast is not None and dtype.startswith(("F", "BF")):
                size = cast.itemsize
            total += math.prod(part.get_shape()) * size
    return total


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _format_bytes(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def train_model(model: ModelDir, options: RunOptions | None = None) -> dict:
    """Run one training of ``model`` in this process. Returns the final status."""
    return Trainer(model, options).run()
