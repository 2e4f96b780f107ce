"""Per-example loss weights by timestep (min-SNR, debiased estimation) and the masked loss.

SNR(t) = alpha-bar(t) / (1 - alpha-bar(t)): how much of the image is left in the noisy input at timestep t.
"""

from __future__ import annotations

import torch

SNR_CAP = 1000.0  # SNR near t = 0 is huge (infinite at alpha-bar 1): debiased weights use at most this, as kohya


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac)


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
                ) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1) if prediction_type == "v_prediction" else clipped / ratio


def debiased_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation loss weights (Yu et al. 2024, kohya's ``--debiased_estimation_loss``): 1 / sqrt(SNR) for
    epsilon, 1 / (SNR + 1) for v-prediction, with SNR capped at :data:`SNR_CAP`. They take weight off the nearly
    clean timesteps, whose epsilon loss is large and says little about the image."""
    ratio = torch.clamp(snr(alphas_cumprod, timesteps), max=SNR_CAP)
    return 1 / (ratio + 1) if prediction_type == "v_prediction" else 1 / ratio.sqrt()


def masked_mean(per_element: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean loss over its pixels, each pixel weighted by the mask (None: unmasked), as kohya: masked
    parts count as zero loss in the mean, so a small subject weighs less than a large one."""
    if mask is not None:
        per_element = per_element * mask.to(per_element.dtype)
    return per_element.mean(dim=(1, 2, 3))
