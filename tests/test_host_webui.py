"""The WebUI host adapter against a stand-in of the WebUI's modules (tests/webui_standin, after HOST_API.md)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

from dreambooth.store import ModelDir

STANDIN = Path(__file__).resolve().parent / "webui_standin"


@pytest.fixture()
def webui(tmp_path, monkeypatch):
    """A fresh stand-in WebUI with its data dir in tmp_path, and our adapter imported against it."""
    monkeypatch.setenv("WEBUI_STANDIN_DATA", str(tmp_path))
    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "dreambooth.host.webui", raising=False)
    adapter = importlib.import_module("dreambooth.host.webui")
    from modules import sd_models, shared

    ckpt_dir = tmp_path / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    for name in ("a.safetensors", "b.ckpt"):
        (ckpt_dir / name).write_bytes(b"x")
    sd_models.sha256_cache[str(ckpt_dir / "a.safetensors")] = A_SHA256  # a was loaded in an earlier session
    sd_models.list_models()  # the WebUI lists its checkpoints at start, before extensions load; nothing is loaded
    sd_models.calls.clear()
    return adapter, shared, sd_models


A_SHA256 = "abcdef0123" + "4" * 54
A_TITLE, B_TITLE = "a.safetensors [abcdef0123]", "b.ckpt"  # b was never hashed: its title has no hash


def test_settings_and_paths_come_from_the_webui(webui, tmp_path):
    adapter, shared, _ = webui
    adapter.on_ui_settings()
    assert {"dreambooth_models_root", "dreambooth_free_webui_model", "dreambooth_attention",
            "dreambooth_console_progress_seconds"} <= set(
        shared.opts.data_labels)
    host = adapter.WebUIHost()
    assert host.models_root() == (tmp_path / "models").resolve()
    shared.opts.data["dreambooth_models_root"] = str(tmp_path / "elsewhere")
    assert host.models_root() == (tmp_path / "elsewhere").resolve()
    assert host.checkpoint_dir() == tmp_path / "models" / "Stable-diffusion"
    shared.cmd_opts.ckpt_dir = str(tmp_path / "ckpts")
    assert host.checkpoint_dir() == tmp_path / "ckpts"
    shared.cmd_opts.ckpt_dir = None


def test_source_list_and_loaded_checkpoint(webui, tmp_path):
    adapter, shared, sd_models = webui
    host = adapter.WebUIHost()
    folder = tmp_path / "models" / "Stable-diffusion"
    assert host.checkpoints() == {A_TITLE: str(folder / "a.safetensors"), B_TITLE: str(folder / "b.ckpt")}
    assert host.loaded_checkpoint() is None
    shared.opts.data["sd_model_checkpoint"] = "b"  # selected in the settings (by any of its names), not loaded yet
    assert host.loaded_checkpoint() == B_TITLE
    sd_models.load_model(sd_models.checkpoints_list[A_TITLE])  # the model actually loaded wins
    assert host.checkpoints()[host.loaded_checkpoint()] == str(folder / "a.safetensors")
    sd_models.load_model(sd_models.checkpoints_list[B_TITLE])  # loading hashes it: its title gets the hash
    b_title = next(t for t in sd_models.checkpoints_list if t.startswith("b.ckpt ["))
    assert host.loaded_checkpoint() == b_title and b_title in host.checkpoints()
    sd_models.list_models()  # a refresh makes new entries; the loaded model's is still found by its file
    assert host.loaded_checkpoint() == b_title


def test_the_source_list_shows_the_webuis_titles_with_no_model_loaded(webui, tmp_path):
    """The WebUI started without loading a model: the tab, the handlers and the API list its checkpoints by the
    WebUI's own titles and map each back to its file; a file added later appears after a refresh."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dreambooth.api import add_routes
    from dreambooth.ui import compat
    from dreambooth.ui.handlers import TabHandlers
    from dreambooth.ui.tab import build_tab

    adapter, shared, sd_models = webui
    folder = tmp_path / "models" / "Stable-diffusion"
    host = adapter.WebUIHost()
    assert sd_models.model_data.sd_model is None and "sd_model_checkpoint" not in shared.opts.data
    demo = build_tab(host)
    source = next(c for c in compat.components(demo) if getattr(c, "elem_id", None) == "dreambooth_source")
    assert [c[0] if isinstance(c, (tuple, list)) else c for c in source.choices] == [A_TITLE, B_TITLE]
    handlers = TabHandlers(host)
    assert handlers.checkpoint_path(A_TITLE) == folder / "a.safetensors"
    assert handlers.checkpoint_path(B_TITLE) == folder / "b.ckpt"
    app = FastAPI()
    add_routes(app, host)
    listed = TestClient(app).get("/dreambooth/checkpoints").json()["checkpoints"]
    assert listed == [{"title": A_TITLE, "path": str(folder / "a.safetensors")},
                      {"title": B_TITLE, "path": str(folder / "b.ckpt")}]
    (folder / "sub").mkdir()
    (folder / "sub" / "c.safetensors").write_bytes(b"x")  # put there after the WebUI started
    assert handlers.refresh_checkpoints("") == compat.update(choices=[A_TITLE, B_TITLE, "sub/c.safetensors"])
    assert handlers.checkpoint_path("sub/c.safetensors") == folder / "sub" / "c.safetensors"
    sd_models.load_model(sd_models.checkpoints_list[B_TITLE])  # b is hashed: its title changes under a pick
    assert B_TITLE not in host.checkpoints() and handlers.checkpoint_path(B_TITLE) == folder / "b.ckpt"


