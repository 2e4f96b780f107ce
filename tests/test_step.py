"""The step's settings, checked on the loss function itself: each one changes exactly what it says."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dreambooth.create import create_model
from dreambooth.data.prompts import tokenize_prompts
from dreambooth.train.conditioning import encode_tokens
from dreambooth.train.models import load_models
from dreambooth.train.step import Batch, StepSettings, compute_loss, snr_weights


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    md = create_model(tiny_checkpoint("sd1"), "step", tmp_path_factory.mktemp("step"))
    return load_models(md.working, "sd1")


@dataclass
class _Out:
    sample: torch.Tensor


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: predicts zeros and records what it was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, hidden, added_cond_kwargs=None):
        self.calls.append((noisy, timesteps, hidden))
        return _Out(torch.zeros_like(noisy))


def batch_for(models, prompts, is_class=None, mode="truncate"):
    ids = [tokenize_prompts(tok, prompts, mode)[0] for tok in models.tokenizers]
    n = len(prompts)
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    flags = torch.tensor(is_class if is_class is not None else [False] * n)
    return Batch(latents, ids, flags, [(64, 64)] * n)


def with_recording_unet(models):
    recorder = RecordingUNet()
    original = models.unet
    models.unet = recorder
    return recorder, original


def test_offset_noise_adds_a_per_channel_constant(models):
    batch = batch_for(models, ["zwx"])
    recorder, original = with_recording_unet(models)
    try:
        compute_loss(models, batch, StepSettings(), torch.Generator().manual_seed(0))
        compute_loss(models, batch, StepSettings(offset_noise=0.5), torch.Generator().manual_seed(0))
    finally:
        models.unet = original
    (plain, t1, _), (offset, t2, _) = recorder.calls
    assert torch.equal(t1, t2)  # same noise and timesteps: the difference is the offset alone
    diff = offset - plain
    spread = (diff - diff.mean(dim=(2, 3), keepdim=True)).abs().max()
    assert spread < 1e-5 and diff.abs().max() > 1e-3


def test_min_snr_weights_follow_the_formula(models):
    ac = models.noise_scheduler.alphas_cumprod
    t = torch.tensor([10, 500, 990])
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(snr_weights(ac, t, 5.0, "epsilon"), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(snr_weights(ac, t, 5.0, "v_prediction"), torch.clamp(snr, max=5.0) / (snr + 1))
    batch = batch_for(models, ["zwx", "zwx"])
    plain, per_a = compute_loss(models, batch, StepSettings(), torch.Generator().manual_seed(1))
    weighted, per_b = compute_loss(models, batch, StepSettings(min_snr_gamma=5.0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(per_a, per_b)
    assert not torch.isclose(plain, weighted)


def test_prior_loss_weight_scales_class_examples_only(models):
    batch = batch_for(models, ["zwx", "disc"], is_class=[False, True])
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        loss, per = compute_loss(models, batch, StepSettings(prior_loss_weight=weight),
                                 torch.Generator().manual_seed(2))
        losses[weight] = loss.item()
    instance, klass = per.tolist()
    assert losses[0.0] == pytest.approx(instance / 2, rel=1e-5)
    assert losses[3.0] == pytest.approx((instance + 3 * klass) / 2, rel=1e-5)


def test_clip_skip_changes_the_conditioning(models):
    ids = [tokenize_prompts(tok, ["a zwx disc"], "truncate")[0] for tok in models.tokenizers]
    with torch.no_grad():
        last, _ = encode_tokens(models, ids, clip_skip=1)
        skip2, _ = encode_tokens(models, ids, clip_skip=2)
        out = models.text_encoders[0](ids[0], output_hidden_states=True)
        text_model = getattr(models.text_encoders[0], "text_model", models.text_encoders[0])
        expected = text_model.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(last, out.last_hidden_state)
    torch.testing.assert_close(skip2, expected)
    assert not torch.allclose(last, skip2)


def test_long_prompts_truncate_or_chunk(models):
    long_prompt = ", ".join(f"tag{i}" for i in range(60))
    truncated = batch_for(models, [long_prompt], mode="truncate")
    chunked = batch_for(models, [long_prompt], mode="chunk")
    assert truncated.token_ids[0].shape[1] == 77 and chunked.token_ids[0].shape[1] > 77
    with torch.no_grad():
        hidden, _ = encode_tokens(models, chunked.token_ids)
        loss, _ = compute_loss(models, chunked, StepSettings(), torch.Generator().manual_seed(0))
    assert hidden.shape[1] == chunked.token_ids[0].shape[1] and torch.isfinite(loss)


def test_v_prediction_target(models):
    batch = batch_for(models, ["zwx"])
    recorder, original = with_recording_unet(models)
    scheduler_config = dict(models.noise_scheduler.config)
    from diffusers import DDPMScheduler

    eps_scheduler = models.noise_scheduler
    try:
        eps_loss, _ = compute_loss(models, batch, StepSettings(), torch.Generator().manual_seed(4))
        models.noise_scheduler = DDPMScheduler.from_config({**scheduler_config, "prediction_type": "v_prediction"})
        v_loss, _ = compute_loss(models, batch, StepSettings(), torch.Generator().manual_seed(4))
    finally:
        models.unet, models.noise_scheduler = original, eps_scheduler
    # with a zero prediction the loss is the mean square of the target: the noise for epsilon, v otherwise
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(batch.latents.shape, generator=gen)
    t = torch.randint(0, 1000, (1,), generator=gen)
    v = eps_scheduler.get_velocity(batch.latents, noise, t)
    assert eps_loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    assert v_loss.item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)
