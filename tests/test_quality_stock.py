"""The quality benchmark's ecosystem side (bench/quality/stock.py): diffusers' own single-file loader reads our
checkpoints, and the small LoRA and hypernetwork readers written from the file formats compute what our trainer's
networks compute, so the benchmark measures our files, not a reader's mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lora import LOCON, outputs, randomize

from bench.quality import stock
from dreambooth.create import create_model
from dreambooth.train.hypernetwork import Hypernetwork, HypernetworkSettings, save_hypernetwork
from dreambooth.train.lora import LoraNetwork, save_lora
from dreambooth.train.models import load_models


@pytest.fixture(scope="module")
def tiny_pipe(tiny_checkpoint, tmp_path_factory):
    """(checkpoint, config folder) of the tiny random SD 1.x model."""
    source = tiny_checkpoint("sd1")
    folder = stock.write_config_folder(tmp_path_factory.mktemp("config"), stock.file_configs(source))
    return source, folder


def _ours(tmp_path, source):
    return load_models(create_model(source, "m", tmp_path).working, "sd1")


def _modules(pipe) -> dict:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def test_diffusers_reads_our_checkpoint_as_we_do(tmp_path, tiny_pipe):
    source, folder = tiny_pipe
    pipe = stock.load_pipeline(source, folder)
    ours = _ours(tmp_path, source)
    theirs = outputs("sd1", _modules(pipe))
    assert all(torch.equal(theirs[k], v) for k, v in outputs("sd1", {"unet": ours.unet,
                                                                      "text_encoder": ours.text_encoders[0]}).items())
    first = stock.sample(pipe, "a red circle", 2, seed=3, steps=2)
    assert [i.shape for i in first] == [(64, 64, 3)] * 2 and first[0].dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, stock.sample(pipe, "a red circle", 2, seed=3, steps=2),
                                                      strict=True))


def test_the_lora_reader_merges_what_our_network_computes(tmp_path, tiny_pipe):
    source, folder = tiny_pipe
    ours = _ours(tmp_path, source)
    network = LoraNetwork(ours, LOCON, "sd1")
    randomize(network)
    network.multiplier = 0.8
    path = save_lora(tmp_path / "lora.safetensors", network, {}, dtype=torch.float32)
    pipe = stock.load_pipeline(source, folder)
    base = outputs("sd1", _modules(pipe))
    merged = stock.merge_kohya_lora(pipe, path, multiplier=0.8)
    assert merged == len(network.names())
    expected = outputs("sd1", {"unet": ours.unet, "text_encoder": ours.text_encoders[0]})
    got = outputs("sd1", _modules(pipe))
    assert max((expected[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the LoRA changes the model
    assert max((expected[k] - got[k]).abs().max().item() for k in base) <= 1e-4


def test_a_lora_layer_the_model_lacks_is_refused(tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    source, folder = tiny_pipe
    path = tmp_path / "stray.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 4), "lora_unet_nowhere.lora_up.weight":
               torch.zeros(4, 1)}, str(path))
    with pytest.raises(ValueError, match="match no module"):
        stock.merge_kohya_lora(stock.load_pipeline(source, folder), path)


@pytest.mark.parametrize("settings", [HypernetworkSettings("1, 2, 1", "relu"),
                                      HypernetworkSettings("1, 1.5, 1.5, 1", "tanh", layer_norm=True, dropout=0.3)],
                         ids=["relu", "tanh-norm-dropout"])
def test_the_hypernetwork_reader_computes_what_our_network_computes(tmp_path, tiny_pipe, settings):
    source, folder = tiny_pipe
    ours = _ours(tmp_path, source)
    torch.manual_seed(0)
    network = Hypernetwork([32], settings)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    network.attach(ours.unet)
    ours.unet.eval()
    network.eval()
    path = save_hypernetwork(tmp_path / "hn.pt", network, name="hn", step=1)
    pipe = stock.load_pipeline(source, folder)
    base = outputs("sd1", _modules(pipe))["unet"]
    assert stock.hook_hypernetwork(pipe, path) == len(network.hooked)
    expected = outputs("sd1", {"unet": ours.unet})["unet"]
    got = outputs("sd1", {"unet": pipe.unet})["unet"]
    assert (expected - base).abs().max().item() > 1e-3
    assert (expected - got).abs().max().item() <= 1e-4
