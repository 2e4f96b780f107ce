"""ldm/sgm single-file <-> diffusers key mapping, checked against the official layouts in tests/reference/.

The reference TSVs list every tensor (key, shape, dtype) of SD1.5, SD2.1-768-v and SDXL base in both layouts, as
instantiated from the original code. Meta tensors built from them let us check the complete mapping of real-size
models in milliseconds; small random tensors check the values (q/k/v split, transposes, reshapes) bit for bit,
and diffusers' own single-file converters give an independent second opinion on those values.
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dreambooth.errors import CheckpointError
from dreambooth.families.keys_clip import hf_clip_key_map, open_clip_key_map
from dreambooth.families.keys_unet import SD_UNET, SDXL_UNET, unet_key_map
from dreambooth.families.keys_vae import vae_key_map
from dreambooth.families.layout import ema_key, join_ldm, normalize_diffusers_keys, split_ldm

REF = Path(__file__).parent / "reference"
DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}

# family -> (ldm tsv, diffusers tsv)
CASES = {
    "sd1": ("sd15_ldm_keys.tsv", "sd15_diffusers_keys.tsv"),
    "sd2": ("sd21v_ldm_keys.tsv", "sd21v_diffusers_keys.tsv"),  # SD2 512-eps has the same keys as 768-v
    "sd2v": ("sd21v_ldm_keys.tsv", "sd21v_diffusers_keys.tsv"),
    "sdxl": ("sdxl_base_ldm_keys.tsv", "sdxl_base_diffusers_keys.tsv"),
}
COMPONENTS = {
    "sd1": {"unet", "vae", "text_encoder"},
    "sd2": {"unet", "vae", "text_encoder"},
    "sd2v": {"unet", "vae", "text_encoder"},
    "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2"},
}

SCHEDULE = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
_SD2_LAST = "cond_stage_model.model.transformer.resblocks.23."
# The ldm keys the reference README documents as having no place in diffusers, written out independently of the
# implementation.
NO_PLACE = {
    "sd1": SCHEDULE | {"cond_stage_model.transformer.text_model.embeddings.position_ids"},
    "sd2": SCHEDULE | {"cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"} | {
        _SD2_LAST + s for s in (
            "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight",
            "ln_1.bias", "ln_1.weight", "ln_2.bias", "ln_2.weight",
            "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "mlp.c_proj.weight")},
    "sdxl": {"denoiser.sigmas", "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
             "conditioner.embedders.1.model.logit_scale"},
}
NO_PLACE["sd2v"] = NO_PLACE["sd2"]


@cache
def read_tsv(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    lines = (REF / name).read_text().splitlines()
    assert lines[0].startswith("# source:")
    out = {}
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(d) for d in shape.split(",")) if shape else (), DTYPES[dtype])
    return out


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in read_tsv(name).items()}


def flat(components: dict[str, dict[str, torch.Tensor]], skip: tuple[str, ...] = ("unet_ema",)) -> dict:
    return {f"{c}.{k}": v for c, d in components.items() if c not in skip for k, v in d.items()}


def layout_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def test_reference_files_are_complete():
    counts = {"sd15_ldm_keys.tsv": 1143, "sd21v_ldm_keys.tsv": 1240, "sdxl_base_ldm_keys.tsv": 2516,
              "sd15_ldm_keys_with_ema.tsv": 1831, "sd15_diffusers_keys.tsv": 1130, "sd21v_diffusers_keys.tsv": 1306,
              "sdxl_base_diffusers_keys.tsv": 2641}
    for name, n in counts.items():
        assert len(read_tsv(name)) == n, name


# --- full-size layouts on meta tensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(CASES))
def test_split_matches_reference_diffusers_layout(family):
    ldm_name, diffusers_name = CASES[family]
    components, extras = split_ldm(meta_state(ldm_name), family)
    assert set(components) == COMPONENTS[family]
    got = {k: tuple(v.shape) for k, v in flat(components).items()}
    want = {k: shape for k, (shape, _) in read_tsv(diffusers_name).items()}
    assert sorted(set(want) - set(got)) == []  # none dropped
    assert sorted(set(got) - set(want)) == []  # none invented
    assert {k: s for k, s in got.items() if s != want[k]} == {}
    assert all(v.dtype == torch.float32 for v in flat(components).values())
    assert set(extras) == NO_PLACE[family]


@pytest.mark.parametrize("family", list(CASES))
def test_join_restores_reference_ldm_layout(family):
    sd = meta_state(CASES[family][0])
    joined = join_ldm(*split_ldm(sd, family), family)
    assert layout_of(joined) == read_tsv(CASES[family][0])


def test_ema_layout_sd15():
    sd = meta_state("sd15_ldm_keys_with_ema.tsv")
    components, extras = split_ldm(sd, "sd1")
    assert set(components) == COMPONENTS["sd1"] | {"unet_ema"}
    assert layout_of(components["unet_ema"]) == layout_of(components["unet"])
    assert set(extras) == NO_PLACE["sd1"] | {"model_ema.decay", "model_ema.num_updates"}
    assert extras["model_ema.num_updates"].dtype == torch.int32 and extras["model_ema.decay"].ndim == 0
    joined = join_ldm(components, extras, "sd1")
    assert layout_of(joined) == read_tsv("sd15_ldm_keys_with_ema.tsv")
    assert sum(k.startswith("model_ema.") for k in joined) == 686 + 2

    # Without the EMA component only the non-EMA file comes back (plus the two scalars kept in extras).
    no_ema = {c: d for c, d in components.items() if c != "unet_ema"}
    assert set(join_ldm(no_ema, extras, "sd1")) == set(read_tsv("sd15_ldm_keys.tsv")) | {
        "model_ema.decay", "model_ema.num_updates"}


def test_partial_ema_is_kept_verbatim(caplog):
    sd = meta_state("sd15_ldm_keys_with_ema.tsv")
    del sd["model_ema.diffusion_modelout2weight"]
    components, extras = split_ldm(sd, "sd1")
    assert "unet_ema" not in components
    assert sum(k.startswith("model_ema.") for k in extras) == 686 - 1 + 2
    assert "EMA" in caplog.text
    assert layout_of(join_ldm(components, extras, "sd1")) == layout_of(sd)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ema_names_are_the_ldm_flattened_names(family):
    unet = [m.ldm for m in unet_key_map(SDXL_UNET if family == "sdxl" else SD_UNET)]
    names = [ema_key(k) for k in unet]
    assert len(set(names)) == len(names)  # dropping the dots never merges two keys
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    with_ema = read_tsv("sd15_ldm_keys_with_ema.tsv")
    if family == "sd1":
        assert {n for n in names} == {k for k in with_ema if k.startswith("model_ema.")} - {
            "model_ema.decay", "model_ema.num_updates"}


def test_key_maps_are_one_to_one():
    maps = [unet_key_map(SD_UNET), unet_key_map(SDXL_UNET), vae_key_map(), hf_clip_key_map(),
            open_clip_key_map(23, with_projection=False), open_clip_key_map(32, with_projection=True)]
    for m in maps:
        ldm = [e.ldm for e in m]
        diffusers = [d for e in m for d in e.diffusers]
        assert len(set(ldm)) == len(ldm)
        assert len(set(diffusers)) == len(diffusers)


# --- real values --------------------------------------------------------------------------------------------------

QKV_D = 4  # hidden size used for the OpenCLIP towers in the small real-valued models


def small_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tiny shape with the same rank; q/k/v and the text projection keep the relations the converters rely on."""
    if key.endswith("in_proj_weight"):
        return (3 * QKV_D, QKV_D)
    if key.endswith("in_proj_bias"):
        return (3 * QKV_D,)
    if key.endswith("text_projection"):
        return (QKV_D, QKV_D + 1)  # not square, so a missing transpose shows in the shape too
    return tuple(1 if d == 1 else 2 + i for i, d in enumerate(shape))


