"""LoRA as a training method: it learns, leaves the base model bitwise unchanged, exports a WebUI LoRA, resumes."""

from __future__ import annotations

import pytest
import torch
from conftest import cancelled_at, make_training_model, working_files
from safetensors import safe_open
from safetensors.torch import load_file
from world_learning import LEARNT, base_shares, pipeline, subject_share, train

from bench.quality import run
from dreambooth import sample as sample_module
from dreambooth.data.images import list_images
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.lora import LoraNetwork, LoraSettings
from dreambooth.train.models import load_models

LORA_LR, LORA_EPOCHS = 1e-3, 20


def _run(md, tmp_path, **opts):
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "Lora", **opts))
    trainer.run()
    return trainer


def _with_lora(md, lora_file, rank, alpha):
    models = load_models(md.working, "sd1")
    settings = LoraSettings(rank=rank, alpha=alpha, conv_rank=rank, conv_alpha=alpha, train_text_encoder=False)
    network = LoraNetwork(models, settings, "sd1")
    network.load_kohya_state_dict(load_file(str(lora_file)))
    return models, network


@pytest.mark.slow
def test_lora_learns_and_leaves_the_base_model_unchanged(tmp_path):
    # LoRA + LoCon on the pretrained world model: the stock pipeline with the exported file merged in draws the
    # subject the base draws in about one sample of a hundred
    md = run.subject_model(tmp_path, "m", dict(method="lora", lora_rank=8, lora_alpha=8.0, lora_conv_rank=8,
                                               lora_conv_alpha=8.0, learning_rate=LORA_LR, epochs=LORA_EPOCHS))
    before = working_files(md)
    trainer = train(md, tmp_path)
    assert working_files(md) == before  # the base model is bitwise unchanged
    exported = tmp_path / "Lora" / f"m_{trainer.total_steps}.safetensors"
    state = load_file(str(exported))
    assert all(k.startswith("lora_unet_") for k in state)  # the text encoder was not trained
    assert any("resnets" in k for k in state)  # LoCon: the convolutions too
    with safe_open(str(exported), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_output_name"] == exported.stem and "conv_dim" in meta["ss_network_args"]
    share = subject_share(pipeline(exported, "lora"))
    assert share >= base_shares()[0] + LEARNT, (base_shares(), share)
    models, network = _with_lora(md, exported, 8, 8.0)
    images = list_images(tmp_path / "instances")
    base_loss = evaluation_loss(load_models(md.working, "sd1"), images, run.INSTANCE_PROMPT, 64)
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) < base_loss
    network.multiplier = 0.0  # the LoRA off: the base model again
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) == pytest.approx(base_loss, rel=1e-5)


def test_lora_resume_continues_the_same_run(tmp_path, tiny_checkpoint):
    settings = dict(method="lora", lora_rank=4, learning_rate=1e-2, epochs=2, save_every_n_epochs=1)
    reference = make_training_model(tmp_path / "ref", tiny_checkpoint("sd1"), **settings)
    _run(reference, tmp_path / "ref")
    md = make_training_model(tmp_path / "run", tiny_checkpoint("sd1"), save_on_cancel=True, **settings)
    with cancelled_at(3):
        _run(md, tmp_path / "run")
    trainer = _run(md, tmp_path / "run", resume=True)
    assert trainer.step == 8
    a = load_file(str(reference.path / "lora" / "m.safetensors"))
    b = load_file(str(md.path / "lora" / "m.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)


def test_lora_previews_use_the_lora(tmp_path, tiny_checkpoint, monkeypatch):
    seen = []
    real = sample_module.generate

    def spy(pipe, req, device=None, autocast=None):
        seen.append(pipe.unet is not None and any(len(m._forward_hooks) for m in pipe.unet.modules()))
        return real(pipe, req, device, autocast)

    monkeypatch.setattr(sample_module, "generate", spy)
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="lora", epochs=1, images=1,
                             preview_every_n_epochs=1)
    _run(md, tmp_path)
    assert seen == [True]
