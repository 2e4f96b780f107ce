"""What is checked before a run starts (issue 12, items 2, 3, 11, 20): bad concepts and a textual-inversion word in no
prompt are refused by the API (400), the tab (its message) and the CLI (its exit) before anything trains; the first
save's disk space is checked before the first step; a resume without a resume state says so and keeps the loss log.
"""

from __future__ import annotations

import sys
from collections import namedtuple

import pytest
from conftest import make_training_model
from conftest import train_here as _run
from test_api import Host, make_client

from dreambooth import jobs
from dreambooth.cli import main
from dreambooth.config import TrainConfig
from dreambooth.errors import UserError
from dreambooth.train import saving as saving_module
from dreambooth.train.loop import Trainer
from dreambooth.train.methods import method_class
from dreambooth.train.status import read_status
from dreambooth.ui.handlers import TabHandlers, guarded
from dreambooth.ui.output import status_html

Usage = namedtuple("Usage", "total used free")
TI = dict(method="textual_inversion", embedding_token="zwx-style", learning_rate=5e-3)


def _loss_rows(path) -> list[str]:
    return path.read_text().splitlines()[1:] if path.exists() else []


@pytest.fixture()
def no_worker(monkeypatch):
    """Workers that would start are a process that does nothing; the list holds the models they were started for."""
    started = []

    def command(model, **kwargs):
        started.append(model.name)
        return [sys.executable, "-c", "import time; time.sleep(3)"]  # ends by itself

    monkeypatch.setattr(jobs, "worker_command", command)
    return started


# ------------------------------------------------------------------------------------- item 2: the embedding word


def test_a_textual_inversion_run_whose_word_is_in_no_prompt_stops_before_its_first_step(tmp_path, tiny_checkpoint,
                                                                                         capsys):
    md = make_training_model(tmp_path / "models", tiny_checkpoint("sd1"), epochs=1, **TI)
    code = main(["train", "m", "--models-root", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code != 0
    assert "'zwx-style' is in none of the training prompts" in err and "'a photo of zwx disc'" in err
    status = read_status(md)
    assert status["state"] == "failed" and "'zwx-style'" in status["message"] and status.get("step", 0) == 0
    assert _loss_rows(md.logs / "loss.csv") == []


def test_a_word_in_only_some_prompts_is_a_note():
    check = method_class("textual_inversion").check_prompts
    cfg = TrainConfig(method="textual_inversion", embedding_token="zwx-style")
    assert check(cfg, ["a ZWX-STYLE cat", "zwx-style"]) == []  # a whole word, in any case (CLIP lowercases)
    [note] = check(cfg, ["a zwx-style cat", "a dog", "zwx-styled"])
    assert "'zwx-style' is in 1 of the 3 training prompts" in note


# ------------------------------------------------------------------------------- item 3: bad concepts, three doors


def _api_model(tmp_path, tiny_checkpoint, concept: dict, **settings):
    host = Host(tmp_path)
    md = make_training_model(host.models_root(), tiny_checkpoint("sd1"), epochs=1, concept=concept, **settings)
    return host, md


@pytest.mark.parametrize("concept, settings, words", [
    ({"instance_data_dir": "/no/such/folder"}, {}, "instance images folder /no/such/folder does not exist"),
    ({"num_class_images_per": 1, "class_prompt": ""}, {}, "no class prompt to generate them with"),
    ({}, TI, "'zwx-style' is in none of the training prompts"),
    ({}, {"method": "textual_inversion", "embedding_token": "Bad Word"}, "contains spaces"),
])
def test_the_api_refuses_a_bad_concept_with_400_before_a_worker_starts(tmp_path, tiny_checkpoint, no_worker,
                                                                       concept, settings, words):
    host, md = _api_model(tmp_path, tiny_checkpoint, concept, **settings)
    r = make_client(host).post("/dreambooth/models/m/train", json={})
    assert r.status_code == 400 and words in r.json()["error"], r.text
    assert r.json()["hint"] and no_worker == [] and read_status(md) is None


def test_the_tab_shows_why_a_concept_is_refused(tmp_path, tiny_checkpoint, no_worker):
    host, md = _api_model(tmp_path, tiny_checkpoint, {"num_class_images_per": 2, "class_prompt": " [filewords], "})
    handlers = TabHandlers(host, no_change=lambda: None)
    values = handlers.load("m")[3:]
    message, _ = guarded(2, lambda: None)(handlers.train)("m", False, *values)
    assert "db-error" in message and "no class prompt to generate them with" in message
    assert no_worker == []


def test_the_cli_refuses_a_missing_class_prompt_before_loading_the_model(tmp_path, tiny_checkpoint, capsys,
                                                                         monkeypatch):
    md = make_training_model(tmp_path / "models", tiny_checkpoint("sd1"), epochs=1,
                             concept={"num_class_images_per": 1})
    from dreambooth.train import loop

    monkeypatch.setattr(loop, "load_models", lambda *a: pytest.fail("the model was loaded"))
    assert main(["train", "m", "--models-root", str(tmp_path / "models")]) != 0
    assert "no class prompt to generate them with" in capsys.readouterr().err
    assert read_status(md)["state"] == "failed"


# ----------------------------------------------------------------------------------- item 11: the first save's disk


def test_a_run_whose_first_save_cannot_fit_stops_before_its_first_step(tmp_path, tiny_checkpoint, monkeypatch):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1, save_checkpoint=True)
    monkeypatch.setattr(saving_module.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 2**20))
    with pytest.raises(UserError) as err:
        _run(md, export_dir=tmp_path / "exports")
    assert "not enough free disk space for this run's first save" in err.value.message
    assert "nothing was trained" in err.value.message and "1.0 MB is free" in err.value.message
    assert read_status(md)["step"] == 0 and _loss_rows(md.logs / "loss.csv") == []


