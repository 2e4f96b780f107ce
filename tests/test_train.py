"""The trainer: every setting has an effect that a test sees, on tiny models, in a few seconds each."""

from __future__ import annotations

import csv
import html
import json
import time

import pytest
import torch
from conftest import make_training_model
from conftest import train_here as run
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import load_config
from dreambooth.errors import UserError
from dreambooth.train import batch as batch_module
from dreambooth.train import loop as loop_module
from dreambooth.train.loop import RunOptions, Trainer, autocast_dtype
from dreambooth.train.optimizers import adamw_8bit_problem
from dreambooth.train.resume import list_states
from dreambooth.train.schedules import lr_multiplier
from dreambooth.ui.output import status_html


def weights(md, component="unet"):
    name = "diffusion_pytorch_model" if component in ("unet", "unet_ema", "vae") else "model"
    return load_file(str(md.working / component / f"{name}.safetensors"))


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture()
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


def test_training_updates_the_working_unet_and_reports_done(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1)
    before = weights(md)
    trainer = run(md)
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "done" and status["step"] == trainer.total_steps == 2 * 4
    assert status["loss"] is not None and status["it_per_s"] > 0 and "peak_memory_mb" in status
    assert changed(before, weights(md))
    assert load_config(md.path).revision == 8
    rows = list(csv.DictReader(open(md.logs / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))


def test_train_unet_off_leaves_the_unet_bitwise_unchanged(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, train_unet=False, text_encoder_ratio=1.0, epochs=1)
    unet, te = weights(md), weights(md, "text_encoder")
    run(md)
    assert not changed(unet, weights(md)) and changed(te, weights(md, "text_encoder"))


def test_nothing_to_train_is_refused(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, train_unet=False, text_encoder_ratio=0.0)
    with pytest.raises(UserError, match="nothing to train"):
        run(md)


def test_text_encoder_changes_only_during_its_step_ratio(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, text_encoder_ratio=0.5, epochs=2)  # 8 steps: the TE trains 4
    snapshots = []
    original = Trainer._optimizer_step

    def spy(self, group):
        original(self, group)
        te = self.models.text_encoders[0]
        snapshots.append(te.get_input_embeddings().weight.detach().clone())

    monkeypatch.setattr(Trainer, "_optimizer_step", spy)
    initial = weights(md, "text_encoder")["text_model.embeddings.token_embedding.weight"]
    run(md)
    assert not torch.equal(snapshots[0], initial)
    assert all(not torch.equal(snapshots[i], snapshots[i + 1]) for i in range(3))
    assert all(torch.equal(snapshots[3], s) for s in snapshots[4:])


def test_frozen_clip_norms_stay_bitwise_equal(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, text_encoder_ratio=1.0, freeze_clip_normalization=True, epochs=1)
    before = weights(md, "text_encoder")
    run(md)
    diff = changed(before, weights(md, "text_encoder"))
    assert diff and not [k for k in diff if "layer_norm" in k]
    md2 = make_training_model(tmp_path, sd1, name="free", text_encoder_ratio=1.0, epochs=1)
    run(md2)
    assert [k for k in changed(before, weights(md2, "text_encoder")) if "layer_norm" in k]


def test_ema_follows_its_decay(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, use_ema=True, ema_decay=0.5, epochs=1, images=1)  # one step
    before = weights(md)
    run(md)
    raw, ema = weights(md), weights(md, "unet_ema")
    key = "conv_in.weight"
    assert not torch.equal(raw[key], ema[key])
    torch.testing.assert_close(ema[key], 0.5 * before[key] + 0.5 * raw[key])


def test_lr_curve_follows_the_scheduler(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, lr_scheduler="cosine", lr_warmup_steps=2, epochs=3, learning_rate=1e-3)
    run(md)
    rows = list(csv.DictReader(open(md.logs / "loss.csv")))
    logged = [float(r["lr"].split(";")[0]) for r in rows]
    # each logged step shows the LR it used: step s (from 1) uses the schedule's value at s - 1
    expected = [1e-3 * lr_multiplier("cosine", s, 12, warmup_steps=2) for s in range(12)]
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_cached_latents_encode_each_image_once(tmp_path, sd1):
    cached = run(make_training_model(tmp_path, sd1, name="c", cache_latents=True, epochs=3))
    fresh = run(make_training_model(tmp_path, sd1, name="f", cache_latents=False, epochs=3))
    assert cached.latents.encodes == 4 and fresh.latents.encodes == 12


def test_hflip_feeds_mirrored_images(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, hflip=True, epochs=3))
    assert {flip for (_, _, flip) in trainer.latents.entries} == {True, False}
    trainer = run(make_training_model(tmp_path, sd1, name="noflip", hflip=False, epochs=3))
    assert {flip for (_, _, flip) in trainer.latents.entries} == {False}


