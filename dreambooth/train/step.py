"""One training step's loss, top to bottom: noise, timestep, target, prediction, weighted loss.

Prior preservation mixes class examples into the batch; each example's loss is weighted (instance 1, class
``prior_loss_weight``) and the batch mean is taken, so the class images pull against the instance images exactly
in that ratio. All randomness comes from the ``generator`` passed in, so a step is a pure function of its inputs
and a resumed run repeats an uninterrupted one. The noise options are ``noise.py``, the loss weights and the mask
``loss_weighting.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from .conditioning import encode_tokens, sdxl_time_ids
from .loss_weighting import debiased_weights, masked_mean, snr_weights
from .models import Models
from .noise import offset_noise, perturbed, pyramid_noise


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w], already multiplied by the VAE's scaling factor
    token_ids: list[torch.Tensor]  # one [B, 77*n] tensor per tokenizer
    is_class: torch.Tensor  # [B] bool: prior-preservation examples
    sizes: list[tuple[int, int]]  # (width, height) in pixels, for SDXL's time ids
    # the text conditioning (hidden, pooled) from the text embedding cache; None: encode token_ids in the step
    encoded: tuple[torch.Tensor, torch.Tensor | None] | None = None
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss mask at the latent grid (masked loss); None: everywhere
    # one process's rows of a batch of ``drawn_for`` examples (data parallel), from ``first_row`` on: the noise is drawn
    # for the whole batch and these rows kept, so each example gets what it gets in one process; 0: this whole batch
    drawn_for: int = 0
    first_row: int = 0


@dataclass
class StepSettings:
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0
    prior_loss_weight: float = 1.0
    clip_skip: int = 1
    train_text_encoder: bool = False
    autocast_dtype: torch.dtype | None = None  # fp16 / bf16 mixed precision, None for fp32
    debiased_estimation: bool = False
    pyramid_noise_iterations: int = 0
    pyramid_noise_discount: float = 0.3
    input_perturbation: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, train_text_encoder: bool, autocast_dtype: torch.dtype | None
                    ) -> StepSettings:
        return cls(offset_noise=cfg.offset_noise, min_snr_gamma=cfg.min_snr_gamma,
                   prior_loss_weight=cfg.prior_loss_weight, clip_skip=cfg.clip_skip,
                   train_text_encoder=train_text_encoder, autocast_dtype=autocast_dtype,
                   debiased_estimation=cfg.debiased_estimation, pyramid_noise_iterations=cfg.pyramid_noise_iterations,
                   pyramid_noise_discount=cfg.pyramid_noise_discount, input_perturbation=cfg.input_perturbation)


def compute_loss(models: Models, batch: Batch, settings: StepSettings, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss to backpropagate, and the detached per-example losses (for logging)."""
    latents = batch.latents
    device = latents.device
    bsz = latents.shape[0]
    scheduler = models.noise_scheduler

    # 1. noise and a random timestep per example; the optional pyramid noise, per-channel offset and, for the input
    #    only, perturbation (each draws only while it is on). A data-parallel process draws for the whole batch and
    #    keeps its rows, so each example gets what it gets in one process.
    drawn, rows = batch.drawn_for or bsz, slice(batch.first_row, batch.first_row + bsz)
    noise = torch.randn((drawn, *latents.shape[1:]), generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (drawn,), generator=generator)[rows].to(device)
    noise = pyramid_noise(noise, settings.pyramid_noise_iterations, settings.pyramid_noise_discount, generator)
    noise = offset_noise(noise, settings.offset_noise, generator)
    inputs = perturbed(noise, settings.input_perturbation, generator)[rows]
    noise = noise[rows]
    noisy = scheduler.add_noise(latents, inputs, timesteps)

    # 2. what the UNet should predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768)
    target = scheduler.get_velocity(latents, noise, timesteps) if models.prediction_type == "v_prediction" \
        else noise

    # 3. prediction, conditioned on the prompts (with gradients into the text encoder while it trains)
    autocast = torch.autocast(device.type, dtype=settings.autocast_dtype) if settings.autocast_dtype \
        else nullcontext()
    with autocast:
        if batch.encoded is not None:
            hidden, pooled = batch.encoded
        else:
            with torch.set_grad_enabled(settings.train_text_encoder and torch.is_grad_enabled()):
                hidden, pooled = encode_tokens(models, batch.token_ids, settings.clip_skip)
        added = None
        if models.is_sdxl:
            added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch.sizes, device, hidden.dtype)}
        pred = models.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample

    # 4. per-example MSE (under the mask, with masked loss), weighted by min-SNR, debiased estimation and by the
    #    prior-loss weight for class examples
    per_example = masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), batch.mask)
    weights = torch.ones_like(per_example)
    if settings.min_snr_gamma > 0:
        weights = snr_weights(scheduler.alphas_cumprod, timesteps, settings.min_snr_gamma, models.prediction_type)
    if settings.debiased_estimation:
        weights = weights * debiased_weights(scheduler.alphas_cumprod, timesteps, models.prediction_type)
    weights = torch.where(batch.is_class.to(device), weights * settings.prior_loss_weight, weights)
    return (per_example * weights).mean(), per_example.detach()
