"""The trainer's speed and memory switches: each gives the loss curve of the plain path (exactly where it should,
within a stated tolerance where it rounds differently) and has the effect it promises, on tiny models."""

from __future__ import annotations

import csv
from unittest import mock

import pytest
import torch
from conftest import cancelled_at, make_training_model
from conftest import train_here as run
from conftest import unet_weights as unet
from safetensors.torch import load_file

from dreambooth.errors import UserError
from dreambooth.train import caches as caches_module
from dreambooth.train import loop as loop_module
from dreambooth.train import step as step_module
from dreambooth.train.fused import ParamwiseOptimizer, install_fused_step
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.precision import WeightPrecision, round_generator, stochastic_round

# every switch compared with its default; the reference run turns the cache off to compare with the plain path
PLAIN = dict(cache_text_embeddings=False, epochs=2, images=2)


def losses(md) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(md.logs / "loss.csv"))]


@pytest.fixture()
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


def train(tmp_path, source, name, **settings) -> tuple[Trainer, object]:
    merged = {**PLAIN, **settings}
    images = merged.pop("images")
    md = make_training_model(tmp_path, source, name=name, images=images, **merged)
    return run(md), md


# ------------------------------------------------------------------------------------------- text embedding cache


def test_cached_text_embeddings_give_the_same_losses_and_encode_each_prompt_once(tmp_path, sd1, monkeypatch):
    calls = []
    real = step_module.encode_tokens

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "encode_tokens", counting)
    plain, md_plain = train(tmp_path, sd1, "plain")
    assert len(calls) == plain.total_steps == 4 and plain.text_cache is None
    calls.clear()
    cached, md_cached = train(tmp_path, sd1, "cached", cache_text_embeddings=True)
    assert calls == []  # the step never ran the text encoder
    assert cached.text_cache.encodes == len(cached.text_cache) == 1  # one distinct prompt, encoded once
    # each prompt is encoded alone (batch of 1) instead of in the step's batch: equal up to float rounding
    assert losses(md_cached) == pytest.approx(losses(md_plain), rel=1e-6, abs=1e-7)


def test_shuffled_tags_get_one_entry_per_distinct_prompt(tmp_path, sd1):
    concept = {"instance_prompt": "zwx disc, red, round, shiny, small"}
    trainer, _ = train(tmp_path, sd1, "shuffle", cache_text_embeddings=True, shuffle_tags=True, keep_tokens=1,
                       epochs=3, concept=concept)
    # 6 steps, 4! orders of the shuffled tags: several distinct prompts, each encoded exactly once
    assert 1 < len(trainer.text_cache) <= trainer.total_steps
    assert trainer.text_cache.encodes == len(trainer.text_cache)


def test_the_text_cache_stays_in_bounded_ram_with_shuffled_tags_and_hits_skip_the_encoder(tmp_path, sd1):
    """Shuffled tags make a new prompt nearly every step: the cache keeps nothing on the training device (``meta``
    stands in for a GPU here: a tensor kept there would show) and at most ``max_bytes`` in RAM, least recently used
    dropped first; a prompt it holds is never encoded again."""
    import random

    from dreambooth.data.captions import shuffle_tags
    from dreambooth.data.prompts import tokenize_prompts
    from dreambooth.train.models import load_models

    md = make_training_model(tmp_path, sd1)
    models = load_models(md.working, "sd1")

    def ids(prompt: str) -> list[torch.Tensor]:
        return [tokenize_prompts(t, [prompt], "truncate")[0] for t in models.tokenizers]

    row = 77 * models.text_encoders[0].config.hidden_size * 4  # one fp32 prompt
    cache = caches_module.TextEmbeddingCache(models, 1, None, torch.device("meta"))
    cache.max_bytes = 3 * row  # the limit, made small (the default holds thousands of prompts)
    rng = random.Random(0)
    prompts = {shuffle_tags("zwx disc, red, round, shiny, small, flat, old", 1, rng) for _ in range(40)}
    assert len(prompts) > 10
    for prompt in sorted(prompts):
        hidden, _ = cache.get(ids(prompt))
        assert hidden.device.type == "meta" and hidden.shape[0] == 1  # what the step gets: on its device
    assert len(cache) == 3 and cache.nbytes == 3 * row and cache.dropped == len(prompts) - 3
    assert all(t.device.type == "cpu" for entry in cache.entries.values() for t in entry if t is not None)
    newest = sorted(prompts)[-1]
    encodes = cache.encodes
    cache.get(ids(newest))
    assert cache.encodes == encodes  # a hit: the text encoder is not run
    cache.get(ids(sorted(prompts)[0]))  # dropped long ago: encoded again
    assert cache.encodes == encodes + 1 and len(cache) == 3
    # what a hit returns is what encoding gives
    fresh = caches_module.TextEmbeddingCache(models, 1, None, torch.device("cpu"))
    first, _ = fresh.get(ids(newest))
    again, _ = fresh.get(ids(newest))
    assert fresh.encodes == 1 and torch.equal(first, again)


