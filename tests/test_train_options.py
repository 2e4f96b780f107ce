"""The data and loss options (issue 17, item 3), each shown by its effect: caption dropout (the whole caption, and
per tag with tag shuffle), masked loss (a mask file or the alpha channel), debiased estimation, zero-terminal SNR,
multi-resolution (pyramid) noise and input perturbation. Each test fails when its option does nothing."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from conftest import make_training_model
from PIL import Image

from dreambooth.config import Concept
from dreambooth.create import create_model
from dreambooth.data.dataset import TrainingData
from dreambooth.data.images import list_images
from dreambooth.data.masks import LossMasks
from dreambooth.data.prompts import tokenize_prompts
from dreambooth.demo import make_concept_images
from dreambooth.errors import UserError
from dreambooth.train import batch as batch_module
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.models import load_models
from dreambooth.train.noise import pyramid_noise, use_zero_terminal_snr
from dreambooth.train.step import Batch, StepSettings, compute_loss


def run(md) -> Trainer:
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False))
    trainer.run()
    return trainer


def logged_losses(md) -> list[float]:
    lines = (md.logs / "loss.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [float(line.split(",")[2]) for line in lines]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint):
    md = create_model(tiny_checkpoint("sd1"), "opts", tmp_path_factory.mktemp("opts"))
    return load_models(md.working, "sd1")


class _Out:
    def __init__(self, sample):
        self.sample = sample


class ZeroUNet(torch.nn.Module):
    """Predicts zeros (so the loss is the mean square of the target) and records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, hidden, added_cond_kwargs=None):
        self.calls.append((noisy, timesteps))
        return _Out(torch.zeros_like(noisy))


def step_with_zero_unet(models, settings_list, n=1, mask=None, seed=0):
    """compute_loss once per settings with the same generator seed; [(loss, per_example, noisy, timesteps)]."""
    ids = [tokenize_prompts(tok, ["zwx"] * n, "truncate")[0] for tok in models.tokenizers]
    latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = Batch(latents, ids, torch.tensor([False] * n), [(64, 64)] * n, None, mask)
    unet, models.unet = models.unet, ZeroUNet()
    try:
        out = []
        for settings in settings_list:
            loss, per = compute_loss(models, batch, settings, torch.Generator().manual_seed(seed))
            noisy, t = models.unet.calls[-1]
            out.append((loss, per, noisy, t))
        return out, latents
    finally:
        models.unet = unet


def spy_prompts(monkeypatch) -> list[str]:
    prompts: list[str] = []
    real = batch_module.tokenize_prompts
    monkeypatch.setattr(batch_module, "tokenize_prompts",
                        lambda tok, batch, mode: prompts.extend(batch) or real(tok, batch, mode))
    return prompts


# ------------------------------------------------------------------------------------------------ caption dropout
def test_caption_dropout_trains_instance_images_with_an_empty_prompt(tmp_path, sd1_checkpoint, monkeypatch):
    prompts = spy_prompts(monkeypatch)
    run(make_training_model(tmp_path, sd1_checkpoint, name="all", images=2, caption_dropout=1.0))
    assert prompts and set(prompts) == {""}
    prompts.clear()
    run(make_training_model(tmp_path, sd1_checkpoint, name="none", images=2))
    assert prompts and "" not in prompts


def test_caption_dropout_drops_about_its_share_and_never_a_class_prompt(tmp_path):
    folder = tmp_path / "img"
    make_concept_images(folder, count=1)
    data = TrainingData([Concept(instance_data_dir=str(folder), instance_prompt="zwx disc")], 64,
                        enable_buckets=False, seed=0)
    ex = data.instances[0][0]
    rng = random.Random(5)
    dropped = sum(data.prompt_for(ex, shuffle=False, keep_tokens=0, rng=rng, caption_dropout=0.3) == ""
                  for _ in range(1000))
    assert 200 < dropped < 400  # 300 expected; the binomial's sd is 14
    klass = dataclasses.replace(ex, is_class=True)
    assert all(data.prompt_for(klass, shuffle=False, keep_tokens=0, rng=rng, caption_dropout=1.0)
               for _ in range(20))


