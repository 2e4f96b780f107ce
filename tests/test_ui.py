"""The Dreambooth tab under the installed gradio (3.41.2 in the host profile, 4.x in the current one): it builds,
has exactly one control per setting, loads and saves db_config.json exactly, counts steps, shows errors as one line,
and starts training through jobs without waiting."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("gradio") is None:  # not imported here: dreambooth.ui.compat imports it
    pytest.skip("gradio is not installed", allow_module_level=True)

from dreambooth.config import Concept, TrainConfig, config_from_dict, field_specs, load_config  # noqa: E402
from dreambooth.create import create_model  # noqa: E402
from dreambooth.demo import make_concept_images  # noqa: E402
from dreambooth.host.standalone import StandaloneHost  # noqa: E402
from dreambooth.ui import compat  # noqa: E402
from dreambooth.ui.form import (  # noqa: E402
    CONCEPT_PANELS,
    all_controls,
    config_to_values,
    estimate_steps,
    values_to_config,
)
from dreambooth.ui.handlers import TabHandlers
from dreambooth.ui.output import LossLog, loss_svg, status_html  # noqa: E402
from dreambooth.ui.tab import build_tab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class RecordingHost(StandaloneHost):
    """The standalone host, remembering what was exported."""

    exported: list[Path]

    def __init__(self, root: Path) -> None:
        super().__init__(root, "cpu")
        object.__setattr__(self, "exported", [])

    def after_export(self, path: Path) -> None:
        self.exported.append(Path(path))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-root")
    host = RecordingHost(root)
    demo = build_tab(host)
    components = {c.elem_id: c for c in compat.components(demo) if getattr(c, "elem_id", None)}
    return demo, host, components


@pytest.fixture()
def model(tmp_path, tiny_checkpoint):
    """A models root with one tiny model in it, and handlers for a host on that root."""
    root = tmp_path / "models"
    source = root / "Stable-diffusion" / "tiny.safetensors"
    source.parent.mkdir(parents=True)
    source.write_bytes(tiny_checkpoint("sd1").read_bytes())
    md = create_model(source, "m", root)
    host = RecordingHost(root)
    return md, host, TabHandlers(host, no_change=lambda: "NO_CHANGE")


def _other(spec, seed: int):
    """A valid value for ``spec`` that differs from its default (a different one for each ``seed``)."""
    if spec.type is bool:
        return not spec.default
    if spec.choices is not None:
        others = [c for c in spec.choices if c != spec.default]
        return others[seed % len(others)]
    if spec.kind == "gpus":  # GPU numbers (none of them on this machine: the tab keeps them, marked not found)
        return f"{seed % 3 + 1},{seed % 3}"
    if spec.type is str:
        return f"{spec.name} value {seed} with ünïcödé"
    lo = spec.minimum if spec.minimum is not None else spec.default - 1000
    hi = spec.maximum if spec.maximum is not None else spec.default + 1000
    if spec.type is int:
        value = int(lo + (hi - lo) * ((0.37 + 0.01 * seed) % 0.99))  # inside the range for any number of fields
        return value if value != spec.default else value + 1
    value = lo + (hi - lo) * (0.3721 + 0.0013 * seed)
    return value if value != spec.default else value / 2


def _everything_set() -> TrainConfig:
    """A config whose every setting differs from its default, with concepts in and past the panels."""
    values = {s.name: _other(s, i) for i, s in enumerate(field_specs(TrainConfig))
              if s.ui and s.name not in ("config_version",)}
    concepts = [Concept(**{s.name: _other(s, i + 7 * n) for i, s in enumerate(field_specs(Concept))})
                for n in range(CONCEPT_PANELS + 1)]
    return TrainConfig(**values, concepts=concepts, unknown={"from_a_newer_version": [1, {"x": 2}]},
                       method_defaults=values["method"])  # as saved once its method was chosen


# ---------------------------------------------------------------------------------------------------- building


def test_importing_the_ui_does_not_import_gradio():
    code = ("import sys, dreambooth.ui.app, dreambooth.ui.tab, dreambooth.ui.compat, dreambooth.host.standalone; "
            "print('gradio' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_tab_builds_under_the_installed_gradio(built):
    demo, _, components = built
    gr = compat.gradio()
    assert isinstance(demo, gr.Blocks)
    expected_major = 3 if gr.__version__.startswith("3.") else 4
    assert compat.major() == expected_major
    for elem_id in ("dreambooth_model", "dreambooth_load", "dreambooth_save", "dreambooth_train", "dreambooth_cancel",
                    "dreambooth_pause", "dreambooth_export", "dreambooth_sample", "dreambooth_source",
                    "dreambooth_model_type", "dreambooth_extract_ema", "dreambooth_new_name", "dreambooth_create",
                    "dreambooth_status", "dreambooth_poll", "dreambooth_loss", "dreambooth_gallery",
                    "dreambooth_log", "dreambooth_message", "dreambooth_steps"):
        assert elem_id in components, elem_id
    assert components["dreambooth_model_type"].choices in (["auto", "sd1", "sd2", "sd2v", "sdxl"],
                                                           [(c, c) for c in ("auto", "sd1", "sd2", "sd2v", "sdxl")])


def test_one_control_per_setting_generated_from_its_spec(built):
    demo, _, components = built
    gr = compat.gradio()
    settings = {k: c for k, c in components.items() if k.startswith("dbt_") and "_group_" not in k
                and not k.startswith("dbt_group_")}
    expected = {f"dbt_{s.name}": s for s in field_specs(TrainConfig) if s.ui}
    for index in range(CONCEPT_PANELS):
        expected.update({f"dbt_c{index}_{s.name}": s for s in field_specs(Concept) if s.ui})
    assert sorted(settings) == sorted(expected)
    ids = [getattr(c, "elem_id", None) for c in compat.components(demo)]
    assert all(ids.count(k) == 1 for k in expected)  # exactly one control each
    kinds = {bool: gr.Checkbox, str: gr.Textbox}
    for elem_id, spec in expected.items():
        component = settings[elem_id]
        assert component.label == spec.label
        if spec.kind == "gpus":  # this machine's GPUs to tick (none here: the help says so)
            assert isinstance(component, gr.CheckboxGroup) and component.info.startswith(spec.help)
            assert component.choices == [] and component.value == []
            continue
        assert component.info == spec.help
        if spec.choices is not None:
            assert isinstance(component, gr.Dropdown)
            assert [c[1] if isinstance(c, tuple) else c for c in component.choices] == list(spec.choices)
        elif spec.type in kinds:
            assert isinstance(component, kinds[spec.type])
        else:
            assert isinstance(component, (gr.Slider, gr.Number))
            assert (component.minimum, component.maximum) == (spec.minimum, spec.maximum)
            if spec.type is float:
                assert isinstance(component, gr.Number)  # a slider would snap e.g. 0.9999 to its step
        assert component.value == spec.default or (spec.type is float and component.value == float(spec.default))


def test_concept_panels_and_groups(built):
    _, _, components = built
    for index in range(CONCEPT_PANELS):
        assert f"dreambooth_concept_{index}" in components
    for group in ("intervals", "batching", "learning_rate", "performance", "images", "loss", "saving"):
        assert f"dbt_group_{group}" in components


# ------------------------------------------------------------------------------------------------ load and save


def test_values_round_trip_every_field_without_gradio():
    cfg = _everything_set()
    controls = all_controls()
    base = TrainConfig(model_name="x", concepts=[], unknown=dict(cfg.unknown))
    base.concepts = [Concept(), Concept(), Concept(), cfg.concepts[3]]
    again = values_to_config(config_to_values(cfg, controls), controls, base)
    assert again.to_dict() | {"model_name": cfg.model_name} == cfg.to_dict() | {"model_name": cfg.model_name}


def test_load_then_save_through_the_tab_keeps_db_config_json_exactly(model, built):
    md, _, handlers = model
    _, _, components = built
    cfg = _everything_set()
    saved = load_config(md.path)
    for name in ("model_name", "family", "source_checkpoint", "source_sha256"):  # the model's identity
        setattr(cfg, name, getattr(saved, name))
    cfg.revision, cfg.epochs_trained = 1234, 56
    cfg.save(md.path)
    before = md.config_path.read_bytes()
    default = TrainConfig().to_dict()
    changed = {k for k, v in json.loads(before).items() if k != "concepts" and v != default.get(k)}
    ui_names = {s.name for s in field_specs(TrainConfig) if s.ui}
    assert ui_names <= changed  # every setting of the form is off its default

    out = handlers.load("m")
    assert "loaded" in out[0] and "concepts 4-4 are not shown" in out[0]
    values = out[3:]
    assert len(values) == len(handlers.controls)
    # as the browser sends them back: through each real component of this gradio version
    values = [compat.roundtrip(components[c.elem_id], v) for c, v in zip(handlers.controls, values, strict=True)]
    md.config_path.unlink()
    cfg.save(md.path)  # the file as it was, so only the form is compared
    message = handlers.save("m", *values)
    assert "saved" in message
    assert md.config_path.read_bytes() == before
    assert config_from_dict(json.loads(before))[0] == load_config(md.path)


def test_save_keeps_what_training_wrote_meanwhile(model):
    md, _, handlers = model
    values = handlers.load("m")[3:]
    cfg = load_config(md.path)
    cfg.revision, cfg.epochs_trained = 99, 3  # the worker saved progress after the form was loaded
    cfg.save(md.path)
    epochs = next(i for i, c in enumerate(handlers.controls) if c.spec.name == "epochs")
    values[epochs] = 7
    handlers.save("m", *values)
    again = load_config(md.path)
    assert (again.revision, again.epochs_trained, again.epochs) == (99, 3, 7)


def test_empty_trailing_panels_are_not_concepts_but_gaps_keep_indices(model):
    md, _, handlers = model
    values = handlers.load("m")[3:]
    index = {(c.concept, c.spec.name): i for i, c in enumerate(handlers.controls)}
    values[index[(2, "instance_prompt")]] = "third"
    handlers.save("m", *values)
    concepts = load_config(md.path).concepts
    assert [c.instance_prompt for c in concepts] == ["", "", "third"]
    values[index[(2, "instance_prompt")]] = ""
    handlers.save("m", *values)
    assert load_config(md.path).concepts == []


# ---------------------------------------------------------------------------------------------------- step count


def test_total_steps_is_images_times_repeats_times_epochs_over_batch_and_accumulation(tmp_path):
    make_concept_images(tmp_path / "a", count=5)
    make_concept_images(tmp_path / "b", count=3)
    a = Concept(instance_data_dir=str(tmp_path / "a"), repeats=2)
    b = Concept(instance_data_dir=str(tmp_path / "b"), num_class_images_per=1)  # prior preservation doubles
    estimate = estimate_steps([a, b], epochs=7, batch_size=3, grad_accum=4)
    # (5 x 2 + 3 x 2) = 16 images per epoch -> 6 batches of 3 -> 2 optimizer steps per epoch -> 14
    assert estimate.total == 14
    assert estimate.text.startswith("14 steps")
    assert estimate_steps([a], epochs=10, batch_size=1, grad_accum=1).total == 100
    assert estimate_steps([Concept()], epochs=10, batch_size=1, grad_accum=1).total == 0


def test_total_steps_matches_the_trainer(tmp_path):
    from dreambooth.data.dataset import TrainingData

    make_concept_images(tmp_path / "a", count=5)
    concept = Concept(instance_data_dir=str(tmp_path / "a"), repeats=2)
    data = TrainingData([concept], 64, enable_buckets=False, seed=0)
    for batch, accumulation in ((1, 1), (3, 2), (4, 3), (16, 1)):
        assert estimate_steps([concept], 5, batch, accumulation).total == 5 * data.steps_per_epoch(batch,
                                                                                                  accumulation)
    held = Concept(instance_data_dir=str(tmp_path / "a"), repeats=2, validation_holdout=2)  # 2 images validate
    held_data = TrainingData([held], 64, enable_buckets=False, seed=0)
    assert estimate_steps([held], 5, 1, 1).total == 5 * held_data.steps_per_epoch(1, 1) == 5 * 3 * 2


def test_live_step_count_from_the_form_controls(tmp_path, model):
    _, _, handlers = model
    make_concept_images(tmp_path / "a", count=4)
    text = handlers.steps(3, 2, 1, "", str(tmp_path / "a"), 2, 0, "", 1, 0, "", 1, 0)
    assert "Total: 12 steps" in text  # 4 x 2 = 8 per epoch, batch 2 -> 4 steps, 3 epochs


def test_live_step_count_is_wired_to_the_step_controls(built):
    demo, _, _ = built
    fns = [getattr(f, "__wrapped__", f) for f in compat.event_functions(demo)]
    assert sum(1 for f in fns if getattr(f, "__name__", "") == "steps") == 4 + 3 * CONCEPT_PANELS


# ---------------------------------------------------------------------------------------------------- errors


def _wired(demo, name: str):
    """The guarded function the tab wired for handler ``name``."""
    for fn in compat.event_functions(demo):
        if getattr(getattr(fn, "__wrapped__", None), "__name__", None) == name:
            return fn
    raise AssertionError(f"no event runs {name}")


def test_errors_show_as_one_message_line_not_a_traceback(built, tmp_path, monkeypatch):
    demo, host, _ = built
    handlers = demo.dreambooth_handlers
    defaults = [c.spec.default for c in handlers.controls]

    out = _wired(demo, "save")(None, *defaults)
    assert "error: no model is selected" in out and "db-error" in out

    out = _wired(demo, "create")("missing.safetensors", "auto", False, "new-model")
    assert "error: source checkpoint" in out[0] and "does not exist" in out[0]
    assert all(compat.no_change() == o for o in out[1:])  # the other outputs are left as they are

    out = _wired(demo, "create")("missing.safetensors", "auto", False, "../evil")
    assert "error: model name '../evil' contains a path separator" in out[0]

    out = _wired(demo, "create")("/etc/passwd", "auto", False, "new-model")
    assert "error: /etc/passwd is not in the checkpoint folder" in out[0]

    out = _wired(demo, "load")("no-such-model")
    assert "error: no model named 'no-such-model'" in out[0]

    def boom(*args):
        raise RuntimeError("something broke")

    monkeypatch.setattr(handlers, "model", boom)
    out = _wired(demo, "cancel")("m")
    assert "unexpected RuntimeError: something broke" in out
    for text in (out,):
        assert "Traceback" not in text


def test_bad_form_value_names_the_setting(model):
    md, _, handlers = model
    values = handlers.load("m")[3:]
    index = {(c.concept, c.spec.name): i for i, c in enumerate(handlers.controls)}
    values[index[(None, "epochs")]] = 0
    with pytest.raises(Exception) as err:
        handlers.save("m", *values)
    assert "Training steps per image (epochs)" in str(err.value) and "from 1 to 100000" in str(err.value)
    values[index[(None, "epochs")]] = 3
    values[index[(1, "repeats")]] = 2.5
    with pytest.raises(Exception) as err:
        handlers.save("m", *values)
    assert "Concept 2: Repeats" in str(err.value)


# ---------------------------------------------------------------------------------------------------- actions


def test_train_saves_the_form_and_starts_a_worker_without_waiting(model, monkeypatch):
    from dreambooth import jobs

    md, host, handlers = model
    calls = []
    monkeypatch.setattr(jobs, "start", lambda m, **kw: calls.append((m, kw)) or 4321)
    values = handlers.load("m")[3:]
    index = {(c.concept, c.spec.name): i for i, c in enumerate(handlers.controls)}
    values[index[(0, "instance_data_dir")]] = "/data/dog"
    values[index[(None, "epochs")]] = 3
    message, status = handlers.train("m", True, *values)
    assert "training m started (resuming)" in message
    assert "data-db-running='1'" in status
    [(started, kwargs)] = calls
    assert started.path == md.path
    assert kwargs == {"models_root": host.models_root(), "resume": True, "device": "cpu",
                      "export_dir": host.checkpoint_dir(), "attention_default": "sdp", "lora_dir": host.lora_dir(),
                      "embeddings_dir": host.embeddings_dir(), "hypernetworks_dir": host.hypernetworks_dir()}
    told = []
    object.__setattr__(host, "training_started", lambda m, **kw: told.append((m.name, sorted(kw))))
    handlers.train("m", False, *values)
    assert told == [("m", ["is_running", "read_status"])]
    cfg = load_config(md.path)
    assert (cfg.epochs, cfg.concepts[0].instance_data_dir) == (3, "/data/dog")


def test_cancel_and_pause_need_a_running_training(model):
    _, _, handlers = model
    for action in (handlers.cancel, handlers.pause):
        with pytest.raises(Exception, match="no training of m is running"):
            action("m")


def test_export_now_writes_a_checkpoint_and_tells_the_host(model):
    md, host, handlers = model
    values = handlers.load("m")[3:]
    message = handlers.export("m", *values)
    path = host.checkpoint_dir() / "m_0.safetensors"
    assert path.is_file() and str(path) in message
    assert host.exported == [path]


def test_poll_renders_status_loss_previews_and_log(model):
    from PIL import Image

    from dreambooth.atomic import write_json

    md, host, handlers = model
    write_json(md.status_path, {"state": "done", "message": "training complete", "step": 10, "total_steps": 10,
                                "epoch": 2, "total_epochs": 2, "smoothed_loss": 0.25, "it_per_s": 3.5,
                                "last_export": str(host.checkpoint_dir() / "m_10.safetensors")})
    md.logs.mkdir(exist_ok=True)
    (md.logs / "loss.csv").write_text("step,epoch,loss,lr\n1,0,0.9,1e-3\n2,0,0.5,1e-3\n3,1,0.4,1e-3\n")
    (md.logs / "worker.log").write_text("\n".join(f"line {i}" for i in range(100)))
    from dreambooth.sample import SampleRequest, save_sample

    req = SampleRequest("a photo of zwx disc", "", 1, 2, 7.5, 64, 64, "ddim")
    save_sample(Image.new("RGB", (64, 64), "red"), md.samples, "step000010_c0_0", req, {"step": "10"})

    status, loss, gallery, log_text, pause_label, seen = handlers.poll("m", {})
    assert "data-db-state='done'" in status and "data-db-running='0'" in status and "100.0%" in status
    assert "<svg" in loss and "<path d='M" in loss and "loss at step 3: 0.4" in loss
    [(image, caption)] = gallery
    assert image.size == (64, 64) and caption == "step 10: a photo of zwx disc"
    assert log_text.splitlines() == [f"line {i}" for i in range(100)]  # the newest at the bottom
    assert host.exported == [host.checkpoint_dir() / "m_10.safetensors"]

    again = handlers.poll("m", seen)
    assert again[2] == again[3] == "NO_CHANGE"  # the same previews and log are not sent again
    with open(md.logs / "worker.log", "a") as fh:
        fh.write("\nline 100")
    assert handlers.poll("m", again[5])[3].splitlines()[-1] == "line 100"
    assert host.exported == [host.checkpoint_dir() / "m_10.safetensors"]  # told once


def test_two_browser_tabs_see_the_same_run(model):
    """Each tab keeps its own poll state; both show the run's whole status, loss curve and previews."""
    from PIL import Image

    from dreambooth.atomic import write_json
    from dreambooth.sample import SampleRequest, save_sample

    md, _, handlers = model
    write_json(md.status_path, {"state": "done", "message": "training complete", "step": 3, "total_steps": 5})
    md.logs.mkdir(exist_ok=True)
    (md.logs / "loss.csv").write_text("step,epoch,loss,lr\n1,0,0.9,1e-3\n2,0,0.5,1e-3\n3,1,0.4,1e-3\n")
    req = SampleRequest("a photo of zwx disc", "", 1, 2, 7.5, 64, 64, "ddim")
    save_sample(Image.new("RGB", (64, 64), "red"), md.samples, "step000003_c0_0", req, {"step": "3"})
    first = handlers.poll("m", {})
    with open(md.logs / "loss.csv", "a") as fh:
        fh.write("4,1,0.3,1e-3\n5,1,0.2,1e-3\n")
    second = handlers.poll("m", {})  # a tab opened later
    again = handlers.poll("m", first[-1])  # the first tab's next poll
    def untimed(html: str) -> str:
        return re.sub(r"data-db-tick='\d+'", "", html)  # a per-render tick for the page script

    assert untimed(second[0]) == untimed(again[0]) and "data-db-state='done'" in second[0]
    assert second[1] == again[1] and "step 1</text>" in second[1] and "loss at step 5: 0.2" in second[1]
    assert len(first[2]) == len(second[2]) == 1 and again[2] == "NO_CHANGE"  # each tab gets the previews once


