"""Kill the worker with SIGKILL after a save; --resume ends where an uninterrupted run ends, with the same weights."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_training_model
from safetensors.torch import load_file

from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.resume import latest_state, list_states

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(epochs=4, save_every_n_epochs=1, keep_resume_states=2, lr_scheduler="cosine", lr_warmup_steps=2,
                use_ema=True, ema_decay=0.9)


def _worker(root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dreambooth", "train", "m", "--models-root", str(root),
                             "--device", "cpu", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _unet(md):
    return load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd1")
    reference = make_training_model(tmp_path / "ref", source, **SETTINGS)
    Trainer(reference, RunOptions(device="cpu", install_signal_handlers=False)).run()

    # the pause after each epoch gives the test time to kill the worker right after a save
    md = make_training_model(tmp_path / "run", source, pause_every_n_epochs=1, pause_seconds=30, **SETTINGS)
    proc = _worker(tmp_path / "run")
    deadline = time.time() + 120
    while not list_states(md.checkpoints) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list_states(md.checkpoints), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_state(md.checkpoints).step
    assert killed_at == 4  # one epoch of 4 steps

    cfg = json.loads(md.config_path.read_text())
    cfg["pause_every_n_epochs"] = 0  # the rest runs straight through
    md.config_path.write_text(json.dumps(cfg))
    proc = _worker(tmp_path / "run", "--resume")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out

    status = json.loads(md.status_path.read_text())
    assert status["state"] == "done" and status["step"] == 16
    a, b = _unet(reference), _unet(md)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    ema_a = load_file(str(reference.working / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    ema_b = load_file(str(md.working / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(ema_a["conv_in.weight"], ema_b["conv_in.weight"], rtol=1e-4, atol=1e-6)
    # the LR schedule went on where it was: the resumed steps log the same LRs as the uninterrupted run
    lrs = {int(r["step"]): r["lr"] for r in csv.DictReader(open(md.logs / "loss.csv"))}
    ref_lrs = {int(r["step"]): r["lr"] for r in csv.DictReader(open(reference.logs / "loss.csv"))}
    assert all(lrs[s] == ref_lrs[s] for s in range(killed_at + 1, 17))


def test_damaged_newest_state_falls_back_to_the_one_before(tmp_path, tiny_checkpoint, caplog):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=2, save_every_n_epochs=1, keep_resume_states=2)
    Trainer(md, RunOptions(device="cpu", install_signal_handlers=False)).run()
    older, newest = list_states(md.checkpoints)
    state_file = newest / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # a power cut in the middle of the write
    state = latest_state(md.checkpoints)
    assert state is not None and state.path == older
    assert "cannot be read" in caplog.text and newest.name in caplog.text