def small_state(name: str, float_dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dt) in read_tsv(name).items():
        shape = small_shape(key, shape)
        if dt.is_floating_point:
            out[key] = torch.randn(shape, generator=gen).to(float_dtype)
        else:
            out[key] = torch.randint(0, 1000, shape, generator=gen, dtype=dt)
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize(("family", "ldm_name", "dtype"), [
    ("sd1", "sd15_ldm_keys.tsv", torch.float32),
    ("sd1", "sd15_ldm_keys_with_ema.tsv", torch.float16),
    ("sd2v", "sd21v_ldm_keys.tsv", torch.bfloat16),
    ("sdxl", "sdxl_base_ldm_keys.tsv", torch.float16),
])
def test_real_values_round_trip_bitwise(family, ldm_name, dtype):
    sd = small_state(ldm_name, dtype)
    components, extras = split_ldm(sd, family)
    joined = join_ldm(components, extras, family)
    assert set(joined) == set(sd)
    bad = [k for k in sd if not bitwise_equal(joined[k], sd[k])]
    assert bad == []
    # Nothing but the q/k/v join allocates: every other joined tensor still uses the caller's storage.
    copied = [k for k in sd if not same_storage(joined[k], sd[k])]
    assert all(k.endswith(("in_proj_weight", "in_proj_bias")) for k in copied)
    assert bool(copied) == (family != "sd1")  # only the OpenCLIP towers (SD2, SDXL) have a fused q/k/v
    for k, v in extras.items():
        assert v is sd[k]