def test_the_text_encoder_is_not_cached_while_it_trains(tmp_path, sd1):
    trainer, _ = train(tmp_path, sd1, "te", cache_text_embeddings=True, text_encoder_ratio=0.5)
    # 4 steps, the first 2 train the text encoder (no cache), the last 2 reuse the frozen encoder's one prompt
    assert trainer.text_cache.encodes == 1


# ------------------------------------------------------------------------------------------------------ offloading


def test_offloading_fills_the_caches_first_and_keeps_the_frozen_models_off_during_steps(tmp_path, sd1, monkeypatch):
    moved = []
    real_offload = caches_module.Offloader.offload

    def offload(self, modules):
        moved.extend(type(m).__name__ for m in modules)
        real_offload(self, modules)

    monkeypatch.setattr(caches_module.Offloader, "offload", offload)
    seen = []
    real_step = Trainer._optimizer_step

    def spy(self, group):
        if self.offloader is not None:
            seen.append((self.latents.encodes, self.text_cache.encodes, list(self.offloader.offloaded)))
        real_step(self, group)

    monkeypatch.setattr(Trainer, "_optimizer_step", spy)
    on_device = []
    real_on_device = caches_module.Offloader.on_device

    def entering(self):
        on_device.append(len(self.offloaded))
        return real_on_device(self)

    monkeypatch.setattr(caches_module.Offloader, "on_device", entering)
    plain, md_plain = train(tmp_path, sd1, "plain", cache_text_embeddings=True, preview_every_n_epochs=1)
    off, md_off = train(tmp_path, sd1, "off", cache_text_embeddings=True, offload_frozen_models=True, hflip=True,
                        preview_every_n_epochs=1)
    assert sorted(moved) == ["AutoencoderKL", "CLIPTextModel"]
    models = off.models
    # before the first step every latent (2 images x 2 flips) and the prompt are cached, and nothing more is
    # encoded during the steps: the VAE and text encoder are idle and offloaded
    assert len(seen) == 4 and all(s == (4, 1, [models.vae, models.text_encoders[0]]) for s in seen)
    assert off.latents.encodes == 4 and off.text_cache.encodes == 1
    assert on_device == [2, 2]  # both previews had them back on the device
    assert len(losses(md_off)) == len(losses(md_plain)) == 4


def test_offloader_moves_modules_off_and_back_for_previews():
    targets = []

    class Recording(torch.nn.Linear):
        def to(self, *args, **kwargs):
            targets.append(str(args[0]))
            return self

    module = Recording(2, 2)
    offloader = caches_module.Offloader(mock.Mock(), torch.device("cuda"))
    with mock.patch("torch.cuda.empty_cache"):
        offloader.offload([module])
        with offloader.on_device():
            targets.append("preview")
    assert targets == ["cpu", "cuda", "preview", "cpu"]


# ---------------------------------------------------------------------------------------------------- channels-last