def test_saves_and_previews_match_their_intervals(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=4, save_every_n_epochs=2, preview_every_n_epochs=3,
                             save_checkpoint=True, keep_resume_states=1, export_dtype="fp32")
    trainer = run(md, export_dir=tmp_path / "exports")
    per_epoch = 4
    assert trainer.saves == [2 * per_epoch, 4 * per_epoch]
    assert trainer.previews == [3 * per_epoch, 4 * per_epoch]  # every 3rd epoch, plus the last
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["m_16.safetensors", "m_8.safetensors"]
    assert [p.name for p in list_states(md.checkpoints)] == ["step_00000016"]  # keep_resume_states=1
    samples = sorted(md.samples.glob("*.png"))
    assert len(samples) == 2
    text = Image.open(samples[-1]).text["parameters"]
    assert "a photo of zwx disc" in text and "Seed: 7" in text
    exported = load_file(str(tmp_path / "exports" / "m_16.safetensors"))
    assert exported["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float32


def test_pause_takes_its_seconds(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=3, pause_every_n_epochs=1, pause_seconds=0.6, images=1)
    start = time.perf_counter()
    run(md)
    assert time.perf_counter() - start >= 1.2  # after epochs 1 and 2, not after the last


def test_set_grads_to_none(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, epochs=1, set_grads_to_none=True, images=1))
    assert all(p.grad is None for p in trainer.models.unet.parameters())
    trainer = run(make_training_model(tmp_path, sd1, name="z", epochs=1, set_grads_to_none=False, images=1))
    grads = [p.grad for p in trainer.models.unet.parameters()]
    assert all(g is not None and not g.any() for g in grads)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path, sd1, monkeypatch):
    norms = []
    original = Trainer._make_optimizer

    def spy(self):
        original(self)
        step = self.optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return step(*args, **kwargs)

        self.optimizer.step = recording_step

    monkeypatch.setattr(Trainer, "_make_optimizer", spy)
    run(make_training_model(tmp_path, sd1, name="clip", epochs=1, max_grad_norm=1e-3))
    clipped, norms[:] = list(norms), []
    run(make_training_model(tmp_path, sd1, name="free", epochs=1, max_grad_norm=0.0))
    assert max(clipped) <= 1e-3 * 1.001 and min(norms) > 1e-2


def test_gradient_accumulation_divides_the_steps(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, gradient_accumulation_steps=2, epochs=1))
    assert trainer.total_steps == 2 and trainer.step == 2


def test_batch_size(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, train_batch_size=2, epochs=1))
    assert trainer.total_steps == 2


def test_gradient_checkpointing_is_switched_on(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, gradient_checkpointing=True, epochs=1, images=1))
    assert trainer.models.unet.is_gradient_checkpointing
    trainer = run(make_training_model(tmp_path, sd1, name="n", gradient_checkpointing=False, epochs=1, images=1))
    assert not trainer.models.unet.is_gradient_checkpointing


@pytest.mark.parametrize("mode, processor", [("default", "AttnProcessor"), ("sdp", "AttnProcessor2_0")])
def test_attention_choice(tmp_path, sd1, mode, processor):
    trainer = run(make_training_model(tmp_path, sd1, attention=mode, epochs=1, images=1))
    names = {type(p).__name__ for p in trainer.models.unet.attn_processors.values()}
    assert names == {processor}


def test_auto_attention_follows_the_host(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, attention="auto", epochs=1, images=1),
                  attention_default="default")
    assert {type(p).__name__ for p in trainer.models.unet.attn_processors.values()} == {"AttnProcessor"}


