"""One training per GPU (the device lock), loss.csv after a resume (each step once), and the optional out-of-memory
retry with a smaller batch."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from conftest import cancelled_at, make_training_model
from conftest import train_here as run

from dreambooth import jobs, lock
from dreambooth.compat import is_out_of_memory
from dreambooth.config import Concept, TrainConfig
from dreambooth.errors import UserError
from dreambooth.store import model_dir, store_dir
from dreambooth.train import loop as loop_module
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.oom import OOM_ENV, oom_point
from dreambooth.train.status import StatusWriter


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


# --- one training per GPU -----------------------------------------------------------------------------------------


def test_device_key_names_the_physical_device_and_none_for_the_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert lock.device_key("cpu") is None
    assert lock.device_key("cuda:1") == "cuda:1" and lock.device_key("mps") == "mps:0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert lock.device_key("cuda:1") == "cuda:5"  # the same GPU as cuda:5 in a process that sees all of them
    assert lock.device_key("cuda:4") == "cuda:4"  # not in the list: left as it is
    assert lock.device_lock_path("/s", "cuda:5").name == "cuda_5.lock"  # no ':' in file names (Windows)


def test_a_second_training_on_the_same_device_is_refused_naming_the_model(tmp_path):
    first = lock.acquire_device(tmp_path, "cuda:7", "dog-v1")
    assert lock.device_holder(tmp_path, "cuda:7")["model"] == "dog-v1"
    with pytest.raises(lock.Locked) as err:
        lock.acquire_device(tmp_path, "cuda:7", "cat-v2")
    assert "'dog-v1' is training" in err.value.message and "cuda:7" in err.value.message
    assert "another GPU" in err.value.hint
    other = lock.acquire_device(tmp_path, "cuda:8", "cat-v2")  # another GPU is free
    first.release()
    other.release()
    assert not list((tmp_path / ".locks").iterdir())
    again = lock.acquire_device(tmp_path, "cuda:7", "cat-v2")  # released: free again
    again.release()


def test_a_stale_device_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    path = lock.device_lock_path(tmp_path, "cuda:0")
    path.parent.mkdir()
    pid = dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": lock.socket.gethostname(), "model": "crashed"}))
    assert lock.device_holder(tmp_path, "cuda:0") is None
    with caplog.at_level(logging.WARNING):
        held = lock.acquire_device(tmp_path, "cuda:0", "next")
    assert json.loads(path.read_text())["model"] == "next"
    assert any("stale device lock" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records)
    held.release()


def test_the_trainer_refuses_a_busy_gpu_before_touching_it_and_releases_the_model_lock(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, name="cat-v2", epochs=1)
    busy = lock.acquire_device(md.path.parent, "cuda:7", "dog-v1")  # a fake GPU: refused before any CUDA call
    try:
        with pytest.raises(lock.Locked, match="'dog-v1' is training"):
            Trainer(md, RunOptions(device="cuda:7", install_signal_handlers=False))
        assert not (md.path / "train.lock").exists()
    finally:
        busy.release()


def test_the_trainer_holds_the_device_lock_while_it_runs_and_releases_it_at_the_end(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1)
    monkeypatch.setattr(loop_module, "device_key", lambda device: "fake:0")  # the CPU run stands in for a GPU run
    seen = []
    run(md, on_progress=lambda status: seen.append(lock.device_holder(md.path.parent, "fake:0")))
    assert seen and all(h is not None and h["model"] == "m" and h["pid"] == os.getpid() for h in seen)
    assert lock.device_holder(md.path.parent, "fake:0") is None
    assert not lock.device_lock_path(md.path.parent, "fake:0").exists()


def test_a_cpu_run_takes_no_device_lock(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1)
    run(md)
    assert not (md.path.parent / lock.LOCKS_FOLDER).exists()


def test_jobs_refuse_a_start_on_a_busy_gpu_at_once(tmp_path):
    md = model_dir("cat-v2", tmp_path)
    md.working.mkdir(parents=True)
    cfg = TrainConfig(model_name="cat-v2")
    cfg.concepts = [Concept(instance_data_dir=str(tmp_path), instance_prompt="a photo of zwx")]
    cfg.save(md.path)
    busy = lock.acquire_device(store_dir(tmp_path), "cuda:3", "dog-v1")
    try:
        with pytest.raises(jobs.AlreadyRunning, match="'dog-v1' is training"):
            jobs.start(md, models_root=tmp_path, device="cuda:3")
    finally:
        busy.release()
    assert not md.status_path.exists() and not (md.path / "train.lock").exists()


# --- loss.csv after a resume ----------------------------------------------------------------------------------------


def _loss_steps(md) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(open(md.logs / "loss.csv", encoding="utf-8"))]


def test_a_resume_drops_the_logged_steps_after_the_resumed_one(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=2, images=4, save_every_n_epochs=1, save_on_cancel=False,
                             enable_buckets=False)
    monkeypatch.setattr(StatusWriter, "due", lambda self: True)  # every step is logged at once
    with cancelled_at(6):  # saved at step 4 (epoch 1), then steps 5 and 6 are logged and lost
        run(md)
    assert _loss_steps(md) == [1, 2, 3, 4, 5, 6]
    before = (md.logs / "loss.csv").read_text().splitlines()
    run(md, resume=True)
    assert _loss_steps(md) == [1, 2, 3, 4, 5, 6, 7, 8]  # 5 and 6 once, from the resumed run
    after = (md.logs / "loss.csv").read_text().splitlines()
    assert after[:5] == before[:5]  # the header and the steps up to the resumed one are kept as they were
    assert not [p for p in md.logs.iterdir() if ".tmp-" in p.name]


def test_a_fresh_run_starts_its_own_loss_log_and_keeps_the_earlier_one(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1, images=2, enable_buckets=False)
    monkeypatch.setattr(StatusWriter, "due", lambda self: True)  # every step is logged at once
    run(md)
    first = (md.logs / "loss.csv").read_text()
    run(md)  # trains on from the saved weights: a new run, its steps counted from 1
    assert _loss_steps(md) == [1, 2]
    assert (md.logs / "loss_until_step_2.csv").read_text() == first
    run(md)
    assert _loss_steps(md) == [1, 2] and (md.logs / "loss_until_step_4.csv").is_file()


def test_truncating_the_loss_log_drops_torn_rows_and_keeps_appending(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1)
    (md.logs / "loss.csv").write_text("step,epoch,loss,lr\n1,0,0.5,0.001\n2,0,0.4,0.001\n3,0,0.3,0.001\n4,0,0.")
    writer = StatusWriter(md, loop_module.pick_device("cpu"))
    assert writer.truncate_loss_log(2) == 2  # step 3, and the row a crash cut off
    writer.log_loss(3, 0, 0.25, [0.001])
    writer.close()
    assert (md.logs / "loss.csv").read_text() == "step,epoch,loss,lr\n1,0,0.5,0.001\n2,0,0.4,0.001\n3,0,0.25,0.001\n"


# --- out of memory: retry with a smaller batch ----------------------------------------------------------------------


def test_the_oom_hook_does_nothing_without_its_variable_and_raises_like_cuda_with_it(monkeypatch):
    monkeypatch.delenv(OOM_ENV, raising=False)
    oom_point(3, 8)
    monkeypatch.setenv(OOM_ENV, "3:1")
    oom_point(2, 8)  # another step
    oom_point(3, 1)  # a batch small enough
    with pytest.raises(RuntimeError, match="out of memory") as err:
        oom_point(3, 2)
    assert is_out_of_memory(err.value)


def test_oom_retry_halves_the_batch_doubles_accumulation_and_completes(tmp_path, sd1, monkeypatch, caplog):
    md = make_training_model(tmp_path, sd1, epochs=2, images=4, train_batch_size=2, gradient_accumulation_steps=1,
                             enable_buckets=False, oom_retry_smaller_batch=True, save_every_n_epochs=1)
    monkeypatch.setenv(OOM_ENV, "3:1")  # step 3 runs out of memory with more than 1 image per pass
    messages = []
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False,
                                         on_progress=lambda s: messages.append(s.get("message"))))
        final = trainer.run()
    assert final["state"] == "done" and final["step"] == 4 == trainer.total_steps  # the same steps as planned
    assert final["train_batch_size"] == 1 and final["gradient_accumulation_steps"] == 2
    assert "with batch 1 after running out of memory" in final["message"]
    assert any("out of memory at step 3 with batch 2: going on with batch 1 and gradient accumulation 2" in m
               for m in messages if m)
    assert any("going on with batch 1" in r.getMessage() for r in caplog.records)
    assert trainer.saves == [2, 4]
    assert json.loads(md.config_path.read_text())["train_batch_size"] == 2  # the user's setting stays
    assert _loss_steps(md) == [1, 2, 3, 4]  # step 3 is logged once, from the retry


def test_oom_retry_gives_the_same_update_as_the_full_batch(tmp_path, sd1, monkeypatch):
    """Halving the batch changes how a step is computed, not what it computes: same examples, same weighting."""
    md = make_training_model(tmp_path, sd1, epochs=1, images=2, train_batch_size=2, enable_buckets=False,
                             oom_retry_smaller_batch=True)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False))
    trainer._setup()
    trainer.pending_losses = []
    import torch

    group = trainer.data.epoch_batches(0, 2)[:1]
    settings = loop_module.StepSettings(0.0, 0.0, 1.0, 1, False, None)
    grads = []
    for micro in (2, 1):
        trainer.micro_batch = micro
        monkeypatch.setattr(loop_module, "compute_loss", _fixed_noise_loss(loop_module.compute_loss))
        trainer._backward(group, settings, [1e-3])
        grads.append([p.grad.clone() for p in trainer.trained_params if p.grad is not None])
        trainer.optimizer.zero_grad(set_to_none=True)
        monkeypatch.undo()
    trainer.controls.close()
    trainer.status.close()
    trainer._release_locks()
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fixed_noise_loss(real):
    """compute_loss with each image's noise and timestep fixed by the image itself, not by the order of draws, so a
    batch and its halves see the same noise: the batch loss is the mean of its images' losses."""
    return lambda models, batch, settings, generator: _split(real, models, batch, settings)