def test_channels_last_gives_the_same_losses_and_channels_last_weights(tmp_path, sd1, monkeypatch):
    formats = []
    real = step_module.compute_loss

    def spy(models, batch, settings, generator):
        formats.append(batch.latents.is_contiguous(memory_format=torch.channels_last))
        return real(models, batch, settings, generator)

    _, md_plain = train(tmp_path, sd1, "plain")
    monkeypatch.setattr(loop_module, "compute_loss", spy)
    trainer, md_cl = train(tmp_path, sd1, "cl", channels_last=True)
    conv = trainer.models.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert formats and all(formats)
    # the same math in another memory layout: convolutions may sum in another order
    assert losses(md_cl) == pytest.approx(losses(md_plain), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------- bf16 weights


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((20000,), 1.0 + 2**-10)  # a quarter of the way between the bf16 neighbours 1 and 1 + 2**-7
    low, high = torch.tensor(1.0), torch.tensor(1.0 + 2**-7)
    rounded = stochastic_round(x, torch.Generator().manual_seed(1)).float()
    assert set(rounded.unique().tolist()) == {low.item(), high.item()}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)  # nearest rounding would give 1.0
    assert (rounded == high).float().mean().item() == pytest.approx(0.125, abs=0.01)
    again = stochastic_round(x, torch.Generator().manual_seed(1))
    assert torch.equal(again.float(), rounded)
    assert not torch.equal(stochastic_round(x, torch.Generator().manual_seed(2)).float(), rounded)
    values = torch.randn(10000) * 1e3
    mean = torch.stack([stochastic_round(values, round_generator(0, s, 0)).float() for s in range(200)]).mean(0)
    nearest_error = (values.bfloat16().float() - values).abs().mean()
    assert (mean - values).abs().mean() < nearest_error / 5
    negative = stochastic_round(torch.tensor([-1.0 - 2**-9, float("inf"), -0.0]), torch.Generator().manual_seed(0))
    assert negative[0].item() in (-1.0, -1.0 - 2**-7) and negative[1].item() == float("inf")


def test_bf16_refuses_without_bf16_mixed_precision(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, weight_precision="bf16_stochastic", mixed_precision="no")
    with pytest.raises(UserError, match="bf16 mixed precision"):
        run(md)


@pytest.mark.parametrize("mode", ["bf16_master", "bf16_stochastic"])
def test_bf16_weights_follow_the_fp32_loss_curve(tmp_path, sd1, mode):
    _, md_fp32 = train(tmp_path, sd1, "fp32", mixed_precision="bf16")
    trainer, md_bf16 = train(tmp_path, sd1, "bf16", mixed_precision="bf16", weight_precision=mode)
    unet_params = list(trainer.models.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in unet_params)
    assert all(p.dtype == torch.bfloat16 for p in trainer.models.vae.parameters())
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32  # the optimizer's moments stay fp32 in both modes
    if mode == "bf16_master":
        assert len(trainer.precision.masters) == len(unet_params)
        assert all(m.dtype == torch.float32 for m in trainer.precision.masters.values())
    else:
        assert trainer.precision.masters == {}
        slots = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        assert all(s.numel() == 0 for s in slots)  # no fp32 copy of any weight outlives its own update
    saved = unet(md_bf16)
    assert all(v.dtype == torch.float32 for v in saved.values())  # working weights keep their fp32 files
    # Both runs compute under bf16 autocast; the only difference is the weights' storage: bf16 keeps 8 mantissa
    # bits (relative rounding 2**-9 ~ 0.2%), which moves each prediction by about that much, and the per-step MSE
    # of noise predictions near 1 by a few tenths of a percent. 2% covers that with margin, and still fails if
    # the updates were lost (a step of lr 1e-3 changes the loss by more) or the weights were garbage.
    assert losses(md_bf16) == pytest.approx(losses(md_fp32), rel=2e-2)
    # The weights: Adam moves each one by about lr (1e-3) per step whatever its gradient's size, so where the
    # gradient is tiny, rounding can flip a step's sign: the bound per weight is bf16's ulp (2**-7 relative) plus
    # 2 x lr per step; stochastic rounding may land one ulp off at every step (a random walk, bounded by steps).
    # On average they agree far closer than that.
    fp32_unet, steps = unet(md_fp32), trainer.total_steps
    ulps = steps if mode == "bf16_stochastic" else 1
    diffs = []
    for key, value in saved.items():
        diff = (value - fp32_unet[key]).abs()
        assert (diff <= fp32_unet[key].abs() * 2**-7 * ulps + 2 * steps * 1e-3).all(), key
        diffs.append(diff.flatten())
    assert torch.cat(diffs).mean() < 1e-3