def test_xformers_missing_is_a_clear_error(tmp_path, sd1, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    with pytest.raises(UserError, match="xformers"):
        run(make_training_model(tmp_path, sd1, attention="xformers", epochs=1, images=1))


def test_bf16_mixed_precision_runs_the_unet_in_bf16(tmp_path, sd1):
    trainer = Trainer(make_training_model(tmp_path, sd1, mixed_precision="bf16", epochs=1, images=1),
                      RunOptions(device="cpu", install_signal_handlers=False))
    seen = []
    trainer_hook = None

    def capture(module, args, output):
        seen.append(output.sample.dtype)

    trainer._setup_orig = trainer._setup

    def setup():
        trainer._setup_orig()
        nonlocal trainer_hook
        trainer_hook = trainer.models.unet.register_forward_hook(capture)

    trainer._setup = setup
    trainer.run()
    assert seen and set(seen) == {torch.bfloat16}


def test_bf16_on_a_gpu_without_it_names_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError) as err:
        autocast_dtype("bf16", torch.device("cuda"))
    assert "fp16" in err.value.hint
    assert autocast_dtype("fp16", torch.device("cpu")) is None  # fp16 needs a GPU: fp32 on the CPU


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "adafactor", "adamw_8bit"])
def test_each_optimizer_trains(tmp_path, sd1, optimizer):
    md = make_training_model(tmp_path, sd1, optimizer=optimizer, epochs=1, images=1)
    before = weights(md)
    run(md)
    assert changed(before, weights(md))
    status = json.loads(md.status_path.read_text())
    if optimizer == "adamw_8bit":
        problem = adamw_8bit_problem("cpu")
        if problem is None:  # bitsandbytes runs 8-bit on this CPU: no fallback to tell of (other notes may be there)
            assert "8-bit" not in status.get("note", "") and "AdamW instead" not in status.get("note", "")
        else:  # the status and the tab say that plain AdamW runs instead, and why
            assert problem in status["note"] and "AdamW instead" in status["note"]
            assert html.escape(problem) in status_html(status, False, "m")


def test_seed_makes_runs_repeatable(tmp_path, sd1):
    a = make_training_model(tmp_path, sd1, name="a", seed=1, epochs=1)
    b = make_training_model(tmp_path, sd1, name="b", seed=1, epochs=1)
    c = make_training_model(tmp_path, sd1, name="c", seed=2, epochs=1)
    for md in (a, b, c):
        run(md)
    assert not changed(weights(a), weights(b)) and changed(weights(a), weights(c))


def test_seed_makes_runs_with_dropout_repeatable(tmp_path, sd1):
    """LoRA dropout draws from torch's global generator: the run seeds it, so the same seed gives the same LoRA
    whatever ran in this process before."""
    settings = dict(method="lora", lora_rank=4, lora_dropout=0.5, seed=3, epochs=1, images=2)
    a, b = (make_training_model(tmp_path, sd1, name=n, **settings) for n in ("a", "b"))
    run(a)
    torch.rand(1000)  # anything else drawing from the global generator between the runs
    run(b)
    lora_a, lora_b = (load_file(str(md.path / "lora" / f"{md.name}.safetensors")) for md in (a, b))
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


def test_repeats_and_epochs_set_the_step_count(tmp_path, sd1):
    trainer = run(make_training_model(tmp_path, sd1, concept={"repeats": 2}, epochs=2))
    assert trainer.total_steps == 4 * 2 * 2


def test_save_on_cancel(tmp_path, sd1, monkeypatch):
    def cancel_after_two(self):
        if self.step >= 2:
            raise loop_module.Cancelled()

    monkeypatch.setattr(Trainer, "_check_controls", cancel_after_two)
    md = make_training_model(tmp_path, sd1, save_on_cancel=True, epochs=2)
    trainer = run(md)
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "cancelled" and trainer.saves == [2] and list_states(md.checkpoints)
    md2 = make_training_model(tmp_path, sd1, name="nosave", save_on_cancel=False, epochs=2)
    before = weights(md2)
    trainer = run(md2)
    assert trainer.saves == [] and not changed(before, weights(md2))


def test_cancel_file_stops_at_a_step_boundary(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, save_on_cancel=False, epochs=2)
    original = Trainer._optimizer_step

    def step_then_ask(self, group):
        original(self, group)
        if self.step == 2:
            (md.path / "cancel.request").touch()

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_ask)
    trainer = run(md)
    assert trainer.step == 3 and json.loads(md.status_path.read_text())["state"] == "cancelled"
    assert not (md.path / "cancel.request").exists()


