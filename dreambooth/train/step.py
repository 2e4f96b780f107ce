"""One training step's loss, top to bottom: noise, timestep, target, prediction, weighted loss.

Prior preservation mixes class examples into the batch; each example's loss is weighted (instance 1, class
``prior_loss_weight``) and the batch mean is taken, so the class images pull against the instance images exactly
in that ratio. All randomness comes from the ``generator`` passed in, so a step is a pure function of its inputs
and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from .conditioning import encode_tokens, sdxl_time_ids
from .models import Models


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w], already multiplied by the VAE's scaling factor
    token_ids: list[torch.Tensor]  # one [B, 77*n] tensor per tokenizer
    is_class: torch.Tensor  # [B] bool: prior-preservation examples
    sizes: list[tuple[int, int]]  # (width, height) in pixels, for SDXL's time ids
    # the text conditioning (hidden, pooled) from the text embedding cache; None: encode token_ids in the step
    encoded: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class StepSettings:
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0
    prior_loss_weight: float = 1.0
    clip_skip: int = 1
    train_text_encoder: bool = False
    autocast_dtype: torch.dtype | None = None  # fp16 / bf16 mixed precision, None for fp32

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, train_text_encoder: bool, autocast_dtype: torch.dtype | None
                    ) -> StepSettings:
        return cls(offset_noise=cfg.offset_noise, min_snr_gamma=cfg.min_snr_gamma,
                   prior_loss_weight=cfg.prior_loss_weight, clip_skip=cfg.clip_skip,
                   train_text_encoder=train_text_encoder, autocast_dtype=autocast_dtype)


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
                ) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def compute_loss(models: Models, batch: Batch, settings: StepSettings, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss to backpropagate, and the detached per-example losses (for logging)."""
    latents = batch.latents
    device = latents.device
    bsz = latents.shape[0]
    scheduler = models.noise_scheduler

    # 1. noise and a random timestep per example, plus the optional per-channel noise offset
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
    if settings.offset_noise > 0:
        offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator).to(device)
        noise = noise + settings.offset_noise * offset
    noisy = scheduler.add_noise(latents, noise, timesteps)

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

    # 4. per-example MSE, weighted by min-SNR and by the prior-loss weight for class examples
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = torch.ones_like(per_example)
    if settings.min_snr_gamma > 0:
        weights = snr_weights(scheduler.alphas_cumprod, timesteps, settings.min_snr_gamma, models.prediction_type)
    weights = torch.where(batch.is_class.to(device), weights * settings.prior_loss_weight, weights)
    return (per_example * weights).mean(), per_example.detach()