@pytest.mark.slow
def test_bf16_stochastic_resume_repeats_the_uninterrupted_run_exactly(tmp_path, sd1):
    settings = dict(mixed_precision="bf16", weight_precision="bf16_stochastic", save_every_n_epochs=1,
                    save_on_cancel=True, epochs=2, images=2)
    _, reference = train(tmp_path / "ref", sd1, "m", **settings)
    md = make_training_model(tmp_path / "run", sd1, images=2, cache_text_embeddings=False,
                             **{k: v for k, v in settings.items() if k != "images"})
    with cancelled_at(2):
        run(md)
    trainer = run(md, resume=True)
    assert trainer.step == 4
    a, b = unet(reference), unet(md)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_precision_write_back_rounds_stochastically_per_step():
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
    precision = WeightPrecision("bf16_stochastic", seed=3)
    update = torch.full((1000,), 2**-12)  # far below bf16's step at 1.0, but 0 has finer steps: use an offset
    p.data.fill_(1.0)
    precision.write_back(p, 1.0 + update, index=0)
    first = p.detach().clone()
    assert 0 < (first != 1.0).sum() < 1000  # some rounded up, most down: unbiased on average
    p.data.fill_(1.0)
    precision.write_back(p, 1.0 + update, index=0)
    assert torch.equal(p.detach(), first)  # same (seed, step, index): same bits
    precision.step = 1
    p.data.fill_(1.0)
    precision.write_back(p, 1.0 + update, index=0)
    assert not torch.equal(p.detach(), first)


# -------------------------------------------------------------------------------------------- fused backward step


FUSED_CHECK = dict(max_grad_norm=0.0, lr_scheduler="cosine", lr_warmup_steps=2, use_ema=True, ema_decay=0.5)