def test_loss_log_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,epoch,loss,lr\n1,0,0.5,0.1\n2,0,0.4")
    log = LossLog()
    assert log.points(path) == [(1, 0.5)]  # the unfinished line waits
    with open(path, "a") as fh:
        fh.write(",0.1\n3,0,0.3,0.1\n")
    assert log.points(path) == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert "no data" in loss_svg([])
    many = loss_svg([(i, 1.0 / (i + 1)) for i in range(5000)])
    assert many.count(" L") < 500  # bucketed


def test_status_html_marks_a_vanished_worker_and_keeps_polling_while_running():
    html = status_html({"state": "running", "step": 5, "total_steps": 20, "eta_s": 75}, True, "m")
    assert "data-db-running='1'" in html and "25.0%" in html and "ETA 1:15" in html
    html = status_html({"state": "running", "step": 5, "total_steps": 20}, False, "m")
    assert "data-db-state='stopped'" in html and "data-db-running='0'" in html


# ---------------------------------------------------------------------------------------------------- app


def test_standalone_host_lists_checkpoints(tmp_path):
    host = StandaloneHost(tmp_path)
    folder = tmp_path / "Stable-diffusion"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "b.ckpt", "sub/c.safetensors", "notes.txt", ".hidden.safetensors"):
        (folder / name).write_bytes(b"x")
    assert host.checkpoints() == ["a.safetensors", "b.ckpt", "sub/c.safetensors"]
    assert host.checkpoint_path("sub/c.safetensors") == folder / "sub" / "c.safetensors"
    assert (host.loaded_checkpoint(), host.attention_default(), host.device()) == (None, "sdp", None)


