"""The config: every field validated and named when wrong, migration, unknown keys kept, metadata complete."""

from __future__ import annotations

import json

import pytest

from dreambooth.config import (
    CONFIG_VERSION,
    Concept,
    TrainConfig,
    config_from_dict,
    field_specs,
    load_concepts_file,
    load_config,
)
from dreambooth.errors import ConfigError


def test_defaults_round_trip(tmp_path):
    cfg = TrainConfig(model_name="m", concepts=[Concept(instance_prompt="a zwx dog", num_class_images_per=2)])
    cfg.save(tmp_path)
    again = load_config(tmp_path)
    assert again == cfg
    assert json.loads((tmp_path / "db_config.json").read_text())["config_version"] == CONFIG_VERSION


def test_every_field_has_metadata():
    for cls in (TrainConfig, Concept):
        for spec in field_specs(cls):
            assert spec.label, spec.name
            assert spec.group, spec.name
            assert spec.type in (bool, int, float, str), spec.name
            if spec.ui:
                assert spec.help, spec.name
            if spec.choices:
                assert spec.default in spec.choices, spec.name
            if spec.minimum is not None:
                assert spec.default >= spec.minimum, spec.name
            if spec.maximum is not None:
                assert spec.default <= spec.maximum, spec.name


def _bad_value(spec):
    return {bool: "yes", int: 1.5, float: "fast", str: 3}[spec.type]


@pytest.mark.parametrize("spec", [s for s in field_specs(TrainConfig) if s.name != "config_version"],
                         ids=lambda s: s.name)
def test_wrong_type_names_the_field(spec):
    with pytest.raises(ConfigError) as err:
        config_from_dict({spec.name: _bad_value(spec)})
    assert err.value.message.startswith(f"{spec.name}: expected ")


@pytest.mark.parametrize("spec", [s for s in field_specs(TrainConfig) if s.maximum is not None or s.choices],
                         ids=lambda s: s.name)
def test_out_of_range_names_the_field(spec):
    value = "nonsense" if spec.choices else spec.maximum + 1
    with pytest.raises(ConfigError) as err:
        config_from_dict({spec.name: value})
    assert spec.name in err.value.message and ("from" in err.value.message or "one of" in err.value.message)


def test_bool_is_not_an_int_and_nan_is_refused():
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        config_from_dict({"epochs": True})
    with pytest.raises(ConfigError, match="learning_rate: expected a number"):
        config_from_dict({"learning_rate": float("nan")})


def test_int_accepted_for_float():
    cfg, _ = config_from_dict({"learning_rate": 1})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_concept_errors_name_the_concept_and_field():
    with pytest.raises(ConfigError, match=r"concepts\[1\]\.repeats: expected an integer"):
        config_from_dict({"concepts": [{}, {"repeats": "many"}]})
    with pytest.raises(ConfigError, match=r"concepts\[0\]\.colour: unknown concept setting"):
        config_from_dict({"concepts": [{"colour": "red"}]})
    with pytest.raises(ConfigError, match="concepts: expected a list"):
        config_from_dict({"concepts": {"a": 1}})


def test_old_keys_are_migrated_and_reported():
    cfg, notes = config_from_dict({"num_train_epochs": 7, "use_8bit_adam": True, "half_model": False,
                                   "concepts": [{"save_sample_prompt": "zwx", "n_save_sample": 3}]})
    assert cfg.epochs == 7 and cfg.optimizer == "adamw_8bit" and cfg.export_dtype == "fp32"
    assert cfg.concepts[0].sample_prompt == "zwx" and cfg.concepts[0].n_samples == 3
    assert any("num_train_epochs migrated to epochs" in n for n in notes)


def test_pin_memory_is_gone_and_an_old_config_with_it_still_loads_with_a_note(tmp_path):
    """pin_memory changed nothing measurable (issue 12 item 21): no setting, no form field; a config that has it
    loads, says why it is ignored, and is saved without it."""
    from dreambooth.config import field_specs

    assert "pin_memory" not in {spec.name for spec in field_specs(TrainConfig)}
    cfg, notes = config_from_dict({"epochs": 3, "pin_memory": True})
    assert cfg.epochs == 3 and cfg.unknown == {}
    assert [n for n in notes if n.startswith("pin_memory: removed")] and all("unknown" not in n for n in notes)
    cfg.save(tmp_path)
    assert "pin_memory" not in json.loads((tmp_path / "db_config.json").read_text())


def test_unknown_keys_are_kept_and_reported(tmp_path):
    cfg, notes = config_from_dict({"epochs": 3, "some_future_knob": [1, 2]})
    assert cfg.unknown == {"some_future_knob": [1, 2]}
    assert any("some_future_knob" in n for n in notes)
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "db_config.json").read_text())["some_future_knob"] == [1, 2]


def test_future_version_is_refused():
    with pytest.raises(ConfigError, match="newer version"):
        config_from_dict({"config_version": CONFIG_VERSION + 1})


def test_broken_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)
    (tmp_path / "db_config.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "db_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path)


def test_concepts_list_file(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{"instance_data_dir": "a", "instance_prompt": "zwx"},
                                {"class_prompt": "dog", "num_class_images_per": 4}]), encoding="utf-8")
    concepts = load_concepts_file(path)
    assert [c.instance_data_dir for c in concepts] == ["a", ""] and concepts[1].num_class_images_per == 4
    path.write_text(json.dumps({"instance_data_dir": "a"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON list"):
        load_concepts_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_concepts_file(tmp_path / "nope.json")
