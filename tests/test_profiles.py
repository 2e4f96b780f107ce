"""Memory profiles: valid settings, applied by the tab's handler, and a memory estimate that moves the right way."""

from __future__ import annotations

import dataclasses

import pytest

from dreambooth.config import TrainConfig, config_from_dict, field_specs
from dreambooth.host.standalone import StandaloneHost
from dreambooth.profiles import PROFILES, apply_profile, estimate_memory
from dreambooth.ui.form import config_to_values
from dreambooth.ui.handlers import NO_PROFILE, PROFILE_CHOICES, TabHandlers


@pytest.mark.parametrize("name", list(PROFILES))
def test_each_profile_is_valid_config(name):
    specs = {s.name for s in field_specs(TrainConfig)}
    profile = PROFILES[name]
    assert set(profile.settings) <= specs
    cfg = apply_profile(TrainConfig(), name)
    data = cfg.to_dict()
    data["concepts"] = []
    checked, _ = config_from_dict(data)  # every value passes the config's own validation
    for key, value in profile.settings.items():
        assert getattr(checked, key) == value


def test_profiles_the_tab_offers_are_the_profiles():
    assert list(PROFILE_CHOICES[1:]) == list(PROFILES)


def test_unknown_profile_is_refused():
    from dreambooth.errors import UserError

    with pytest.raises(UserError, match="unknown memory profile"):
        apply_profile(TrainConfig(), "fits in 1 GB")


def test_the_6_gb_profile_is_estimated_below_6_gb_and_below_8_gb_profile():
    base = TrainConfig(family="sd1", resolution=512)
    six, eight, fast = (estimate_memory(apply_profile(base, n)).total for n in PROFILES)
    assert six < 6 * 2**30 and six < eight < 8 * 2**30 and fast > eight
    sdxl_lora = dataclasses.replace(apply_profile(TrainConfig(family="sdxl"), "fits in 8 GB"), method="lora",
                                    lora_rank=32)
    assert estimate_memory(sdxl_lora).total < 8 * 2**30


def test_estimate_grows_with_batch_and_resolution():
    cfg = TrainConfig(family="sd1", resolution=512)
    batches = [estimate_memory(dataclasses.replace(cfg, train_batch_size=b)).total for b in (1, 2, 4, 8)]
    assert batches == sorted(batches) and len(set(batches)) == 4
    sizes = [estimate_memory(dataclasses.replace(cfg, resolution=r)).total for r in (256, 512, 768, 1024)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


@pytest.mark.parametrize(("change", "setting"), [
    (dict(gradient_checkpointing=True), "gradient_checkpointing"),
    (dict(offload_frozen_models=True), "offload_frozen_models"),
    (dict(weight_precision="bf16_stochastic"), "weight_precision"),
    (dict(fused_backward_step=True), "fused_backward_step"),
    (dict(optimizer="adamw_8bit"), "optimizer"),
    (dict(use_ema=False), "use_ema"),
    (dict(mixed_precision="bf16"), "mixed_precision"),
])
def test_each_saving_switch_lowers_the_estimate(change, setting):
    heavy = TrainConfig(family="sd1", resolution=512, gradient_checkpointing=False, offload_frozen_models=False,
                        optimizer="adamw", use_ema=True, mixed_precision="no")
    assert estimate_memory(dataclasses.replace(heavy, **change)).total < estimate_memory(heavy).total, setting


def test_estimate_text_says_estimated():
    assert "estimated" in estimate_memory(TrainConfig()).text()


def test_applying_a_profile_in_the_tab_sets_the_fields(tmp_path):
    handlers = TabHandlers(StandaloneHost(tmp_path, "cpu"), no_change=lambda: "NO_CHANGE")
    values = config_to_values(TrainConfig(), handlers.controls)
    out = handlers.apply_profile(None, "fits in 6 GB", *values)
    assert "estimated" in out[0] and "GB" in out[0]
    shown = {c.spec.name: v for c, v in zip(handlers.controls, out[1:], strict=True) if c.concept is None}
    for key, value in PROFILES["fits in 6 GB"].settings.items():
        assert shown[key] == value, key
    kept = handlers.apply_profile(None, NO_PROFILE, *values)
    assert kept[1:] == values and "estimated" in kept[0]


def test_cli_train_applies_a_profile_first(tmp_path, tiny_checkpoint, monkeypatch):
    from dreambooth.cli import main
    from dreambooth.config import load_config
    from dreambooth.create import create_model
    from dreambooth.train import loop

    md = create_model(tiny_checkpoint("sd1"), "m", tmp_path)
    seen = []
    monkeypatch.setattr(loop, "train_model", lambda model, options: seen.append(load_config(model.path)) or
                        {"state": "done", "step": 0})
    assert main(["train", "m", "--models-root", str(tmp_path), "--profile", "fits in 6 GB"]) == 0
    assert seen[0].fused_backward_step and seen[0].weight_precision == "bf16_stochastic"
    assert load_config(md.path).offload_frozen_models