def test_app_serves_the_tab_with_script_style_and_api(tmp_path):
    from starlette.testclient import TestClient

    from dreambooth.ui.app import build_app

    client = TestClient(build_app(StandaloneHost(tmp_path)))
    page = client.get("/")
    assert page.status_code == 200
    head = page.text.split("</head>")[0]
    assert "data-db-running" in head and "onUiLoaded" in head  # javascript/dreambooth.js
    assert "#dreambooth_tab" in head  # style.css
    if (REPO / "dreambooth" / "api.py").is_file():
        assert client.get("/dreambooth/models").status_code == 200


def test_ui_command_parses(tmp_path):
    import argparse

    from dreambooth.ui.app import add_ui_command

    parser = argparse.ArgumentParser()
    add_ui_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui", "--port", "7999", "--models-root", str(tmp_path), "--listen", "0.0.0.0"])
    assert (args.command, args.port, args.models_root, args.listen, args.device) == ("ui", 7999, str(tmp_path),
                                                                                    "0.0.0.0", None)


def test_every_setting_has_a_distinct_non_default_test_value():
    cfg = _everything_set()
    default = TrainConfig()
    for spec in field_specs(TrainConfig):
        if spec.ui:
            assert getattr(cfg, spec.name) != getattr(default, spec.name), spec.name
    for concept in cfg.concepts:
        for f in dataclasses.fields(Concept):
            assert getattr(concept, f.name) != getattr(Concept(), f.name), f.name


