"""The benchmark harness (bench/) end to end on tiny models on the CPU: the sentinel that it runs and reports sane
numbers. The figures themselves are not checked (benchmarks are not unit tests)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import flops, report
from bench.matrix import TARGETS, Case
from bench.ours import unavailable_settings
from bench.run import main
from dreambooth import compat
from dreambooth.tiny import tiny_config


def test_harness_runs_ours_and_baseline_and_writes_every_column(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--matrix", "cpu-smoke", "--steps", "2", "--warmup", "2", "--out", str(out),
                 "--workdir", str(tmp_path / "work"), "--only", "sd15/dreambooth/64/b1 ours-",
                 "--only", "sd15/dreambooth/64/b1 baseline-default"])
    assert code == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["profile"]: r for r in result["rows"]}
    assert set(rows) == {"ours-default", "ours-lowmem", "baseline-default"}
    for row in rows.values():
        assert set(report.ROW_KEYS) <= set(row)
    for row in rows.values():
        assert row["status"] == "ok", row["status"]
        assert row["samples_per_s"] > 0 and row["step_time_s"] > 0 and row["time_to_first_step_s"] > 0
        assert row["measured_steps"] == 2 and row["warmup_steps"] == 2
        assert row["flops_per_sample"] > 0
        assert 0 < row["mfu"] <= 1
        assert row["peak_allocated_bytes"] is None  # CUDA's allocator peak: "n/a" on the CPU, not a made-up number
        assert row["peak_tensor_bytes"] > 0  # the tracked step's tensors: measured on any device
        split = sum(row[f"peak_{part}_bytes"] for part in ("weights", "gradients", "optimizer_state", "other"))
        assert split == row["peak_tensor_bytes"] and row["peak_other_bytes"] >= 0
        assert row["last_loss"] is not None and row["last_loss"] > 0
    assert rows["ours-default"]["flops_per_sample"] == rows["baseline-default"]["flops_per_sample"]
    # the 6 GB profile stores bf16 weights and offloads the VAE and text encoder: the split shows it
    low, default = rows["ours-lowmem"], rows["ours-default"]
    assert low["peak_weights_bytes"] < default["peak_weights_bytes"] / 1.5 and low["offloaded_bytes"] > 0
    assert result["device"]["measured_peak_flops"] > 0
    assert [(r["ours"], r["samples_per_s"]) for r in result["ratios"]] == [
        (p, pytest.approx(rows[p]["samples_per_s"] / rows["baseline-default"]["samples_per_s"]))
        for p in ("ours-default", "ours-lowmem")]
    assert rows["ours-lowmem"]["settings"]["fused_backward_step"]  # the tab's "fits in 6 GB" profile ran
    assert len(result["targets"]) == len(TARGETS)
    printed = capsys.readouterr().out
    assert "ours-default" in printed and "baseline-default" in printed and "targets (issue 7)" in printed


def test_flop_count_on_meta_equals_the_real_count_and_lora_skips_weight_gradients():
    config = tiny_config("sd1", "unet")
    real = flops.count_unet_flops(config, 32, "dreambooth", False, torch.device("cpu"))
    assert flops.count_unet_flops(config, 32, "dreambooth", False, torch.device("meta")) == real
    lora = flops.count_unet_flops(config, 32, "lora", False, torch.device("cpu"))
    assert 0 < lora < real  # no weight gradients for frozen weights


def test_missing_fields_and_values_are_reported_not_dropped():
    assert unavailable_settings({"cache_latents": True}) == []
    assert unavailable_settings({"no_such_field": True, "optimizer": "adamw"}) == ["no_such_field"]
    assert unavailable_settings({"mixed_precision": "fp8"}) == ["mixed_precision='fp8'"]


def _row(profile: str, kind: str, **values) -> dict:
    row = {k: None for k in report.ROW_KEYS}
    row.update(case="sd15/dreambooth/512/b1", profile=profile, kind=kind, status="ok", **values)
    return row


def test_targets_pass_fail_and_missing():
    rows = [_row("ours-lowmem", "ours", peak_allocated_bytes=5.5e9, samples_per_s=3.0),
            _row("baseline-lowmem", "baseline", peak_allocated_bytes=9.9e9, samples_per_s=1.0)]
    by_name = {t["name"]: t for t in (report.evaluate_target(t, rows) for t in TARGETS)}
    memory, speed = (by_name[t.name] for t in TARGETS[:2])
    assert memory["passed"] is True and memory["value"] == 5.5e9
    assert speed["passed"] is True and speed["value"] == pytest.approx(3.0)
    rows[0]["peak_allocated_bytes"], rows[0]["samples_per_s"] = 6.5e9, 1.2
    memory, speed = (report.evaluate_target(t, rows) for t in TARGETS[:2])
    assert memory["passed"] is False and speed["passed"] is False
    assert report.evaluate_target(TARGETS[3], rows)["passed"] is None  # the b8 case is not in these rows
    rows[0]["status"] = "oom"
    assert report.evaluate_target(TARGETS[0], rows)["passed"] is False


def test_case_keys_name_what_the_targets_look_for():
    assert Case("sd1", "dreambooth", 512, 1, ()).key == "sd15/dreambooth/512/b1"
    assert Case("sdxl", "lora", 1024, 1, ()).key == "sdxl/lora-r32/1024/b1"
    from bench.matrix import MATRICES

    gpu_keys = {c.key for c in MATRICES["gpu"].cases}
    assert {t.case_key for t in TARGETS} <= gpu_keys
    for t in TARGETS:
        case = next(c for c in MATRICES["gpu"].cases if c.key == t.case_key)
        assert t.profile in case.profiles and (t.versus is None or t.versus in case.profiles)


def test_an_out_of_memory_error_is_recognised_through_the_trainers_user_error():
    from bench.measure import is_oom
    from dreambooth.errors import UserError

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.cuda.OutOfMemoryError as err:
            raise UserError("out of cuda:0 memory at step 3", "try ...") from err
    except UserError as wrapped:
        assert is_oom(wrapped)
    assert not is_oom(UserError("the loss became nan at step 3", "lower the learning rate"))


def test_baseline_lora_leaves_the_output_unchanged_at_init_and_trains_only_its_own_weights():
    from diffusers import UNet2DConditionModel

    from bench.baseline import LoraLayer, add_lora

    torch.manual_seed(0)
    config = {k: v for k, v in tiny_config("sd1", "unet").items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    args, kwargs = flops.unet_inputs(config, 32, 1, torch.device("cpu"), torch.float32, False)
    before = unet(*args, **kwargs).sample
    unet.requires_grad_(False)
    params = add_lora(unet, rank=4, alpha=4.0)
    wrapped = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert wrapped and len(params) == 2 * len(wrapped)
    after = unet(*args, **kwargs).sample
    torch.testing.assert_close(after, before)  # up starts at zero: the LoRA adds nothing until it trains
    after.square().mean().backward()
    assert all(p.grad is not None for p in params[1::2])  # the up weights get gradients
    assert all(p.grad is None for p in unet.parameters() if not any(p is q for q in params))


def test_like_for_like_baseline_lora_adapts_the_layers_ours_adapts():
    """baseline-as-ours rows put LoRA on our layers (every Linear and 1x1 conv of each transformer block), so the
    comparison holds the LoRA work equal; the recipe rows keep the diffusers scripts' attention projections."""
    from diffusers import UNet2DConditionModel

    from bench.baseline import add_lora
    from dreambooth.train.lora import LoraNetwork, LoraSettings

    config = {k: v for k, v in tiny_config("sd1", "unet").items() if not k.startswith("_")}
    ours = LoraNetwork({"unet": UNet2DConditionModel.from_config(config)},
                       LoraSettings(rank=4, train_text_encoder=False), "sd1")
    as_ours = add_lora(UNet2DConditionModel.from_config(config), rank=4, alpha=4.0, layers="ours")
    recipe = add_lora(UNet2DConditionModel.from_config(config), rank=4, alpha=4.0)
    assert len(as_ours) == 2 * len(ours.names("unet"))
    assert sum(p.numel() for p in as_ours) == sum(p.numel() for p in ours.parameters_for("unet"))
    assert len(recipe) < len(as_ours)  # the scripts adapt fewer layers


