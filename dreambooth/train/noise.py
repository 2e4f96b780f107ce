"""The training noise and the noise schedule: offset noise, multi-resolution (pyramid) noise, input perturbation,
and the zero-terminal-SNR rescaling of the schedule.

Every random draw comes from the step's ``generator``, so a step stays a pure function of its inputs and a resumed
run repeats an uninterrupted one. Each option draws only while it is on: a run without them draws exactly as before.
The conventions (what a setting's value means) follow kohya's sd-scripts and diffusers, so values carry over.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``generator`` (the same numbers on every device)."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator
                  ) -> torch.Tensor:
    """Multi-resolution noise (J. Whitaker 2023, kohya's ``multires_noise``): noise at ever coarser grids (each a
    random 2-4x smaller than the one before, weighted ``discount ** i``) is upsampled and added, then each example is
    scaled back to unit variance. The coarse levels put low-frequency energy into the noise, which lets the model
    change an image's overall brightness and colour (as offset noise does), not only its details."""
    if iterations <= 0:
        return noise
    bsz, channels, height, width = noise.shape
    out = noise.clone()
    for i in range(iterations):
        ratio = 2.0 + 2.0 * float(torch.rand((), generator=generator))  # rather than always 2x
        h, w = max(1, int(height / ratio**i)), max(1, int(width / ratio**i))
        coarse = _randn((bsz, channels, h, w), generator, noise)
        out = out + F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**i
        if h == 1 or w == 1:
            break  # the coarsest level is a single value per row or column
    return out / out.flatten(1).std(dim=1).view(bsz, 1, 1, 1)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A random constant per example and channel added to the noise (crosslabs' offset noise)."""
    if strength <= 0:
        return noise
    return noise + strength * _randn((noise.shape[0], noise.shape[1], 1, 1), generator, noise)


def perturbed(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, diffusers' ``--input_perturbation``): the noise the UNet's input is
    made with, a little more than the target's, so training sees the errors sampling makes (less exposure bias)."""
    if strength <= 0:
        return noise
    return noise + strength * _randn(tuple(noise.shape), generator, noise)


def rescaled_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule's alpha-bars rescaled so the last timestep has zero signal (Lin et al. 2023, algorithm 1):
    sqrt(alpha-bar) is shifted so its last value is 0 and scaled so its first value stays as it was."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).to(alphas_cumprod.dtype)


def use_zero_terminal_snr(scheduler: object, sampling_config: dict) -> None:
    """Train with the zero-terminal-SNR schedule (v-prediction only: ``config.check_applies`` refuses epsilon, whose
    target at zero SNR means nothing), and sample previews with it: ``sampling_config`` gets diffusers' switch
    for it and the "trailing" timestep spacing that starts sampling at the last timestep."""
    alphas_cumprod = rescaled_zero_terminal_snr(scheduler.alphas_cumprod)
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    scheduler.alphas_cumprod = alphas_cumprod
    scheduler.alphas = alphas
    scheduler.betas = 1.0 - alphas
    sampling_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    log.info("zero terminal SNR: the noise schedule is rescaled; its last timestep is pure noise")