def test_generate_samples_now_writes_previews_with_the_form_settings(model, tmp_path):
    md, _, handlers = model
    make_concept_images(tmp_path / "c", count=2)
    values = handlers.load("m")[3:]
    index = {(c.concept, c.spec.name): i for i, c in enumerate(handlers.controls)}
    for name, value in (("instance_data_dir", str(tmp_path / "c")), ("instance_prompt", "a photo of zwx disc"),
                        ("sample_steps", 2), ("n_samples", 2), ("sample_seed", 5)):
        values[index[(0, name)]] = value
    values[index[(None, "resolution")]] = 64
    message = handlers.sample("m", *values)
    assert "in a worker" in message
    from dreambooth import jobs

    status = jobs.wait(md, 300)
    assert status["state"] == "done" and status["job"] == "sample", status
    assert "made 2 preview(s)" in status["message"]
    written = sorted(md.samples.glob("now_*.png"))
    assert sorted(status["samples"]) == [str(p) for p in written]
    assert len(written) == 2
    from dreambooth.ui.output import sample_caption

    assert sample_caption(written[0]) == "step 0: a photo of zwx disc"


def test_pause_button_pauses_then_goes_on(model, monkeypatch):
    from dreambooth import jobs
    from dreambooth.train import status as st

    md, _, handlers = model
    monkeypatch.setattr(jobs, "running", lambda m: True)
    monkeypatch.setattr(jobs, "pause", st.request_pause)
    monkeypatch.setattr(jobs, "unpause", st.request_unpause)
    message, label = handlers.pause("m")
    assert "pause requested" in message and (md.path / st.PAUSE_FILE).exists()
    assert compat.no_change() != label
    message, label = handlers.pause("m")
    assert "goes on" in message and not (md.path / st.PAUSE_FILE).exists()


