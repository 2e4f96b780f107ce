"""Each choice list is declared once, in config.py; the modules that act on a choice cover exactly that list, and
nothing else in the package spells a list out again. Settings classes are built from the config by name. The step
count has one function, used by the trainer, the tab's estimate and the kohya import alike."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from dreambooth import cli, config
from dreambooth.config import TrainConfig
from dreambooth.data.steps import StepCount, count_steps
from dreambooth.dtypes import torch_dtype
from dreambooth.errors import UserError
from dreambooth.profiles import OPTIMIZER_STATE_BYTES
from dreambooth.sample import SCHEDULER_CLASSES, WEBUI_SAMPLER_NAMES
from dreambooth.train.embedding import EmbeddingSettings
from dreambooth.train.hypernetwork import HypernetworkSettings
from dreambooth.train.lora import LoraSettings
from dreambooth.train.optimizers import OptimizerSettings
from dreambooth.train.schedules import lr_multiplier
from dreambooth.train.step import StepSettings

PACKAGE = Path(config.__file__).resolve().parent
LISTS = {name: value for name, value in vars(config).items() if name.isupper()
         and isinstance(value, tuple | dict) and len(value) >= 2 and all(isinstance(v, str) for v in value)}


def test_the_implementations_cover_exactly_the_declared_choices():
    assert tuple(SCHEDULER_CLASSES) == config.SAMPLE_SCHEDULERS
    assert set(WEBUI_SAMPLER_NAMES) == set(config.SAMPLE_SCHEDULERS)
    assert set(OPTIMIZER_STATE_BYTES) == set(config.OPTIMIZERS)
    assert set(config.GLOBAL_OPTIMIZERS) <= set(config.OPTIMIZERS)
    assert set(config.ATTENTION_MODES) == set(config.ATTENTION) - {"auto"}
    for name in config.LR_SCHEDULERS:
        assert lr_multiplier(name, 5, 10, 2) >= 0
    for name in (*config.MIXED_PRECISION, *config.FILE_DTYPES):
        dtype = torch_dtype(name)
        assert dtype is None if name in ("no", "keep") else isinstance(dtype, torch.dtype)
    with pytest.raises(UserError, match="unknown precision"):
        torch_dtype("fp8")


def test_the_cli_offers_the_config_lists():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    options = {(command, opt): action.choices for command, p in sub.items() for action in p._actions
               for opt in action.option_strings}
    assert tuple(options["create", "--dtype"]) == tuple(options["export", "--dtype"]) == config.FILE_DTYPES
    assert tuple(options["export", "--ema"]) == config.EMA_EXPORTS
    assert tuple(options["train", "--attention-default"]) == config.ATTENTION_MODES


@pytest.mark.parametrize("name", sorted(LISTS))
def test_no_other_module_spells_a_choice_list_out_again(name):
    """Neighbouring entries of a list (three, or both of a pair) in a literal anywhere outside config.py mean the list
    was copied (tables keyed by the choices, like the sample schedulers' classes, are checked for coverage above)."""
    quoted = [rf"[\"']{re.escape(item)}[\"']" for item in LISTS[name]]
    size = min(3, len(quoted))
    pairs = [re.compile(r"[(\[{,]\s*" + r"\s*,\s*".join(quoted[i:i + size]))
             for i in range(len(quoted) - size + 1)]
    copies = [f"{path.relative_to(PACKAGE)}: {pattern.pattern}" for path in PACKAGE.rglob("*.py")
              if path.name != "config.py" for pattern in pairs if pattern.search(path.read_text(encoding="utf-8"))]
    assert not copies


def test_one_step_count():
    assert count_steps(16, 3, 4, 7) == StepCount(2, 14)  # 16 items -> 6 batches -> 2 optimizer steps per epoch
    assert count_steps(10, 1, 1, 3).total == 30
    assert count_steps(0, 2, 1, 5).total == 0
    assert count_steps(4, 2, 1, 1, batches=3).per_epoch == 3  # a bucket's remainder is a batch of its own
    for bad in ((1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, -1), (-1, 1, 1, 1)):
        with pytest.raises(ValueError):
            count_steps(*bad)


def test_settings_are_built_from_the_config_by_name():
    cfg = TrainConfig(lora_rank=7, lora_alpha=3.0, lora_dropout=0.25, lora_conv_rank=2, lora_conv_alpha=0.5,
                      lora_type="lokr", lora_lokr_factor=4, lora_lokr_decompose_both=True, train_unet=False,
                      embedding_token="zwx-style", embedding_vectors=3, embedding_init_word="dog",
                      seed=99, hypernetwork_layer_structure="1, 3, 1", hypernetwork_activation="relu",
                      hypernetwork_layer_norm=True, hypernetwork_dropout=0.1, optimizer="lion", weight_decay=0.2,
                      adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, offset_noise=0.05, min_snr_gamma=5.0,
                      prior_loss_weight=0.5, clip_skip=2)
    assert dataclasses.asdict(LoraSettings.from_config(cfg, train_text_encoder=True)) == dict(
        rank=7, alpha=3.0, dropout=0.25, conv_rank=2, conv_alpha=0.5, train_unet=False, train_text_encoder=True,
        type="lokr", lokr_factor=4, lokr_decompose_both=True)
    assert dataclasses.asdict(EmbeddingSettings.from_config(cfg)) == dict(token="zwx-style", vectors=3,
                                                                           init_word="dog", seed=99)
    hyper = HypernetworkSettings.from_config(cfg)
    assert (hyper.layer_structure, hyper.activation, hyper.layer_norm, hyper.dropout) == ((1.0, 3.0, 1.0), "relu",
                                                                                          True, 0.1)
    assert OptimizerSettings.from_config(cfg) == OptimizerSettings(name="lion", weight_decay=0.2, betas=(0.8, 0.95),
                                                                   eps=1e-6)
    assert StepSettings.from_config(cfg, train_text_encoder=True, autocast_dtype=torch.bfloat16) == StepSettings(
        offset_noise=0.05, min_snr_gamma=5.0, prior_loss_weight=0.5, clip_skip=2, train_text_encoder=True,
        autocast_dtype=torch.bfloat16)
