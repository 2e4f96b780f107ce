"""Hypernetwork as a training method: it learns, leaves the base model bitwise unchanged, exports a WebUI
hypernetwork file, previews with it, and resumes."""

from __future__ import annotations

import pytest
import torch
from conftest import cancelled_at, make_training_model, working_files
from test_hypernetwork import webui_safe_check

from dreambooth.data.images import list_images
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.hypernetwork import Hypernetwork, HypernetworkSettings, load_hypernetwork
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.models import load_models

PROMPT = "a photo of zwx disc"
SETTINGS = dict(method="hypernetwork", hypernetwork_layer_structure="1, 2, 1", hypernetwork_activation="relu",
                hypernetwork_layer_norm=False, learning_rate=1e-2)


def _run(md, tmp_path, **opts):
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False,
                                     hypernetworks_dir=tmp_path / "hypernetworks", **opts))
    trainer.run()
    return trainer


def test_hypernetwork_trains_leaves_the_model_unchanged_and_exports(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=2, save_checkpoint=True,
                             preview_every_n_epochs=2, **SETTINGS)
    before = working_files(md)
    trainer = _run(md, tmp_path)
    assert working_files(md) == before  # the base model is bitwise unchanged
    assert not (tmp_path / "Stable-diffusion").exists()  # no checkpoint export for a hypernetwork
    exported = tmp_path / "hypernetworks" / f"m_{trainer.total_steps}.pt"
    webui_safe_check(exported)
    state = torch.load(exported, map_location="cpu", weights_only=True)
    assert state["name"] == exported.stem and state["step"] == trainer.total_steps
    assert state["activation_func"] == "relu" and [k for k in state if isinstance(k, int)] == [32]
    assert (md.path / "hypernetwork" / "m.pt").is_file()
    assert trainer.previews == [trainer.total_steps]  # previews ran with the hypernetwork hooked in
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # the run's seed: the same initial weights
        initial = Hypernetwork([32], HypernetworkSettings("1, 2, 1", "relu"))
    for which in (0, 1):
        changed = [k for k, v in initial.module(32, "kv"[which]).state_dict().items()
                   if not torch.equal(v, state[32][which][k])]
        assert changed, "the hypernetwork's weights did not change"


@pytest.mark.slow
def test_hypernetwork_learns(tmp_path, tiny_checkpoint):
    # the tiny base is random, not a denoiser, and a hypernetwork only reshapes the attention keys and values:
    # measured 1.8% lower evaluation loss after 40 steps (it plateaus near 2.3%)
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=10, **{
        **SETTINGS, "hypernetwork_layer_structure": "1, 4, 1", "learning_rate": 5e-2})
    images = list_images(tmp_path / "concept-m")
    base_models = load_models(md.working, "sd1")
    base_loss = evaluation_loss(base_models, images, PROMPT, 64)
    _run(md, tmp_path)
    # the file, applied to a fresh copy of the base model, lowers the loss on the instance images
    network = load_hypernetwork(md.path / "hypernetwork" / "m.pt")
    network.attach(base_models.unet, (base_models.vae, *base_models.text_encoders))
    trained_loss = evaluation_loss(base_models, images, PROMPT, 64)
    assert trained_loss <= 0.99 * base_loss, (base_loss, trained_loss)
    network.multiplier = 0.0  # strength 0: the base model again
    assert evaluation_loss(base_models, images, PROMPT, 64) == pytest.approx(base_loss, rel=1e-5)


def test_the_settings_reach_the_trained_file(tmp_path, tiny_checkpoint):
    # what each setting computes is in test_hypernetwork.py; here: the config's values reach the network and file
    runs = {"plain": dict(hypernetwork_activation="relu"),
            "all": dict(hypernetwork_layer_structure="1, 1.5, 1.5, 1", hypernetwork_layer_norm=True,
                        hypernetwork_dropout=0.5, hypernetwork_activation="tanh")}
    states = {}
    for name, extra in runs.items():
        md = make_training_model(tmp_path / name, tiny_checkpoint("sd1"), images=2, epochs=1, **{**SETTINGS, **extra})
        _run(md, tmp_path / name)
        states[name] = torch.load(md.path / "hypernetwork" / "m.pt", weights_only=True)
    plain, changed = states["plain"], states["all"]
    assert plain["layer_structure"] == [1.0, 2.0, 1.0] and sorted(plain[32][0]) == [
        "linear.0.bias", "linear.0.weight", "linear.2.bias", "linear.2.weight"]  # Linear, ReLU, Linear
    assert plain["dropout_structure"] == [0.0, 0.0, 0.0] and not plain["use_dropout"]
    assert changed["layer_structure"] == [1.0, 1.5, 1.5, 1.0] and changed["activation_func"] == "tanh"
    assert changed["is_layer_norm"] and changed["dropout_structure"] == [0.0, 0.5, 0.5, 0.0]
    shapes = {k: tuple(v.shape) for k, v in changed[32][0].items() if k.endswith("weight")}
    # Linear 32->48, Tanh, LayerNorm, Dropout, Linear 48->48, Tanh, LayerNorm, Dropout, Linear 48->32, LayerNorm
    assert shapes == {"linear.0.weight": (48, 32), "linear.2.weight": (48,), "linear.4.weight": (48, 48),
                      "linear.6.weight": (48,), "linear.8.weight": (32, 48), "linear.9.weight": (32,)}


def test_hypernetwork_resume_continues_the_same_run(tmp_path, tiny_checkpoint):
    settings = dict(epochs=2, save_every_n_epochs=1, **SETTINGS)
    reference = make_training_model(tmp_path / "ref", tiny_checkpoint("sd1"), **settings)
    _run(reference, tmp_path / "ref")
    md = make_training_model(tmp_path / "run", tiny_checkpoint("sd1"), save_on_cancel=True, **settings)
    with cancelled_at(3):
        _run(md, tmp_path / "run")
    assert _run(md, tmp_path / "run", resume=True).step == 8
    a = torch.load(reference.path / "hypernetwork" / "m.pt", weights_only=True)
    b = torch.load(md.path / "hypernetwork" / "m.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for which in (0, 1):
        for key, value in a[32][which].items():
            torch.testing.assert_close(value, b[32][which][key], rtol=1e-4, atol=1e-6)