def _split(real, models, batch, settings):
    """The full batch's loss as the mean of its images' losses (each with its own fixed noise)."""
    import torch

    from dreambooth.train.step import Batch

    losses, per = [], []
    for i in range(len(batch.latents)):
        one = Batch(batch.latents[i:i + 1], [ids[i:i + 1] for ids in batch.token_ids], batch.is_class[i:i + 1],
                    batch.sizes[i:i + 1])
        seed = int(one.latents.abs().sum().item() * 1000) % (2**31)
        loss, p = real(models, one, settings, torch.Generator().manual_seed(seed))
        losses.append(loss)
        per.append(p)
    return torch.stack(losses).mean(), torch.cat(per)


def test_oom_retry_at_batch_1_stops_with_the_clear_message(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1, images=2, train_batch_size=2, enable_buckets=False,
                             oom_retry_smaller_batch=True)
    monkeypatch.setenv(OOM_ENV, "1")  # step 1 runs out of memory whatever the batch
    start = time.time()
    with pytest.raises(UserError) as err:
        run(md)
    assert err.value.message.startswith("out of RAM at step 1 (batch 1,")  # halved once, then the clear message
    assert "smaller batch size" not in err.value.hint and "gradient checkpointing on" in err.value.hint
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and status["train_batch_size"] == 1
    assert not (md.path / "train.lock").exists() and time.time() - start < 60


def test_without_the_setting_an_oom_stops_at_once(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1, images=2, train_batch_size=2, enable_buckets=False)
    monkeypatch.setenv(OOM_ENV, "1:1")
    with pytest.raises(UserError) as err:
        run(md)
    assert err.value.message.startswith("out of RAM at step 1 (batch 2,")
    assert "retry with a smaller batch" in err.value.hint  # the setting that would have kept it going
