"""Each training method trains with its own defaults: a run with the defaults only logs the method's learning rate
(issue 12, item 1), and the tab shows those defaults as soon as the method is picked."""

from __future__ import annotations

import json

from conftest import cancelled_at
from test_ui import _wired, built  # noqa: F401 - the built tab fixture

from dreambooth.cli import main
from dreambooth.config import TrainConfig, load_config
from dreambooth.demo import make_concept_images
from dreambooth.store import model_dir


def _default_model(tmp_path, tiny_checkpoint, instance_prompt: str):
    """A model made through the CLI whose config holds nothing but the defaults and one concept."""
    root = tmp_path / "models"
    assert main(["create", str(tiny_checkpoint("sd1")), "m", "--models-root", str(root)]) == 0
    md = model_dir("m", root)
    make_concept_images(tmp_path / "images", count=1)
    data = json.loads(md.config_path.read_text())
    data["concepts"] = [{"instance_data_dir": str(tmp_path / "images"), "instance_prompt": instance_prompt}]
    md.config_path.write_text(json.dumps(data))
    return root, md


def _logged_learning_rates(md) -> list[float]:
    rows = (md.logs / "loss.csv").read_text().splitlines()[1:]
    assert rows, "no step was logged"
    return [float(lr) for row in rows for lr in row.split(",")[3].split(";")]


def test_a_lora_run_with_the_defaults_trains_at_loras_learning_rate(tmp_path, tiny_checkpoint):
    root, md = _default_model(tmp_path, tiny_checkpoint, "a photo of zwx disc")
    with cancelled_at(1):  # one step of the default 100 epochs is enough to see the learning rate
        assert main(["train", "m", "--models-root", str(root), "--method", "lora"]) == 0
    assert load_config(md.path).method == "lora"
    assert min(_logged_learning_rates(md)) >= 1e-5


def test_a_textual_inversion_run_with_the_defaults_trains_at_its_learning_rate(tmp_path, tiny_checkpoint):
    root, md = _default_model(tmp_path, tiny_checkpoint, "a photo of zwx-style disc")
    data = json.loads(md.config_path.read_text())  # the method chosen in the config, as the API's PUT does
    data.update(method="textual_inversion", embedding_token="zwx-style")
    md.config_path.write_text(json.dumps(data))
    with cancelled_at(1):
        assert main(["train", "m", "--models-root", str(root)]) == 0
    assert min(_logged_learning_rates(md)) >= 1e-3


def test_picking_a_method_in_the_tab_shows_its_defaults_and_keeps_changed_settings(built):  # noqa: F811
    demo, _, _ = built
    handlers = demo.dreambooth_handlers
    names = [c.spec.name if c.concept is None else None for c in handlers.controls]
    values = [c.spec.default for c in handlers.controls]
    values[names.index("method")] = "textual_inversion"
    values[names.index("epochs")] = 7  # changed by the user: stays
    out = _wired(demo, "choose_method")("dreambooth", *values)
    shown = dict(zip(names, out[1:-1], strict=True))
    assert (shown["learning_rate"], shown["weight_decay"], shown["epochs"]) == (5e-3, 0.0, 7)
    assert "learning_rate" in out[0] and out[-1] == "textual_inversion"
    values = list(out[1:-1])
    values[names.index("learning_rate")] = 3e-3  # the user's own: stays when the method changes again
    values[names.index("method")] = "lora"
    shown = dict(zip(names, _wired(demo, "choose_method")(out[-1], *values)[1:-1], strict=True))
    assert (shown["learning_rate"], shown["text_encoder_learning_rate"]) == (3e-3, 5e-5)
    assert shown["weight_decay"] == TrainConfig().weight_decay  # textual inversion's 0 was its default, not the user's
