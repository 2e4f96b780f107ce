"""A tiny training run with each of LoHa, LoKr and DoRA, the adapter at its default settings: the file the run exports
has the WebUI's keys for that type and every module is matched by the WebUI's rules; the WebUI's formula applied to the
exported tensors gives the weight change of our adapter; and the model so patched has learned (its loss on the
instance images is below the untrained model's, both measured here).

The WebUI side (module lookup, module type, formula) is the test-side re-implementation in test_lora / test_lora_types.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import cancelled_at, make_training_model, working_files
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import webui_find, webui_layer_mapping
from test_lora_types import NEW_TYPES, READ_KEYS, WEBUI_TYPE, by_module, webui_module_type, webui_updown

from dreambooth.config import TrainConfig, load_config
from dreambooth.data.images import list_images
from dreambooth.families import SD1
from dreambooth.train.evaluate import evaluation_loss
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.lora import LoraNetwork
from dreambooth.train.models import load_models

pytestmark = pytest.mark.slow  # end-to-end training runs

PROMPT = "a photo of zwx disc"
ADAPTER_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_conv_rank", "lora_conv_alpha", "lora_lokr_factor",
                    "lora_lokr_decompose_both")


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_tiny_run_exports_what_the_webui_loads_and_learns(tmp_path, tiny_checkpoint, kind):
    md = make_training_model(tmp_path, tiny_checkpoint(SD1), method="lora", lora_type=kind, epochs=20,
                             learning_rate=5e-3, text_encoder_ratio=1.0, save_checkpoint=True)
    cfg, defaults = load_config(md.path), TrainConfig()
    assert all(getattr(cfg, n) == getattr(defaults, n) for n in ADAPTER_SETTINGS)  # the type's default settings
    images = list_images(tmp_path / "concept-m")
    before = working_files(md)
    base_loss = evaluation_loss(load_models(md.working, SD1), images, PROMPT, 64)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "Lora"))
    trainer.run()
    assert working_files(md) == before  # the base model is bitwise unchanged
    trained = trainer.method.network

    # the exported file: the WebUI's keys for the type, every module matched, the metadata LyCORIS writes
    exported = tmp_path / "Lora" / f"m_{trainer.total_steps}.safetensors"
    modules = by_module(load_file(str(exported)))
    assert set(modules) == set(trained.names())
    assert any(n.startswith("lora_te_") for n in modules) and any(n.startswith("lora_unet_") for n in modules)
    mapping = webui_layer_mapping(SD1)
    unmatched = [n for n in modules if webui_find(n, mapping)[1] is None]
    print(f"{kind}: the WebUI matches {len(modules) - len(unmatched)} of {len(modules)} modules")
    assert not unmatched, unmatched[:5]
    for name, tensors in modules.items():
        assert webui_module_type(set(tensors)) == WEBUI_TYPE[kind], (name, sorted(tensors))
        assert set(tensors) <= READ_KEYS[WEBUI_TYPE[kind]] and "alpha" in tensors
        assert ("dora_scale" in tensors) == (kind == "dora")
    with safe_open(str(exported), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == {"dora": "lora"}.get(kind, kind)

    # the WebUI's formula on the file's tensors == our adapter's weight change (exactly for the file's values; for the
    # trained fp32 values up to the fp16 rounding of the export)
    models = load_models(md.working, SD1)
    network = LoraNetwork(models, dataclasses.replace(trained.settings), SD1)
    layers = network.adapted_layers()
    network.load_kohya_state_dict(load_file(str(exported)))
    theirs = {}
    for name, layer in layers.items():
        base = layer.weight.detach().float()
        theirs[name] = webui_updown({k: v.float() for k, v in modules[name].items()}, base, 1.0)
        ours = network.lora_modules[name].delta_weight(layer.weight).float()
        torch.testing.assert_close(theirs[name], ours, rtol=1e-4, atol=1e-6 * base.abs().max().item())
        fp32 = trained.lora_modules[name].delta_weight(layer.weight).float()
        # the file is fp16: a factor rounds by ~5e-4 of its size, and DoRA's magnitude is the size of the weight
        assert (theirs[name] - fp32).norm() <= 1e-2 * fp32.norm() + 2e-3 * base.norm(), name
    wrapped_loss = evaluation_loss(models, images, PROMPT, 64)
    network.remove()

    # the model as the WebUI patches it has learned: its loss below the untrained model's
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.add_(theirs[name].to(layer.weight.dtype))
    patched_loss = evaluation_loss(models, images, PROMPT, 64)
    print(f"{kind}: loss untrained {base_loss:.5f}, trained (WebUI patch) {patched_loss:.5f}, ours {wrapped_loss:.5f}")
    assert patched_loss == pytest.approx(wrapped_loss, rel=1e-4)
    assert patched_loss <= 0.995 * base_loss, (base_loss, patched_loss)


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_resume_continues_the_same_run(tmp_path, tiny_checkpoint, kind):
    """Cancelled at step 3 and resumed, a run of each type ends where the uninterrupted run ends."""
    settings = dict(method="lora", lora_type=kind, lora_rank=4, learning_rate=1e-2, epochs=2, save_every_n_epochs=1)
    reference = make_training_model(tmp_path / "ref", tiny_checkpoint(SD1), **settings)
    Trainer(reference, RunOptions(device="cpu", install_signal_handlers=False)).run()
    md = make_training_model(tmp_path / "run", tiny_checkpoint(SD1), save_on_cancel=True, **settings)
    with cancelled_at(3):
        Trainer(md, RunOptions(device="cpu", install_signal_handlers=False)).run()
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, resume=True))
    trainer.run()
    assert trainer.step == 8
    a = load_file(str(reference.path / "lora" / "m.safetensors"))
    b = load_file(str(md.path / "lora" / "m.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)
