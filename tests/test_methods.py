"""Training methods behind one interface: a new method is one class and one registration line (here both in this
test file), the built-in ones each live in their own file, and the loop never asks which method it runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import cancelled_at, make_training_model, working_files
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import METHODS, TrainConfig, coerce, field_specs
from dreambooth.errors import UserError
from dreambooth.profiles import PARAMS, estimate_memory
from dreambooth.train import batch as batch_module
from dreambooth.train import loop as loop_module
from dreambooth.train.hypernetwork import Hypernetwork, HypernetworkSettings
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.methods import ParamGroup, SavePoint, TrainingMethod, Weights, method_class
from dreambooth.train.methods.base import tensor_bytes
from dreambooth.working import save_tensors

PACKAGE = Path(loop_module.__file__).resolve().parents[1]  # dreambooth/


class BiasOnly(TrainingMethod):
    """A throw-away method: only the UNet's last bias trains, the word 'zwx' is doubled in every prompt, and a save
    writes the bias as one file."""

    name = "bias_only"

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        m = self.models
        for module in (m.unet, m.vae, *m.text_encoders):
            module.requires_grad_(False)
        self.bias = m.unet.conv_out.bias
        self.bias.requires_grad_(True)
        return [ParamGroup([self.bias], self.cfg.learning_rate)]

    def expand_prompt(self, prompt: str) -> str:
        return prompt.replace("zwx", "zwx zwx")

    def trained_weights(self) -> Weights:
        return {"bias": {"conv_out.bias": self.bias.detach().cpu().clone()}}

    def load_weights(self, weights: Weights) -> None:
        with torch.no_grad():
            self.bias.copy_(weights["bias"]["conv_out.bias"])

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        return {self.model.path / "bias": tensor_bytes(weights)}

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        save_tensors(self.model.path / "bias" / f"bias_{at.revision}.safetensors", weights["bias"])
        return []


@pytest.fixture
def bias_only(monkeypatch):
    monkeypatch.setitem(METHODS, BiasOnly.name, f"{__name__}:BiasOnly")  # the one registration line


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


def _run(md, resume: bool = False) -> Trainer:
    trainer = Trainer(md, RunOptions(device="cpu", resume=resume, install_signal_handlers=False))
    trainer.run()
    return trainer


def test_a_method_in_one_file_with_one_registration_line_trains_end_to_end(tmp_path, sd1, bias_only, monkeypatch):
    prompts = []
    real = batch_module.tokenize_prompts
    monkeypatch.setattr(batch_module, "tokenize_prompts", lambda tok, batch, mode: prompts.extend(batch) or
                        real(tok, batch, mode))
    md = make_training_model(tmp_path, sd1, method="bias_only", epochs=2, save_every_n_epochs=1,
                             preview_every_n_epochs=2, learning_rate=1e-2)
    before = working_files(md)
    start = load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))["conv_out.bias"]
    trainer = _run(md)
    assert trainer.status.status["state"] == "done" and trainer.step == 8
    assert working_files(md) == before  # it writes only its own file
    assert sorted(p.name for p in (md.path / "bias").iterdir()) == ["bias_4.safetensors", "bias_8.safetensors"]
    trained = load_file(str(md.path / "bias" / "bias_8.safetensors"))["conv_out.bias"]
    assert not torch.equal(trained, start)  # it learned
    assert (md.logs / "loss.csv").read_text().count("\n") == 9  # header and 8 steps
    assert prompts and all("zwx zwx" in p for p in prompts)  # the loop asked the method how to write the prompt
    preview = next(md.samples.glob("step000008_*.png"))
    assert json.loads(Image.open(preview).info["dreambooth"])["request"]["prompt"].startswith("a photo of zwx zwx")


def test_the_new_method_resumes_through_the_interface(tmp_path, sd1, bias_only):
    whole = make_training_model(tmp_path, sd1, name="whole", method="bias_only", epochs=2, learning_rate=1e-2)
    _run(whole)
    parts = make_training_model(tmp_path, sd1, name="parts", method="bias_only", epochs=2, learning_rate=1e-2)
    with cancelled_at(3):
        _run(parts)
    assert (parts.path / "bias" / "bias_3.safetensors").exists()  # saved on cancel
    _run(parts, resume=True)
    a = load_file(str(whole.path / "bias" / "bias_8.safetensors"))["conv_out.bias"]
    b = load_file(str(parts.path / "bias" / "bias_8.safetensors"))["conv_out.bias"]
    torch.testing.assert_close(a, b)


def test_an_unregistered_method_is_refused_by_the_config_and_the_registry(tmp_path):
    with pytest.raises(UserError, match="unknown training method 'bias_only'.*dreambooth"):
        method_class("bias_only")
    spec = next(s for s in field_specs() if s.name == "method")
    with pytest.raises(UserError, match="expected one of"):
        coerce("method", spec, "bias_only")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_built_in_method_lives_in_its_own_file(name):
    cls = method_class(name)
    assert issubclass(cls, TrainingMethod) and cls.name == name
    assert Path(cls.__module__.replace(".", "/")).name == name  # train/methods/<name>.py
    defaults = cls.default_settings()
    specs = {s.name: s for s in field_specs()}
    for key, value in defaults.items():  # suggestions for settings the user has not changed must be valid values
        assert coerce(key, specs[key], value) == value


def test_the_loop_never_asks_which_method_it_runs():
    source = (PACKAGE / "train" / "loop.py").read_text(encoding="utf-8")
    assert not re.search(r"\.method\s*(==|!=|in)|self\.(network|embedding|hypernetwork) is (not )?None", source)
    assert not re.search(r"[\"'](dreambooth|lora|textual_inversion|hypernetwork)[\"']", source)
    assert source.count("\n") <= 450


def test_no_module_is_over_600_lines():
    sizes = {p.relative_to(PACKAGE): p.read_text(encoding="utf-8").count("\n") for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 600}


def test_the_hypernetwork_estimate_counts_its_own_parameters():
    cfg = TrainConfig(method="hypernetwork", hypernetwork_layer_structure="1, 1.5, 2, 1", hypernetwork_layer_norm=True)
    share = method_class("hypernetwork").memory(cfg, PARAMS["sd1"])
    network = Hypernetwork([PARAMS["sd1"]["context"]], HypernetworkSettings.from_config(cfg))
    assert share.trained == share.added == sum(p.numel() for p in network.parameters())
    assert not share.text_encoders  # it needs their output, not their gradients: they may be offloaded
    assert estimate_memory(cfg).parts["hypernetwork"] > 0
