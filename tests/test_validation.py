"""The validation set: its loss at each save (logs/validation.csv, status, the loss chart), "keep the best N saves"
and "stop when validation loss has not improved for K saves"."""

from __future__ import annotations

import math

import pytest
from conftest import make_training_model
from conftest import train_here as run
from safetensors.torch import load_file

from dreambooth.demo import make_concept_images
from dreambooth.errors import UserError
from dreambooth.train.validation import Record, Validation
from dreambooth.train.validation_log import LOG_NAME, read_log
from dreambooth.ui.output import loss_svg


def test_the_validation_loss_curve_is_written_to_logs_at_each_save(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), images=5, epochs=4, save_every_n_epochs=1,
                             learning_rate=1e-2, concept={"validation_holdout": 1})
    trainer = run(md)
    rows = read_log(md.logs / LOG_NAME)
    assert [step for step, _ in rows] == trainer.saves == [4, 8, 12, 16]  # 4 images train a epoch: a row a save
    losses = [loss for _, loss in rows]
    assert all(math.isfinite(v) and v > 0 for v in losses) and len(set(losses)) > 1  # the model changed between saves
    status = trainer.status.status
    assert status["state"] == "done" and status["validation_loss"] == pytest.approx(losses[-1], rel=1e-5)
    held_out = trainer.data.validation[0]
    assert len(held_out) == 1 and held_out[0].image not in {ex.image for ex in trainer.data.instances[0]}
    print("validation curve (step, loss):", rows)


def test_measuring_the_validation_loss_changes_nothing_about_the_training(tmp_path, tiny_checkpoint):
    """The same run with a validation folder and without one ends with bitwise the same weights."""
    valid = tmp_path / "valid"
    make_concept_images(valid, count=2)
    finals, logs = [], []
    for name, concept in (("plain", {}), ("validated", {"validation_data_dir": str(valid)})):
        md = make_training_model(tmp_path, tiny_checkpoint("sd1"), name=name, images=2, epochs=2,
                                 save_every_n_epochs=1, concept=concept, hflip=True, shuffle_tags=True)
        run(md)
        finals.append(load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors")))
        logs.append(read_log(md.logs / LOG_NAME))
    assert logs[0] == [] and [step for step, _ in logs[1]] == [2, 4]
    assert finals[0].keys() == finals[1].keys() and all(finals[0][k].equal(finals[1][k]) for k in finals[0])


def test_a_run_stops_early_when_the_validation_loss_has_not_improved(tmp_path, tiny_checkpoint):
    # learning rate 0: the model never changes, so no save after the first brings a new lowest validation loss
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), images=3, epochs=10, save_every_n_epochs=1,
                             learning_rate=0.0, early_stop_saves=2, concept={"validation_holdout": 1})
    trainer = run(md)
    status = trainer.status.status
    assert status["state"] == "done" and "stopped early" in status["message"]
    assert trainer.epoch == 3 and trainer.saves == [2, 4, 6]  # 2 training images a epoch; 10 epochs were asked
    assert [step for step, _ in read_log(md.logs / LOG_NAME)] == [2, 4, 6]


def test_the_early_stop_counts_saves_since_the_lowest_loss(tmp_path):
    validation = Validation.__new__(Validation)
    validation.enabled = True
    validation.cfg = type("Cfg", (), {"early_stop_saves": 2})()
    validation.records = []
    stopped = []
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.7, 0.5], start=1):
        validation.records.append(Record(step, step, loss))
        try:
            validation.stop_if_stale()
        except Exception as err:  # noqa: BLE001 - StoppedEarly
            stopped.append((step, str(err)))
            break
    assert stopped and stopped[0][0] == 6 and "best 1 at step 4" in stopped[0][1]


def test_keep_the_best_saves_deletes_the_other_saves_exports(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="lora", images=3, epochs=3,
                             save_every_n_epochs=1, learning_rate=0.0, keep_best_saves=1, save_checkpoint=True,
                             concept={"validation_holdout": 1})
    lora_dir = tmp_path / "Lora"
    trainer = run(md, lora_dir=lora_dir)
    assert trainer.saves == [2, 4, 6]
    # equal losses (nothing learns at learning rate 0): the earliest save is the best, the others' files are gone
    assert sorted(p.name for p in lora_dir.iterdir()) == ["m_2.safetensors"]
    exports = dict(read_log(md.logs / LOG_NAME, with_exports=True))
    assert exports == {2: [str(lora_dir / "m_2.safetensors")], 4: [], 6: []}


def test_keep_best_ranks_by_loss(tmp_path):
    files = {}
    for step in (1, 2, 3, 4):
        files[step] = tmp_path / f"m_{step}.safetensors"
        files[step].write_bytes(b"x")
    validation = Validation.__new__(Validation)
    validation.status = type("S", (), {"update": lambda self, **kw: None})()
    validation.records = [Record(s, s, loss, [str(files[s])]) for s, loss in ((1, 4.0), (2, 1.0), (3, 3.0), (4, 2.0))]
    validation._keep_best(2)
    assert sorted(s for s, f in files.items() if f.exists()) == [2, 4]


def test_validation_settings_refuse_what_cannot_work(tmp_path, tiny_checkpoint, monkeypatch):
    from dreambooth.train import loop

    def never(*args, **kwargs):
        raise AssertionError("the models were loaded before the settings were checked")

    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), name="nohold", images=2, early_stop_saves=2)
    with monkeypatch.context() as patched:
        patched.setattr(loop, "load_models", never)
        with pytest.raises(UserError, match="needs a validation set"):
            run(md)
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), name="all", images=2,
                             concept={"validation_holdout": 2})
    with pytest.raises(UserError, match="leaves none to train on"):
        run(md)


def test_the_loss_chart_draws_the_validation_loss():
    steps = [(s, 1.0 / s) for s in range(1, 50)]
    plain = loss_svg(steps)
    with_validation = loss_svg(steps, [(10, 0.2), (20, 0.1), (30, 0.15)])
    assert "db-val-line" not in plain and "db-val-line" in with_validation
    assert "validation loss at step 30: 0.15" in with_validation


def test_a_resumed_run_continues_the_validation_log_as_an_uninterrupted_one(tmp_path, tiny_checkpoint):
    from conftest import cancelled_at

    settings = dict(images=3, epochs=3, save_every_n_epochs=1, learning_rate=1e-2, save_on_cancel=False,
                    concept={"validation_holdout": 1})
    whole = make_training_model(tmp_path, tiny_checkpoint("sd1"), name="whole", **settings)
    run(whole)
    cut = make_training_model(tmp_path, tiny_checkpoint("sd1"), name="cut", **settings)
    with cancelled_at(3):
        run(cut)
    assert [step for step, _ in read_log(cut.logs / LOG_NAME)] == [2]
    run(cut, resume=True)
    assert read_log(cut.logs / LOG_NAME) == read_log(whole.logs / LOG_NAME)
    assert [step for step, _ in read_log(whole.logs / LOG_NAME)] == [2, 4, 6]
