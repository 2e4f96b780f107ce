"""How much a model has learned: its noise-prediction error on given images at fixed noise and timesteps.

The same noise and timesteps are used before and after training, so the numbers compare directly; the demo and
the tests report the drop on the instance images (with the instance prompt) and, for prior preservation, the
rise on the class images (with the class prompt).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.buckets import fit_to_bucket
from ..data.images import load_image, to_tensor
from ..data.prompts import tokenize_prompts
from .conditioning import encode_tokens, sdxl_time_ids
from .models import Models

TIMESTEPS = (50, 200, 400, 600, 800, 950)


def image_latents(models: Models, images: list[Path], resolution: int, device: torch.device) -> torch.Tensor:
    """Scaled VAE latents (distribution means) of the images, centre-cropped to a square of ``resolution``."""
    pixels = [to_tensor(fit_to_bucket(load_image(path), (resolution, resolution))) for path in images]
    with torch.no_grad():
        latents = models.vae.encode(torch.stack(pixels).to(device)).latent_dist.mode()
    return latents * models.vae.config.scaling_factor


@torch.no_grad()
def evaluation_loss(models: Models, images: list[Path], prompt: str, resolution: int, seed: int = 0,
                    timesteps: tuple[int, ...] = TIMESTEPS) -> float:
    """Mean MSE of the UNet's prediction (epsilon or v) over every image x timestep, with fixed noise."""
    device = next(models.unet.parameters()).device
    latents = image_latents(models, images, resolution, device)
    ids = [tokenize_prompts(tok, [prompt] * len(images), "truncate")[0] for tok in models.tokenizers]
    hidden, pooled = encode_tokens(models, ids)
    added = None
    if models.is_sdxl:
        added = {"text_embeds": pooled,
                 "time_ids": sdxl_time_ids([(resolution, resolution)] * len(images), device, hidden.dtype)}
    generator = torch.Generator().manual_seed(seed)
    was_training = models.unet.training
    models.unet.eval()
    total = 0.0
    try:
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            steps = torch.full((len(images),), t, device=device, dtype=torch.long)
            noisy = models.noise_scheduler.add_noise(latents, noise, steps)
            target = models.noise_scheduler.get_velocity(latents, noise, steps) \
                if models.prediction_type == "v_prediction" else noise
            pred = models.unet(noisy, steps, hidden, added_cond_kwargs=added).sample
            total += F.mse_loss(pred.float(), target.float()).item()
    finally:
        models.unet.train(was_training)
    return total / len(timesteps)
