"""The HTTP API: every route, auth, path traversal, and a real training worker started and stopped through it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import make_training_model
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from dreambooth import api, jobs
from dreambooth.config import load_config
from dreambooth.sample import SampleRequest, save_sample
from dreambooth.store import model_dir


class Host:
    def __init__(self, root: Path, auth: object = None, extra_checkpoints: list[Path] | None = None) -> None:
        self.root = root / "models"
        self.ckpt_dir = self.root / "Stable-diffusion"
        self.ckpt_dir.mkdir(parents=True)
        self.extra = extra_checkpoints or []
        self.auth = auth
        self.exported: list[Path] = []
        self.started: list[str] = []

    def models_root(self) -> Path:
        return self.root

    def checkpoint_dir(self) -> Path:
        return self.ckpt_dir

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.ckpt_dir.glob("*.safetensors") if not p.is_symlink()) + self.extra

    def attention_default(self) -> str:
        return "default"

    def device(self) -> str:
        return "cpu"

    def after_export(self, path: Path) -> None:
        self.exported.append(Path(path))

    def training_started(self, model, *, is_running, read_status, job: str = "training") -> None:
        self.started.append(model.name if job == "training" else f"{model.name} ({job})")
        assert is_running() in (True, False) and read_status()["state"] in ("starting", "running", "sampling")


def make_client(host: Host) -> TestClient:
    app = FastAPI()
    api.add_routes(app, host)
    return TestClient(app)


@pytest.fixture()
def host(tmp_path, tiny_checkpoint) -> Host:
    h = Host(tmp_path)
    shutil.copy(tiny_checkpoint("sd1"), h.ckpt_dir / "tiny-sd1.safetensors")
    return h


@pytest.fixture()
def client(host) -> TestClient:
    return make_client(host)


@pytest.fixture()
def model(host, client):
    r = client.post("/dreambooth/models", json={"name": "dog", "source": "tiny-sd1.safetensors"})
    assert r.status_code == 201, r.text
    return model_dir("dog", host.models_root())


def error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "hint"} and body["error"]
    return body["error"]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------------------------
# listing, schema, create


def test_schema_lists_config_and_concept_fields(client):
    body = client.get("/dreambooth/schema").json()
    fields = {f["name"]: f for f in body["config"]}
    assert body["version"] == 1 and fields["learning_rate"]["type"] == "float"
    assert fields["learning_rate"]["min"] == 0.0 and fields["optimizer"]["choices"][0] == "adamw"
    assert fields["epochs"]["default"] == 100 and fields["epochs"]["label"]
    assert "instance_prompt" in {f["name"] for f in body["concept"]} and "concepts" not in fields


def test_create_list_get_and_checkpoints(host, client):
    assert client.get("/dreambooth/models").json() == {"models": []}
    listed = client.get("/dreambooth/checkpoints").json()
    assert listed["checkpoints"] == [{"title": "tiny-sd1.safetensors",
                                      "path": str(host.ckpt_dir / "tiny-sd1.safetensors")}]
    r = client.post("/dreambooth/models", json={"name": "dog", "source": "tiny-sd1.safetensors", "family": "sd1",
                                                "extract_ema": False})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "dog" and r.json()["family"] == "sd1" and r.json()["state"] == "idle"
    models = client.get("/dreambooth/models").json()["models"]
    assert [m["name"] for m in models] == ["dog"] and models[0]["running"] is False
    detail = client.get("/dreambooth/models/dog").json()
    assert detail["config"]["model_name"] == "dog" and detail["status"]["state"] == "idle" and detail["samples"] == 0
    # by absolute path inside the checkpoint folder, too
    r = client.post("/dreambooth/models", json={"name": "cat", "source": str(host.ckpt_dir / "tiny-sd1.safetensors")})
    assert r.status_code == 201, r.text
    assert error(client.post("/dreambooth/models", json={"name": "dog", "source": "tiny-sd1.safetensors"}), 409)


def test_create_refuses_bad_input(host, client):
    ok = {"name": "x", "source": "tiny-sd1.safetensors"}
    assert "name: required" in error(client.post("/dreambooth/models", json={"source": ok["source"]}), 400)
    assert "family" in error(client.post("/dreambooth/models", json={**ok, "family": "sd9"}), 400)
    assert "extract_ema" in error(client.post("/dreambooth/models", json={**ok, "extract_ema": "yes"}), 400)
    assert "colour" in error(client.post("/dreambooth/models", json={**ok, "colour": 1}), 400)
    assert "not valid JSON" in error(client.post("/dreambooth/models", content=b"{nope",
                                                 headers={"content-type": "application/json"}), 400)
    assert "JSON object" in error(client.post("/dreambooth/models", json=[1, 2]), 400)
    assert "body" in error(client.post("/dreambooth/models"), 400)
    assert "no EMA" in error(client.post("/dreambooth/models", json={**ok, "extract_ema": True}), 400)
    assert "does not exist" in error(client.post("/dreambooth/models", json={**ok, "source": "missing.ckpt"}), 400)
    assert not (host.models_root() / "dreambooth" / "x").exists()


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "a\\b", "", " x", "con", "x" * 200])
def test_create_refuses_unsafe_names(host, client, name):
    before = files_under(host.root.parent)
    assert error(client.post("/dreambooth/models", json={"name": name, "source": "tiny-sd1.safetensors"}), 400)
    assert files_under(host.root.parent) == before


def test_create_reads_only_checkpoints_the_host_knows(host, client, tmp_path, tiny_checkpoint):
    outside = tmp_path / "elsewhere" / "private.safetensors"
    outside.parent.mkdir()
    shutil.copy(tiny_checkpoint("sd1"), outside)
    (host.ckpt_dir / "link.safetensors").symlink_to(outside)  # a link inside the folder that leads out of it,
    # which this host does not list
    attempts = [str(outside), "../../elsewhere/private.safetensors", "link.safetensors", str(host.ckpt_dir),
                "/etc/passwd", "/etc/shadow", "~/.ssh/id_rsa", "../../../../../../etc/hostname"]
    for source in attempts:
        message = error(client.post("/dreambooth/models", json={"name": "x", "source": source}), 400)
        assert "not one of the host's checkpoints" in message, (source, message)
    assert not (host.models_root() / "dreambooth" / "x").exists()
    # the same file is fine once the host lists it (the WebUI lists files of --ckpt-dir and links)
    listed = make_client(Host(tmp_path / "h2", extra_checkpoints=[outside]))
    r = listed.post("/dreambooth/models", json={"name": "x", "source": str(outside)})
    assert r.status_code == 201, r.text
    r = listed.post("/dreambooth/models", json={"name": "y", "source": "private.safetensors"})  # by its title
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_round_trip_and_managed_fields(client, model):
    cfg = client.get("/dreambooth/models/dog/config").json()
    assert cfg["model_name"] == "dog" and cfg["concepts"] == []
    cfg["epochs"] = 7
    cfg["concepts"] = [{"instance_data_dir": "/data/dog", "instance_prompt": "a photo of zwx dog", "repeats": 3}]
    cfg["family"] = "sdxl"  # not changeable: kept
    cfg["revision"] = 999
    r = client.put("/dreambooth/models/dog/config", json=cfg)
    assert r.status_code == 200, r.text
    notes = r.json()["notes"]
    assert any(n.startswith("family: kept 'sd1'") for n in notes) and any(n.startswith("revision") for n in notes)
    again = client.get("/dreambooth/models/dog/config").json()
    assert again["epochs"] == 7 and again["family"] == "sd1" and again["revision"] == 0
    assert again["concepts"][0]["repeats"] == 3 and again["concepts"][0]["instance_prompt"] == "a photo of zwx dog"
    assert json.loads(model.config_path.read_text()) == again
    assert r.json()["config"] == again


def test_bad_config_is_refused_naming_the_field_and_nothing_is_written(client, model):
    stored = model.config_path.read_bytes()
    cfg = client.get("/dreambooth/models/dog/config").json()
    assert "learning_rate" in error(client.put("/dreambooth/models/dog/config", json={**cfg, "learning_rate": "x"}),
                                    400)
    assert "epochs" in error(client.put("/dreambooth/models/dog/config", json={**cfg, "epochs": 0}), 400)
    assert "optimizer" in error(client.put("/dreambooth/models/dog/config", json={**cfg, "optimizer": "sgd"}), 400)
    bad_concept = {**cfg, "concepts": [{"repeats": -1}]}
    assert "concepts[0].repeats" in error(client.put("/dreambooth/models/dog/config", json=bad_concept), 400)
    assert "JSON object" in error(client.put("/dreambooth/models/dog/config", json="epochs=3"), 400)
    assert model.config_path.read_bytes() == stored


# ---------------------------------------------------------------------------------------------------------------
# unknown models, traversal


@pytest.mark.parametrize("route", ["", "/config", "/status", "/samples", "/samples/a.png"])
def test_unknown_model_is_404(client, model, route):
    assert "no model named 'cat'" in error(client.get(f"/dreambooth/models/cat{route}"), 404)


@pytest.mark.parametrize("method,route", [("post", "/train"), ("post", "/pause"), ("post", "/resume"),
                                          ("post", "/cancel"), ("post", "/export"), ("put", "/config")])
def test_unknown_model_is_404_for_actions(client, model, method, route):
    assert error(getattr(client, method)(f"/dreambooth/models/cat{route}", json={}), 404)


def write_sample(folder: Path, stem: str, prompt: str) -> Path:
    req = SampleRequest(prompt, "blurry", 7, 20, 7.5, 16, 16, "ddim")
    return save_sample(Image.new("RGB", (16, 16), (200, 10, 10)), folder, stem, req, {"step": "12", "epoch": "3"})


def test_samples_list_and_download(client, model):
    assert client.get("/dreambooth/models/dog/samples").json() == {"samples": []}
    png = write_sample(model.samples, "step000012_c0_0", "a photo of zwx dog, on a beach")
    (model.samples / "notes.txt").write_text("x")
    listed = client.get("/dreambooth/models/dog/samples").json()["samples"]
    assert len(listed) == 1
    item = listed[0]
    assert item["file"] == png.name and item["prompt"] == "a photo of zwx dog, on a beach" and item["step"] == 12
    assert item["seed"] == 7 and item["negative_prompt"] == "blurry" and (item["width"], item["height"]) == (16, 16)
    r = client.get(item["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png.read_bytes()
    assert client.get("/dreambooth/models/dog").json()["samples"] == 1


def test_sample_traversal_is_refused_and_nothing_outside_is_read(client, model, host, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    secret_bytes = secret.read_bytes()
    write_sample(model.samples, "ok", "p")
    (model.samples / "link.png").symlink_to(secret)
    (model.path / "inside.png").write_bytes(secret_bytes)
    names = [p["file"] for p in client.get("/dreambooth/models/dog/samples").json()["samples"]]
    assert names == ["ok.png"]  # the link is not listed
    attempts = ["../inside.png", "..%2finside.png", "%2e%2e%2finside.png", "%2e%2e/%2e%2e/secret.png",
                "..%2f..%2f..%2f..%2fsecret.png", "link.png", "..%5cinside.png", "%2Ftmp%2Fsecret.png",
                "/" + str(secret), "..", "%2e%2e", "db_config.json", "ok.PNG.txt", ".hidden.png", "x.png%00.txt"]
    for attempt in attempts:
        r = client.get(f"/dreambooth/models/dog/samples/{attempt}")
        assert r.content != secret_bytes and secret_bytes not in r.content, attempt
        if r.request.url.raw_path.startswith(b"/dreambooth/models/dog/samples/"):  # else the client resolved the ..
            assert r.status_code in (400, 404), (attempt, r.status_code)
    # a samples folder that is itself a link out of the model dir
    shutil.rmtree(model.samples)
    outside = tmp_path / "out"
    outside.mkdir()
    write_sample(outside, "leak", "p")
    model.samples.symlink_to(outside)
    assert client.get("/dreambooth/models/dog/samples").json() == {"samples": []}
    assert error(client.get("/dreambooth/models/dog/samples/leak.png"), 404)


def test_model_name_traversal_is_refused(client, model, host, tmp_path):
    before = files_under(tmp_path)
    for name in ["..", "%2e%2e", "a..b", "..%2fdreambooth%2fdog", "%2e%2e%2f%2e%2e", ".hidden"]:
        for route in ("", "/config", "/status", "/samples"):
            r = client.get(f"/dreambooth/models/{name}{route}")
            assert r.status_code in (400, 404), (name, route, r.status_code, r.text)
        r = client.put(f"/dreambooth/models/{name}/config", json={"epochs": 1})
        assert r.status_code in (400, 404), (name, r.status_code)
        r = client.post(f"/dreambooth/models/{name}/train", json={})
        assert r.status_code in (400, 404), (name, r.status_code)
    assert "not allowed" in error(client.get("/dreambooth/models/%2e%2e/config"), 400)
    # a link in the store that leads elsewhere is not a model
    elsewhere = tmp_path / "elsewhere_model"
    shutil.copytree(model.path, elsewhere)
    (model.path.parent / "linked").symlink_to(elsewhere)
    assert "link" in error(client.get("/dreambooth/models/linked/config"), 400)
    assert files_under(tmp_path) - before == {model.path.parent / "linked"} | files_under(elsewhere) | {elsewhere}


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_writes_the_checkpoint_and_tells_the_host(client, model, host):
    r = client.post("/dreambooth/models/dog/export", json={"dtype": "fp32"})
    assert r.status_code == 200, r.text
    path = Path(r.json()["path"])
    assert path == host.ckpt_dir / "dog.safetensors" and path.is_file() and host.exported == [path]
    tensors = load_file(str(path))
    assert tensors and all(str(t.dtype) in ("torch.float32", "torch.int64") for t in tensors.values())
    r = client.post("/dreambooth/models/dog/export")  # again, body-less: config's dtype, our own file is replaced
    assert r.status_code == 200, r.text
    assert {str(t.dtype) for t in load_file(str(path)).values()} >= {"torch.float16"}
    assert "dtype" in error(client.post("/dreambooth/models/dog/export", json={"dtype": "fp8"}), 400)
    assert "ema" in error(client.post("/dreambooth/models/dog/export", json={"ema": "yes"}), 400)
    assert "EMA" in error(client.post("/dreambooth/models/dog/export", json={"ema": "main"}), 400)


def test_export_does_not_overwrite_a_foreign_checkpoint_unless_asked(client, model, host):
    foreign = host.ckpt_dir / "dog.safetensors"
    shutil.copy(host.ckpt_dir / "tiny-sd1.safetensors", foreign)
    original = foreign.read_bytes()
    assert "was not exported from 'dog'" in error(client.post("/dreambooth/models/dog/export", json={}), 409)
    assert foreign.read_bytes() == original and host.exported == []
    r = client.post("/dreambooth/models/dog/export", json={"overwrite": True})
    assert r.status_code == 200 and foreign.read_bytes() != original


# ---------------------------------------------------------------------------------------------------------------
# auth


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("auth", [{"alice": "s3cret:x", "bob": "pw"},
                                  lambda u, p: (u, p) in {("alice", "s3cret:x"), ("bob", "pw")}])
def test_auth_guards_every_route(tmp_path, auth, tiny_checkpoint):
    host = Host(tmp_path, auth=auth)
    shutil.copy(tiny_checkpoint("sd1"), host.ckpt_dir / "tiny-sd1.safetensors")
    client = make_client(host)
    good = basic("alice", "s3cret:x")
    r = client.post("/dreambooth/models", json={"name": "dog", "source": "tiny-sd1.safetensors"}, headers=good)
    assert r.status_code == 201, r.text
    write_sample(model_dir("dog", host.models_root()).samples, "s", "p")
    routes = [("get", "/schema"), ("get", "/checkpoints"), ("get", "/models"), ("get", "/models/dog"),
              ("get", "/models/dog/config"), ("put", "/models/dog/config"), ("get", "/models/dog/status"),
              ("get", "/models/dog/samples"), ("get", "/models/dog/samples/s.png"), ("post", "/models/dog/train"),
              ("post", "/models/dog/pause"), ("post", "/models/dog/resume"), ("post", "/models/dog/cancel"),
              ("post", "/models/dog/export"), ("post", "/models"), ("get", "/models/nope")]
    bad_headers = [{}, basic("alice", "wrong"), basic("mallory", "pw"), basic("bob", "s3cret:x"),
                   {"Authorization": "Basic !!!"}, {"Authorization": "Bearer abc"}, basic("alice", "")]
    before = files_under(tmp_path)
    for method, route in routes:
        for headers in bad_headers:
            r = getattr(client, method)(f"/dreambooth{route}", headers=headers)
            assert error(r, 401), (route, headers)
            assert r.headers["www-authenticate"] == 'Basic realm="dreambooth"'
    assert files_under(tmp_path) == before and host.exported == []
    assert client.get("/dreambooth/models", headers=good).status_code == 200
    assert client.get("/dreambooth/models/dog/samples/s.png", headers=basic("bob", "pw")).status_code == 200
    assert error(client.get("/dreambooth/models/nope", headers=good), 404)


def test_auth_from_api_credentials_and_off(tmp_path):
    class WithCredentials(Host):
        auth = None

        def api_credentials(self) -> dict[str, str]:
            return {"u": "p"}

    host = WithCredentials(tmp_path / "a")
    client = make_client(host)
    assert error(client.get("/dreambooth/schema"), 401)
    assert client.get("/dreambooth/schema", headers=basic("u", "p")).status_code == 200
    open_client = make_client(Host(tmp_path / "b"))
    assert open_client.get("/dreambooth/models").status_code == 200


def test_unexpected_errors_are_json_500(tmp_path):
    class Broken(Host):
        def checkpoints(self):
            raise RuntimeError("list exploded")

    r = make_client(Broken(tmp_path)).get("/dreambooth/checkpoints")
    assert "RuntimeError: list exploded" in error(r, 500)


# ---------------------------------------------------------------------------------------------------------------
# training through the API, with a real worker


def wait_for(client, name: str, states: tuple[str, ...], timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while True:
        status = client.get(f"/dreambooth/models/{name}/status").json()
        if status["state"] in states or time.monotonic() > end:
            return status
        time.sleep(0.1)


def test_train_refuses_a_model_without_concepts(client, model):
    assert "no concepts" in error(client.post("/dreambooth/models/dog/train", json={}), 400)
    assert not model.status_path.exists()
    for action in ("pause", "resume", "cancel"):
        assert "not training" in error(client.post(f"/dreambooth/models/dog/{action}"), 409)
    assert "resume" in error(client.post("/dreambooth/models/dog/train", json={"resume": "yes"}), 400)


def test_training_runs_in_a_worker_and_is_paused_resumed_and_cancelled(host, client, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_training_model(host.models_root(), host.ckpt_dir / "tiny-sd1.safetensors", name="cat", epochs=10000,
                        save_on_cancel=False)
    r = client.post("/dreambooth/models/cat/train", json={})
    assert r.status_code == 202, r.text
    pid = r.json()["pid"]
    assert r.json()["status"]["state"] == "starting" and r.json()["status"]["running"] and host.started == ["cat"]
    try:
        assert "already training" in error(client.post("/dreambooth/models/cat/train", json={}), 409)
        cfg = client.get("/dreambooth/models/cat/config").json()
        assert "is training" in error(client.put("/dreambooth/models/cat/config", json=cfg), 409)
        assert "is training" in error(client.post("/dreambooth/models/cat/export", json={}), 409)
        status = wait_for(client, "cat", ("running", "failed"))
        assert status["state"] == "running", status
        assert client.post("/dreambooth/models/cat/pause").status_code == 200
        assert wait_for(client, "cat", ("paused",), 60)["state"] == "paused"
        step = client.get("/dreambooth/models/cat/status").json()["step"]
        time.sleep(1.0)
        assert client.get("/dreambooth/models/cat/status").json()["step"] == step
        assert client.post("/dreambooth/models/cat/resume").status_code == 200
        assert wait_for(client, "cat", ("running",), 60)["state"] == "running"
        listed = client.get("/dreambooth/models").json()["models"]
        assert [(m["name"], m["running"], m["state"]) for m in listed] == [("cat", True, "running")]
        r = client.post("/dreambooth/models/cat/cancel")
        assert r.status_code == 200, r.text
        final = wait_for(client, "cat", ("cancelled", "failed", "done"), 120)
    finally:
        if jobs.running(model_dir("cat", host.models_root())):
            os.kill(pid, 9)
    assert final["state"] == "cancelled" and final["pid"] == pid, final
    end = time.monotonic() + 30
    while client.get("/dreambooth/models/cat/status").json()["running"] and time.monotonic() < end:
        time.sleep(0.1)
    assert client.get("/dreambooth/models/cat/status").json()["running"] is False


def test_generate_samples_now_starts_a_sampling_worker(host, client, monkeypatch):
    """POST .../sample starts ``python -m dreambooth sample NAME`` through jobs.start (the model's lock, the status,
    the host's hook that frees the WebUI's VRAM) and answers at once; a model with nothing to preview is refused."""
    commands, real = [], jobs.worker_command

    def stand_in(model, **kw):
        commands.append(real(model, **kw))
        return [sys.executable, "-c", "import time; time.sleep(3)"]

    monkeypatch.setattr(jobs, "worker_command", stand_in)
    md = make_training_model(host.models_root(), host.ckpt_dir / "tiny-sd1.safetensors", name="cat")
    r = client.post("/dreambooth/models/cat/sample")
    assert r.status_code == 202, r.text
    assert r.json()["status"]["job"] == "sample" and host.started == ["cat (sampling)"]
    assert commands[0][2:6] == ["dreambooth", "sample", "cat", "--models-root"]
    assert commands[0][-4:] == ["--device", "cpu", "--attention-default", "default"]
    assert "already sampling" in error(client.post("/dreambooth/models/cat/train", json={}), 409)
    jobs.wait(md, 30)
    cfg = load_config(md.path)
    cfg.concepts[0].n_samples = 0
    cfg.save(md.path)
    assert "no previews" in error(client.post("/dreambooth/models/cat/sample"), 400)
