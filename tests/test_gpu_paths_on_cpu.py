"""The GPU's code paths, run on the CPU where torch and bitsandbytes allow it, through the trainer's own code.

- fp16 mixed precision: autocast to fp16 and a GradScaler, skipping the step whose gradients overflowed. torch 2.3+
  runs both on the CPU; the trainer uses them there when asked (``RunOptions.cpu_fp16`` / ``train --cpu-fp16``).
- 8-bit AdamW: bitsandbytes 0.50 runs its 8-bit optimizers on the CPU (uint8 states); the trainer uses it wherever
  one real step runs (``optimizers.adamw_8bit_problem``), through the whole-model, per-parameter and fused-backward
  optimizer paths, with its state in the resume states.

Each test is skipped, with the reason, where this torch / bitsandbytes cannot run the path (the host profile's
torch 2.1.2 and bitsandbytes 0.45.5); the current profile runs them all.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import cancelled_at, make_training_model
from conftest import train_here as run
from conftest import unet_weights as unet

from dreambooth import compat
from dreambooth.data.images import list_images
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.fused import ParamwiseOptimizer
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.models import load_models
from dreambooth.train.optimizers import adamw_8bit_problem
from dreambooth.train.resume import latest_state

needs_cpu_fp16 = pytest.mark.skipif(
    torch.float16 not in compat.autocast_dtypes("cpu") or not compat.grad_scaler_available("cpu"),
    reason=f"torch {torch.__version__} has no fp16 CPU autocast and no CPU grad scaler (torch 2.3+ has both)")
_EIGHT_BIT = adamw_8bit_problem("cpu")
needs_cpu_8bit = pytest.mark.skipif(_EIGHT_BIT is not None, reason=f"{_EIGHT_BIT}")


@pytest.fixture()
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


def losses(md) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(md.logs / "loss.csv"))]


# --------------------------------------------------------------------------------------------------- fp16 + scaler


@needs_cpu_fp16
def test_fp16_autocast_and_grad_scaler_train_on_the_cpu_when_asked(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, mixed_precision="fp16", epochs=2, images=2)
    before = unet(md)
    dtypes = []
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, cpu_fp16=True))
    real_setup = trainer._setup

    def setup():
        real_setup()
        trainer.models.unet.register_forward_hook(lambda m, a, out: dtypes.append(out.sample.dtype))

    trainer._setup = setup
    trainer.run()
    assert trainer.autocast is torch.float16 and isinstance(trainer.scaler, torch.amp.GradScaler)
    assert dtypes and set(dtypes) == {torch.float16}  # the UNet ran under fp16 autocast
    assert trainer.scaler.get_scale() > 1  # the loss was scaled (65536 at the start, halved on overflow only)
    after = unet(md)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(v.dtype == torch.float32 for v in after.values())  # fp32 weights, as with fp16 on a GPU


def test_fp16_on_the_cpu_trains_in_fp32_unless_asked(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, mixed_precision="fp16", epochs=1, images=1)
    trainer = run(md)
    assert trainer.autocast is None and trainer.scaler is None


@needs_cpu_fp16
def test_grad_scaler_skips_the_step_whose_gradients_overflowed(tmp_path, sd1):
    """An fp16 overflow (inf gradients) at step 2: the scaler skips that update and halves its scale; the weights stay
    finite and the run completes. Without the scaler the inf reaches the weights and the save refuses them."""
    md = make_training_model(tmp_path, sd1, mixed_precision="fp16", epochs=1, images=4, max_grad_norm=1.0)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, cpu_fp16=True))
    real_backward = trainer._backward
    scales = []

    def backward(group, settings, lrs):
        real_backward(group, settings, lrs)
        scales.append(trainer.scaler.get_scale())
        if trainer.step == 1:  # the second step: one gradient overflows, as an fp16 product can
            first = next(p for p in trainer.trained_params if p.grad is not None)
            first.grad.fill_(float("inf"))

    trainer._backward = backward
    trainer.run()
    assert trainer.step == 4 and trainer.status.status["state"] == "done"
    assert trainer.scaler.get_scale() == scales[0] / 2  # halved once, at the overflow
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {3}  # 4 steps, 1 skipped
    assert all(torch.isfinite(v).all() for v in unet(md).values())


# --------------------------------------------------------------------------------------------------- 8-bit AdamW


def _uint8_states(obj: object) -> int:
    """The uint8 tensors in an optimizer state dict (bitsandbytes nests them a level deeper in its saved form)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.dtype == torch.uint8)
    if isinstance(obj, dict):
        return sum(_uint8_states(v) for v in obj.values())
    return 0


@needs_cpu_8bit
def test_8bit_adamw_runs_on_the_cpu_learns_and_saves_uint8_states(tmp_path, sd1):
    settings = dict(epochs=6, images=4, learning_rate=1e-3, save_every_n_epochs=3)
    reference = make_training_model(tmp_path / "adamw", sd1, optimizer="adamw", **settings)
    md = make_training_model(tmp_path / "8bit", sd1, optimizer="adamw_8bit", **settings)
    images = list_images(tmp_path / "8bit" / "concept-m")
    base = evaluation_loss(load_models(md.working, "sd1"), images, "a photo of zwx disc", 64)
    run(reference)
    trainer = run(md)
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    assert "AdamW instead" not in trainer.status.status.get("note", "")  # no fallback reported
    state = latest_state(md.checkpoints)
    assert state.step == 24 and _uint8_states(state.trainer["optimizer"]) > 0
    adamw = evaluation_loss(load_models(reference.working, "sd1"), images, "a photo of zwx disc", 64)
    eight = evaluation_loss(load_models(md.working, "sd1"), images, "a photo of zwx disc", 64)
    # 8-bit states quantize the moments, not the update rule: it learns about as much as AdamW in the same run
    assert base - eight > 0.5 * (base - adamw) > 0, (base, adamw, eight)


@needs_cpu_8bit
@pytest.mark.parametrize("path", ["whole", "fused", "bf16_master"])
def test_8bit_adamw_resumes_exactly_on_every_optimizer_path(tmp_path, sd1, path):
    extra = {"whole": {}, "fused": dict(fused_backward_step=True, max_grad_norm=0.0),
             "bf16_master": dict(mixed_precision="bf16", weight_precision="bf16_master")}[path]
    settings = dict(optimizer="adamw_8bit", epochs=2, images=2, save_every_n_epochs=1, save_on_cancel=True, **extra)
    reference = make_training_model(tmp_path / "ref", sd1, **settings)
    ref_trainer = run(reference)
    md = make_training_model(tmp_path / "run", sd1, **settings)
    with cancelled_at(2):
        run(md)
    assert _uint8_states(latest_state(md.checkpoints).trainer["optimizer"]) > 0
    trainer = run(md, resume=True)
    assert trainer.step == 4
    inner = trainer.optimizer
    if path != "whole":
        assert isinstance(inner, ParamwiseOptimizer)
        inner = inner.buckets[0].optimizer  # the bucket updates' inner optimizers (one per parameter too)
        assert all(type(opt).__name__ == "AdamW8bit" for opt, *_ in trainer.optimizer.inner.values())
    assert type(inner).__name__ == "AdamW8bit"
    assert _uint8_states(trainer.optimizer.state_dict()) == _uint8_states(ref_trainer.optimizer.state_dict()) > 0
    a, b = unet(reference), unet(md)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one, bit for bit
    assert losses(md)[-2:] == losses(reference)[-2:]
