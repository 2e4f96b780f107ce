"""Family detection from the official key layouts (tests/reference/*.tsv), the SD2 yaml rule, diffusers folders."""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.checkpoint_file import read_header
from dreambooth.errors import CheckpointError
from dreambooth.families import SD1, SD2, SD2V, SDXL
from dreambooth.families.detect import detect_diffusers_folder, detect_ldm_family, resolve_v_prediction

REFERENCE = Path(__file__).parent / "reference"
UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"


@cache
def _load(name: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    rows = []
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.split(",")) if shape else (), dtype))
    return tuple(rows)


def shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s, _ in _load(name)}


def refused(sh: dict, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        detect_ldm_family(sh, name="x.safetensors")
    err = info.value
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert "supported families: SD 1.x, SD 2.x" in err.message or "without a VAE" in err.message
    assert err.hint
    return err


# ---------------------------------------------------------------------------------- the three families


@pytest.mark.parametrize(("tsv", "family", "count"), [
    ("sd15_ldm_keys.tsv", SD1, 1143),
    ("sd15_ldm_keys_with_ema.tsv", SD1, 1831),
    ("sd21v_ldm_keys.tsv", SD2, 1240),
    ("sdxl_base_ldm_keys.tsv", SDXL, 2516),
])
def test_reference_layouts(tsv: str, family: str, count: int) -> None:
    sh = shapes(tsv)
    assert len(sh) == count
    assert detect_ldm_family(sh) == family
    # read_header-style (shape, dtype) pairs work as well
    assert detect_ldm_family({k: (s, d) for k, s, d in _load(tsv)}) == family


def test_optional_keys_missing_still_detected() -> None:
    sd1 = {k: s for k, s in shapes("sd15_ldm_keys.tsv").items() if not k.endswith("position_ids")}
    assert detect_ldm_family(sd1) == SD1
    xl = {k: s for k, s in shapes("sdxl_base_ldm_keys.tsv").items()
          if k != "denoiser.sigmas" and not k.endswith("position_ids")}
    assert detect_ldm_family(xl) == SDXL


def test_legacy_sd1_names_detected() -> None:
    sh = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): s
          for k, s in shapes("sd15_ldm_keys.tsv").items()}
    assert detect_ldm_family(sh) == SD1


def test_detection_through_read_header(tmp_path: Path) -> None:
    """A tiny real file: only the keys detection looks at (1-byte bool data; the vocab cut to 1 row)."""
    sd1 = shapes("sd15_ldm_keys.tsv")
    wanted = [CONV_IN, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "cond_stage_model.transformer.embeddings.token_embedding.weight", "first_stage_model.quant_conv.bias"]
    tensors = {}
    for key in wanted:
        shape = sd1.get(key) or (1, 768)
        tensors[key] = torch.zeros(shape, dtype=torch.bool)
    p = tmp_path / "mini.safetensors"
    save_file(tensors, str(p))
    header = read_header(p)  # renames the legacy text-encoder key
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in header
    assert detect_ldm_family(header, name=p.name) == SD1


# ---------------------------------------------------------------------------------------- refusals


def with_in_channels(sh: dict, channels: int) -> dict:
    out = dict(sh)
    out[CONV_IN] = (320, channels, 3, 3)
    return out


@pytest.mark.parametrize(("tsv", "channels", "fragment"), [
    ("sd15_ldm_keys.tsv", 9, "an SD 1.x inpainting model (9 UNet input channels)"),
    ("sd21v_ldm_keys.tsv", 9, "an SD 2.x inpainting model"),
    ("sdxl_base_ldm_keys.tsv", 9, "an SDXL inpainting model"),
    ("sd15_ldm_keys.tsv", 8, "InstructPix2Pix"),
    ("sd21v_ldm_keys.tsv", 5, "depth-to-image"),
    ("sd15_ldm_keys.tsv", 6, "model with 6 UNet input channels"),
])
def test_other_unet_inputs_refused(tsv: str, channels: int, fragment: str) -> None:
    err = refused(with_in_channels(shapes(tsv), channels), fragment)
    assert "4 UNet input channels" in err.hint


def sdxl_refiner() -> dict:
    """The refiner's layout: bigG only (as embedders.0), UNet width 384, context 1280, adm 2560."""
    out = {}
    for k, s in shapes("sdxl_base_ldm_keys.tsv").items():
        if k.startswith("conditioner.embedders.0."):
            continue
        if k.startswith("conditioner.embedders.1."):
            k = k.replace("conditioner.embedders.1.", "conditioner.embedders.0.")
        if k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight"):
            s = (s[0], 1280)
        out[k] = s
    out[CONV_IN] = (384, 4, 3, 3)
    out[UNET + "label_emb.0.0.weight"] = (1536, 2560)
    return out