def test_export_ema_writes_the_ema_weights(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, use_ema=True, ema_decay=0.5, epochs=1, images=1, save_checkpoint=True,
                             export_ema=True, export_dtype="fp32")
    run(md, export_dir=tmp_path / "x")
    exported = load_file(str(tmp_path / "x" / "m_1.safetensors"))
    ema = weights(md, "unet_ema")
    assert torch.equal(exported["model.diffusion_model.input_blocks.0.0.weight"], ema["conv_in.weight"])


def test_concepts_list_file_replaces_the_panels(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1)
    cfg = load_config(md.path)
    listed = tmp_path / "concepts.json"
    listed.write_text(json.dumps([{"instance_data_dir": cfg.concepts[0].instance_data_dir, "repeats": 3,
                                   "instance_prompt": "zwx"}]))
    cfg.concepts_list_file = str(listed)
    cfg.save(md.path)
    assert run(md).total_steps == 12


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_other_families_train(tmp_path, tiny_checkpoint, family):
    md = make_training_model(tmp_path, tiny_checkpoint(family), epochs=1, images=2, text_encoder_ratio=1.0)
    before = weights(md)
    trainer = run(md)
    assert trainer.models.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    assert changed(before, weights(md))
    if family == "sdxl":
        before2 = load_file(str(md.working / "text_encoder_2" / "model.safetensors"))
        assert before2  # both text encoders are written back


# --- bad input at the trainer level ----------------------------------------------------------------------------


def test_a_corrupt_image_is_skipped_and_the_run_goes_on(tmp_path, sd1, caplog):
    md = make_training_model(tmp_path, sd1, epochs=1)
    folder = tmp_path / "concept-m"
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 50)
    trainer = run(md)
    assert trainer.total_steps == 4 and json.loads(md.status_path.read_text())["state"] == "done"
    assert "broken.jpg" in caplog.text


def test_an_empty_instance_folder_fails_with_a_message(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1)
    for p in (tmp_path / "concept-m").iterdir():
        p.unlink()
    with pytest.raises(UserError) as err:
        run(md)
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and "concept-m" in status["message"] and err.value.hint


def test_disk_full_during_a_save_keeps_the_previous_save(tmp_path, sd1, monkeypatch):
    import dreambooth.train.resume as resume_module
    from dreambooth.train.resume import load_state

    md = make_training_model(tmp_path, sd1, epochs=2, save_every_n_epochs=1)
    real_save = resume_module.torch.save
    calls = []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(resume_module.torch, "save", full_disk)
    with pytest.raises(OSError):
        run(md)
    states = list_states(md.checkpoints)
    assert [p.name for p in states] == ["step_00000004"]
    assert load_state(states[0]).step == 4
    assert not [p for p in md.checkpoints.iterdir() if p.name.startswith(".")]  # no half-written folder left
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and "No space left" in status["message"]
    weights(md)  # working/ is still loadable


# --- controls and the remaining settings -----------------------------------------------------------------------


def test_sigterm_cancels_and_the_handlers_are_given_back(tmp_path, sd1, monkeypatch):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    original = Trainer._optimizer_step

    def step_then_signal(self, group):
        original(self, group)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)
    md = make_training_model(tmp_path, sd1, save_on_cancel=False, epochs=1)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=True))
    trainer.run()
    assert trainer.step == 2 and json.loads(md.status_path.read_text())["state"] == "cancelled"
    assert signal.getsignal(signal.SIGTERM) is before


def test_pause_request_holds_the_run_until_unpaused(tmp_path, sd1, monkeypatch):
    import threading

    from dreambooth.train.status import request_pause, request_unpause

    md = make_training_model(tmp_path, sd1, epochs=1)
    seen = []
    original = Trainer._optimizer_step

    def step(self, group):
        original(self, group)
        if self.step == 1:
            request_pause(md)
            threading.Timer(0.8, lambda: (seen.append(json.loads(md.status_path.read_text())["state"]),
                                          request_unpause(md))).start()

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    start = time.perf_counter()
    trainer = run(md)
    assert seen == ["paused"] and trainer.step == 4 and time.perf_counter() - start >= 0.8


def test_optimizer_settings_reach_the_optimizer(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1, images=1, text_encoder_ratio=1.0, learning_rate=3e-4,
                             text_encoder_learning_rate=2e-5, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-7)
    trainer = run(md)
    unet_group, te_group = trainer.optimizer.param_groups
    assert unet_group["lr"] == 3e-4 and te_group["lr"] == 2e-5
    for group in (unet_group, te_group):
        assert group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7