def test_each_row_of_ours_starts_from_our_defaults_not_the_previous_rows_profile(tmp_path):
    from bench.matrix import Case, profile_overrides
    from bench.measure import StepClock
    from bench.models import write_images, write_random_model
    from bench.ours import run_ours
    from dreambooth.config import TrainConfig, load_config

    md = write_random_model(tmp_path / "models", "sd1", "tiny")
    images = write_images(tmp_path / "images", 2, 64)
    case = Case("sd1", "lora", 64, 1, ("ours-lowmem", "ours-default"), lora_rank=4)
    cpu = torch.device("cpu")
    lowmem = profile_overrides("ours-lowmem", eight_bit=False, compile_unet=False)
    run_ours(md, case, lowmem, images, cpu, StepClock(cpu, 0, 1))
    assert load_config(md.path).fused_backward_step
    run_ours(md, case, {}, images, cpu, StepClock(cpu, 0, 1))
    cfg, defaults = load_config(md.path), TrainConfig()
    assert (cfg.fused_backward_step, cfg.weight_precision, cfg.offload_frozen_models) == \
        (defaults.fused_backward_step, defaults.weight_precision, defaults.offload_frozen_models)


# ------------------------------------------------------------------------------------------- the memory tracker


def test_the_tracker_follows_a_known_allocation_pattern_exactly():
    from bench.memory import LiveTensorTracker

    keep = torch.ones(256)  # 1 KiB alive before the step: counted from the census
    with LiveTensorTracker("cpu") as tracker:
        start = tracker.start_bytes
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000: 12000 alive
        del a  # 8000
        c = torch.empty(500)  # 10000
        view = b[10:]  # a view: no new bytes
        e = torch.empty(1500)  # 16000: the peak
        del b, view, c, e
        f = torch.empty(3000)  # 12000
        f.add_(1)  # an in-place op: no new bytes
        del f
    assert start >= keep.numel() * 4
    assert tracker.peak_bytes - start == 16000
    assert tracker.max_other_bytes - start == 16000  # nothing here is a weight, a gradient or a state


