"""Training teaches: full DreamBooth, DreamBooth with prior preservation, text-encoder training and EMA learn the
subject of the synthetic world into the tiny pretrained base model (bench/quality), as the stock diffusers pipeline
sees the exported checkpoint; prior preservation keeps the class word's meaning (the DreamBooth paper's ablation,
on and off in one run).

The base draws the subject in about one sample of a hundred; a run that learnt it, in most. The margins below
are that large effect, not thresholds tuned to a machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from world_learning import LEARNT, base_shares, pipeline, subject_share, train

from bench.quality import run, world
from bench.quality.measures import CLASS_PROMPT
from dreambooth.data.images import list_images

DREAMBOOTH = dict(method="dreambooth", learning_rate=2e-4, epochs=20)


def _exported(trainer) -> Path:
    return Path(trainer.status.status["last_export"])


def test_dreambooth_learns_the_subject(tmp_path):
    md = run.subject_model(tmp_path, "db", DREAMBOOTH)
    share = subject_share(pipeline(_exported(train(md, tmp_path))))
    assert share >= base_shares()[0] + LEARNT, (base_shares(), share)


def test_text_encoder_training_alone_learns_the_subject(tmp_path):
    md = run.subject_model(tmp_path, "te", {**DREAMBOOTH, "train_unet": False, "text_encoder_ratio": 1.0,
                                             "text_encoder_learning_rate": 1e-3})
    trainer = train(md, tmp_path)
    share = subject_share(pipeline(_exported(trainer)))
    assert share >= base_shares()[0] + LEARNT, (base_shares(), share)


def test_the_ema_weights_learn_the_subject_too(tmp_path):
    md = run.subject_model(tmp_path, "ema", {**DREAMBOOTH, "use_ema": True, "ema_decay": 0.95, "export_ema": True})
    share = subject_share(pipeline(_exported(train(md, tmp_path))))
    assert share >= base_shares()[0] + LEARNT, (base_shares(), share)


@pytest.fixture(scope="module")
def prior_runs(tmp_path_factory):
    """The same DreamBooth run with prior preservation off and on: how often "a star" then draws the subject."""
    root = tmp_path_factory.mktemp("prior")
    concept = dict(class_prompt=CLASS_PROMPT.text, class_infer_steps=20, num_class_images_per=2)
    runs = {}
    for name, per in (("without", 0), ("with", 2)):
        md = run.subject_model(root, name, {**DREAMBOOTH, "prior_loss_weight": 1.0,
                                            "concept": {**concept, "num_class_images_per": per}})
        trainer = train(md, root)
        pipe = pipeline(_exported(trainer))
        runs[name] = {"drift": subject_share(pipe, CLASS_PROMPT.text), "subject": subject_share(pipe)}
    runs["class_images"] = list_images(root / "class-with", "class images")
    return runs


@pytest.mark.slow
def test_class_images_are_generated_once_per_instance_image(prior_runs):
    assert len(prior_runs["class_images"]) == 2 * len(world.SUBJECT_INSTANCES)


@pytest.mark.slow
def test_prior_preservation_keeps_the_class_word(prior_runs):
    """Without prior preservation "a star" drifts towards the subject; with it, much less, and both learn it."""
    without, with_prior = prior_runs["without"], prior_runs["with"]
    assert without["drift"] >= base_shares()[1] + LEARNT, prior_runs
    assert with_prior["drift"] <= without["drift"] - 0.3, prior_runs
    assert with_prior["subject"] >= base_shares()[0] + LEARNT, prior_runs