def test_sdxl_refiner_refused() -> None:
    err = refused(sdxl_refiner(), "x.safetensors looks like an SDXL refiner")
    assert "SDXL base" in err.hint


def test_lora_refused() -> None:
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}
    refused(kohya, "a LoRA/LyCORIS file")
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (320, 4)}
    refused(peft, "a LoRA/LyCORIS file")


def test_vae_only_refused() -> None:
    sd1 = shapes("sd15_ldm_keys.tsv")
    refused({k: s for k, s in sd1.items() if k.startswith("first_stage_model.")}, "a VAE-only file")
    bare = {k[len("first_stage_model."):]: s for k, s in sd1.items() if k.startswith("first_stage_model.")}
    bare.update({"model_ema.decay": (), "model_ema.num_updates": ()})
    refused(bare, "a VAE-only file")


def test_text_encoder_only_and_unet_only_refused() -> None:
    sd1 = shapes("sd15_ldm_keys.tsv")
    refused({k: s for k, s in sd1.items() if k.startswith("cond_stage_model.")}, "a text-encoder-only file")
    refused({k: s for k, s in sd1.items() if k.startswith(UNET)}, "an SD 1.x UNet without its text encoder")
    xl = shapes("sdxl_base_ldm_keys.tsv")
    refused({k: s for k, s in xl.items() if k.startswith(UNET)}, "an SDXL UNet without its text encoder")


def test_missing_vae_refused() -> None:
    sd1 = {k: s for k, s in shapes("sd15_ldm_keys.tsv").items() if not k.startswith("first_stage_model.")}
    err = refused(sd1, "is an SD 1.x checkpoint without a VAE")
    assert "VAE" in err.hint


def test_sd3_flux_dit_refused() -> None:
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
           "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2),
           "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,),
           "first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3)}
    refused(sd3, "an SD3/SD3.5 (MMDiT) model")
    flux = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "single_blocks.0.linear1.weight": (21504, 3072),
            "img_in.weight": (3072, 64)}
    refused(flux, "a Flux model")
    refused({"model." + k: s for k, s in flux.items()}, "a Flux model")
    pixart = {UNET + "x_embedder.proj.weight": (1152, 4, 2, 2), UNET + "t_embedder.mlp.0.weight": (1152, 256)}
    refused(pixart, "diffusion-transformer (DiT)")


def test_diffusers_layout_file_refused() -> None:
    refused(shapes("sd15_diffusers_keys.tsv"), "a diffusers-layout weights file")
    unet_only = {k[len("unet."):]: s for k, s in shapes("sdxl_base_diffusers_keys.tsv").items()
                 if k.startswith("unet.")}
    refused(unet_only, "a diffusers-layout weights file")


def test_embedding_random_and_empty_refused() -> None:
    refused({"emb_params": (2, 768)}, "textual-inversion embedding")
    refused({"clip_l": (2, 768), "clip_g": (2, 1280)}, "textual-inversion embedding")
    refused({"fc1.weight": (10, 10), "fc1.bias": (10,)}, "an unknown model", "fc1.bias")
    refused({}, "an empty file")


def test_mismatched_text_encoder_and_unet_refused() -> None:
    sd1 = shapes("sd15_ldm_keys.tsv")
    sd2 = shapes("sd21v_ldm_keys.tsv")
    frankenstein = {k: s for k, s in sd2.items() if not k.startswith("cond_stage_model.")}
    frankenstein.update({k: s for k, s in sd1.items() if k.startswith("cond_stage_model.")})
    refused(frankenstein, "CLIP text encoder (width 768) does not match its UNet (cross-attention width 1024)")
    both = dict(sd1)
    both.update({k: s for k, s in sd2.items() if k.startswith("cond_stage_model.")})
    refused(both, "both an SD1 and an SD2 text encoder")


def test_unclip_refused() -> None:
    sd2 = dict(shapes("sd21v_ldm_keys.tsv"))
    sd2[UNET + "label_emb.0.0.weight"] = (1280, 1024)
    sd2["embedder.model.visual.proj"] = (1280, 1024)
    refused(sd2, "an SD 2.x unCLIP")


def test_sgm_layout_not_sdxl_base_refused() -> None:
    xl = {k: s for k, s in shapes("sdxl_base_ldm_keys.tsv").items() if not k.startswith("conditioner.embedders.1.")}
    refused(xl, "an SGM-layout model that is not SDXL base", "OpenCLIP bigG missing")


# ------------------------------------------------------------------------------------------- SD2 v/eps


def write_yaml(tmp_path: Path, stem: str, text: str) -> Path:
    (tmp_path / f"{stem}.yaml").write_text(text)
    return tmp_path / f"{stem}.safetensors"


