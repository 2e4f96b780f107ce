"""Memory profiles: valid settings, applied by the tab's handler, and a memory estimate that moves the right way."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dreambooth.config import TrainConfig, config_from_dict, field_specs
from dreambooth.host.standalone import StandaloneHost
from dreambooth.profiles import MEASURED_FILE, PARAMS, PROFILES, apply_profile, estimate_memory
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


@pytest.fixture()
def eight_bit_runs(monkeypatch):
    """bitsandbytes runs 8-bit AdamW on every device (as on a GPU with it installed)."""
    from dreambooth.train import optimizers

    monkeypatch.setattr(optimizers, "adamw_8bit_problem", lambda device_type: None)


def test_the_6_gb_profile_is_estimated_below_6_gb_and_below_8_gb_profile(eight_bit_runs):
    base = TrainConfig(family="sd1", resolution=512)
    six, eight, fast = (estimate_memory(apply_profile(base, n), device_type="cuda").total for n in PROFILES)
    assert six < 6e9 and six < eight < 8e9 and fast > eight  # GB as the targets count them: 10^9 bytes
    sdxl_lora = dataclasses.replace(apply_profile(TrainConfig(family="sdxl"), "fits in 8 GB"), method="lora",
                                    lora_rank=32)
    assert estimate_memory(sdxl_lora, device_type="cuda").total < 8e9


def test_the_estimate_counts_the_optimizer_that_will_run(monkeypatch):
    from dreambooth.train import optimizers

    cfg = apply_profile(TrainConfig(family="sd1", resolution=512), "fits in 6 GB")
    monkeypatch.setattr(optimizers, "adamw_8bit_problem", lambda device_type: None)
    eight_bit = estimate_memory(cfg, device_type="cuda")
    monkeypatch.setattr(optimizers, "adamw_8bit_problem", lambda device_type: "no bitsandbytes here")
    fallback = estimate_memory(cfg, device_type="cuda")
    # AdamW's two fp32 moments (8 bytes per weight) instead of two 8-bit ones (2 and a bit): ~5 GB more for SD 1.5
    assert fallback.total - eight_bit.total > 4.5e9
    assert "adamw counted" in fallback.text() and "adamw counted" not in eight_bit.text()


def test_fp16_trains_in_fp32_on_the_cpu_and_the_estimate_knows():
    cfg = dataclasses.replace(TrainConfig(family="sd1", resolution=512), method="lora", gradient_checkpointing=False)
    assert estimate_memory(cfg, device_type="cpu").parts["activations"] > \
        1.5 * estimate_memory(cfg, device_type="cuda").parts["activations"]


def test_estimate_grows_with_batch_and_resolution():
    cfg = dataclasses.replace(TrainConfig(family="sd1", resolution=512), method="lora", lora_rank=32)
    batches = [estimate_memory(dataclasses.replace(cfg, train_batch_size=b), device_type="cuda").total
               for b in (1, 2, 4, 8)]
    assert batches == sorted(batches) and len(set(batches)) == 4
    sizes = [estimate_memory(dataclasses.replace(cfg, resolution=r), device_type="cuda").total
             for r in (256, 512, 768, 1024)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    # full training: every gradient and state in the optimizer step outweighs the checkpointed activations
    full = TrainConfig(family="sd1", resolution=512)
    assert estimate_memory(full, device_type="cuda").total <= \
        estimate_memory(dataclasses.replace(full, resolution=768), device_type="cuda").total


@pytest.mark.parametrize(("base", "change"), [
    (dict(gradient_checkpointing=False, method="lora"), dict(gradient_checkpointing=True)),
    (dict(offload_frozen_models=False), dict(offload_frozen_models=True)),
    (dict(mixed_precision="bf16"), dict(weight_precision="bf16_stochastic")),
    (dict(mixed_precision="bf16", weight_precision="bf16_stochastic"), dict(fused_backward_step=True)),
    (dict(), dict(optimizer="adamw_8bit")),
    (dict(use_ema=True), dict(use_ema=False)),
    (dict(mixed_precision="no", method="lora"), dict(mixed_precision="bf16")),
], ids=["checkpointing", "offload", "bf16 weights", "fused step", "8-bit adamw", "no ema", "16-bit compute"])
def test_each_saving_switch_lowers_the_estimate(eight_bit_runs, base, change):
    heavy = dataclasses.replace(TrainConfig(family="sd1", resolution=512), **base)
    light = dataclasses.replace(heavy, **change)
    assert estimate_memory(light, device_type="cuda").total < estimate_memory(heavy, device_type="cuda").total


def test_estimate_text_says_estimated():
    assert "estimated" in estimate_memory(TrainConfig(), device_type="cpu").text()


MEASURED = json.loads(MEASURED_FILE.read_text(encoding="utf-8")) if MEASURED_FILE.is_file() else None
needs_measurements = pytest.mark.skipif(MEASURED is None, reason="no cpu-full measurements stored")


def _measured_config(row: dict) -> TrainConfig:
    settings = {k: v for k, v in row["settings"].items() if k in TrainConfig.__dataclass_fields__}
    return dataclasses.replace(TrainConfig(), **settings)


@needs_measurements
def test_every_measured_row_is_within_15_percent_of_the_fitted_estimate():
    assert MEASURED["rows"]
    for row in MEASURED["rows"]:
        cfg = _measured_config(row)
        estimate = estimate_memory(cfg, device_type="cpu", optimizer=row["optimizer"])
        model = sum(estimate.parts.values())  # the model, not the measured lookup
        assert abs(model / row["peak_tensor_bytes"] - 1) <= 0.15, (row["case"], row["profile"], model)


@needs_measurements
def test_a_measured_configuration_says_measured_and_512_px_says_extrapolated():
    row = next(r for r in MEASURED["rows"] if r["profile"] == "ours-lowmem" and "dreambooth" in r["case"])
    cfg = _measured_config(row)
    estimate = estimate_memory(cfg, device_type="cpu", optimizer=row["optimizer"])
    assert estimate.measured == row["peak_tensor_bytes"] and estimate.text().startswith("measured")
    at_512 = estimate_memory(dataclasses.replace(cfg, resolution=512), device_type="cpu", optimizer=row["optimizer"])
    assert at_512.measured is None and "estimated" in at_512.text() and "extrapolated" in at_512.text()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_parameter_counts_are_our_lora_targets(family):
    from dreambooth import assets_api
    from dreambooth.families.architecture import build_empty
    from dreambooth.train.lora import LoraSettings, _targets

    unet = build_empty("unet", assets_api.family_config(family, "unet"))  # meta device: shapes only
    settings = LoraSettings(1, 1.0, 0.0, 0, 0.0, train_unet=True, train_text_encoder=False)
    count = 0
    for _, layer, rank, _ in _targets("unet", unet, settings, family):
        w = layer.weight
        count += rank * (w.shape[0] + w[0].numel())
    assert count == PARAMS[family]["lora_per_rank"]
    assert max(p.numel() for p in unet.parameters()) == PARAMS[family]["largest"]
    assert sum(p.numel() for p in unet.parameters()) == PARAMS[family]["unet"]


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
