"""The training run: set up from the config, then epochs of steps with previews, saves and pauses at their
intervals, reported through ``status.json``. ``Trainer.run`` reads as an outline. The loop never asks which training
method it runs (``methods/``); one step's loss is ``step.py``, its batch ``batch.py``, saves and crash recovery
``saving.py``, validation ``validation.py``, out-of-memory handling ``oom.py``, previews ``sample.py``, speed and
memory ``caches.py``, ``precision.py``, ``fused.py``, ``speed.py``; several processes ``distributed.py``.

No host sync per step: losses stay on the device in ``pending_losses`` and are read once per status write
(:meth:`Trainer._report`). Previews free every gradient first; offloaded modules come back only for them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time

import torch

from ..atomic import clean_stale_temps, fault_point
from ..compat import grad_scaler
from ..config import check_applies, load_config, resolve_concepts
from ..data.dataset import Example, TrainingData
from ..errors import UserError
from ..families import get_family
from ..gpus import check_several_processes
from ..lock import acquire, acquire_device, device_key
from ..preflight import check_run
from ..sample import Sampler, SampleSettings, fill_class_folders
from ..store import ModelDir
from . import oom
from .batch import BatchMaker
from .caches import LatentCache, Offloader, TextEmbeddingCache, offload_idle
from .distributed import CANCEL, SingleProcess, from_environment, global_batch
from .methods import MethodContext, SavePoint, Weights, method_class
from .models import load_models, set_attention
from .noise import use_zero_terminal_snr
from .optimizers import build_optimizer
from .options import RunOptions, attention_for, autocast_dtype, pick_device  # noqa: F401 - tests use loop's
from .precision import WeightPrecision, check_weight_precision
from .saving import NAN_HINT, Saver, restore_rng, rng_states
from .schedules import make_lr_scheduler
from .speed import compile_unet
from .status import Cancelled
from .step import StepSettings, compute_loss
from .validation import StoppedEarly, Validation

log = logging.getLogger(__name__)


class Trainer:
    """One training run of one model dir."""

    def __init__(self, model: ModelDir, options: RunOptions | None = None, ranks: SingleProcess | None = None) -> None:
        self.model = model
        self.opts = options or RunOptions()
        self.ranks = ranks or SingleProcess()  # the processes of the run; only rank 0 (the main one) writes
        self.cfg = load_config(model.path)
        if self.ranks.world > 1:
            check_several_processes(self.cfg)  # also when torchrun / accelerate started the processes
        # one run per model dir; takes over the lock jobs.start handed to this worker ($DREAMBOOTH_LOCK_TOKEN)
        self.lock = acquire(model.path) if self.ranks.main else None
        self.device_locks: list = []
        try:
            self.device = self.ranks.device(self.opts.device)
            devices = [str(self.device), *self.ranks.other_gpus()] if self.ranks.main else []
            for key in filter(None, map(device_key, devices)):  # one training per GPU (all of a run's); none on CPU
                self.device_locks.append(acquire_device(model.path.parent, key, model.name))
            if self.device.type == "cpu":
                torch.set_flush_denormal(True)  # tiny values otherwise slow CPU math down by orders of magnitude
            # a worker jobs.start launched keeps the requests made while it started; a direct run drops old ones
            self.controls = self.ranks.controls(model, self.opts.install_signal_handlers,
                                                not (self.lock and self.lock.handed_over))
            self.status = self.ranks.status_writer(model, self.device)
        except BaseException:
            self._release_locks()
            raise
        self.step = self.epoch = self.batch_in_epoch = 0
        self.micro_batch = self.cfg.train_batch_size  # images per forward pass; an out-of-memory retry halves it
        self.base_revision = self.cfg.revision  # steps trained before this run
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
                self.ranks.by_main(self._recover_from_crash)  # the others wait for rank 0's repairs
                self._train()
            except Cancelled:
                self.ranks.stop(CANCEL)  # the other processes (waiting for this one) stop too
                if self.cfg.save_on_cancel and self.step > 0 and self.ranks.main:  # rank 0 saves; the others wait
                    self._save()  # a failing save here ends as "failed", below
                self._finish("cancelled", f"cancelled at step {self.step}")
            except StoppedEarly as stop:  # rank 0's decision (at a save): the others stop at their next step
                self.ranks.stop(CANCEL)
                self._finish("done", str(stop))
            else:
                lowered = "" if self.micro_batch == math.ceil(self.batch / self.ranks.world) else \
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
        for held in [*self.device_locks, *([self.lock] if self.lock else [])]:
            held.release()

    def _setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # dropout draws from the global generators (CPU and CUDA): a seeded run repeats
        self.concepts = resolve_concepts(cfg)
        self.resolution = cfg.resolution or get_family(cfg.family).resolution
        self.status.note("; ".join(check_run(self.model, cfg)))  # jobs.start's checks, for a run started directly
        self.models = load_models(self.model.working, cfg.family)
        self.autocast = autocast_dtype(cfg.mixed_precision, self.device, self.opts.cpu_fp16)
        self.sample_settings = SampleSettings.from_config(cfg, self.autocast)  # previews and class images
        self.attention = set_attention(self.models, attention_for(cfg.attention, self.opts.attention_default))
        self._to_device()
        self.class_dirs = [self.model.class_images(i, c.class_data_dir) for i, c in enumerate(self.concepts)]
        self.ranks.by_main(self._generate_class_images)  # the others wait for rank 0's class images
        if cfg.zero_terminal_snr:  # after the class images: they are the untrained model's, with its own schedule
            use_zero_terminal_snr(self.models.noise_scheduler, self.models.scheduler_config)
        class_dirs = [d if c.num_class_images_per > 0 else None for c, d in zip(self.concepts, self.class_dirs,
                                                                                   strict=True)]
        self.data = TrainingData(self.concepts, self.resolution, enable_buckets=cfg.enable_buckets, seed=cfg.seed,
                                 class_dirs=class_dirs, bucket_step=8 if self.resolution < 256 else 64)
        self.resume = self.ranks.resume_state(self.model.checkpoints) if self.opts.resume else None
        self.batch, note = global_batch(cfg.train_batch_size, self.ranks.world, self.resume and self.resume.trainer)
        self.micro_batch = math.ceil(self.batch / self.ranks.world)  # this process's share of each batch
        self.steps_per_epoch = self.data.steps_per_epoch(self.batch, cfg.gradient_accumulation_steps)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.method = method_class(cfg.method)(MethodContext(cfg, self.models, self.device, self.model, self.opts))
        self.text_encoder_steps = self.method.text_encoder_steps(math.floor(cfg.text_encoder_ratio * self.total_steps))
        self.param_groups = self.method.setup(self.text_encoder_steps)
        self.trained_params = [p for g in self.param_groups for p in g.params]
        self.te_params = [p for g in self.param_groups if g.text_encoder for p in g.params]
        self._apply_speed_settings()
        self._make_optimizer()
        self.method.ready()
        self.saver = Saver(self.model, cfg, self.opts, self.method, self.status)
        self.validation = Validation(cfg, self.data, self.models, self.device, self.status, self.autocast,
                                     self.method.added_modules(), self.model.logs if self.ranks.main else None)
        if self.opts.resume and self._load_resume_state():
            self.status.truncate_loss_log(self.step)  # the steps after it are trained (and logged) again
        else:  # this run's steps count from 1 again (a resume without a resume state says so)
            self.status.start_new_loss_log(self.base_revision, self.model.checkpoints if self.opts.resume else None)
        self.validation.start_log(self.opts.resume, self.base_revision)
        self.status.note(self.saver.check_first_save(self._trained_weights(), self._trainer_state(), self.optimizer))
        self._prepare_caches()
        self.ranks.check_same(self.trained_params)
        log.info("training %s: %d epochs x %d steps = %d steps", self.model.name, cfg.epochs, self.steps_per_epoch,
                 self.total_steps)
        self.status.update(force=True, state="running", total_steps=self.total_steps, total_epochs=cfg.epochs,
                           step=self.step, epoch=self.epoch, attention=self.attention, **self.ranks.status_fields(),
                           **({"note": note} if note else {}))

    def _train(self) -> None:
        cfg = self.cfg
        self.started = time.time()
        self.start_step = self.step
        self.pending_losses: list[tuple[int, int, torch.Tensor, list[float]]] = []
        while self.epoch < cfg.epochs:
            batches = self.data.epoch_batches(self.epoch, self.batch)
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
        if not self.ranks.main:
            return  # previews, saves and pauses are rank 0's; the others wait at the next step
        if cfg.preview_every_n_epochs and (epoch % cfg.preview_every_n_epochs == 0 or last):
            self._preview()
        if last or cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
            self._save()
            self.validation.stop_if_stale()
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

    def _apply_speed_settings(self) -> None:
        """Memory format, weight precision and compiling, once the trained parameters are known."""
        cfg, m = self.cfg, self.models
        self.latents = LatentCache(m, self.data, self.device, cfg.cache_latents)
        check_weight_precision(cfg.weight_precision, cfg.mixed_precision, self.device)
        check_applies(cfg, "weight_precision", "fp32")
        if cfg.channels_last:
            m.unet.to(memory_format=torch.channels_last)
        self.precision = WeightPrecision(cfg.weight_precision, cfg.seed)
        self.precision.cast_modules([m.unet, m.vae, *m.text_encoders, *self.method.added_modules()],
                                    self.trained_params)
        if cfg.compile_unet:
            self.status.note(compile_unet(m.unet))

    def _prepare_caches(self) -> None:
        """The text embedding cache and the batch maker; with offloading, fill the caches up front and move the idle
        models off."""
        cfg = self.cfg
        if cfg.cache_text_embeddings and not self.method.trains_conditioning:
            self.text_cache = TextEmbeddingCache(self.models, cfg.clip_skip, self.autocast, self.device)
        self.batches = BatchMaker(cfg, self.models, self.data, self.latents, self.method, self.text_cache,
                                  self.text_encoder_steps)
        if cfg.offload_frozen_models:
            if cfg.cache_latents:
                self.status.update(force=True, state="caching", message="caching latents")
            frozen = self.step >= self.text_encoder_steps  # from now on: the text cache can stand in for them
            written = lambda: self.batches.written_prompts(self.data.all_examples())  # noqa: E731 - shuffled: later
            self.offloader = offload_idle(self.models, self.device, self.latents, self.text_cache,
                                          written if frozen else None, cfg.hflip, cfg.long_prompts)

    def _make_optimizer(self) -> None:
        cfg = self.cfg
        uses_scaler = self.autocast is torch.float16  # fp16 needs loss scaling, on a GPU and on the CPU alike
        self.optimizer, note = build_optimizer([{"params": g.params, "lr": g.lr} for g in self.param_groups], cfg,
                                               self.precision, uses_scaler)
        self.status.note(note)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg.lr_scheduler, self.total_steps,
                                              cfg.lr_warmup_steps, cfg.lr_cycles, cfg.lr_power)
        self.scaler = grad_scaler(self.device.type) if uses_scaler else None

    def _generate_class_images(self) -> None:
        def report(message: str, starting: bool) -> None:
            self.status.update(force=starting, message=message, **({"state": "generating_class_images"} if starting
                               else {}))

        fill_class_folders(self.concepts, self.class_dirs, lambda: Sampler(self.models, self.device,
                           self.sample_settings), self.resolution, self.cfg.seed, report)

    # ------------------------------------------------------------------------------------------------ resume
    def _trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "base_revision": self.base_revision, **rng_states(self.device), **self.method.state_dict(),
                **self.validation.state_dict(), **self.ranks.state(self.batch)}

    def _load_resume_state(self) -> bool:
        state = self.resume
        if state is None:
            log.warning("no readable resume state in %s: starting from the working weights", self.model.checkpoints)
            return False
        with self.precision.full_precision():  # bf16 weights: the fp32 values (masters) are what was saved
            self.method.load_weights(state.weights)
        t = state.trainer
        self.optimizer.load_state_dict(t["optimizer"])
        self.lr_scheduler.load_state_dict(t["lr_scheduler"])
        self.method.load_state_dict(t)
        self.validation.load_state_dict(t)
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.base_revision = t["base_revision"]
        restore_rng(t, self.device)
        self.saver.previous = self.step
        log.info("resumed from %s at step %d (epoch %d)", state.path.name, self.step, self.epoch)
        return True

    def _recover_from_crash(self) -> None:
        """Remove what a crashed run left half-written; complete a save cut off after its resume state."""
        clean_stale_temps(self.model.path, r"db_config\.json|status\.json")
        if self.opts.resume and self.step > 0 and self.saver.recover(self._save_point(), self._trained_weights):
            self.saves.append(self.step)

    # ------------------------------------------------------------------------------------------------ stepping
    def _optimizer_step(self, group: list[list[Example]]) -> None:
        cfg = self.cfg
        if self.text_encoder_steps and self.step == self.text_encoder_steps:
            self._stop_text_encoder()
        settings = StepSettings.from_config(cfg, autocast_dtype=self.autocast, train_text_encoder=(
            self.method.trains_conditioning or self.step < self.text_encoder_steps))
        lrs = [g["lr"] for g in self.optimizer.param_groups]  # the LRs this step uses
        self.precision.step = self.step  # stochastic rounding draws from (seed, step)
        logged = len(self.pending_losses)
        free = lambda: oom.free_memory(self.optimizer, self.device)  # noqa: E731
        with oom.stop_on_out_of_memory(self._out_of_memory_error, free):
            oom.retry_smaller(lambda: self.ranks.together(lambda: self._backward(group, settings, lrs)),
                              lambda: self._halve_batch(logged), free)  # together: every process does the same
            self.ranks.sum_([p.grad for p in self.trained_params if p.grad is not None]
                            + [loss for _, _, loss, _ in self.pending_losses[logged:]])  # the global batch's
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
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
        self.method.after_step()

    def _backward(self, group: list[list[Example]], settings: StepSettings, lrs: list[float]) -> None:
        """Gradients of one optimizer step: each batch of ``group`` in pieces of at most ``micro_batch`` images
        (fewer than the batch only after an out-of-memory retry), each piece's loss weighted by its share, so the
        gradient is the batch mean's either way."""
        seed = self.cfg.seed * 1_000_003 + self.step
        generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        for examples in group:
            batch_loss = 0.0
            for whole, rows, share in self.ranks.pieces(examples, self.micro_batch):  # this process's rows
                oom.oom_point(self.step + 1, len(whole[rows]))
                loss, _ = compute_loss(self.models, self.batches.make(whole, rng, self.step, rows), settings,
                                       generator)
                loss = loss * share
                (self.scaler.scale(loss / len(group)) if self.scaler else loss / len(group)).backward()
                batch_loss = batch_loss + loss.detach()
            self.pending_losses.append((self.step + 1, self.epoch, batch_loss, lrs))

    def _halve_batch(self, logged: int) -> bool:
        """The out-of-memory retry, where the config allows it: this step again with half the images per pass."""
        if not oom.can_halve(self.cfg, self.micro_batch):
            return False
        del self.pending_losses[logged:]
        self.micro_batch, accumulation, message = oom.halved(self.cfg, self.micro_batch, self.step)
        self.status.update(force=True, message=message, train_batch_size=self.micro_batch,
                           gradient_accumulation_steps=accumulation)
        return True

    def _out_of_memory_error(self, err: BaseException) -> UserError:
        return oom.advice(self.cfg, self.device, self.micro_batch, self.resolution, self.step,
                          self.method.memory_tips())

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

    # ------------------------------------------------------------------------------------------------ events
    def _save_point(self) -> SavePoint:
        return SavePoint(self.step, self.base_revision + self.step, self.epoch, self.data.tag_prompts())

    def _trained_weights(self) -> Weights:
        with self.precision.full_precision():  # bf16 weights are saved from their fp32 values (masters)
            return self.method.trained_weights()

    def _save(self) -> None:
        """A save (``saving.py``): the free disk space is checked first, and the resume state is written first; the
        validation loss is measured before (the resume state keeps it), and the best saves are kept after."""
        if self.pending_losses:  # the steps up to the save are in loss.csv before it: a kill after it loses none
            self._report(force=True)
        self.validation.measure(self.step, self.epoch, self.batches)
        exported = self.saver.save(self._save_point(), self._trained_weights, self._trainer_state)
        self.saves.append(self.step)
        self.validation.saved(self.step, exported)

    def _preview(self) -> None:
        for p in self.trained_params:
            p.grad = None  # free every gradient before sampling (set_grads_to_none off keeps zeroed ones otherwise)
        on_device = self.offloader.on_device() if self.offloader is not None else contextlib.nullcontext()
        with on_device:
            sampler = Sampler(self.models, self.device, self.sample_settings, self.method.expand_prompt)
            clean_stale_temps(self.model.samples, r"step\d+_c\d+_\d+\.png")  # previews cut off by a crash
            written = sampler.previews(self.concepts, self.resolution, self.model.samples,
                                       lambda c, n: f"step{self.step:06d}_c{c}_{n}",
                                       {"step": str(self.step), "epoch": str(self.epoch), "model": self.model.name},
                                       after_each=lambda: fault_point("preview"))  # test hook: made, not written
        self.previews.append(self.step)
        self.status.update(force=True, samples=[str(p) for p in written])

    def _report(self, force: bool = False) -> None:
        if not self.ranks.main:
            self.pending_losses.clear()  # rank 0 reports (the losses are summed over the processes)
            return
        now = time.time()
        if not (force or self.status.due()) and self.step < self.total_steps:
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
        self.ranks.check_controls(self.controls, self.status)  # raises Cancelled; pauses while asked

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


def train_model(model: ModelDir, options: RunOptions | None = None) -> dict:
    """Run one training of ``model`` in this process (one of several under torch's launcher). Returns the final
    status (of this process: rank 0's is the run's)."""
    ranks = from_environment((options or RunOptions()).device)
    with ranks.session():
        return Trainer(model, options, ranks).run()