V_YAML = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n"
EPS_YAML = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    linear_start: 0.00085\n"


def test_yaml_v_gives_sd2v(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = write_yaml(tmp_path, "v2-1_768-ema-pruned", V_YAML)
    with caplog.at_level(logging.INFO, logger="dreambooth.families.detect"):
        assert resolve_v_prediction(ckpt, SD2, None) == SD2V
    assert "v2-1_768-ema-pruned.yaml" in caplog.text


def test_yaml_without_v_and_no_yaml_give_sd2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_v_prediction(write_yaml(tmp_path, "base", EPS_YAML), SD2, None) == SD2
    assert resolve_v_prediction(write_yaml(tmp_path, "eps", "model:\n  params:\n    parameterization: eps\n"),
                                SD2, None) == SD2
    assert resolve_v_prediction(write_yaml(tmp_path, "empty_params", "model: {}\n"), SD2, None) == SD2
    with caplog.at_level(logging.INFO, logger="dreambooth.families.detect"):
        assert resolve_v_prediction(tmp_path / "no_yaml.safetensors", SD2, None) == SD2
    assert "no no_yaml.yaml" in caplog.text and "'sd2v'" in caplog.text


def test_yaml_uses_full_stem(tmp_path: Path) -> None:
    """As the WebUI: os.path.splitext(filename)[0] + '.yaml', so 'a.b.safetensors' pairs with 'a.b.yaml'."""
    (tmp_path / "a.yaml").write_text(EPS_YAML)
    (tmp_path / "a.b.yaml").write_text(V_YAML)
    assert resolve_v_prediction(tmp_path / "a.b.safetensors", SD2, None) == SD2V
    assert resolve_v_prediction(tmp_path / "a.b.ckpt", SD2, None) == SD2V


def test_explicit_choice_wins(tmp_path: Path) -> None:
    assert resolve_v_prediction(write_yaml(tmp_path, "v", V_YAML), SD2, SD2) == SD2
    assert resolve_v_prediction(write_yaml(tmp_path, "eps", EPS_YAML), SD2, SD2V) == SD2V
    assert resolve_v_prediction(tmp_path / "none.ckpt", SD2, SD2V) == SD2V
    # a broken yaml is not even read when the choice is explicit
    assert resolve_v_prediction(write_yaml(tmp_path, "broken", "model: [unclosed\n"), SD2, SD2V) == SD2V


@pytest.mark.parametrize(("text", "fragment"), [
    ("model: [unclosed\n  params: {\n", "cannot be read"),
    ("- just\n- a list\n", "is not a model config"),
    ("model:\n  params:\n    parameterization: x0\n", "parameterization 'x0'"),
    ("!!python/object/apply:os.system ['echo hi']\n", "cannot be read"),
])
def test_broken_yaml_refused(tmp_path: Path, text: str, fragment: str) -> None:
    ckpt = write_yaml(tmp_path, "model", text)
    with pytest.raises(CheckpointError, match="model.yaml") as info:
        resolve_v_prediction(ckpt, SD2, None)
    assert fragment in info.value.message
    assert "yaml" in info.value.hint


def test_sd1_sdxl_explicit_family(tmp_path: Path) -> None:
    ckpt = write_yaml(tmp_path, "sd15", V_YAML)  # a yaml is ignored for sd1/sdxl
    assert resolve_v_prediction(ckpt, SD1, None) == SD1
    assert resolve_v_prediction(ckpt, SD1, SD1) == SD1
    assert resolve_v_prediction(tmp_path / "xl.safetensors", SDXL, SDXL) == SDXL
    for detected, explicit in ((SD1, SDXL), (SD1, SD2V), (SDXL, SD1), (SDXL, SD2), (SD2, SDXL), (SD2, SD1)):
        with pytest.raises(CheckpointError, match="checkpoint, but .* was chosen"):
            resolve_v_prediction(tmp_path / "m.safetensors", detected, explicit)
    with pytest.raises(CheckpointError, match="unknown model family 'sd3'"):
        resolve_v_prediction(tmp_path / "m.safetensors", SD1, "sd3")


# ----------------------------------------------------------------------------------- diffusers folders

TE_CONFIGS = {
    "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 768},
    "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280},
}


def make_pipeline(root: Path, *, cad: int | list[int], te: bool = True, te2: bool = False,
                  prediction: str | None = "epsilon", in_channels: int = 4, text_time: bool = False,
                  cls: str = "StableDiffusionPipeline", skip: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True)
    index: dict = {"_class_name": cls, "_diffusers_version": "0.31.0",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "DDIMScheduler"]}
    configs: dict[str, dict] = {
        "unet": {"_class_name": "UNet2DConditionModel", "cross_attention_dim": cad, "in_channels": in_channels,
                 **({"addition_embed_type": "text_time"} if text_time else {})},
        "vae": {"_class_name": "AutoencoderKL", "latent_channels": 4},
    }
    for name, on in (("text_encoder", te), ("text_encoder_2", te2)):
        if on:
            index[name] = ["transformers", TE_CONFIGS[name]["architectures"][0]]
            configs[name] = TE_CONFIGS[name]
        else:
            index[name] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index))
    for name, cfg in configs.items():
        if name in skip:
            continue
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    if prediction is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "DDIMScheduler", "prediction_type": prediction}))
    return root