def test_tag_dropout_with_tag_shuffle_keeps_the_first_tags(tmp_path, sd1_checkpoint, monkeypatch):
    prompts = spy_prompts(monkeypatch)
    concept = {"instance_prompt": "zwx, red, round, shiny, small, bright"}
    run(make_training_model(tmp_path, sd1_checkpoint, name="all", images=2, epochs=3, shuffle_tags=True,
                            keep_tokens=1, caption_tag_dropout=1.0, concept=concept))
    assert prompts and set(prompts) == {"zwx"}
    prompts.clear()
    run(make_training_model(tmp_path, sd1_checkpoint, name="half", images=2, epochs=6, shuffle_tags=True,
                            keep_tokens=1, caption_tag_dropout=0.5, concept=concept))
    counts = [len(p.split(", ")) for p in prompts]
    assert all(p.startswith("zwx") for p in prompts) and min(counts) < 6 and len(set(prompts)) > 3


# ------------------------------------------------------------------------------------------------ masked loss
def _mask_images(folder, masks: str):
    """Beside each instance image a black mask (``file``), or the image's alpha channel made transparent."""
    for path in list_images(folder):
        img = Image.open(path).convert("RGB")
        if masks == "file":
            Image.new("L", img.size, 0).save(path.with_name(f"{path.stem}.mask.png"))
        else:
            rgba = img.convert("RGBA")
            rgba.putalpha(0)
            rgba.save(path.with_suffix(".png"))
            if path.suffix != ".png":
                path.unlink()


@pytest.mark.parametrize("masks", ["file", "alpha"])
def test_masked_loss_trains_nothing_under_a_black_mask(tmp_path, sd1_checkpoint, masks):
    md = make_training_model(tmp_path, sd1_checkpoint, images=2, masked_loss=True)
    _mask_images(tmp_path / "concept-m", masks)
    trainer = run(md)
    assert len(trainer.data.instances[0]) == 2  # the mask files are not images to train on
    assert logged_losses(md) and all(v == 0.0 for v in logged_losses(md))
    unmasked = make_training_model(tmp_path, sd1_checkpoint, name="plain", images=2)
    _mask_images(tmp_path / "concept-plain", masks)
    run(unmasked)
    assert all(v > 0 for v in logged_losses(unmasked))


def test_a_mask_follows_its_image_to_the_latent_grid(tmp_path):
    folder = tmp_path / "img"
    make_concept_images(folder, count=1)
    path = list_images(folder)[0]
    width, height = Image.open(path).size
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255  # the left half trains
    Image.fromarray(mask).save(path.with_name(f"{path.stem}.mask.png"))
    data = TrainingData([Concept(instance_data_dir=str(folder), instance_prompt="zwx")], 64, enable_buckets=False,
                        seed=0)
    ex = data.instances[0][0]
    masks = LossMasks(data)
    plain, flipped = masks.get([ex], [False], (8, 8), torch.device("cpu")), masks.get([ex], [True], (8, 8),
                                                                                    torch.device("cpu"))
    assert plain.shape == (1, 1, 8, 8)
    assert plain[..., :3].min() == 1 and plain[..., 5:].max() == 0  # left trains, right does not
    assert torch.equal(flipped, plain.flip(-1))  # mirrored with its image


def test_masked_loss_weighs_each_latent_pixel_by_its_mask(models):
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    (plain, _, _, _), = step_with_zero_unet(models, [StepSettings()])[0]
    (with_mask, _, _, _), = step_with_zero_unet(models, [StepSettings()], mask=mask)[0]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the step's first draw
    assert plain.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    assert with_mask.item() == pytest.approx((noise.pow(2) * mask).mean().item(), rel=1e-5)


def test_masked_loss_without_any_mask_is_refused(tmp_path, sd1_checkpoint):
    with pytest.raises(UserError, match="no instance image has a mask"):
        run(make_training_model(tmp_path, sd1_checkpoint, images=2, masked_loss=True))


# ------------------------------------------------------------------------------------------------ loss weighting
def test_debiased_estimation_weights_each_example_by_one_over_sqrt_snr(models):
    (plain, per, _, t), (debiased, per_d, _, t_d) = step_with_zero_unet(
        models, [StepSettings(), StepSettings(debiased_estimation=True)], n=4)[0]
    assert torch.equal(t, t_d) and torch.equal(per, per_d)  # same draws: only the weighting differs
    ac = models.noise_scheduler.alphas_cumprod[t].float()
    snr = torch.clamp(ac / (1 - ac), max=1000)
    assert debiased.item() == pytest.approx((per / snr.sqrt()).mean().item(), rel=1e-5)
    assert not torch.isclose(plain, debiased)


