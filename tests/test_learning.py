"""Training works: the evaluation loss on the instance images drops, and prior preservation protects the class."""

from __future__ import annotations

import pytest
from conftest import make_training_model

from dreambooth.data.images import list_images
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.models import load_models

pytestmark = pytest.mark.slow  # end-to-end training runs: skipped in the second CI profile

PROMPT = "a photo of zwx disc"
CLASS_PROMPT = "a photo of a disc"


def _eval(md, images, prompt):
    return evaluation_loss(load_models(md.working, "sd1"), images, prompt, 64)


def _train(md):
    Trainer(md, RunOptions(device="cpu", install_signal_handlers=False)).run()


def test_instance_loss_drops_by_at_least_30_percent(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=15, learning_rate=1e-3)
    images = list_images(tmp_path / "concept-m")
    before = _eval(md, images, PROMPT)
    _train(md)
    after = _eval(md, images, PROMPT)
    assert after <= 0.7 * before, (before, after)


@pytest.fixture(scope="module")
def prior_runs(tmp_path_factory, tiny_checkpoint):
    """The same training with prior preservation off and on; the class loss before and after each."""
    root = tmp_path_factory.mktemp("prior")
    source = tiny_checkpoint("sd1")
    settings = dict(epochs=8, learning_rate=1e-3, prior_loss_weight=1.0)
    concept = {"class_prompt": CLASS_PROMPT, "class_infer_steps": 2, "num_class_images_per": 1,
               "class_data_dir": str(root / "classes")}
    with_prior = make_training_model(root, source, name="with", concept=concept, **settings)
    without = make_training_model(root, source, name="without", concept={**concept, "num_class_images_per": 0},
                                  **settings)
    _train(with_prior)  # generates the class images first, with the untrained model
    class_images = list_images(root / "classes", "class images")
    before = _eval(without, class_images, CLASS_PROMPT)
    _train(without)
    return {"class_images": class_images, "before": before,
            "with": _eval(with_prior, class_images, CLASS_PROMPT),
            "without": _eval(without, class_images, CLASS_PROMPT)}


def test_class_images_are_generated_once_per_instance_image(prior_runs):
    assert len(prior_runs["class_images"]) == 4


def test_prior_preservation_protects_the_class(prior_runs):
    rise_with = prior_runs["with"] - prior_runs["before"]
    rise_without = prior_runs["without"] - prior_runs["before"]
    assert rise_with < rise_without, prior_runs