def test_diffusers_families(tmp_path: Path) -> None:
    assert detect_diffusers_folder(make_pipeline(tmp_path / "sd15", cad=768)) == SD1
    assert detect_diffusers_folder(make_pipeline(tmp_path / "sd2", cad=1024)) == SD2
    assert detect_diffusers_folder(make_pipeline(tmp_path / "sd2v", cad=1024, prediction="v_prediction")) == SD2V
    assert detect_diffusers_folder(make_pipeline(tmp_path / "sd2-nosched", cad=1024, prediction=None)) == SD2
    assert detect_diffusers_folder(make_pipeline(tmp_path / "sd2-list", cad=[1024, 1024, 1024, 1024])) == SD2
    xl = make_pipeline(tmp_path / "xl", cad=2048, te2=True, text_time=True, cls="StableDiffusionXLPipeline")
    assert detect_diffusers_folder(xl) == SDXL
    assert detect_diffusers_folder(str(xl)) == SDXL  # type: ignore[arg-type]


def test_shipped_family_configs_are_detected(tmp_path: Path) -> None:
    """The repo's own per-family configs (dreambooth/assets/families), laid out as a pipeline folder."""
    assets = Path(__file__).parents[1] / "dreambooth" / "assets" / "families"
    if not (assets / "sdxl" / "unet.json").is_file():
        pytest.skip("family assets not present")
    for fam, expected in (("sd1", SD1), ("sd2", SD2), ("sdxl", SDXL)):
        root = tmp_path / fam
        root.mkdir()
        (root / "model_index.json").write_text((assets / fam / "model_index.json").read_text())
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if (assets / fam / f"{comp}.json").is_file():
                (root / comp).mkdir()
                (root / comp / "config.json").write_text((assets / fam / f"{comp}.json").read_text())
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text((assets / fam / "scheduler.json").read_text())
        assert detect_diffusers_folder(root) == expected


def diffusers_refused(folder: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        detect_diffusers_folder(folder)
    for fragment in fragments:
        assert fragment in info.value.message, (fragment, info.value.message)
    assert info.value.hint
    return info.value


def test_diffusers_refusals(tmp_path: Path) -> None:
    refiner = make_pipeline(tmp_path / "refiner", cad=1280, te=False, te2=True, text_time=True,
                            cls="StableDiffusionXLImg2ImgPipeline")
    diffusers_refused(refiner, "an SDXL refiner")
    diffusers_refused(make_pipeline(tmp_path / "inpaint", cad=768, in_channels=9,
                                    cls="StableDiffusionInpaintPipeline"), "an SD 1.x inpainting model")
    diffusers_refused(make_pipeline(tmp_path / "xl-v", cad=2048, te2=True, text_time=True,
                                    prediction="v_prediction"), "SDXL base model with v_prediction prediction")
    diffusers_refused(make_pipeline(tmp_path / "odd", cad=512), "cross_attention_dim 512")
    diffusers_refused(make_pipeline(tmp_path / "novae", cad=768, skip=("vae",)), "missing its vae")
    diffusers_refused(make_pipeline(tmp_path / "mixed", cad=[768, 1024]), "unsupported UNet")

    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    diffusers_refused(sd3, "transformer-based StableDiffusion3Pipeline")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "unet").mkdir()
    err = diffusers_refused(plain, "not a diffusers model folder (no model_index.json)")
    assert ".safetensors" in err.hint
    diffusers_refused(tmp_path / "missing", "model folder not found")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    diffusers_refused(f, "is a file, not a diffusers model folder")

    broken = make_pipeline(tmp_path / "broken", cad=768)
    (broken / "unet" / "config.json").write_text("{ not json")
    diffusers_refused(broken, "unet/config.json cannot be read")
    nounet = make_pipeline(tmp_path / "nounet", cad=768, skip=("unet",))
    diffusers_refused(nounet, "has no unet/config.json")
    bad_index = tmp_path / "badindex"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("[1, 2]")
    diffusers_refused(bad_index, "model_index.json is not a JSON object")