def test_settings_have_their_own_section_under_training(webui):
    """On the WebUI's settings page our options form one page, "Dreambooth", listed under "Training" (a section
    without a category is listed under "Uncategorized")."""
    adapter, shared, _ = webui
    adapter.on_ui_settings()
    shared.opts.reorder()  # as the settings page does before it is built
    ours = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("dreambooth_")}
    assert len(ours) == 4 and {v.section for v in ours.values()} == {("dreambooth", "Dreambooth")}
    assert shared.opts.section_categories()["Dreambooth"] == "Training"


@pytest.mark.parametrize("choice, xformers_flag, expected", [
    ("xformers", False, "xformers"), ("sdp", False, "sdp"), ("sdp-no-mem", False, "sdp"),
    ("Doggettx", False, "default"), ("InvokeAI", False, "default"), ("Automatic", True, "xformers"),
    ("Automatic", False, "sdp"),
])
def test_attention_default_follows_the_webui(webui, choice, xformers_flag, expected):
    adapter, shared, _ = webui
    shared.opts.data["cross_attention_optimization"] = choice
    shared.cmd_opts.xformers = xformers_flag
    assert adapter.WebUIHost().attention_default() == expected
    shared.opts.data["dreambooth_attention"] = "default"  # our own setting overrides
    assert adapter.WebUIHost().attention_default() == "default"
    shared.cmd_opts.xformers = False


def test_api_auth_parsing(webui):
    adapter, shared, _ = webui
    assert adapter.parse_api_auth(None) is None
    assert adapter.parse_api_auth("alice:pw1, bob:p:w2") == {"alice": "pw1", "bob": "p:w2"}
    shared.cmd_opts.api_auth = "u:p"
    assert adapter.WebUIHost().api_credentials() == {"u": "p"}
    shared.cmd_opts.api_auth = None


def test_export_refreshes_the_checkpoint_and_lora_lists(webui, tmp_path, monkeypatch):
    import types

    adapter, _, sd_models = webui
    lora_refreshes = []
    monkeypatch.setitem(sys.modules, "networks", types.SimpleNamespace(
        list_available_networks=lambda: lora_refreshes.append(1)))  # the WebUI's built-in Lora extension
    new = tmp_path / "models" / "Stable-diffusion" / "trained.safetensors"
    new.write_bytes(b"x")
    adapter.WebUIHost().after_export(new)
    assert sd_models.calls == ["list_models"] and lora_refreshes == [1]
    assert any(i.filename == str(new) for i in sd_models.checkpoints_list.values())


