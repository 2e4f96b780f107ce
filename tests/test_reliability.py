"""Reliability: a truncated weight file in the newest resume state, a disk too full for a save, and running out of
memory mid-step each stop or fall back cleanly, with a clear message and every earlier file intact."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import make_training_model
from conftest import train_here as run
from conftest import unet_weights as unet

from dreambooth.atomic import fault_point
from dreambooth.compat import is_out_of_memory
from dreambooth.errors import UserError
from dreambooth.train import loop as loop_module
from dreambooth.train import saving as saving_module
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.resume import latest_state, list_states, load_state, save_state

Usage = namedtuple("Usage", "total used free")


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under ``folders`` (but logs, status and lock), by path: to prove that nothing changed."""
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "logs" not in path.parts and path.name not in ("status.json", "train.lock"):
                files[str(path)] = path.read_bytes()
    return files


@pytest.fixture()
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1")


# --- power cut: a truncated weight file in the newest resume state ------------------------------------------------


def test_truncated_weights_in_the_newest_state_fall_back_to_the_one_before(tmp_path, sd1, caplog):
    md = make_training_model(tmp_path, sd1, epochs=2, save_every_n_epochs=1, keep_resume_states=2)
    run(md)
    older, newest = list_states(md.checkpoints)
    weights = newest / "unet.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])  # a power cut in the middle of the write, without a rename
    state = latest_state(md.checkpoints)
    assert state is not None and state.path == older and state.step == 4
    assert "cannot be read" in caplog.text and newest.name in caplog.text and "falling back" in caplog.text


def test_resume_after_a_truncated_state_continues_from_the_one_before(tmp_path, sd1, caplog):
    md = make_training_model(tmp_path, sd1, epochs=2, save_every_n_epochs=1, keep_resume_states=2)
    run(md)
    newest = list_states(md.checkpoints)[-1]
    (newest / "unet.safetensors").write_bytes((newest / "unet.safetensors").read_bytes()[:1000])
    trainer = run(md, resume=True)
    assert trainer.start_step == 4 and trainer.step == 8 and trainer.saves == [8]  # steps 5-8 trained again
    assert load_state(list_states(md.checkpoints)[-1]).step == 8  # and the damaged state is replaced
    assert "falling back" in caplog.text


def test_a_state_whose_step_does_not_match_its_folder_is_refused(tmp_path):
    path = save_state(tmp_path, 4, {"step": 4}, {"unet": {"w": torch.ones(2)}}, keep=3)
    path.rename(tmp_path / "step_00000009")  # a state in the wrong place is no state of that step
    assert latest_state(tmp_path) is None


def test_old_states_are_renamed_away_before_they_are_deleted(tmp_path, monkeypatch):
    from dreambooth.train import resume as resume_module

    removed = []
    real_rmtree = resume_module.shutil.rmtree

    def spy(path, *args, **kwargs):
        removed.append(Path(path).name)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(resume_module.shutil, "rmtree", spy)
    for step in (1, 2, 3):
        save_state(tmp_path, step, {"step": step}, {"unet": {"w": torch.ones(2)}}, keep=2)
    assert removed == [".step_00000001.tmp-deleting"]  # a crash mid-delete leaves a temporary, not a half state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


# --- disk space ---------------------------------------------------------------------------------------------------


def test_a_save_the_disk_cannot_hold_stops_with_a_clear_message(tmp_path, sd1, monkeypatch):
    exports = tmp_path / "exports"
    md = make_training_model(tmp_path, sd1, epochs=3, save_every_n_epochs=1, save_checkpoint=True)
    real_usage = shutil.disk_usage
    saves = []
    original_save = Trainer._save

    def save(self):
        saves.append(self.step)
        if len(saves) == 2:  # the disk fills up before the second save
            before.update(snapshot(md.path, exports))
            monkeypatch.setattr(saving_module.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, 2**20))
        original_save(self)

    before: dict[str, bytes] = {}
    monkeypatch.setattr(Trainer, "_save", save)
    with pytest.raises(UserError) as err:
        run(md, export_dir=exports)
    monkeypatch.setattr(saving_module.shutil, "disk_usage", real_usage)
    message = str(err.value)
    assert "not enough free disk space to save at step 8" in message
    assert "needs about" in message and "1.0 MB is free" in message and str(md.checkpoints) in message
    assert "--resume" in err.value.hint
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and "not enough free disk space" in status["message"]
    assert snapshot(md.path, exports) == before  # the previous save is intact, nothing of the new one was written
    assert [p.name for p in list_states(md.checkpoints)] == ["step_00000004"]
    assert sorted(p.name for p in exports.iterdir()) == ["m_4.safetensors"]
    assert not (md.path / "train.lock").exists()


def test_the_space_estimate_covers_what_a_save_writes(tmp_path, sd1, monkeypatch):
    """With exactly the estimate free the save goes through, and the estimate is at least what was written."""
    exports = tmp_path / "exports"
    md = make_training_model(tmp_path, sd1, epochs=1, save_every_n_epochs=1, save_checkpoint=True, use_ema=True,
                             text_encoder_ratio=1.0)
    estimates = []
    real_check = saving_module.check_disk_space

    def check(sizes, step, previous=None):
        estimates.append(dict(sizes))
        real_check(sizes, step, previous)

    monkeypatch.setattr(saving_module, "check_disk_space", check)
    run(md, export_dir=exports)
    (_, sizes) = estimates  # the check before the run, the save's

    def written(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) + \
            sum(p.stat().st_size for p in folder.rglob("*.pt"))

    assert sizes[md.checkpoints] * saving_module.DISK_MARGIN >= written(md.checkpoints)
    assert sizes[exports] * saving_module.DISK_MARGIN >= written(exports) >= sizes[exports] * 0.9
    working = sum((md.working / c / "diffusion_pytorch_model.safetensors").stat().st_size for c in ("unet", "unet_ema"))
    working += (md.working / "text_encoder" / "model.safetensors").stat().st_size
    assert sizes[md.working] * saving_module.DISK_MARGIN >= working