def test_real_values_special_ops_sdxl():
    sd = small_state("sdxl_base_ldm_keys.tsv")
    components, _ = split_ldm(sd, "sdxl")
    te2 = components["text_encoder_2"]
    p = "conditioner.embedders.1.model."
    w = sd[p + "transformer.resblocks.7.attn.in_proj_weight"]
    b = sd[p + "transformer.resblocks.7.attn.in_proj_bias"]
    d = "text_model.encoder.layers.7.self_attn."
    for i, x in enumerate("qkv"):
        assert bitwise_equal(te2[f"{d}{x}_proj.weight"], w[i * QKV_D:(i + 1) * QKV_D])
        assert bitwise_equal(te2[f"{d}{x}_proj.bias"], b[i * QKV_D:(i + 1) * QKV_D])
        assert same_storage(te2[f"{d}{x}_proj.weight"], w)  # a view, not a copy
    proj = sd[p + "text_projection"]
    assert te2["text_projection.weight"].shape == (QKV_D + 1, QKV_D)
    assert bitwise_equal(te2["text_projection.weight"], proj.T.contiguous())
    assert same_storage(te2["text_projection.weight"], proj)
    assert bitwise_equal(te2["text_model.embeddings.position_embedding.weight"], sd[p + "positional_embedding"])

    vae = components["vae"]
    q = sd["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.ndim == 4
    assert bitwise_equal(vae["decoder.mid_block.attentions.0.to_q.weight"], q[:, :, 0, 0].contiguous())
    assert same_storage(vae["decoder.mid_block.attentions.0.to_q.weight"], q)
    unet = components["unet"]
    assert unet["add_embedding.linear_1.weight"] is sd["model.diffusion_model.label_emb.0.0.weight"]
    assert unet["up_blocks.1.upsamplers.0.conv.weight"] is sd["model.diffusion_model.output_blocks.5.2.conv.weight"]
    assert unet["up_blocks.2.resnets.2.conv_shortcut.bias"] is sd[
        "model.diffusion_model.output_blocks.8.0.skip_connection.bias"]


def test_unknown_keys_and_legacy_clip_names_sd1(caplog):
    sd = small_state("sd15_ldm_keys.tsv")
    legacy = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
              for k, v in sd.items()}
    legacy["some_lora.alpha"] = torch.tensor(1.0)
    components, extras = split_ldm(legacy, "sd1")
    assert components["text_encoder"]["text_model.final_layer_norm.weight"] is sd[
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    assert extras["some_lora.alpha"] is legacy["some_lora.alpha"]
    assert "some_lora.alpha" in caplog.text
    joined = join_ldm(components, extras, "sd1")
    assert set(joined) == set(sd) | {"some_lora.alpha"}  # written back under the current names


def test_sd21_turbo_prefix_is_accepted():
    sd = {k.replace("cond_stage_model.", "conditioner.embedders.0."): v
          for k, v in meta_state("sd21v_ldm_keys.tsv").items()}
    components, extras = split_ldm(sd, "sd2")
    assert len(components["text_encoder"]) == 372
    assert "cond_stage_model.model.logit_scale" in extras


# --- errors -------------------------------------------------------------------------------------------------------

def test_missing_key_names_component_and_examples():
    sd = meta_state("sd15_ldm_keys.tsv")
    del sd["first_stage_model.decoder.conv_out.weight"]
    with pytest.raises(CheckpointError) as err:
        split_ldm(sd, "sd1")
    assert "vae" in str(err.value) and "first_stage_model.decoder.conv_out.weight" in str(err.value)


@pytest.mark.parametrize(("ldm_name", "family", "component"), [
    ("sdxl_base_ldm_keys.tsv", "sd1", "unet"),
    ("sd15_ldm_keys.tsv", "sdxl", "unet"),
    ("sd15_ldm_keys.tsv", "sd2", "text_encoder"),
    ("sd21v_ldm_keys.tsv", "sd1", "text_encoder"),
])
def test_wrong_family_is_a_checkpoint_error(ldm_name, family, component):
    with pytest.raises(CheckpointError, match=component):
        split_ldm(meta_state(ldm_name), family)


def test_join_rejects_incomplete_or_foreign_components():
    components, extras = split_ldm(meta_state("sdxl_base_ldm_keys.tsv"), "sdxl")
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        join_ldm({c: d for c, d in components.items() if c != "text_encoder_2"}, extras, "sdxl")
    bad = dict(components, text_encoder={**components["text_encoder"], "text_model.embeddings.position_ids": 0})
    with pytest.raises(CheckpointError, match="unexpected"):
        join_ldm(bad, extras, "sdxl")
    bad = dict(components, vae={k: v for k, v in components["vae"].items() if k != "quant_conv.bias"})
    with pytest.raises(CheckpointError, match="quant_conv.bias"):
        join_ldm(bad, extras, "sdxl")
    with pytest.raises(ValueError):
        join_ldm(dict(components, controlnet={}), extras, "sdxl")
    with pytest.raises(ValueError):
        join_ldm(components, {**extras, "model.diffusion_model.out.2.bias": torch.zeros(4)}, "sdxl")


# --- diffusers folders --------------------------------------------------------------------------------------------

def test_normalize_transformers5_text_encoder():
    components, _ = split_ldm(meta_state("sdxl_base_ldm_keys.tsv"), "sdxl")
    te = components["text_encoder"]
    v5 = {k.removeprefix("text_model."): v for k, v in te.items()}
    v5["embeddings.position_ids"] = torch.arange(77)[None]
    norm = normalize_diffusers_keys("text_encoder", v5)
    assert norm.keys() == te.keys()
    assert all(norm[k] is te[k] for k in te)

    te2 = dict(components["text_encoder_2"])
    te2["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers < 4.31 files
    norm2 = normalize_diffusers_keys("text_encoder_2", te2)
    assert norm2.keys() == components["text_encoder_2"].keys()
    assert "text_projection.weight" in norm2

    with pytest.raises(CheckpointError):
        normalize_diffusers_keys("text_encoder", {**te, "final_layer_norm.weight": te[
            "text_model.final_layer_norm.weight"]})


def test_normalize_old_diffusers_vae_attention_names():
    components, _ = split_ldm(small_state("sd15_ldm_keys.tsv"), "sd1")
    vae = components["vae"]
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in vae.items():
        for new, name in old_names.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                if k.endswith("weight"):
                    v = v.reshape(*v.shape, 1, 1)  # stored as 1x1 conv
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    norm = normalize_diffusers_keys("vae", old)
    assert norm.keys() == vae.keys()
    assert all(bitwise_equal(norm[k], vae[k]) for k in vae)
    # Current names stored as conv are reshaped too, and joining accepts the result.
    conv = {k: (v.reshape(*v.shape, 1, 1) if k.endswith("to_k.weight") else v) for k, v in vae.items()}
    assert all(norm_v.shape == vae[k].shape for k, norm_v in normalize_diffusers_keys("vae", conv).items())
    assert normalize_diffusers_keys("unet", components["unet"]) == components["unet"]
    with pytest.raises(ValueError):
        normalize_diffusers_keys("scheduler", {})


# --- second opinion: diffusers' own single-file converters ------------------------------------------------------

def _converter(name: str, params: tuple[str, ...]):
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    fn = getattr(su, name, None)
    if fn is None or tuple(inspect.signature(fn).parameters)[:len(params)] != params:
        pytest.skip(f"diffusers {name} is missing or has another signature")
    return fn


def assert_same_values(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(set(theirs) - set(mine)) == []
    assert sorted(set(mine) - set(theirs)) == []
    assert [k for k in mine if not bitwise_equal(mine[k], theirs[k].contiguous())] == []


@pytest.mark.parametrize(("family", "ldm_name"), [
    ("sd1", "sd15_ldm_keys_with_ema.tsv"), ("sd2v", "sd21v_ldm_keys.tsv"), ("sdxl", "sdxl_base_ldm_keys.tsv")])
def test_unet_matches_diffusers_converter(family, ldm_name):
    convert = _converter("convert_ldm_unet_checkpoint", ("checkpoint", "config", "extract_ema"))
    sd = small_state(ldm_name)
    components, _ = split_ldm(sd, family)
    config = {"layers_per_block": 2}
    if family == "sdxl":
        config["addition_embed_type"] = "text_time"
    assert_same_values(components["unet"], convert(sd, config))
    if "unet_ema" in components:
        assert_same_values(components["unet_ema"], convert(sd, config, extract_ema=True))


@pytest.mark.parametrize(("family", "ldm_name"), [("sd1", "sd15_ldm_keys.tsv"), ("sdxl", "sdxl_base_ldm_keys.tsv")])
def test_vae_matches_diffusers_converter(family, ldm_name):
    convert = _converter("convert_ldm_vae_checkpoint", ("checkpoint", "config"))
    sd = small_state(ldm_name)
    components, _ = split_ldm(sd, family)
    config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert_same_values(components["vae"], convert(sd, config))


@pytest.mark.parametrize(("family", "ldm_name"), [("sd1", "sd15_ldm_keys.tsv"), ("sdxl", "sdxl_base_ldm_keys.tsv")])
def test_clip_l_matches_diffusers_converter(family, ldm_name):
    convert = _converter("convert_ldm_clip_checkpoint", ("checkpoint", "remove_prefix"))
    sd = small_state(ldm_name)
    components, _ = split_ldm(sd, family)
    theirs = convert(sd)
    theirs.pop("text_model.embeddings.position_ids")  # not a persistent buffer in transformers >= 4.31
    assert_same_values(components["text_encoder"], theirs)


@pytest.mark.parametrize(("family", "ldm_name", "component", "prefix"), [
    ("sd2v", "sd21v_ldm_keys.tsv", "text_encoder", "cond_stage_model.model."),
    ("sdxl", "sdxl_base_ldm_keys.tsv", "text_encoder_2", "conditioner.embedders.1.model."),
])
def test_open_clip_matches_diffusers_converter(family, ldm_name, component, prefix):
    convert = _converter("convert_open_clip_checkpoint", ("text_model", "checkpoint", "prefix"))
    sd = small_state(ldm_name)
    components, _ = split_ldm(sd, family)
    text_model = SimpleNamespace(config=SimpleNamespace(projection_dim=QKV_D))  # only read without text_projection
    assert_same_values(components[component], convert(text_model, sd, prefix=prefix))