def test_hypernetworks_go_to_the_webuis_folder_and_its_list_is_refreshed(webui, tmp_path):
    adapter, shared, _ = webui
    host = adapter.WebUIHost()
    assert host.hypernetworks_dir() == tmp_path / "models" / "hypernetworks"
    shared.cmd_opts.hypernetwork_dir = str(tmp_path / "hn")
    try:
        assert host.hypernetworks_dir() == tmp_path / "hn"
        (tmp_path / "hn").mkdir()
        (tmp_path / "hn" / "m_8.pt").write_bytes(b"x")
        host.after_export(tmp_path / "hn" / "m_8.pt")
        assert shared.hypernetworks == {"m_8": str(tmp_path / "hn" / "m_8.pt")}
    finally:
        shared.cmd_opts.hypernetwork_dir = None


def test_webui_model_leaves_vram_during_training_and_comes_back(webui, tmp_path):
    adapter, shared, sd_models = webui
    info = next(iter(sd_models.checkpoints_list.values()))
    sd_models.model_data.sd_model = sd_models.FakeModel(info)
    running = {"value": True}
    progress = {"step": 3, "total_steps": 10, "smoothed_loss": 0.25}
    host = adapter.WebUIHost()
    host.training_started(ModelDir(tmp_path / "m"), lambda: running["value"], lambda: progress, poll_seconds=0.02)
    assert sd_models.calls == ["unload_model_weights"] and sd_models.model_data.sd_model.device == "cpu"
    time.sleep(0.1)
    assert shared.state.job == "dreambooth m" and shared.state.sampling_step == 3
    assert shared.state.sampling_steps == 10
    assert "loss 0.2500" in shared.state.textinfo
    running["value"] = False
    deadline = time.time() + 2
    while len(sd_models.calls) < 3 and time.time() < deadline:  # the watcher ends, restores, refreshes
        time.sleep(0.02)
    assert sd_models.calls == ["unload_model_weights", "send_model_to_device", "list_models"]
    assert sd_models.model_data.sd_model.device == "cuda" and shared.state.job == "" and shared.state.job_count == 0


def test_standin_reload_leaves_an_unloaded_model_on_the_cpu(webui):
    """What the real v1.10.1 does (HOST_API.md): reload_model_weights() with the same checkpoint returns at once."""
    _, _, sd_models = webui
    sd_models.model_data.sd_model = sd_models.FakeModel(next(iter(sd_models.checkpoints_list.values())))
    sd_models.unload_model_weights()
    sd_models.reload_model_weights()
    assert sd_models.model_data.sd_model.device == "cpu"
    sd_models.send_model_to_device(sd_models.model_data.sd_model)
    assert sd_models.model_data.sd_model.device == "cuda"


def test_restore_never_loads_a_model_the_webui_no_longer_holds(webui):
    adapter, _, sd_models = webui
    adapter.WebUIHost().restore_vram()
    assert sd_models.calls == [] and sd_models.model_data.sd_model is None


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_progress_is_mirrored_only_while_the_webui_is_idle(webui, tmp_path):
    """A txt2img started during training keeps its own progress state; the run's mirror waits for it to end and
    never ends the WebUI's job."""
    adapter, shared, _ = webui
    state = shared.state
    polls = []
    progress = {"state": "running", "step": 3, "total_steps": 10, "smoothed_loss": 0.25}
    running = {"value": True}

    def read_status():
        polls.append(1)
        return dict(progress)

    def polls_later(n: int):
        start = len(polls)
        return lambda: len(polls) >= start + n

    host = adapter.WebUIHost()
    host.training_started(ModelDir(tmp_path / "m"), lambda: running["value"], read_status, poll_seconds=0.01)
    _wait_until(lambda: state.sampling_step == 3 and state.textinfo and "step 3/10" in state.textinfo)
    state.end()  # the WebUI's txt2img starts: its own job, its own steps
    state.begin(job="task(txt2img)")
    state.job_count, state.sampling_steps, state.sampling_step = 1, 20, 5
    txt2img = (state.job, state.job_count, state.job_no, state.sampling_step, state.sampling_steps, state.textinfo)
    progress["step"] = 4
    _wait_until(polls_later(5))
    assert (state.job, state.job_count, state.job_no, state.sampling_step, state.sampling_steps,
            state.textinfo) == txt2img
    state.end()  # the txt2img is done: the run is shown again
    _wait_until(lambda: state.job == "dreambooth m" and state.sampling_step == 4 and state.sampling_steps == 10)
    assert "step 4/10" in state.textinfo
    state.begin(job="task(txt2img 2)")  # another one runs when training ends: it is left alone
    state.job_count, state.sampling_steps, state.sampling_step = 1, 20, 7
    _wait_until(polls_later(2))
    running["value"] = False
    _wait_until(lambda: not host._watchers)
    assert (state.job, state.job_count, state.sampling_step, state.sampling_steps) == ("task(txt2img 2)", 1, 7, 20)


