"""single file -> create -> export is exact for every family; working/ loads in diffusers; bad input leaves nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import REFERENCE_LDM, reference_keys
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.checkpoint_file import read_checkpoint
from dreambooth.config import load_config
from dreambooth.create import create_model
from dreambooth.errors import CheckpointError, StoreError, UserError
from dreambooth.export import export_checkpoint
from dreambooth.families.layout import normalize_diffusers_keys
from dreambooth.store import store_dir
from dreambooth.tiny import write_tiny_checkpoint

FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_has_the_official_key_names(tiny_checkpoint, family):
    keys = sorted(load_file(str(tiny_checkpoint(family))))
    assert keys == sorted(reference_keys(REFERENCE_LDM[family]))


def test_ema_fixture_has_the_official_training_layout(tiny_checkpoint):
    keys = sorted(load_file(str(tiny_checkpoint("sd1", with_ema=True))))
    assert keys == sorted(reference_keys("sd15_ldm_keys_with_ema.tsv"))


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise_exact(tmp_path, tiny_checkpoint, family):
    source = tiny_checkpoint(family)
    md = create_model(source, f"rt-{family}", tmp_path)
    assert load_config(md.path).family == family
    out = export_checkpoint(md, tmp_path / "out" / "rt.safetensors", dtype="keep", ema="both")
    _assert_identical(load_file(str(source)), load_file(str(out)))
    assert out.with_suffix(".yaml").is_file() == (family == "sd2v")


def test_round_trip_with_ema_and_fp16(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "ema16.safetensors", "sd1", with_ema=True, dtype=torch.float16)
    md = create_model(source, "ema16", tmp_path)
    assert (md.working / "unet_ema").is_dir()
    out = export_checkpoint(md, tmp_path / "ema16-out.safetensors", dtype="keep", ema="both")
    _assert_identical(load_file(str(source)), load_file(str(out)))


def test_extract_ema_uses_the_ema_weights(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd1", with_ema=True)
    state = load_file(str(source))
    md = create_model(source, "ema", tmp_path, extract_ema=True)
    out = load_file(str(export_checkpoint(md, tmp_path / "x.safetensors", dtype="keep")))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(out[key], state["model_ema.diffusion_modelinput_blocks00weight"])
    assert not torch.equal(out[key], state[key])
    assert not any(k.startswith("model_ema.") for k in out)


def test_extract_ema_without_ema_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        create_model(tiny_checkpoint("sd1"), "noema", tmp_path, extract_ema=True)
    assert _store_entries(tmp_path) == []


def test_export_precision_metadata_and_ema_choice(tmp_path, tiny_checkpoint):
    md = create_model(tiny_checkpoint("sd1", with_ema=True), "meta", tmp_path)
    out = export_checkpoint(md, tmp_path / "half.safetensors", dtype="fp16")
    state = load_file(str(out))
    assert state["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert not any(k.startswith("model_ema.") for k in state)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["dreambooth.steps"] == "0" and meta["dreambooth.base_model"] == "tiny-sd1.safetensors"
    assert set(json.loads(meta["dreambooth.configs"])) == {"unet", "vae", "text_encoder"}
    with pytest.raises(UserError, match="unknown export precision"):
        export_checkpoint(md, tmp_path / "bad.safetensors", dtype="fp8")


def test_v_prediction_comes_from_the_yaml_beside_the_file(tmp_path, tiny_checkpoint):
    source = tiny_checkpoint("sd2v")
    assert source.with_suffix(".yaml").is_file()
    md = create_model(source, "v", tmp_path)
    sched = json.loads((md.working / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    out = export_checkpoint(md, tmp_path / "v.safetensors")
    assert "parameterization: \"v\"" in out.with_suffix(".yaml").read_text().replace("'", '"')
    # the same weights without the yaml are SD 2.x epsilon, unless chosen explicitly
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(source.read_bytes())
    assert load_config(create_model(bare, "eps", tmp_path).path).family == "sd2"
    assert load_config(create_model(bare, "vv", tmp_path, family="sd2v").path).family == "sd2v"


@pytest.mark.parametrize("family", ("sd1", "sdxl"))
def test_working_dir_loads_in_diffusers_and_transformers(tmp_path, tiny_checkpoint, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    md = create_model(tiny_checkpoint(family), "load", tmp_path)
    w = md.working
    _, info = UNet2DConditionModel.from_pretrained(w / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = AutoencoderKL.from_pretrained(w / "vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    te, info = CLIPTextModel.from_pretrained(w / "text_encoder", output_loading_info=True)
    assert not [k for k in info["missing_keys"] if "position_ids" not in k] and not info["unexpected_keys"]
    sd = load_file(str(w / "text_encoder" / "model.safetensors"))
    loaded = normalize_diffusers_keys("text_encoder", te.state_dict())  # transformers 5 drops "text_model."
    assert torch.equal(loaded["text_model.embeddings.token_embedding.weight"],
                       sd["text_model.embeddings.token_embedding.weight"])
    index = json.loads((w / "model_index.json").read_text())
    assert index["_diffusers_version"] and index["_class_name"].startswith("StableDiffusion")  # as save_pretrained
    tok = CLIPTokenizer.from_pretrained(w / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    if family == "sdxl":
        _, info = CLIPTextModelWithProjection.from_pretrained(w / "text_encoder_2", output_loading_info=True)
        assert not [k for k in info["missing_keys"] if "position_ids" not in k] and not info["unexpected_keys"]
        assert CLIPTokenizer.from_pretrained(w / "tokenizer_2").pad_token == "!"


def test_pipeline_loads_offline(tmp_path, tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    md = create_model(tiny_checkpoint("sd1"), "pipe", tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(md.working, safety_checker=None, requires_safety_checker=False)
    image = pipe("zwx", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_create_from_a_diffusers_folder(tmp_path, tiny_checkpoint):
    first = create_model(tiny_checkpoint("sdxl"), "first", tmp_path)
    second = create_model(first.working, "second", tmp_path)
    assert load_config(second.path).family == "sdxl"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = load_file(str(next((first.working / component).glob("*.safetensors"))))
        b = load_file(str(next((second.working / component).glob("*.safetensors"))))
        _assert_identical(a, b)


def test_ckpt_source_reads_like_safetensors(tmp_path):
    sft = write_tiny_checkpoint(tmp_path / "a.safetensors", "sd1", seed=3)
    ckpt = write_tiny_checkpoint(tmp_path / "a.ckpt", "sd1", seed=3)
    _assert_identical(read_checkpoint(sft), read_checkpoint(ckpt))


# --- bad input: a clear error and no model dir left behind ----------------------------------------------------


def _store_entries(root):
    folder = store_dir(root)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_sources(tmp_path, tiny_checkpoint):
    good = tiny_checkpoint("sd1")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_ckpt = tmp_path / "photo.safetensors"
    not_ckpt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)}, str(unknown))
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": _Payload(tmp_path / "PWNED")}, fh)
    lying_shapes = tmp_path / "wrong-widths.safetensors"
    state = load_file(str(good))
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    save_file(state, str(lying_shapes))  # no configs metadata: the full-size SD1 config does not fit
    return {
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
        "truncated": (truncated, "truncated"),
        "not a checkpoint": (not_ckpt, ""),
        "unknown architecture": (unknown, ""),
        "pickle with code": (evil, ""),
        "wrong shapes": (lying_shapes, "do not fit"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not a checkpoint", "unknown architecture",
                                  "pickle with code", "wrong shapes"])
def test_bad_source_leaves_nothing(tmp_path, tiny_checkpoint, case):
    source, words = _bad_sources(tmp_path, tiny_checkpoint)[case]
    with pytest.raises(CheckpointError) as err:
        create_model(source, "victim", tmp_path)
    assert words in str(err.value) and err.value.hint
    assert _store_entries(tmp_path) == []
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["../evil", "", "a/b", "CON"])
def test_bad_name_leaves_nothing(tmp_path, tiny_checkpoint, name):
    with pytest.raises(StoreError):
        create_model(tiny_checkpoint("sd1"), name, tmp_path)
    assert _store_entries(tmp_path) == []
    assert not (tmp_path / "evil").exists()


def test_existing_name_is_refused_and_kept(tmp_path, tiny_checkpoint):
    md = create_model(tiny_checkpoint("sd1"), "taken", tmp_path)
    before = md.config_path.read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        create_model(tiny_checkpoint("sdxl"), "taken", tmp_path)
    assert md.config_path.read_bytes() == before and _store_entries(tmp_path) == ["taken"]


def test_wrong_explicit_family_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError):
        create_model(tiny_checkpoint("sd1"), "wrong", tmp_path, family="sdxl")
    assert _store_entries(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    import dreambooth.create as create_module

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(create_module, "write_working", boom)
    with pytest.raises(OSError):
        create_model(tiny_checkpoint("sd1"), "full", tmp_path)
    assert _store_entries(tmp_path) == []
