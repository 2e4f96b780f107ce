"""Model names are one safe path component; the store never reaches outside its root."""

from __future__ import annotations

import os

import pytest

from dreambooth.errors import StoreError
from dreambooth.store import list_models, model_dir, models_root, open_model, validate_name

BAD_NAMES = ["", "   ", "..", ".", "../evil", "a/b", "a\\b", "/abs", "C:", "a:b", "CON", "nul.txt", "LPT1",
             ".hidden", "trailing.", " lead", "x" * 101, "a\x00b", "tab\tname", "q?", "star*", "pipe|x", "a..b",
             "e\u0301"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    with pytest.raises(StoreError) as err:
        validate_name(name)
    assert "model name" in err.value.message and err.value.hint


@pytest.mark.parametrize("name", ["my-dog_v1", "Dog 2", "v1.5-tuned", "hündchen", "犬"])
def test_good_names(name):
    assert validate_name(name) == name


def test_non_string_name():
    with pytest.raises(StoreError, match="must be text"):
        validate_name(None)


def test_models_root_override_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODELS_ROOT", str(tmp_path / "env"))
    assert models_root() == (tmp_path / "env").resolve()
    assert models_root(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.delenv("DREAMBOOTH_MODELS_ROOT")
    monkeypatch.chdir(tmp_path)
    assert models_root() == (tmp_path / "models").resolve()


def test_symlink_out_of_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = tmp_path / "root" / "dreambooth"
    store.mkdir(parents=True)
    os.symlink(outside, store / "sneaky")
    with pytest.raises(StoreError, match="link"):
        model_dir("sneaky", tmp_path / "root")


def test_open_missing_model_lists_known(tmp_path):
    md = model_dir("real", tmp_path)
    md.working.mkdir(parents=True)
    md.config_path.write_text("{}", encoding="utf-8")
    assert list_models(tmp_path) == ["real"]
    with pytest.raises(StoreError) as err:
        open_model("ghost", tmp_path)
    assert "ghost" in err.value.message and "real" in err.value.hint
