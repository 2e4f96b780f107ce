""""Generate samples now" as a worker job (``sample_job.run_sample_job``, ``python -m dreambooth sample NAME``): the
locks a training takes, its status, a cancel. The worker itself, started from the WebUI's tab, is tested against the
WebUI stand-in in test_host_webui.py; the config's precision in test_sampling_entry.py."""

from __future__ import annotations

import json
import os

import pytest
from conftest import make_training_model

from dreambooth import lock, sample_job
from dreambooth.train.status import request_cancel


@pytest.fixture()
def md(tmp_path, tiny_checkpoint):
    return make_training_model(tmp_path / "models", tiny_checkpoint("sd1"), mixed_precision="bf16")


def test_the_job_holds_the_models_and_the_gpus_lock_while_it_samples_and_says_what_it_made(md, monkeypatch):
    """As a training does: the model's lock (no training of it meanwhile) and the GPU's lock (none on that GPU);
    a GPU is played by a device key for the CPU, so the GPU lock is taken on any machine."""
    seen = {}

    def previews(model, cfg, device, attention_default, after_each):
        seen["model lock"] = lock.holder(model.path)["pid"]
        seen["gpu lock"] = lock.device_holder(model.path.parent, "cuda:7")
        seen["status"] = json.loads(model.status_path.read_text())
        path = model.samples / "now.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        return [path]

    monkeypatch.setattr(sample_job, "device_key", lambda device: "cuda:7")
    monkeypatch.setattr(sample_job, "sample_now", previews)
    status = sample_job.run_sample_job(md, "cpu")
    assert seen["model lock"] == os.getpid()
    assert seen["gpu lock"]["pid"] == os.getpid() and seen["gpu lock"]["model"] == md.name
    assert seen["status"]["state"] == "sampling" and seen["status"]["job"] == "sample"
    assert seen["status"]["precision"] == "bf16"
    assert status["state"] == "done" and status["samples"] == [str(md.samples / "now.png")]
    assert json.loads(md.status_path.read_text()) == status
    assert lock.holder(md.path) is None and lock.device_holder(md.path.parent, "cuda:7") is None  # released


def test_a_model_that_trains_is_not_sampled(md, monkeypatch):
    monkeypatch.setattr(sample_job, "sample_now", lambda *a: pytest.fail("sampled a model that trains"))
    held = lock.acquire(md.path, token="other")  # a training of the model (this process stands in for it)
    try:
        with pytest.raises(lock.Locked):
            sample_job.run_sample_job(md, "cpu")
    finally:
        held.release()


def test_a_cancel_stops_the_job_between_images(md, monkeypatch):
    def previews(model, cfg, device, attention_default, after_each):
        request_cancel(model)  # the user pressed Cancel while the first image was made
        after_each()
        pytest.fail("went on after a cancel")

    monkeypatch.setattr(sample_job, "sample_now", previews)
    assert sample_job.run_sample_job(md, "cpu")["state"] == "cancelled"


def test_a_sampling_job_is_not_paused(md, monkeypatch):
    from dreambooth import jobs
    from dreambooth.atomic import write_json
    from dreambooth.train.status import PAUSE_FILE

    write_json(md.status_path, {"state": "sampling", "job": "sample", "pid": os.getpid()})
    monkeypatch.setattr(jobs, "worker_pid", lambda model: os.getpid())
    with pytest.raises(jobs.NotRunning, match="making previews"):
        jobs.pause(md)
    assert not (md.path / PAUSE_FILE).exists()
