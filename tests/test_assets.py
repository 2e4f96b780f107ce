"""The shipped offline assets: CLIP tokenizer, per-family configs, model_index templates, ldm yaml.

Model configs are checked by building every model on the meta device and comparing its state-dict keys and shapes
with the reference diffusers-layout lists in ``tests/reference`` (no weights, no network).
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import json
import time
from pathlib import Path

import pytest
import torch

from dreambooth import assets_api
from dreambooth.assets_api import (
    ASSETS_DIR,
    family_config,
    ldm_yaml_text,
    model_index,
    write_component_config,
    write_ldm_yaml,
    write_model_index,
    write_tokenizer,
)
from dreambooth.errors import UserError
from dreambooth.families import FAMILIES, FAMILY_IDS

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "reference"
REFERENCE_TSV = {
    "sd1": "sd15_diffusers_keys.tsv",
    "sd2": "sd21v_diffusers_keys.tsv",  # sd2 512 and sd2v 768 have identical tensors
    "sd2v": "sd21v_diffusers_keys.tsv",
    "sdxl": "sdxl_base_diffusers_keys.tsv",
}
PAD = {("sd1", "tokenizer"): ("<|endoftext|>", 49407), ("sd2", "tokenizer"): ("!", 0),
       ("sd2v", "tokenizer"): ("!", 0), ("sdxl", "tokenizer"): ("<|endoftext|>", 49407),
       ("sdxl", "tokenizer_2"): ("!", 0)}
TOKENIZER_CASES = sorted(PAD)
MODEL_CASES = [(f, c) for f in FAMILY_IDS for c in FAMILIES[f].components]


# --------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family,name", TOKENIZER_CASES)
def test_tokenizer_ids(tmp_path: Path, family: str, name: str) -> None:
    from transformers import CLIPTokenizer

    write_tokenizer(family, name, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.unk_token_id == 49407
    pad_token, pad_id = PAD[(family, name)]
    assert tok.pad_token == pad_token and tok.pad_token_id == pad_id
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {pad_id}
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["pad_token"] == pad_token


def test_fast_tokenizer_agrees(tmp_path: Path) -> None:
    from transformers import CLIPTokenizerFast

    write_tokenizer("sd2", "tokenizer", tmp_path)
    fast = CLIPTokenizerFast.from_pretrained(str(tmp_path))
    assert len(fast) == 49408
    assert fast("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert fast.pad_token_id == 0


def test_shipped_vocab_files() -> None:
    vocab = json.loads((ASSETS_DIR / "clip" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    lines = (ASSETS_DIR / "clip" / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    assert lines[1] == "i n" and lines[-1] == ""
    assert len(lines) - 2 == 49152 - 256 - 2


def test_build_tokenizer_reproduces_shipped_files(tmp_path: Path) -> None:
    """The builder turns a merge list (rebuilt from the shipped merges.txt) into byte-identical files."""
    spec = importlib.util.spec_from_file_location("build_tokenizer", REPO / "tools" / "build_tokenizer.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    merges = (ASSETS_DIR / "clip" / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges)).encode()))
    assert builder.main([str(gz), "--out", str(tmp_path / "out")]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (ASSETS_DIR / "clip" / name).read_bytes()


# ------------------------------------------------------------------------------------------- model configs


def _reference(family: str, component: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    prefix = component + "."
    with open(REFERENCE / REFERENCE_TSV[family], encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            if key.startswith(prefix) and not key.endswith("position_ids"):
                out[key[len(prefix):]] = (tuple(int(s) for s in shape.split(",") if s), dtype)
    return out


def _build_on_meta(family: str, component: str) -> torch.nn.Module:
    cfg = family_config(family, component)
    if component == "unet":
        from diffusers import UNet2DConditionModel as cls_
    elif component == "vae":
        from diffusers import AutoencoderKL as cls_
    else:
        import transformers

        config = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
        cls_ = getattr(transformers, cfg["architectures"][0])
        with torch.device("meta"):
            return cls_(config)
    with torch.device("meta"):
        return cls_.from_config(cfg)


def _state_layout(model: torch.nn.Module, component: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("position_ids"):
            continue  # persistent buffer in transformers < 4.31 only
        if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key  # transformers >= 5: CLIPTextModel lost its text_model submodule
        assert tensor.device.type == "meta", key
        out[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    return out


@pytest.mark.parametrize("family,component", MODEL_CASES)
def test_config_builds_reference_layout(family: str, component: str) -> None:
    start = time.perf_counter()
    model = _build_on_meta(family, component)
    got = _state_layout(model, component)
    elapsed = time.perf_counter() - start
    want = _reference(family, component)
    assert want, "reference list has no tensors for this component"
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]} ... extra {extra[:5]} ..."
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad, list(bad.items())[:5]
    assert elapsed < 60, f"meta build of {family} {component} took {elapsed:.1f}s"


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_component_configs_round_trip(tmp_path: Path, family: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    fam = FAMILIES[family]
    for component in (*fam.components, "scheduler"):
        dest = tmp_path / component
        write_component_config(family, component, dest)
        expected = family_config(family, component)
        if component == "scheduler":
            loaded = json.loads((dest / "scheduler_config.json").read_text())
            assert loaded["_diffusers_version"]
        elif component in ("unet", "vae"):
            cls_ = UNet2DConditionModel if component == "unet" else AutoencoderKL
            loaded = cls_.load_config(str(dest))
            assert loaded["_diffusers_version"]
        else:
            loaded = json.loads((dest / "config.json").read_text())
            assert loaded["transformers_version"]
            config = CLIPTextConfig.from_pretrained(str(dest))
            assert config.hidden_size == expected["hidden_size"]
            assert config.num_hidden_layers == expected["num_hidden_layers"]
            assert config.hidden_act == expected["hidden_act"]
        for key, value in expected.items():
            assert loaded[key] == value, (component, key)
        assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temp files left


def test_family_specific_values() -> None:
    assert family_config("sd1", "text_encoder")["hidden_act"] == "quick_gelu"
    assert family_config("sdxl", "text_encoder") == family_config("sd1", "text_encoder")
    te2 = family_config("sd2", "text_encoder")
    assert (te2["num_hidden_layers"], te2["hidden_act"], te2["projection_dim"]) == (23, "gelu", 512)
    te_xl = family_config("sdxl", "text_encoder_2")
    assert te_xl["architectures"] == ["CLIPTextModelWithProjection"]
    assert (te_xl["hidden_size"], te_xl["num_hidden_layers"], te_xl["projection_dim"]) == (1280, 32, 1280)
    assert family_config("sd2", "unet")["sample_size"] == 64
    assert family_config("sd2v", "unet")["sample_size"] == 96
    assert family_config("sd2v", "unet")["upcast_attention"] is True
    assert family_config("sd1", "unet")["sample_size"] == 64
    assert family_config("sdxl", "unet")["sample_size"] == 128
    for family in FAMILY_IDS:
        vae = family_config(family, "vae")
        assert vae["scaling_factor"] == FAMILIES[family].latent_scale
        assert vae["force_upcast"] is True
        # UNet latent size times 8 is the family's native resolution
        assert family_config(family, "unet")["sample_size"] * 8 == FAMILIES[family].resolution


def test_family_config_returns_fresh_copies() -> None:
    cfg = family_config("sdxl", "unet")
    cfg["transformer_layers_per_block"].append(99)
    cfg["sample_size"] = 1
    fresh = family_config("sdxl", "unet")
    assert fresh["transformer_layers_per_block"] == [1, 2, 10] and fresh["sample_size"] == 128
    index = model_index("sd1")
    index["unet"][0] = "x"
    assert model_index("sd1")["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_bad_names() -> None:
    with pytest.raises(UserError):
        family_config("sd3", "unet")
    with pytest.raises(ValueError):
        family_config("sd1", "text_encoder_2")
    with pytest.raises(ValueError):
        family_config("sd1", "tokenizer")
    with pytest.raises(ValueError):
        write_tokenizer("sd2", "tokenizer_2", Path("/nonexistent"))


# ------------------------------------------------------------------------------------------------ schedulers


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_scheduler_configs(tmp_path: Path, family: str) -> None:
    import diffusers

    cfg = family_config(family, "scheduler")
    want = FAMILIES[family].prediction_type
    assert cfg["prediction_type"] == want
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert cfg["num_train_timesteps"] == 1000
    for cls_ in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, getattr(diffusers, cfg["_class_name"])):
        sched = cls_.from_config(cfg)
        if "prediction_type" in inspect.signature(cls_.__init__).parameters:
            assert sched.config.prediction_type == want
        assert sched.config.num_train_timesteps == 1000
    ddpm = diffusers.DDPMScheduler.from_config(cfg)
    assert ddpm.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert ddpm.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    write_component_config(family, "scheduler", tmp_path)
    loaded = diffusers.DDIMScheduler.from_pretrained(str(tmp_path))
    assert loaded.config.prediction_type == want


def test_sd2_variants_differ_only_where_expected() -> None:
    assert family_config("sd2", "scheduler")["prediction_type"] == "epsilon"
    assert family_config("sd2v", "scheduler")["prediction_type"] == "v_prediction"
    a, b = family_config("sd2", "unet"), family_config("sd2v", "unet")
    assert {k for k in a if a[k] != b[k]} == {"sample_size", "upcast_attention"}
    for component in ("vae", "text_encoder"):
        assert family_config("sd2", component) == family_config("sd2v", component)


# ----------------------------------------------------------------------------------------------- model_index


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_model_index(tmp_path: Path, family: str) -> None:
    import diffusers

    index = model_index(family)
    fam = FAMILIES[family]
    pipeline_cls = getattr(diffusers, index["_class_name"])
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    expected_modules, _optional = pipeline_cls._get_signature_keys(pipeline_cls)
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    assert set(expected_modules) <= set(components)
    shipped = set(fam.components) | set(fam.tokenizers) | {"scheduler"}
    for name, (library, class_name) in components.items():
        if name in shipped:
            assert library and class_name
            assert hasattr(importlib.import_module(library), class_name), (library, class_name)
        else:
            assert (library, class_name) == (None, None), name
            assert name in pipeline_cls._optional_components
    assert shipped <= set(components)
    for te in ("text_encoder", "text_encoder_2"):
        if te in fam.components:
            assert [components[te][1]] == family_config(family, te)["architectures"]
    assert components["scheduler"][1] == family_config(family, "scheduler")["_class_name"]
    write_model_index(family, tmp_path)
    written = json.loads((tmp_path / "model_index.json").read_text())
    assert written["_diffusers_version"] and written["_class_name"] == index["_class_name"]
    assert pipeline_cls.load_config(str(tmp_path))["_class_name"] == index["_class_name"]


# ------------------------------------------------------------------------------------------------- ldm yaml


def test_ldm_yaml(tmp_path: Path) -> None:
    import yaml

    assert ldm_yaml_text("sd1") is None and ldm_yaml_text("sd2") is None and ldm_yaml_text("sdxl") is None
    text = ldm_yaml_text("sd2v")
    assert text is not None
    cfg = yaml.safe_load(text)["model"]
    params = cfg["params"]
    assert cfg["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert params["parameterization"] == "v"
    assert (params["linear_start"], params["linear_end"], params["timesteps"]) == (0.00085, 0.012, 1000)
    assert params["scale_factor"] == 0.18215 and params["use_ema"] is False
    unet = params["unet_config"]["params"]
    assert unet["context_dim"] == 1024 and unet["num_head_channels"] == 64
    assert unet["use_linear_in_transformer"] is True and unet["channel_mult"] == [1, 2, 4, 4]
    cond = params["cond_stage_config"]
    assert cond["target"] == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    assert cond["params"]["layer"] == "penultimate"
    assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]
    ckpt = tmp_path / "my_model.safetensors"
    assert write_ldm_yaml("sd2v", ckpt) == tmp_path / "my_model.yaml"
    assert (tmp_path / "my_model.yaml").read_text(encoding="utf-8") == text
    assert write_ldm_yaml("sd2", ckpt) is None


def test_assets_dir_layout() -> None:
    assert assets_api.ASSETS_DIR == ASSETS_DIR and ASSETS_DIR.is_dir()
    for folder in ("sd1", "sd2", "sdxl"):
        for path in (ASSETS_DIR / "families" / folder).iterdir():
            json.loads(path.read_text(encoding="utf-8"))  # every shipped file is valid JSON
