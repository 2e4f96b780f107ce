"""Settings an optimizer ignores are hidden for it (Adafactor: Adam's betas and epsilon; Lion: epsilon), declared
once in config.py, and the declaration is what train/optimizers.py really passes to each optimizer."""

from __future__ import annotations

import pytest
import torch
from test_api import Host, make_client

from dreambooth.config import BETAS_OPTIMIZERS, EPSILON_OPTIMIZERS, OPTIMIZERS
from dreambooth.train import optimizers
from dreambooth.ui.form import config_controls, shown_for_method

BETAS, EPS = (0.5, 0.6), 0.0123
OPTIMIZER_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon")


class Recording(torch.optim.Optimizer):
    """Stands in for an optional optimizer package: keeps what it was given."""

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decouple=True):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_declaration_is_what_each_optimizer_reads(name, monkeypatch):
    real_import = optimizers._import
    fakes = {"dadaptation": type("M", (), {"DAdaptAdam": Recording}),
             "prodigyopt": type("M", (), {"Prodigy": Recording})}
    monkeypatch.setattr(optimizers, "_import", lambda module: fakes.get(module) or real_import(module))
    param = torch.nn.Parameter(torch.zeros(4))
    opt, _ = optimizers.make_optimizer([{"params": [param], "lr": 1e-3}],
                                       optimizers.OptimizerSettings(name, 0.01, BETAS, EPS))
    assert (opt.defaults.get("betas") == BETAS) == (name in BETAS_OPTIMIZERS)
    assert (opt.defaults.get("eps") == EPS) == (name in EPSILON_OPTIMIZERS)
    assert opt.defaults["weight_decay"] == 0.01  # every optimizer reads the weight decay: it is never hidden


def test_the_tab_hides_the_settings_an_optimizer_ignores():
    controls = config_controls()
    index = {c.spec.name: i for i, c in enumerate(controls)}

    def shown(optimizer):
        visible = shown_for_method("dreambooth", controls, optimizer)
        return {n for n in (*OPTIMIZER_FIELDS, "weight_decay", "learning_rate") if visible[index[n]]}

    everything = {*OPTIMIZER_FIELDS, "weight_decay", "learning_rate"}
    assert shown("adafactor") == {"weight_decay", "learning_rate"}
    assert shown("lion") == everything - {"adam_epsilon"}
    for name in ("adamw", "adamw_8bit", "dadaptation", "prodigy", None):
        assert shown(name) == everything, name
    # the method still counts: a LoRA setting stays hidden for DreamBooth whatever the optimizer
    assert not shown_for_method("dreambooth", controls, "adamw")[index["lora_rank"]]
    assert shown_for_method("lora", controls, "adafactor")[index["lora_rank"]]


def test_the_api_schema_says_which_optimizers_read_a_setting(tmp_path):
    fields = {f["name"]: f for f in make_client(Host(tmp_path)).get("/dreambooth/schema").json()["config"]}
    assert fields["adam_beta1"]["optimizers"] == fields["adam_beta2"]["optimizers"] == list(BETAS_OPTIMIZERS)
    assert fields["adam_epsilon"]["optimizers"] == list(EPSILON_OPTIMIZERS)
    assert "adafactor" not in fields["adam_beta1"]["optimizers"] and "lion" not in fields["adam_epsilon"]["optimizers"]
    assert fields["weight_decay"]["optimizers"] is None and fields["learning_rate"]["optimizers"] is None