def _scripted_run(adapter, tmp_path, statuses: list[dict], reads_each: int = 3) -> None:
    """A run whose status goes through ``statuses``, each read ``reads_each`` times by the watcher; returns when the
    watcher is done."""
    reads = {"n": 0}

    def read_status():
        index = min(reads["n"] // reads_each, len(statuses) - 1)
        reads["n"] += 1
        return dict(statuses[index])

    host = adapter.WebUIHost()
    host.training_started(ModelDir(tmp_path / "m"), lambda: reads["n"] < reads_each * len(statuses), read_status,
                          poll_seconds=0.005)
    _wait_until(lambda: not host._watchers)


RUN = [{"state": "starting", "message": "starting the training process"},
       {"state": "running", "message": "", "step": 1, "total_steps": 8, "smoothed_loss": 0.5, "it_per_s": 1.5,
        "eta_s": 5.0},
       {"state": "running", "message": "", "step": 2, "total_steps": 8, "smoothed_loss": 0.4, "it_per_s": 1.5,
        "eta_s": 4.0},
       {"state": "saving", "message": "saving at step 4", "step": 4, "total_steps": 8},
       {"state": "running", "message": "saved at step 4", "step": 4, "total_steps": 8,
        "last_export": "/x/m_4.safetensors"},
       {"state": "done", "message": "training complete", "step": 8, "total_steps": 8, "smoothed_loss": 0.3,
        "last_export": "/x/m_8.safetensors"}]


def test_the_run_is_told_in_the_webuis_console_once_per_event(webui, tmp_path, capsys):
    adapter, shared, _ = webui
    adapter.on_ui_settings()
    _scripted_run(adapter, tmp_path, RUN)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Dreambooth m: training started") and "worker.log" in out[0]
    assert out[1:] == ["Dreambooth m: starting - starting the training process",
                       "Dreambooth m: step 1/8 (12%), loss 0.5000, 1.5 it/s, ETA 0:05",
                       "Dreambooth m: saving - saving at step 4",
                       "Dreambooth m: saved at step 4",
                       "Dreambooth m: exported /x/m_4.safetensors",
                       "Dreambooth m: done - training complete",
                       "Dreambooth m: exported /x/m_8.safetensors",
                       "Dreambooth m: step 8/8 (100%), loss 0.3000"]
    # the setting's interval: 0 says only the events
    shared.opts.data["dreambooth_console_progress_seconds"] = 0
    _scripted_run(adapter, tmp_path, RUN)
    assert not any(": step 1/8" in line for line in capsys.readouterr().out.splitlines())


def test_a_worker_that_dies_is_told_in_the_console(webui, tmp_path, capsys):
    adapter, _, _ = webui
    _scripted_run(adapter, tmp_path, [RUN[1], {**RUN[1], "state": "failed", "message": "the training process "
                                               "(pid 7) ended with exit code -9 while running"}])
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "Dreambooth m: failed - the training process (pid 7) ended with exit code -9 while running",
        "Dreambooth m: step 1/8 (12%), loss 0.5000, 1.5 it/s"]