def test_shuffle_tags_and_keep_tokens_reach_the_prompts(tmp_path, sd1, monkeypatch):
    prompts = []
    real = batch_module.tokenize_prompts

    def spy(tokenizer, batch, mode):
        prompts.extend(batch)
        return real(tokenizer, batch, mode)

    monkeypatch.setattr(batch_module, "tokenize_prompts", spy)
    concept = {"instance_prompt": "zwx, red, round, shiny, small, bright"}
    run(make_training_model(tmp_path, sd1, epochs=3, shuffle_tags=True, keep_tokens=1, concept=concept))
    assert len(set(prompts)) > 1 and all(p.startswith("zwx, ") for p in prompts)
    prompts.clear()
    run(make_training_model(tmp_path, sd1, name="fixed", epochs=3, shuffle_tags=False, concept=concept))
    assert set(prompts) == {"zwx, red, round, shiny, small, bright"}


def test_resolution_and_buckets_set_the_latent_size(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1, resolution=48, enable_buckets=False)
    wide = tmp_path / "concept-m" / "wide.png"
    Image.new("RGB", (128, 64), (200, 10, 10)).save(wide)
    trainer = run(md)
    assert {tuple(v.shape[-2:]) for v in trainer.latents.entries.values()} == {(6, 6)}
    md = make_training_model(tmp_path, sd1, name="b", epochs=1, resolution=64, enable_buckets=True)
    Image.new("RGB", (128, 64), (200, 10, 10)).save(tmp_path / "concept-b" / "wide.png")
    trainer = run(md)
    shapes = {key[0].name: tuple(v.shape[-2:]) for key, v in trainer.latents.entries.items()}
    assert shapes["wide.png"][1] > shapes["wide.png"][0]  # wider than tall: no squashing into the square
    assert shapes["disc_00.png"] == (8, 8)


@pytest.mark.parametrize("sampler, label", [("euler_a", "Euler a"), ("ddim", "DDIM")])
def test_preview_sampler_is_the_chosen_one(tmp_path, sd1, sampler, label):
    md = make_training_model(tmp_path, sd1, epochs=1, images=1, preview_every_n_epochs=1, sample_scheduler=sampler)
    run(md)
    (sample,) = md.samples.glob("*.png")
    assert f"Sampler: {label}" in Image.open(sample).text["parameters"]
    assert json.loads(md.status_path.read_text())["samples"] == [str(sample)]


def test_nan_loss_stops_the_run_and_no_nan_is_saved(tmp_path, sd1, monkeypatch):
    from dreambooth.train import step as step_module

    real = step_module.compute_loss

    def poisoned(models, batch, settings, generator):
        loss, per = real(models, batch, settings, generator)
        if poisoned.calls >= 5:  # from step 6 on: the loss and, through backward, the weights go NaN
            loss = loss * float("nan")
        poisoned.calls += 1
        return loss, per

    poisoned.calls = 0
    monkeypatch.setattr(loop_module, "compute_loss", poisoned)
    md = make_training_model(tmp_path, sd1, epochs=3, save_every_n_epochs=1, save_checkpoint=True)
    with pytest.raises(UserError) as err:
        run(md, export_dir=tmp_path / "exports")
    # caught by whichever comes first: the loss at the next report, or the finiteness check of the next save
    message = err.value.message.lower()
    assert ("the loss became nan" in message or "no longer finite" in message) and "learning rate" in err.value.hint
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and status["step"] <= 8
    assert [p.name for p in list_states(md.checkpoints)] == ["step_00000004"]  # only the save before the NaN
    for component in ("unet",):
        assert all(torch.isfinite(t).all() for t in weights(md, component).values())
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["m_4.safetensors"]


def test_a_second_run_of_the_same_model_is_refused(tmp_path, sd1):
    from dreambooth.errors import StoreError
    from dreambooth.lock import acquire

    md = make_training_model(tmp_path, sd1, epochs=1, images=1)
    with acquire(md.path):  # another live process (this one) holds the model
        with pytest.raises(StoreError, match="already training"):
            Trainer(md, RunOptions(device="cpu", install_signal_handlers=False))
    run(md)  # free again afterwards
    assert not (md.path / "train.lock").exists()