def test_tab_renders_inside_a_host_page(built):
    """As the WebUI does with on_ui_tabs: the tab's Blocks rendered inside a tab of the host's Blocks."""
    demo, _, _ = built
    gr = compat.gradio()
    with gr.Blocks(analytics_enabled=False) as page, gr.Tabs(), gr.Tab("Dreambooth", id="dreambooth",
                                                                      elem_id="tab_dreambooth"):
        demo.render()
    config = page.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"dreambooth_status", "dreambooth_poll", "dbt_epochs", "dbt_c2_sample_steps"} <= ids


def test_each_page_load_reads_the_model_and_checkpoint_lists_again(built):
    """The lists are filled when the tab is built, in the WebUI once at its start: a model made since then must
    appear when the page is opened again. gradio's load events do that once the page takes events (the page script
    clicked Refresh instead, and a click before gradio was ready was lost: the list lacked the new model, CI16)."""
    demo, _, _ = built
    gr = compat.gradio()
    with gr.Blocks(analytics_enabled=False) as page, gr.Tabs(), gr.Tab("Dreambooth", id="dreambooth"):
        demo.render()
    config = page.get_config_file()
    names = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    loaded = set()
    for dep in config["dependencies"]:
        triggers = {dep.get("trigger")} | {t[1] for t in dep.get("targets", []) if isinstance(t, list | tuple)}
        if "load" in triggers:  # gradio 3: trigger "load", no targets; gradio 4: the target (page id, "load")
            loaded |= {names.get(i) for i in dep["outputs"]}
    assert {"dreambooth_model", "dreambooth_source"} <= loaded, loaded
    script = (Path(__file__).resolve().parents[1] / "javascript" / "dreambooth.js").read_text(encoding="utf-8")
    assert "dreambooth_refresh_models" not in script  # no second, racing refresh from the page script