def test_setting_can_keep_the_model_in_vram(webui, tmp_path):
    adapter, shared, sd_models = webui
    sd_models.model_data.sd_model = sd_models.FakeModel(next(iter(sd_models.checkpoints_list.values())))
    shared.opts.data["dreambooth_free_webui_model"] = False
    adapter.WebUIHost().training_started(ModelDir(tmp_path / "m"), lambda: False, lambda: None, poll_seconds=0.01)
    deadline = time.time() + 2
    while not sd_models.calls and time.time() < deadline:
        time.sleep(0.02)
    assert sd_models.calls == ["list_models"]  # no unload / reload, only the lists refreshed after the run


def test_tab_and_api_routes_register_with_the_webui(webui, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    adapter, shared, _ = webui
    from modules import script_callbacks

    for name in ("callbacks_ui_tabs", "callbacks_ui_settings", "callbacks_app_started"):
        getattr(script_callbacks, name).clear()
    adapter.register()
    assert [len(script_callbacks.callbacks_ui_tabs), len(script_callbacks.callbacks_ui_settings),
            len(script_callbacks.callbacks_app_started)] == [1, 1, 1]
    ((blocks, title, elem_id),) = script_callbacks.callbacks_ui_tabs[0]()
    assert (title, elem_id) == ("Dreambooth", "dreambooth") and type(blocks).__name__ == "Blocks"
    app = FastAPI()
    shared.cmd_opts.api_auth = "user:secret"
    script_callbacks.callbacks_app_started[0](None, app)
    client = TestClient(app)
    assert client.get("/dreambooth/models").status_code == 401
    response = client.get("/dreambooth/models", auth=("user", "secret"))
    assert response.status_code == 200
    shared.cmd_opts.api_auth = None


def test_generate_samples_now_runs_in_a_worker_with_the_lock_and_the_configs_precision(webui, tmp_path,
                                                                                       tiny_checkpoint, capsys):
    """The tab's "Generate samples now" in the WebUI: a worker process makes the previews (never the WebUI's own
    process), holding the model's lock, with the config's mixed precision; the WebUI's model leaves VRAM for it and
    comes back after, and the console says so."""
    import os

    from conftest import make_training_model

    from dreambooth import jobs, lock
    from dreambooth.ui.handlers import TabHandlers

    adapter, shared, sd_models = webui
    sd_models.model_data.sd_model = sd_models.FakeModel(next(iter(sd_models.checkpoints_list.values())))
    host = adapter.WebUIHost()
    md = make_training_model(host.models_root(), tiny_checkpoint("sd1"), mixed_precision="bf16",
                             concept=dict(sample_steps=2))
    handlers = TabHandlers(host)
    message = handlers.sample("m", *handlers.load("m")[3:])
    assert "in a worker" in message
    holder = lock.holder(md.path)  # handed to the worker by jobs.start: no training of the model meanwhile
    assert holder is not None and holder["pid"] != os.getpid()
    with pytest.raises(lock.Locked):
        lock.acquire(md.path, token="a training")
    assert sd_models.calls == ["unload_model_weights"] and sd_models.model_data.sd_model.device == "cpu"
    status = jobs.wait(md, 300)
    assert status["state"] == "done" and status["job"] == "sample", status
    assert status["pid"] == holder["pid"] and status["precision"] == "bf16"
    (sample,) = [Path(p) for p in status["samples"]]
    assert sample.parent == md.samples and sample.name.startswith("now_step000000_")
    _wait_until(lambda: not host._watchers)
    assert sd_models.calls == ["unload_model_weights", "send_model_to_device", "list_models"]
    assert sd_models.model_data.sd_model.device == "cuda"
    out = capsys.readouterr().out
    assert "Dreambooth m: sampling started" in out and "Dreambooth m: done - made 1 preview(s)" in out
