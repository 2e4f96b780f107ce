"""kohya dataset import through the front doors: ``python -m dreambooth import-kohya``, the API and the tab."""

from __future__ import annotations

import json

import pytest
from test_api import Host, make_client
from test_kohya import images, needs_toml, toml

from dreambooth import cli
from dreambooth.config import load_config
from dreambooth.create import create_model
from dreambooth.store import model_dir

DATASET = """
[general]
enable_bucket = false
shuffle_caption = true

[[datasets]]
resolution = 256
batch_size = 2

  [[datasets.subsets]]
  image_dir = "shs"
  class_tokens = "shs girl"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "zwx"
  class_tokens = "zwx dog"
  num_repeats = 5

  [[datasets.subsets]]
  image_dir = "reg"
  class_tokens = "girl"
  is_reg = true
"""


@pytest.fixture()
def dataset(tmp_path):
    data = tmp_path / "data"
    images(data / "shs", 4)
    images(data / "zwx", 2)
    images(data / "reg", 8)
    return toml(data, DATASET)


@pytest.fixture()
def model(tmp_path, tiny_checkpoint):
    return create_model(tiny_checkpoint("sd1"), "m", tmp_path / "models")


def _check_imported(md) -> None:
    cfg = load_config(md.path)
    assert [(c.instance_token, c.class_token, c.repeats) for c in cfg.concepts] == [("shs", "girl", 10),
                                                                                   ("zwx", "dog", 5)]
    assert cfg.concepts[0].class_data_dir.endswith("reg") and cfg.concepts[0].num_class_images_per == 2
    assert cfg.resolution == 256 and cfg.train_batch_size == 2 and cfg.enable_buckets is False
    assert cfg.shuffle_tags is True


@needs_toml
def test_cli_imports_a_toml_and_prints_the_total_steps(model, dataset, tmp_path, capsys):
    code = cli.main(["import-kohya", "m", "--toml", str(dataset), "--models-root", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert code == 0, out
    _check_imported(model)
    # (4 x 10 + 2 x 5) x 2 (prior: the girl concept has class images) x 100 epochs / batch 2
    assert "imported 2 concepts" in out and "= 5000 steps" in out and "x 2 (prior)" in out


def test_cli_imports_a_folder_with_a_reg_folder(model, tmp_path, capsys):
    images(tmp_path / "train" / "10_shs girl", 3)
    images(tmp_path / "reg" / "1_girl", 6)
    code = cli.main(["import-kohya", "m", "--folder", str(tmp_path / "train"), "--reg-folder",
                     str(tmp_path / "reg"), "--models-root", str(tmp_path / "models")])
    assert code == 0, capsys.readouterr()
    [concept] = load_config(model.path).concepts
    assert (concept.instance_token, concept.class_token, concept.repeats) == ("shs", "girl", 10)
    assert concept.class_data_dir == str(tmp_path / "reg" / "1_girl") and concept.num_class_images_per == 2


@needs_toml
def test_cli_bad_dataset_is_one_line_and_changes_nothing(model, tmp_path, capsys):
    before = model.config_path.read_bytes()
    bad = toml(tmp_path, "[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 3\n", "bad.toml")
    assert cli.main(["import-kohya", "m", "--toml", str(bad), "--models-root", str(tmp_path / "models")]) == 2
    assert "image_dir" in capsys.readouterr().err
    assert cli.main(["import-kohya", "m", "--toml", str(tmp_path / "missing.toml"),
                     "--models-root", str(tmp_path / "models")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert model.config_path.read_bytes() == before


@needs_toml
def test_api_imports_a_toml(tmp_path, tiny_checkpoint, dataset):
    host = Host(tmp_path)
    (host.ckpt_dir / "tiny.safetensors").write_bytes(tiny_checkpoint("sd1").read_bytes())
    client = make_client(host)
    assert client.post("/dreambooth/models", json={"name": "dog", "source": "tiny.safetensors"}).status_code == 201
    r = client.post("/dreambooth/models/dog/import-kohya", json={"toml": str(dataset)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["concepts"] == 2 and body["total_steps"] == 5000 and "5000 steps" in body["formula"]
    assert body["settings"]["resolution"] == 256 and body["config"]["concepts"][1]["instance_token"] == "zwx"
    _check_imported(model_dir("dog", host.models_root()))
    for bad, status in (({}, 400), ({"toml": str(dataset), "folder": str(tmp_path)}, 400),
                        ({"toml": str(tmp_path / "nope.toml")}, 400), ({"toml": str(dataset), "x": 1}, 400)):
        r = client.post("/dreambooth/models/dog/import-kohya", json=bad)
        assert r.status_code == status and set(r.json()) == {"error", "hint"}, r.text
    assert client.post("/dreambooth/models/cat/import-kohya", json={"toml": str(dataset)}).status_code == 404


@needs_toml
def test_tab_handler_imports_and_fills_the_form(model, dataset, tmp_path):
    from dreambooth.host.standalone import StandaloneHost
    from dreambooth.ui.handlers import TabHandlers

    handlers = TabHandlers(StandaloneHost(tmp_path / "models"))
    message, _, steps, *values = handlers.import_kohya("m", str(dataset), "")
    assert "imported 2 concepts" in message and "5000 steps" in message
    _check_imported(model)
    shown = dict(zip((c.elem_id for c in handlers.controls), values, strict=True))
    assert shown["dbt_c0_instance_token"] == "shs" and shown["dbt_c1_repeats"] == 5 and shown["dbt_resolution"] == 256
    stored = json.loads(model.config_path.read_text())
    assert stored["concepts"][0]["instance_data_dir"].endswith("shs")