def test_refreshing_the_lists_keeps_a_pick_and_drops_a_deleted_model(model):
    md, host, handlers = model
    assert handlers.refresh_models("m") == compat.update(choices=["m"])
    assert handlers.refresh_models("gone") == compat.update(choices=["m"], value=None)
    assert handlers.refresh_checkpoints("") == compat.update(choices=["tiny.safetensors"])
    object.__setattr__(host, "loaded_checkpoint", lambda: "tiny.safetensors")
    assert handlers.refresh_checkpoints("") == compat.update(choices=["tiny.safetensors"], value="tiny.safetensors")
    assert handlers.refresh_checkpoints("other") == compat.update(choices=["tiny.safetensors"])


def test_settings_of_other_methods_are_hidden():
    from dreambooth.ui.form import config_controls, shown_for_method

    controls = config_controls()
    names = {c.spec.name: i for i, c in enumerate(controls)}
    for method, shown, hidden in (("dreambooth", ["use_ema", "learning_rate"], ["lora_rank", "lora_conv_rank"]),
                                  ("lora", ["lora_rank", "learning_rate"], ["use_ema", "export_ema"])):
        visible = shown_for_method(method, controls)
        assert all(visible[names[n]] for n in shown) and not any(visible[names[n]] for n in hidden)


def test_changing_the_optimizer_hides_the_settings_it_ignores(built):
    demo, _, components = built
    wired = [f for f in compat.event_functions(demo) if getattr(f, "__name__", "") == "show_for"]
    assert len(wired) == 4  # run when the method, the optimizer, the model (prediction type) or the LoRA type change

    def hidden(method: str, optimizer: str, lora_type: str = "lora") -> int:
        return sum(1 for update in wired[0](method, optimizer, None, lora_type) if update.get("visible") is False)

    assert hidden("dreambooth", "adafactor") == hidden("dreambooth", "adamw") + 3  # both betas and the epsilon
    assert hidden("dreambooth", "lion") == hidden("dreambooth", "adamw") + 1  # the epsilon
    assert hidden("lora", "adafactor") == hidden("lora", "adamw") + 3
    assert components["dbt_adam_epsilon"].visible  # the default optimizer (AdamW) reads it
    # the LoKr factor and 'factorise both' show for LoRA type lokr only
    assert hidden("lora", "adamw", "lokr") == hidden("lora", "adamw", "loha") - 2 == hidden("lora", "adamw") - 2
    assert not components["dbt_lora_lokr_factor"].visible  # the default type is plain LoRA
