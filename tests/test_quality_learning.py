"""Training teaches, on the tiny pretrained world model (bench/quality): full DreamBooth, text-encoder training, EMA,
LoRA + LoCon, textual inversion and a hypernetwork learn the subject of the synthetic world, as the stock diffusers
pipeline sees the exported file; prior preservation keeps the class word's meaning (the DreamBooth paper's
ablation, on and off in one run).

The base draws the subject in about one sample of a hundred; a run that learnt it, in most. The margins below are
that large effect, not thresholds tuned to a machine. These tests need the shipped base
(bench/quality/assets/world-sd1.safetensors, built by ``python -m bench.quality.pretrain``); until it is in the
repository they are skipped, and the random-model learning tests (test_learning.py, test_lora_training.py, ...)
are the ones that run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from world_learning import BASE, LEARNT, base_shares, pipeline, subject_share, train

from bench.quality import run, world
from bench.quality.measures import CLASS_PROMPT
from dreambooth.data.images import list_images
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.hypernetwork import load_hypernetwork
from dreambooth.train.lora import LoraNetwork, LoraSettings
from dreambooth.train.models import load_models

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not BASE.is_file(), reason=f"{BASE.name} not built yet "
                                                   "(python -m bench.quality.pretrain --out <it>)")]

DREAMBOOTH = dict(method="dreambooth", learning_rate=2e-4, epochs=20)
LORA = dict(method="lora", lora_rank=8, lora_alpha=8.0, lora_conv_rank=8, lora_conv_alpha=8.0, learning_rate=1e-3,
            epochs=20)
TEXTUAL_INVERSION = dict(method="textual_inversion", embedding_token=world.SUBJECT_WORD,
                         embedding_init_word=world.CLASS_WORD, embedding_vectors=1, learning_rate=5e-3, epochs=20)
HYPERNETWORK = dict(method="hypernetwork", hypernetwork_layer_structure="1, 2, 1", hypernetwork_activation="relu",
                    hypernetwork_layer_norm=False, learning_rate=1e-3, epochs=20)


def _exported(trainer) -> Path:
    return Path(trainer.status.status["last_export"])


def _learnt(share: float) -> None:
    assert share >= base_shares()[0] + LEARNT, (base_shares(), share)


def test_dreambooth_learns_the_subject(tmp_path):
    md = run.subject_model(tmp_path, "db", DREAMBOOTH)
    _learnt(subject_share(pipeline(_exported(train(md, tmp_path)))))


def test_text_encoder_training_alone_learns_the_subject(tmp_path):
    md = run.subject_model(tmp_path, "te", {**DREAMBOOTH, "train_unet": False, "text_encoder_ratio": 1.0,
                                             "text_encoder_learning_rate": 1e-3})
    _learnt(subject_share(pipeline(_exported(train(md, tmp_path)))))


def test_the_ema_weights_learn_the_subject_too(tmp_path):
    md = run.subject_model(tmp_path, "ema", {**DREAMBOOTH, "use_ema": True, "ema_decay": 0.95, "export_ema": True})
    _learnt(subject_share(pipeline(_exported(train(md, tmp_path)))))


def test_lora_and_locon_learn_and_switch_off_exactly(tmp_path):
    md = run.subject_model(tmp_path, "m", LORA)
    trainer = train(md, tmp_path)
    exported = tmp_path / "Lora" / f"m_{trainer.total_steps}.safetensors"
    assert any("resnets" in k for k in load_file(str(exported)))  # LoCon: the convolutions too
    with safe_open(str(exported), "pt") as fh:
        assert "conv_dim" in fh.metadata()["ss_network_args"]
    _learnt(subject_share(pipeline(exported, "lora")))
    models = load_models(md.working, "sd1")
    images = list_images(tmp_path / "instances")
    base_loss = evaluation_loss(models, images, run.INSTANCE_PROMPT, 64)
    network = LoraNetwork(models, LoraSettings(rank=8, alpha=8.0, conv_rank=8, conv_alpha=8.0,
                                               train_text_encoder=False), "sd1")
    network.load_kohya_state_dict(load_file(str(exported)))
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) < base_loss
    network.multiplier = 0.0  # the LoRA off: the base model again
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) == pytest.approx(base_loss, rel=1e-5)


def test_textual_inversion_learns_the_subject(tmp_path):
    train(run.subject_model(tmp_path, "m", TEXTUAL_INVERSION), tmp_path)
    exported = tmp_path / "embeddings" / f"{world.SUBJECT_WORD}.safetensors"
    _learnt(subject_share(pipeline(exported, "textual_inversion")))


def test_hypernetwork_learns_and_strength_zero_is_the_base(tmp_path):
    md = run.subject_model(tmp_path, "m", HYPERNETWORK)
    trainer = train(md, tmp_path)
    exported = tmp_path / "hypernetworks" / f"m_{trainer.total_steps}.pt"
    _learnt(subject_share(pipeline(exported, "hypernetwork")))
    models = load_models(md.working, "sd1")
    images = list_images(tmp_path / "instances")
    base_loss = evaluation_loss(models, images, run.INSTANCE_PROMPT, 64)
    network = load_hypernetwork(exported)
    network.attach(models.unet, (models.vae, *models.text_encoders))
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) < base_loss
    network.multiplier = 0.0  # strength 0: the base model again
    assert evaluation_loss(models, images, run.INSTANCE_PROMPT, 64) == pytest.approx(base_loss, rel=1e-5)


@pytest.fixture(scope="module")
def prior_runs(tmp_path_factory):
    """The same DreamBooth run with prior preservation off and on: how often "a star" then draws the subject."""
    root = tmp_path_factory.mktemp("prior")
    concept = dict(class_prompt=CLASS_PROMPT.text, class_infer_steps=20)
    runs = {}
    for name, per in (("without", 0), ("with", 2)):
        md = run.subject_model(root, name, {**DREAMBOOTH, "prior_loss_weight": 1.0,
                                            "concept": {**concept, "num_class_images_per": per}})
        pipe = pipeline(_exported(train(md, root)))
        runs[name] = {"drift": subject_share(pipe, CLASS_PROMPT.text), "subject": subject_share(pipe)}
    runs["class_images"] = list_images(root / "class-with", "class images")
    return runs


def test_class_images_are_generated_once_per_instance_image(prior_runs):
    assert len(prior_runs["class_images"]) == 2 * len(world.SUBJECT_INSTANCES)


def test_prior_preservation_keeps_the_class_word(prior_runs):
    """Without prior preservation "a star" drifts towards the subject; with it, much less, and both learn it."""
    without, with_prior = prior_runs["without"], prior_runs["with"]
    assert without["drift"] >= base_shares()[1] + LEARNT, prior_runs
    assert with_prior["drift"] <= without["drift"] - 0.3, prior_runs
    assert with_prior["subject"] >= base_shares()[0] + LEARNT, prior_runs
