"""The hypernetwork method is one choice of the same picker in the tab, the API and the CLI, and its output folder
reaches the worker from each front door."""

from __future__ import annotations

import json

from conftest import make_training_model
from test_api import Host, make_client

from dreambooth import cli, jobs
from dreambooth.config import METHODS, field_specs
from dreambooth.store import model_dir
from dreambooth.ui.form import config_controls, shown_for_method

HYPERNETWORK_FIELDS = ["hypernetwork_layer_structure", "hypernetwork_activation", "hypernetwork_layer_norm",
                       "hypernetwork_dropout"]


def test_the_tab_shows_only_the_hypernetwork_settings_that_apply():
    controls = config_controls()
    index = {c.spec.name: i for i, c in enumerate(controls)}
    hypernetwork = shown_for_method("hypernetwork", controls)
    assert all(hypernetwork[index[n]] for n in [*HYPERNETWORK_FIELDS, "learning_rate", "epochs"])
    assert not any(hypernetwork[index[n]] for n in ("lora_rank", "embedding_token", "use_ema", "export_ema"))
    for other in ("dreambooth", "lora", "textual_inversion"):
        assert not any(shown_for_method(other, controls)[index[n]] for n in HYPERNETWORK_FIELDS)


def test_text_encoder_and_unet_switches_show_only_for_methods_that_train_those_weights():
    controls = config_controls()
    index = {c.spec.name: i for i, c in enumerate(controls)}
    switches = ("train_unet", "text_encoder_ratio", "text_encoder_learning_rate")
    for method in METHODS:
        shown = shown_for_method(method, controls)
        assert all(shown[index[n]] for n in switches) == (method in ("dreambooth", "lora")), method


class HypernetworkHost(Host):
    def hypernetworks_dir(self):
        return self.root / "hypernetworks"


def test_the_api_offers_the_method_and_passes_the_hypernetworks_folder(tmp_path, tiny_checkpoint, monkeypatch):
    host = HypernetworkHost(tmp_path)
    (host.ckpt_dir / "tiny-sd1.safetensors").write_bytes(tiny_checkpoint("sd1").read_bytes())
    client = make_client(host)
    fields = {f["name"]: f for f in client.get("/dreambooth/schema").json()["config"]}
    assert "hypernetwork" in fields["method"]["choices"]
    assert all(fields[n]["methods"] == ["hypernetwork"] for n in HYPERNETWORK_FIELDS)
    assert client.post("/dreambooth/models", json={"name": "dog", "source": "tiny-sd1.safetensors"}).status_code == 201
    cfg = client.get("/dreambooth/models/dog/config").json()
    cfg.update(method="hypernetwork", hypernetwork_layer_structure="1, 4, 1", hypernetwork_activation="swish",
               concepts=[{"instance_data_dir": str(tmp_path), "instance_prompt": "zwx"}])
    assert client.put("/dreambooth/models/dog/config", json=cfg).status_code == 200
    bad = client.put("/dreambooth/models/dog/config", json={**cfg, "hypernetwork_activation": "prelu"})
    assert bad.status_code == 400 and "hypernetwork_activation" in bad.json()["error"]
    started = {}
    monkeypatch.setattr(jobs, "start", lambda md, **kw: started.update(kw) or 4242)
    monkeypatch.setattr(jobs, "status", lambda md: {"state": "starting"})
    r = client.post("/dreambooth/models/dog/train", json={})
    assert r.status_code == 202, r.text
    assert started["hypernetworks_dir"] == host.root / "hypernetworks"
    stored = json.loads(model_dir("dog", host.models_root()).config_path.read_text())
    assert stored["method"] == "hypernetwork" and stored["hypernetwork_activation"] == "swish"


def test_the_worker_command_carries_the_hypernetworks_folder(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="hypernetwork")
    cmd = jobs.worker_command(md, models_root=tmp_path, resume=False, device="cpu", export_dir=None,
                              attention_default=None, hypernetworks_dir=tmp_path / "hn")
    assert cmd[cmd.index("--hypernetworks-dir") + 1] == str(tmp_path / "hn")
    args = cli.build_parser().parse_args(cmd[3:])
    assert args.hypernetworks_dir == str(tmp_path / "hn")


def test_cli_trains_a_hypernetwork_into_the_given_folder(tmp_path, tiny_checkpoint, capsys):
    make_training_model(tmp_path, tiny_checkpoint("sd1"), images=1, epochs=1, save_checkpoint=True,
                        method="hypernetwork")
    code = cli.main(["train", "m", "--models-root", str(tmp_path), "--device", "cpu",
                     "--hypernetworks-dir", str(tmp_path / "hn")])
    assert code == 0, capsys.readouterr()
    assert [p.name for p in (tmp_path / "hn").iterdir()] == ["m_1.pt"]


def test_every_method_field_names_known_methods():
    for spec in field_specs():
        assert spec.methods is None or set(spec.methods) <= set(METHODS)