# ------------------------------------------------------------------------------------------------ noise
def test_pyramid_noise_adds_low_frequencies(models):
    settings = [StepSettings(), StepSettings(pyramid_noise_iterations=6, pyramid_noise_discount=0.8)]
    (plain, pyramid), latents = step_with_zero_unet(models, settings, n=32)
    assert torch.equal(plain[3], pyramid[3])  # the timesteps are drawn before the pyramid levels

    def spatial_mean_power(noisy, t):
        ac = models.noise_scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        noise = (noisy - ac.sqrt() * latents) / (1 - ac).sqrt()
        return noise.mean(dim=(2, 3)).pow(2).mean().item()

    white, coarse = spatial_mean_power(plain[2], plain[3]), spatial_mean_power(pyramid[2], pyramid[3])
    assert coarse > 5 * white  # white noise on 8x8: 1/64; the coarse levels are near-constant over the image


def test_pyramid_noise_keeps_unit_variance_and_is_off_at_zero_iterations():
    noise = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    assert pyramid_noise(noise, 0, 0.3, torch.Generator()) is noise
    out = pyramid_noise(noise, 8, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.flatten(1).std(dim=1), torch.ones(8))
    assert out.mean(dim=(2, 3)).pow(2).mean() > 20 * noise.mean(dim=(2, 3)).pow(2).mean()


def test_input_perturbation_noises_the_input_but_not_the_target(models):
    (plain, perturbed), _ = step_with_zero_unet(models, [StepSettings(), StepSettings(input_perturbation=0.5)], n=2)
    assert torch.equal(plain[3], perturbed[3])
    # a zero prediction's loss is the target's mean square: the target (the noise) is the same ...
    assert torch.equal(plain[0], perturbed[0])
    # ... while the UNet's input got noise on top
    ac = models.noise_scheduler.alphas_cumprod[plain[3]].float().view(-1, 1, 1, 1)
    extra = (perturbed[2] - plain[2]) / (1 - ac).sqrt() / 0.5
    assert 0.7 < extra.std().item() < 1.3  # unit normal noise, scaled by the strength


# ------------------------------------------------------------------------------------------------ zero terminal SNR
def test_zero_terminal_snr_makes_the_last_timestep_pure_noise(tmp_path, tiny_checkpoint):
    from diffusers import DDPMScheduler

    md = create_model(tiny_checkpoint("sd2v"), "v", tmp_path)
    models = load_models(md.working, "sd2v")
    before = models.noise_scheduler.alphas_cumprod.clone()
    config = dict(models.scheduler_config)
    use_zero_terminal_snr(models.noise_scheduler, config)
    after = models.noise_scheduler.alphas_cumprod
    reference = DDPMScheduler.from_config({**models.scheduler_config, "rescale_betas_zero_snr": True})
    assert before[-1] > 0 and after[-1] == 0
    torch.testing.assert_close(after, reference.alphas_cumprod, atol=1e-6, rtol=1e-4)  # diffusers' formula
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    torch.testing.assert_close(models.noise_scheduler.add_noise(latents, noise, last), noise)  # no signal left
    v = models.noise_scheduler.get_velocity(latents, noise, last)
    torch.testing.assert_close(v, -latents)  # v-prediction's target there: the image itself


def test_zero_terminal_snr_reaches_the_run_and_is_refused_for_epsilon_models(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd2v"), name="v", images=1, epochs=1,
                             zero_terminal_snr=True, preview_every_n_epochs=1)
    trainer = run(md)
    assert trainer.models.noise_scheduler.alphas_cumprod[-1] == 0
    assert trainer.models.scheduler_config["rescale_betas_zero_snr"] is True
    assert list(md.samples.rglob("*.png"))  # the preview samples with the rescaled schedule
    with pytest.raises(UserError, match="needs a v-prediction model"):
        run(make_training_model(tmp_path, tiny_checkpoint("sd1"), name="eps", images=1, zero_terminal_snr=True))


@pytest.fixture()
def sd1_checkpoint(tiny_checkpoint):
    return tiny_checkpoint("sd1")


def test_the_tab_shows_zero_terminal_snr_for_v_prediction_models_only():
    from dreambooth.ui.form import config_controls, shown_for_method

    controls = config_controls()
    index = next(i for i, c in enumerate(controls) if c.spec.name == "zero_terminal_snr")
    assert shown_for_method("dreambooth", controls, None, prediction="v_prediction")[index]
    assert not shown_for_method("dreambooth", controls, None, prediction="epsilon")[index]
    assert shown_for_method("dreambooth", controls)[index]  # no model chosen: shown