def test_the_tracker_splits_a_training_step_by_role():
    from bench.memory import LiveTensorTracker, Roles

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(32, 64)

    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the states exist from the first step on
    weights = sum(p.numel() * 4 for p in model.parameters())
    with LiveTensorTracker("cpu", Roles([model], list(model.parameters()), optimizer)) as tracker:
        step()
    result = tracker.result()
    assert result["peak_weights_bytes"] == weights
    # AdamW's two moments per weight plus a step counter per tensor (fp32 scalars)
    assert result["peak_optimizer_state_bytes"] == 2 * weights + 4 * len(optimizer.state)
    assert result["peak_gradients_bytes"] == weights  # the peak is in the optimizer step: every gradient alive
    activations = 32 * 256 * 4 * 2  # the hidden layer before and after ReLU, saved for backward
    assert result["max_other_bytes"] - (result["step_start_tensor_bytes"] - weights * 3 - 4 * 4) >= activations
    assert result["tracker_roles_changed"] is False


def test_the_tracker_leaves_offloaded_modules_out_of_the_device_peak():
    from bench.memory import LiveTensorTracker, Roles

    on_device, offloaded = torch.nn.Linear(100, 100), torch.nn.Linear(300, 300)
    with LiveTensorTracker("cpu", Roles([on_device], [], None, [offloaded])) as tracker:
        torch.empty(10)
    result = tracker.result()
    assert result["offloaded_bytes"] == sum(p.numel() * 4 for p in offloaded.parameters())
    assert result["peak_weights_bytes"] == sum(p.numel() * 4 for p in on_device.parameters())


@pytest.mark.slow
def test_the_one_call_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """bench/gpu_check.py on the CPU with tiny models (as the suite can run it): every asked check gives a row, the
    fp16 one runs where this torch has the CPU grad scaler, resume is exact, xformers is skipped with its reason."""
    from bench import gpu_check

    code = gpu_check.main(["--device", "cpu", "--no-matrix", "--out", str(tmp_path),
                           "--checks", "fp16_grad_scaler,resume_exact,sdxl_preview,xformers"])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in result["checks"]}
    assert list(rows) == ["fp16_grad_scaler", "resume_exact", "sdxl_preview", "xformers"]
    fp16 = "PASS" if compat.grad_scaler_available("cpu") else "SKIP"
    assert rows["fp16_grad_scaler"]["result"] == fp16, rows["fp16_grad_scaler"]
    assert rows["resume_exact"]["result"] == "PASS", rows["resume_exact"]
    assert rows["sdxl_preview"]["result"] == "PASS", rows["sdxl_preview"]
    assert rows["xformers"]["result"] == "SKIP" and "xformers" in rows["xformers"]["detail"]
    assert code == 0 and "resume_exact" in (tmp_path / "gpu_check.txt").read_text()