def test_fused_backward_step_gives_the_same_weights_as_the_normal_step(tmp_path, sd1, monkeypatch):
    grads_at_step = []
    trainers = []
    real_fault = loop_module.fault_point

    def fault(name):
        if name == "step" and trainers:
            grads_at_step.append(sum(p.grad is not None for p in trainers[-1].trained_params))
        real_fault(name)

    monkeypatch.setattr(loop_module, "fault_point", fault)
    real_setup = Trainer._setup

    def setup(self):
        trainers.append(self)
        real_setup(self)

    monkeypatch.setattr(Trainer, "_setup", setup)
    normal, md_normal = train(tmp_path, sd1, "normal", **FUSED_CHECK)
    assert grads_at_step and all(n == len(normal.trained_params) for n in grads_at_step)
    grads_at_step.clear()
    fused, md_fused = train(tmp_path, sd1, "fused", fused_backward_step=True, **FUSED_CHECK)
    assert grads_at_step and all(n == 0 for n in grads_at_step)  # each gradient was freed right after its update
    assert isinstance(fused.optimizer, ParamwiseOptimizer)
    assert losses(md_fused) == pytest.approx(losses(md_normal), rel=1e-5, abs=1e-7)
    a, b = unet(md_normal), unet(md_fused)
    for key in a:  # AdamW per parameter is the same math as AdamW over all (foreach kernels may round differently)
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    ema_a = load_file(str(md_normal.working / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    ema_b = load_file(str(md_fused.working / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    for key in ema_a:
        torch.testing.assert_close(ema_b[key], ema_a[key], rtol=1e-5, atol=1e-6)
    # the LR schedule reached the per-parameter optimizers: the logged LRs are the scheduler's
    lrs_a = [r["lr"] for r in csv.DictReader(open(md_normal.logs / "loss.csv"))]
    assert lrs_a == [r["lr"] for r in csv.DictReader(open(md_fused.logs / "loss.csv"))]


@pytest.mark.slow
def test_fused_backward_step_resumes_exactly(tmp_path, sd1):
    settings = dict(fused_backward_step=True, max_grad_norm=0.0, save_every_n_epochs=1, save_on_cancel=True,
                    epochs=2)
    _, reference = train(tmp_path / "ref", sd1, "m", images=2, **settings)
    md = make_training_model(tmp_path / "run", sd1, images=2, cache_text_embeddings=False, **settings)
    with cancelled_at(2):
        run(md)
    trainer = run(md, resume=True)
    assert trainer.step == 4 and trainer.optimizer.state  # the per-parameter states came back
    a, b = unet(reference), unet(md)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("settings", "named"), [
    (dict(gradient_accumulation_steps=2, max_grad_norm=0.0), "gradient accumulation"),
    (dict(max_grad_norm=1.0), "max gradient norm"),
    (dict(max_grad_norm=0.0, optimizer="prodigy", learning_rate=1.0), "prodigy"),
])
def test_fused_backward_step_refuses_what_it_cannot_honour(tmp_path, sd1, settings, named):
    md = make_training_model(tmp_path, sd1, fused_backward_step=True, **settings)
    with pytest.raises(UserError, match=named):
        run(md)


def test_paramwise_optimizer_state_is_the_ordinary_adamw_format():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paramwise = ParamwiseOptimizer([{"params": params, "lr": 0.1}], lambda g: torch.optim.AdamW(g, lr=0.1),
                                   WeightPrecision("fp32", 0))
    plain = torch.optim.AdamW([{"params": twins, "lr": 0.1}], lr=0.1)
    for _ in range(3):
        for p, t in zip(params, twins, strict=True):
            g = torch.randn_like(p)
            p.grad, t.grad = g.clone(), g.clone()
        paramwise.step()
        plain.step()
    for p, t in zip(params, twins, strict=True):
        torch.testing.assert_close(p, t)
    state = paramwise.state_dict()
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    fresh.load_state_dict(state)  # loads into a plain AdamW: same format
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("mode", ["fp32", "bf16_master", "bf16_stochastic"])
def test_bucketed_updates_are_the_updates_of_each_parameter_alone(mode):
    """A bucket's update (a few multi-tensor kernels for many parameters) changes nothing: the same weights, bit
    for bit, as one parameter at a time (the same AdamW kernel; the same rounding bits per parameter)."""
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    shapes = [(3, 2), (4,), (2, 3, 2, 2), (2,), (7,), (3, 3)]  # the 4-D one channels-last, as a UNet's convs
    copies = [[torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype).contiguous(
        memory_format=torch.channels_last if len(s) == 4 else torch.contiguous_format))
        for i, s in enumerate(shapes)] for _ in range(2)]
    optimizers = []
    for params in copies:
        precision = WeightPrecision(mode, seed=5)
        precision.cast_modules([], params)
        optimizers.append(ParamwiseOptimizer([{"params": params[:3], "lr": 0.1}, {"params": params[3:], "lr": 0.2}],
                                             lambda g: torch.optim.AdamW(g, lr=0.1, foreach=False), precision,
                                             bucket_elements=12))
    bucketed, one_by_one = optimizers
    assert 2 < len(bucketed.buckets) < len(shapes)  # several buckets, some with several parameters
    assert [id(p) for b in bucketed.buckets for p in b.params] == [id(p) for p in copies[0]]  # each once, in order
    for step in range(3):
        for a, b in zip(*copies, strict=True):
            g = torch.randn(a.shape).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        bucketed.precision.step = one_by_one.precision.step = step
        bucketed.step()
        for p in copies[1]:
            one_by_one.step_param(p)
            p.grad = None
    for a, b in zip(*copies, strict=True):
        assert torch.equal(a, b)
        if mode == "bf16_master":
            assert torch.equal(bucketed.precision.masters[a], one_by_one.precision.masters[b])
    if mode == "bf16_stochastic":
        assert all(s.numel() == 0 for s in bucketed.buckets[0].slots)  # the fp32 copies were dropped


def test_fused_buckets_update_inside_backward_and_the_step_finishes_the_rest():
    torch.manual_seed(0)
    used = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    unused = torch.nn.Parameter(torch.randn(4))  # gets no gradient: its bucket cannot complete in backward
    twins = [torch.nn.Parameter(p.detach().clone()) for p in [*used, unused]]
    fused = ParamwiseOptimizer([{"params": [*used, unused], "lr": 0.1}], lambda g: torch.optim.AdamW(g, lr=0.1),
                               WeightPrecision("fp32", 0), bucket_elements=32)
    assert [len(b.params) for b in fused.buckets] == [2, 2]
    install_fused_step(fused)
    plain = torch.optim.AdamW(twins, lr=0.1)
    x = torch.randn(2, 4)
    (x @ used[0] @ used[1] @ used[2]).square().sum().backward()
    assert used[0].grad is None and used[1].grad is None  # the complete bucket stepped in backward, grads freed
    assert used[2].grad is not None  # its bucket waits for a gradient that never comes...
    (x @ twins[0] @ twins[1] @ twins[2]).square().sum().backward()
    plain.step()
    fused.step()  # ...and the step after backward updates it
    assert used[2].grad is None
    for p, t in zip([*used, unused], twins, strict=True):
        torch.testing.assert_close(p, t)


# ------------------------------------------------------------------------------------------------------- compile


def test_compile_unet_wraps_the_training_forward(tmp_path, sd1, monkeypatch):
    compiled_calls = []

    def fake_compile(fn):
        def compiled(*args, **kwargs):
            compiled_calls.append(torch.is_grad_enabled())
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    _, md_plain = train(tmp_path, sd1, "plain", preview_every_n_epochs=2)
    trainer, md = train(tmp_path, sd1, "compiled", compile_unet=True, preview_every_n_epochs=2)
    assert compiled_calls == [True] * trainer.total_steps  # every step, never the preview's sampling
    assert losses(md) == losses(md_plain)


def test_compile_unet_falls_back_when_compiling_fails(tmp_path, sd1, monkeypatch, caplog):
    def broken(fn):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    _, md_plain = train(tmp_path, sd1, "plain")
    trainer, md = train(tmp_path, sd1, "broken", compile_unet=True)
    assert trainer.status.status["state"] == "done"
    assert "torch.compile of the UNet failed" in caplog.text and "no C++ compiler found" in caplog.text
    assert losses(md) == losses(md_plain)


# ------------------------------------------------------------------------------------------------ no host sync


def test_the_step_path_reads_no_tensor_on_the_host(tmp_path, sd1, monkeypatch):
    """Between reports nothing in a training step may wait for the device: .item(), float(), bool() of a tensor."""
    md = make_training_model(tmp_path, sd1, epochs=1, images=3, cache_text_embeddings=True)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False))
    trainer._setup()
    trainer.started, trainer.start_step, trainer.pending_losses = 0.0, 0, []
    batches = trainer.data.epoch_batches(0, 1)
    trainer._optimizer_step([batches[0]])  # the first step fills the caches; the next ones are the steady state

    # torch's optimizers keep their step counters on the host on purpose (reading them syncs nothing)
    counters = {id(s["step"]) for s in trainer.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)}

    def guard(name):
        real = getattr(torch.Tensor, name)

        def refuse(self, *args, **kwargs):
            if id(self) not in counters:
                raise AssertionError(f"host sync in the step path: Tensor.{name}")
            return real(self, *args, **kwargs)
        return refuse

    with monkeypatch.context() as m:
        for name in ("item", "__float__", "__bool__"):
            m.setattr(torch.Tensor, name, guard(name))
        for b in batches[1:]:
            trainer._optimizer_step([b])
            trainer.step += 1
    assert len(trainer.pending_losses) == 3
    trainer.lock.release()