def test_disk_space_is_checked_for_lora_saves_too(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1, method="lora", lora_rank=4, save_checkpoint=True)
    monkeypatch.setattr(saving_module.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 100))
    with pytest.raises(UserError, match="not enough free disk space"):
        run(md, lora_dir=tmp_path / "Lora")
    assert not list_states(md.checkpoints) and not (tmp_path / "Lora").exists()
    assert not (md.path / "lora").exists()


def test_a_failing_save_on_cancel_ends_as_failed_not_cancelled(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=2, save_on_cancel=True)
    original = Trainer._optimizer_step

    def step_then_cancel(self, group):
        original(self, group)
        if self.step == 1:
            (md.path / "cancel.request").touch()
            monkeypatch.setattr(saving_module.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 100))

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_cancel)
    with pytest.raises(UserError):
        run(md)
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and "disk space" in status["message"]
    assert not (md.path / "train.lock").exists()


# --- out of memory ------------------------------------------------------------------------------------------------


def _oom_from_step(monkeypatch, error: BaseException, first_failing_call: int) -> None:
    real = loop_module.compute_loss
    calls = []

    def compute_loss(models, batch, settings, generator):
        calls.append(1)
        if len(calls) >= first_failing_call:
            raise error
        return real(models, batch, settings, generator)

    monkeypatch.setattr(loop_module, "compute_loss", compute_loss)


def test_out_of_memory_stops_with_the_settings_that_would_fit(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=2, save_every_n_epochs=1, train_batch_size=2, images=4,
                             gradient_checkpointing=False, cache_latents=False, optimizer="adamw")
    _oom_from_step(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3)
    with pytest.raises(UserError) as err:
        run(md)
    assert isinstance(err.value.__cause__, torch.cuda.OutOfMemoryError)
    message, hint = err.value.message, err.value.hint
    assert message.startswith("out of RAM at step 3 (batch 2, 64 px)") and "last save" in message
    for setting in ("smaller batch size (now 2", "gradient checkpointing on", "8-bit AdamW", "cache latents on",
                    "LoRA instead of full training"):
        assert setting in hint
    assert "lower resolution" not in hint  # 64 px is as low as it sensibly goes
    status = json.loads(md.status_path.read_text())
    assert status["state"] == "failed" and status["message"] == str(err.value)
    assert not (md.path / "train.lock").exists()  # the lock is released
    states = list_states(md.checkpoints)  # the save of epoch 1 (steps 1-2) is intact and loads
    assert [p.name for p in states] == ["step_00000002"] and load_state(states[0]).step == 2
    unet(md)
    monkeypatch.undo()
    assert run(md, resume=True).step == 4  # and the run goes on from it once memory allows


def test_out_of_memory_names_only_settings_not_in_use(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1, method="lora", lora_rank=4, gradient_checkpointing=True,
                             cache_latents=True, train_batch_size=1, resolution=512, enable_buckets=False)
    _oom_from_step(monkeypatch, RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't "
                                             "allocate memory: you tried to allocate 123456789 bytes."), 1)
    with pytest.raises(UserError) as err:
        Trainer(md, RunOptions(device="cpu", install_signal_handlers=False)).run()
    hint = err.value.hint
    assert "8-bit AdamW" in hint and "lower resolution (now 512 px, e.g. 384)" in hint
    for setting in ("batch size", "gradient checkpointing", "cache latents", "LoRA instead"):
        assert setting not in hint
    assert json.loads(md.status_path.read_text())["state"] == "failed"
    assert not (md.path / "train.lock").exists()


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, sd1, monkeypatch):
    md = make_training_model(tmp_path, sd1, epochs=1)
    _oom_from_step(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run(md)
    assert json.loads(md.status_path.read_text())["state"] == "failed"
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory")) and not is_out_of_memory(ValueError("x"))


# --- the crash-test hook ------------------------------------------------------------------------------------------


def test_the_fault_hook_does_nothing_without_its_variable(monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_FAULT_AT", raising=False)
    for _ in range(3):
        fault_point("save", "write")  # no variable: never kills, whatever the count
    monkeypatch.setenv("DREAMBOOTH_FAULT_AT", "step:1000000")
    fault_point("step")  # a point not reached yet: no kill either


def test_a_run_removes_the_temporaries_a_crash_left_in_the_model_dir(tmp_path, sd1):
    md = make_training_model(tmp_path, sd1, epochs=1, images=1, preview_every_n_epochs=1)
    leftovers = [md.path / ".status.json.tmp-ab12", md.path / ".db_config.json.tmp-cd34",
                 md.samples / ".step000001_c0_0.png.tmp-ef56"]
    foreign = md.samples / ".now_step000000_abc_c0_0.png.tmp-0123"  # the UI's own preview being written
    for path in [*leftovers, foreign]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    run(md)
    assert not any(p.exists() for p in leftovers) and foreign.exists()
