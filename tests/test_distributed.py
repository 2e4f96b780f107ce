"""Data-parallel training (issue 16): N processes of the same worker on the CPU (gloo) train exactly as one process at
N times the batch, only rank 0 writes, and a run that loses a process fails cleanly and resumes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_training_model
from safetensors.torch import load_file

from dreambooth import gpus
from dreambooth.atomic import TMP_MARK
from dreambooth.config import coerce, field_specs, load_config
from dreambooth.errors import ConfigError, UserError
from dreambooth.lock import holder
from dreambooth.train.distributed import Ranks, global_batch
from dreambooth.train.launch import launcher_args
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.resume import latest_state, list_states

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # the tests train at learning rates of 1e-3 and more: each Adam step moves a weight by about that
# Adam's default epsilon (1e-8) turns a gradient near 0 into a full step of either sign, so the last bit of rounding
# (the sum over processes adds in another order) can flip it; a larger epsilon keeps the update smooth in the gradient
SMOOTH_ADAM = dict(adam_epsilon=1e-3)


def _cli(root: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dreambooth", "train", "m", "--models-root", str(root),
                           "--lora-dir", str(root / "Lora"), "--export-dir", str(root / "export"), *extra],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def _reference(tmp_path: Path, source: Path, **settings) -> Trainer:
    """The same training in this process at twice the batch."""
    md = make_training_model(tmp_path / "ref", source, **{**SMOOTH_ADAM, **settings, "train_batch_size": 2})
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "ref" / "Lora",
                                     export_dir=tmp_path / "ref" / "export"))
    trainer.run()
    return trainer


def _losses(md) -> list[tuple[int, float]]:
    with open(md.logs / "loss.csv", encoding="utf-8") as fh:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(fh)]


def _weights(md, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(str(md.path / "lora" / "m.safetensors"))
    return load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _assert_same_training(ref, md, method: str) -> None:
    """The same weights within float tolerance (summing gradients over processes rounds differently, and Adam
    magnifies that where a gradient is near 0: ``ATOL`` is far below what one step moves a weight) and losses."""
    a, b = _weights(ref, method), _weights(md, method)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=ATOL)
    ref_losses, losses = _losses(ref), _losses(md)
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]  # each step once, in one log
    for (_, x), (_, y) in zip(ref_losses, losses, strict=True):
        assert y == pytest.approx(x, rel=1e-4)  # the loss of the global batch, not of one process's share


# ------------------------------------------------------------------------------------------------ fast checks
def test_each_process_takes_its_rows_and_weights_cover_the_batch(monkeypatch):
    shares: dict[int, list] = {}
    for rank in (0, 1, 2):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        ranks = Ranks("cpu")
        shares[rank] = [(rows, weight) for _, rows, weight in ranks.pieces(list("abcdefg"), micro_batch=2)]
    rows = [i for pieces in shares.values() for rows, _ in pieces for i in range(7)[rows]]
    assert sorted(rows) == list(range(7))  # every example once, over all processes
    assert sum(w for pieces in shares.values() for _, w in pieces) == pytest.approx(1.0)
    assert shares[0] == [(slice(0, 2), 2 / 7), (slice(2, 3), 1 / 7)]  # micro batches of at most 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    # a batch smaller than the processes: the process without a row draws as the others do, at weight 0
    assert [(rows, w) for _, rows, w in Ranks("cpu").pieces(["x"], 1)] == [(slice(0, 1), 0.0)]


def test_resume_with_another_number_of_processes_keeps_the_global_batch():
    assert global_batch(1, 2, None) == (2, "")
    assert global_batch(1, 2, {"processes": 2, "global_batch": 2}) == (2, "")
    batch, note = global_batch(1, 1, {"processes": 2, "global_batch": 2})
    assert batch == 2 and "keeps its global batch of 2" in note


def test_plans_and_their_refusals(tmp_path, tiny_checkpoint, monkeypatch):
    cfg = load_config(make_training_model(tmp_path, tiny_checkpoint("sd1")).path)
    assert gpus.plan(cfg, "cpu", 2) == gpus.Plan(2, "cpu")
    assert gpus.plan(cfg, "cpu", None) == gpus.Plan(1, "cpu")
    with pytest.raises(UserError, match="names one device"):
        gpus.plan(cfg, "cuda:1", 2)
    monkeypatch.setattr(gpus, "_gpu_count", lambda: 1)
    with pytest.raises(UserError, match="needs 3 GPUs, and 1 is visible"):
        gpus.plan(cfg, None, 3)
    with pytest.raises(UserError, match="names GPU 1"):
        gpus.plan(cfg, None, None, "0,1")
    monkeypatch.setattr(gpus, "_gpu_count", lambda: 4)
    assert gpus.plan(cfg, None, None, "2,3") == gpus.Plan(2, "cuda", [2, 3])
    assert gpus.plan(cfg, None, None, "3") == gpus.Plan(1, "cuda:3")  # one GPU: one process, as always
    with pytest.raises(UserError, match="does not match the 2 GPUs"):
        gpus.plan(cfg, None, 3, "0,1")
    cfg.fused_backward_step = True
    with pytest.raises(UserError, match="Optimizer step in backward"):
        gpus.plan(cfg, "cpu", 2)
    cfg.fused_backward_step = False
    cfg.gpus = "0,0"
    with pytest.raises(UserError, match="listed twice"):
        gpus.plan(cfg)
    spec = next(s for s in field_specs() if s.name == "gpus")
    with pytest.raises(ConfigError, match="gpus: expected GPU numbers"):
        coerce("gpus", spec, "first")


def test_the_tab_lists_this_machines_gpus_and_keeps_a_missing_one():
    machine = ["0: Tiny GPU (8 GB)", "1: Tiny GPU (8 GB)"]
    every, chosen = gpus.choices("1,3", machine)
    assert every == [*machine, f"3: {gpus.NOT_FOUND}"] and chosen == [machine[1], f"3: {gpus.NOT_FOUND}"]
    assert gpus.from_choices(chosen) == "1,3"


def test_torch_launcher_starts_the_same_worker():
    args = launcher_args(gpus.Plan(2, "cpu"), ["train", "m"])
    assert args[args.index("--nproc_per_node") + 1] == "2" and args[-3:] == ["dreambooth", "train", "m"]
    assert args[args.index("--max_restarts") + 1] == "0"  # a failed run stops; --resume continues it


# ------------------------------------------------------------------------------------------------ end to end
def test_two_processes_train_as_one_at_twice_the_batch(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd1")
    settings = dict(epochs=1, images=4)
    ref = _reference(tmp_path, source, **settings)
    md = make_training_model(tmp_path / "dp", source, **{**SMOOTH_ADAM, **settings, "train_batch_size": 1})
    done = _cli(tmp_path / "dp", "--processes", "2", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "done" and status["step"] == 2 and status["processes"] == 2
    _assert_same_training(ref.model, md, "dreambooth")
    untrained = _weights(make_training_model(tmp_path / "fresh", source), "dreambooth")
    moved = max(float((untrained[k] - w).abs().max()) for k, w in _weights(md, "dreambooth").items())
    assert moved > 50 * ATOL  # it trained, far more than the tolerance
    # one writer: the same files as the one-process run, no more (no second log, no file of rank 1)
    assert _files(md.path) == _files(ref.model.path)
    assert _files(tmp_path / "dp" / "export") == _files(tmp_path / "ref" / "export")


@pytest.mark.slow
def test_two_processes_train_lora_as_one_at_twice_the_batch(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd1")
    settings = dict(method="lora", lora_rank=4, learning_rate=1e-2, epochs=2, images=2, use_ema=False)
    ref = _reference(tmp_path, source, **settings)
    md = make_training_model(tmp_path / "dp", source, **{**SMOOTH_ADAM, **settings, "train_batch_size": 1})
    done = _cli(tmp_path / "dp", "--processes", "2", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same_training(ref.model, md, "lora")
    assert any(w.abs().sum() > 0 for k, w in _weights(md, "lora").items() if "lora_up" in k)  # it trained
    assert _files(tmp_path / "dp" / "Lora") == _files(tmp_path / "ref" / "Lora")


def test_two_processes_train_as_one_with_the_noise_and_caption_options(tmp_path, tiny_checkpoint):
    """Pyramid noise, offset noise, input perturbation and caption dropout draw for the whole batch in every
    process: each example gets what it gets in one process."""
    source = tiny_checkpoint("sd1")
    settings = dict(epochs=1, images=4, pyramid_noise_iterations=3, offset_noise=0.1, input_perturbation=0.2,
                    caption_dropout=0.5)
    ref = _reference(tmp_path, source, **settings)
    md = make_training_model(tmp_path / "dp", source, **{**SMOOTH_ADAM, **settings, "train_batch_size": 1})
    done = _cli(tmp_path / "dp", "--processes", "2", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same_training(ref.model, md, "dreambooth")


def test_an_early_stop_ends_every_process(tmp_path, tiny_checkpoint):
    # learning rate 0: no save after the first brings a new lowest validation loss; rank 0 decides, all stop
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), images=3, epochs=10, save_every_n_epochs=1,
                             learning_rate=0.0, early_stop_saves=2, train_batch_size=1,
                             concept={"validation_holdout": 1})
    done = _cli(tmp_path, "--processes", "2", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout + done.stderr  # rank 1 stopped too (else it fails once rank 0 has gone)
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "done" and "stopped early" in status["message"] and status["step"] == 3


@pytest.mark.slow
def test_a_killed_process_fails_the_run_cleanly_and_resume_finishes_it(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd1")
    settings = dict(epochs=3, images=4, save_every_n_epochs=1, lr_scheduler="cosine", lr_warmup_steps=1)
    ref = _reference(tmp_path, source, **settings)
    md = make_training_model(tmp_path / "dp", source, **{**SMOOTH_ADAM, **settings, "train_batch_size": 1})

    # process 2 of 2 dies (SIGKILL) in the middle of step 3, after the save at step 2
    failed = _cli(tmp_path / "dp", "--processes", "2", "--device", "cpu", env={"DREAMBOOTH_FAULT_AT": "step:3@1"})
    assert failed.returncode != 0, failed.stdout + failed.stderr
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed", status
    assert "training process 2" in status["message"] and "of 2" in status["message"], status["message"]
    assert latest_state(md.checkpoints).step == 2
    assert not [p for p in (tmp_path / "dp").rglob("*") if TMP_MARK in p.name]  # nothing half-written
    assert holder(md.path) is None  # the model is free again

    resumed = _cli(tmp_path / "dp", "--processes", "2", "--device", "cpu", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "done" and status["step"] == 6
    _assert_same_training(ref.model, md, "dreambooth")  # ends where the uninterrupted run ends, each step logged once


def test_a_run_on_several_gpus_is_refused_when_one_of_them_is_in_use(tmp_path, tiny_checkpoint):
    from dreambooth import jobs
    from dreambooth.lock import acquire_device

    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), gpus="0,1")
    other = acquire_device(md.path.parent, "cuda:1", "other-model")
    try:
        with pytest.raises(jobs.AlreadyRunning, match="cuda:1 is busy: model 'other-model'"):
            jobs.start(md, models_root=tmp_path)
    finally:
        other.release()
    assert not (md.path / "status.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_cancel_ends_every_process_and_saves_once(tmp_path, tiny_checkpoint):
    from dreambooth.train.status import read_status, request_cancel

    md = make_training_model(tmp_path / "dp", tiny_checkpoint("sd1"), epochs=50, images=4, save_on_cancel=True,
                             save_checkpoint=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "train", "m", "--models-root", str(tmp_path / "dp"),
                             "--export-dir", str(tmp_path / "export"), "--processes", "2", "--device", "cpu"],
                            cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while (read_status(md) or {}).get("step", 0) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    request_cancel(md)  # what the tab's and the CLI's Cancel do: rank 0 reads it, every process stops
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    status = read_status(md)
    assert status["state"] == "cancelled" and 2 <= status["step"] < 100, status
    assert [p.name for p in list_states(md.checkpoints)] == [f"step_{status['step']:08d}"]  # saved once, by rank 0
    assert _files(tmp_path / "export") == {f"m_{status['step']}.safetensors"}