def test_the_status_says_what_a_save_costs_and_the_estimate_covers_it(tmp_path, tiny_checkpoint, monkeypatch):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1, save_checkpoint=True)
    estimates = []
    real = saving_module.check_disk_space
    monkeypatch.setattr(saving_module, "check_disk_space",
                        lambda sizes, step, previous=None: estimates.append((step, dict(sizes))) or real(sizes, step,
                                                                                                      previous))
    _run(md, export_dir=tmp_path / "exports")
    status = read_status(md)
    assert "a save writes about" in status["note"] and "of resume state in" in status["note"]
    (first_step, first), (save_step, at_save) = estimates
    assert (first_step, save_step) == (None, 4)
    # the optimizer's state is in the estimate before it exists (within the margin every check adds)
    assert first[md.checkpoints] * saving_module.DISK_MARGIN >= at_save[md.checkpoints] > first[md.checkpoints] / 2
    written = sum(p.stat().st_size for p in md.checkpoints.rglob("*") if p.is_file())
    assert first[md.checkpoints] * saving_module.DISK_MARGIN >= written
    assert status["save_bytes"] == sum(first.values())


def test_out_of_space_at_the_first_save_does_not_speak_of_a_previous_save(tmp_path, tiny_checkpoint, monkeypatch):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1)
    original = Trainer._save

    def save(self):  # the disk fills up during the run
        monkeypatch.setattr(saving_module.shutil, "disk_usage", lambda path: Usage(2**30, 2**30, 100))
        original(self)

    monkeypatch.setattr(Trainer, "_save", save)
    with pytest.raises(UserError) as err:
        _run(md)
    assert "not enough free disk space to save at step 4" in err.value.message
    assert "previous save" not in err.value.message and "this run has no earlier save" in err.value.message
    assert "--resume" not in err.value.hint


# ------------------------------------------------------------------------------- item 20: resume with nothing to resume


def test_resume_without_a_readable_state_says_so_and_keeps_the_loss_log(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1)
    _run(md)
    first_rows = _loss_rows(md.logs / "loss.csv")
    assert len(first_rows) == 4
    for state in md.checkpoints.glob("step_*"):
        (state / "trainer_state.pt").write_bytes(b"cut off")  # unreadable
    _run(md, resume=True)
    status = read_status(md)
    assert "no readable resume state" in status["note"] and "loss_until_step_4.csv" in status["note"]
    assert "no readable resume state" in status_html(status, False, "m")  # the tab's status shows it
    assert _loss_rows(md.logs / "loss_until_step_4.csv") == first_rows  # the earlier log is kept whole
    assert [r.split(",")[0] for r in _loss_rows(md.logs / "loss.csv")] == ["1", "2", "3", "4"]


def test_the_tab_says_when_resume_has_no_state_to_start_from(tmp_path, tiny_checkpoint, no_worker):
    host, md = _api_model(tmp_path, tiny_checkpoint, {})
    handlers = TabHandlers(host, no_change=lambda: None)
    message, status = handlers.train("m", True, *handlers.load("m")[3:])
    assert "there is no resume state" in message and "there is no resume state" in status
    assert no_worker == ["m"]
    jobs.wait(md, timeout=30)
