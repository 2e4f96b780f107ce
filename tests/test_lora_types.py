"""The LoRA types LoHa, LoKr and DoRA (beside plain LoRA / LoCon): the WebUI maps every module of each and accepts its
keys, the WebUI's formula for each type applied to the base weights gives our wrapped model's outputs, the metadata is
kohya's / LyCORIS's, the network behaves (fresh: no change, remove: exact, training: only the adapter moves).

``webui_updown`` re-implements, independently of ``dreambooth.train.adapters``, how the WebUI's built-in Lora
extension (v1.10.1, ``extensions-builtin/Lora``: ``network_lora.py``, ``network_hada.py``, ``network_lokr.py``,
``lyco_helpers.py`` and ``network.py``'s ``finalize_updown`` / ``apply_weight_decompose``) turns one module's tensors
from the file into the change of the layer's weight. The module lookup is test_lora's re-implementation of
``networks.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_api import Host, make_client
from test_lora import (
    EXPECTED_MODULES,
    _equal,
    _ldm,
    _max_diff,
    build,
    build_meta,
    outputs,
    webui_find,
    webui_layer_mapping,
)

from dreambooth.config import LORA_TYPES
from dreambooth.errors import UserError
from dreambooth.families import SD1, SD2, SD2V, SDXL
from dreambooth.families.layout import split_ldm
from dreambooth.train.adapters import LokrModule, Shared, column_norms, factorization
from dreambooth.train.lora import LoraNetwork, LoraSettings, lora_metadata, save_lora
from dreambooth.ui.form import config_controls, shown_for_method

NEW_TYPES = ("loha", "lokr", "dora")


def settings_for(kind: str, conv: bool = True, **extra) -> LoraSettings:
    """Rank 2 on the tiny model: LoKr then stores some second factors whole and some as pairs, and (decompose_both)
    the first factor of the 64-wide layers as a pair."""
    values = dict(rank=2, alpha=1.0, conv_rank=2 if conv else 0, conv_alpha=1.0, type=kind, lokr_decompose_both=True)
    return LoraSettings(**{**values, **extra})


def by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, part = key.split(".", 1)
        out.setdefault(name, {})[part] = value
    return out


def randomize(network: LoraNetwork, seed: int = 3, scale: float = 0.3) -> None:
    """Every adapter weight non-zero, as after training; DoRA's magnitudes moved off the base's norms by ~20%."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.2 * noise) if name.endswith("dora_scale") else noise * scale)


# --- the WebUI's module types and formulas (extensions-builtin/Lora, A1111 v1.10.1), re-implemented ---------------

def webui_module_type(keys: set[str]) -> str | None:
    """The first of ``networks.module_types`` (lora, hada, ia3, lokr, full, norm, glora, oft) whose ``create_module``
    accepts a module's keys; the WebUI refuses a file with a module none accepts."""
    if {"lora_up.weight", "lora_down.weight"} <= keys:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
        return "hada"
    if "weight" in keys:
        return "ia3"
    has_1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
    has_2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
    if has_1 and has_2:
        return "lokr"
    return None


READ_KEYS = {  # what each module type (and network.py's NetworkModule) reads from a module's tensors
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "bias", "dora_scale"},
    "hada": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "scale", "bias",
             "dora_scale"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "scale",
             "bias", "dora_scale"},
}
WEBUI_TYPE = {"lora": "lora", "dora": "lora", "loha": "hada", "lokr": "lokr"}


def _rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def webui_updown(w: dict[str, torch.Tensor], orig: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``calc_updown`` of the module type, then ``finalize_updown``: the change the WebUI adds to ``orig``."""
    dim = None
    kind = webui_module_type(set(w))
    if kind == "lora":
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        shape = [up.size(0), down.size(1), *(down.shape[2:] if down.ndim == 4 else ())]
        updown = _rebuild_conventional(up, down, shape)
    elif kind == "hada":
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1), *(w1b.shape[2:] if w1b.ndim == 4 else ())]
        updown = _rebuild_conventional(w1a, w1b, shape) * _rebuild_conventional(w2a, w2b, shape)
    elif kind == "lokr":
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        shape = list(orig.shape) if orig.ndim == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    else:
        raise AssertionError(f"no WebUI module type accepts {sorted(w)}")
    # finalize_updown
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    alpha = w["alpha"].item() if "alpha" in w else None
    updown = updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "dora_scale" in w:  # apply_weight_decompose: the norm per input channel (dim 1), over the rest
        merged = updown + orig
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (orig.ndim - 1)).transpose(0, 1)
        updown = merged * (w["dora_scale"] / norm) - orig
    return updown * multiplier


def webui_patch(ldm: dict[str, torch.Tensor], state: dict[str, torch.Tensor], family: str,
                multiplier: float) -> dict[str, torch.Tensor]:
    """The single-file weights as the WebUI patches them with the LoRA file ``state`` at strength ``multiplier``
    (q/k/v into an OpenCLIP ``in_proj_weight`` by chunk, ``network_apply_weights``)."""
    mapping = webui_layer_mapping(family)
    out = {k: v.clone() for k, v in ldm.items()}
    for name, w in by_module({k: v.float() for k, v in state.items()}).items():
        key, module, via_mha = webui_find(name, mapping)
        assert module is not None, f"the WebUI drops {name}"
        if via_mha:
            target = module + ".in_proj_weight"
            index = "qkv".index(key[-6])
            chunks = list(ldm[target].chunk(3, 0))
            out_chunks = list(out[target].chunk(3, 0))
            out_chunks[index] = out_chunks[index] + webui_updown(w, chunks[index], multiplier)
            out[target] = torch.cat(out_chunks, 0)
        else:
            target = module + ".weight"
            out[target] = out[target] + webui_updown(w, ldm[target], multiplier)
    return out


# --- mapping and keys ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LORA_TYPES)
@pytest.mark.parametrize("family", [SD1, SD2, SD2V, SDXL])
def test_webui_maps_and_accepts_every_module_of_every_type(family, kind):
    network = LoraNetwork(build_meta(family), settings_for(kind), family)
    mapping = webui_layer_mapping(family)
    modules = by_module(network.kohya_state_dict())
    unmatched = [n for n in modules if webui_find(n, mapping)[1] is None]
    print(f"{family} {kind}: WebUI matched {len(modules) - len(unmatched)} of {len(modules)} modules")
    assert not unmatched, f"the WebUI would drop {len(unmatched)} of {len(modules)} modules: {unmatched[:5]}"
    assert len(modules) == sum(EXPECTED_MODULES[family]) == len(network.names())
    for name, tensors in modules.items():
        keys = set(tensors)
        assert webui_module_type(keys) == WEBUI_TYPE[kind], (name, sorted(keys))
        assert keys <= READ_KEYS[WEBUI_TYPE[kind]], (name, sorted(keys - READ_KEYS[WEBUI_TYPE[kind]]))
        assert "alpha" in keys and ("dora_scale" in keys) == (kind == "dora")
    if kind == "lokr":  # the tiny model's widths give both forms of each factor at rank 2
        suffixes = {k for tensors in modules.values() for k in tensors}
        assert {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"} <= suffixes


@pytest.mark.parametrize(("kind", "multiplier"), [("loha", 0.7), ("lokr", 0.7), ("dora", 1.0), ("dora", 0.7)])
@pytest.mark.parametrize("family", [SD1, SD2, SDXL])
def test_webui_formula_gives_our_outputs(tmp_path, family, kind, multiplier):
    """The file, applied to the single-file weights by the WebUI's formula for its type and converted to diffusers,
    computes what our wrapped model computes (UNet with its convolutions, and the text encoders)."""
    modules = build(family)
    base = outputs(family, modules)
    network = LoraNetwork(modules, settings_for(kind), family)
    randomize(network)
    network.multiplier = multiplier
    ours = outputs(family, modules)
    path = save_lora(tmp_path / "x.safetensors", network, {}, dtype=torch.float32)
    patched = webui_patch(_ldm(family), load_file(str(path)), family, multiplier)
    theirs = outputs(family, build(family, split_ldm(patched, family)[0]))
    effect, diff = _max_diff(ours, base), _max_diff(ours, theirs)
    print(f"{family} {kind} x{multiplier}: effect {effect:.3g}, WebUI vs ours {diff:.3g}")
    assert min(_max_diff({k: ours[k]}, {k: base[k]}) for k in ours) > 1e-3  # every component changes
    assert diff <= 1e-4


def test_dora_without_its_magnitudes_would_differ():
    """The formula test can tell DoRA from LoRA: the same low-rank weights without ``dora_scale`` compute otherwise."""
    modules = build(SD1)
    dora = LoraNetwork(modules, settings_for("dora"), SD1)
    randomize(dora)
    with_magnitude = outputs(SD1, modules)
    state = {k: v for k, v in dora.kohya_state_dict().items() if not k.endswith("dora_scale")}
    dora.remove()
    plain = LoraNetwork(modules, settings_for("lora"), SD1)
    plain.load_kohya_state_dict(state)
    assert _max_diff(outputs(SD1, modules), with_magnitude) > 1e-2


# --- the adapters -----------------------------------------------------------------------------------------------------

def test_factorization_follows_lycoris():
    assert factorization(128) == (8, 16) and factorization(1024) == (32, 32) and factorization(127) == (1, 127)
    assert factorization(320) == (16, 20) and factorization(512, 4) == (4, 128) and factorization(360, 16) == (15, 24)
    assert factorization(36, 5) == (4, 9) and factorization(64, 8) == (8, 8) and factorization(64, 128) == (8, 8)
    for dim in range(1, 200):
        for factor in (-1, 1, 3, 8):
            m, n = factorization(dim, factor)
            assert m * n == dim and m <= n


def test_lokr_shapes_and_scale():
    layer = torch.nn.Linear(64, 64)
    shared = Shared()
    half = LokrModule("x", layer, 2, 1.0, 0.0, shared, torch.float32, factor=-1, decompose_both=True)
    assert {k: tuple(v.shape) for k, v in half.state_dict().items()} == {
        "alpha": (), "lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert half.scale == 0.5
    whole = LokrModule("x", layer, 4, 1.0, 0.0, shared, torch.float32, factor=4)  # (4, 16): 4 >= 16 / 2? no: w2 pair
    assert {k: tuple(v.shape) for k, v in whole.state_dict().items()} == {
        "alpha": (), "lokr_w1": (4, 4), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 16)}
    full = LokrModule("x", layer, 8, 1.0, 0.0, shared, torch.float32, factor=-1)  # 8 >= 8 / 2: both whole
    assert set(full.state_dict()) == {"alpha", "lokr_w1", "lokr_w2"}
    assert (full.scale, full.alpha.item()) == (1.0, 8.0)  # scale 1, alpha written as the rank (LyCORIS)
    conv = LokrModule("x", torch.nn.Conv2d(32, 64, 3, padding=1), 8, 1.0, 0.0, shared, torch.float32)
    assert tuple(conv.lokr_w2.shape) == (8, 8, 3, 3) and tuple(conv.lokr_w1.shape) == (8, 4)
    assert tuple(conv.updown().shape) == (64, 32, 3, 3)


def test_dora_magnitude_layout():
    """``dora_scale`` is one magnitude per input channel, (1, in) / (1, in, 1, 1), starting at the base's norms."""
    modules = build(SD1)
    network = LoraNetwork(modules, settings_for("dora"), SD1)
    layers = network.adapted_layers()
    for name, adapter in network.lora_modules.items():
        weight = layers[name].weight
        assert tuple(adapter.dora_scale.shape) == (1, weight.shape[1], *[1] * (weight.ndim - 2)), name
        assert torch.equal(adapter.dora_scale, column_norms(weight.float()))
    assert any(layers[n].weight.ndim == 4 and layers[n].kernel_size == (3, 3) for n in network.names())


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_fresh_network_changes_nothing_and_remove_restores_exactly(kind):
    modules = build(SDXL)
    base = outputs(SDXL, modules)
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    network = LoraNetwork(modules, settings_for(kind), SDXL)
    assert _equal(outputs(SDXL, modules), base)  # bitwise the base model
    randomize(network)
    assert _max_diff(outputs(SDXL, modules), base) > 1e-3
    network.multiplier = 0.0
    assert _equal(outputs(SDXL, modules), base)
    network.remove()
    assert _equal(outputs(SDXL, modules), base)
    for n, m in modules.items():
        assert all(not sub._forward_hooks and not sub._forward_pre_hooks for sub in m.modules())
        assert _equal(m.state_dict(), weights[n])


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_training_steps_change_only_the_adapter_weights(kind):
    modules = build(SD1)
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    network = LoraNetwork(modules, settings_for(kind, dropout=0.1), SD1)
    network.train()
    modules["unet"].train()
    modules["text_encoder"].train()
    before = {k: v.clone() for k, v in network.kohya_state_dict().items()}
    params = network.parameters_for("unet") + network.parameters_for("text_encoder")
    assert len(params) == len(list(network.parameters()))
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sample = torch.randn(1, modules["unet"].config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        context = modules["text_encoder"](ids).last_hidden_state
        loss = modules["unet"](sample, 10, context).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = network.kohya_state_dict()
    zero_started = {"loha": "hada_w2_a", "lokr": ("lokr_w2", "lokr_w2_b"), "dora": "lora_up.weight"}[kind]
    moved = [k for k in after if k.split(".", 1)[1] in zero_started or k.endswith(zero_started)]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved)  # every zero-started factor learns
    if kind == "dora":
        assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("dora_scale"))
    for n, m in modules.items():
        assert all(p.grad is None for p in m.parameters())
        assert _equal(m.state_dict(), weights[n])


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_state_round_trip_and_merge(tmp_path, kind):
    modules = build(SD2)
    network = LoraNetwork(modules, settings_for(kind), SD2)
    randomize(network)
    network.multiplier = 0.6
    expected = outputs(SD2, modules)
    state = network.kohya_state_dict()
    path = save_lora(tmp_path / "a.safetensors", network, {}, dtype=torch.float32)
    network.remove()
    again = LoraNetwork(modules, settings_for(kind), SD2)
    again.multiplier = 0.6
    again.load_kohya_state_dict(load_file(str(path)))
    assert _equal(outputs(SD2, modules), expected)
    again.remove()
    wrong = LoraNetwork(modules, settings_for("lora"), SD2)  # another type: other keys
    with pytest.raises(UserError, match="do not fit"):
        wrong.load_kohya_state_dict(state)
    wrong.remove()
    merged = LoraNetwork(modules, settings_for(kind), SD2)
    merged.multiplier = 0.6
    merged.load_kohya_state_dict(state)
    merged.merge_into()
    assert all(not sub._forward_hooks and not sub._forward_pre_hooks for m in modules.values() for sub in m.modules())
    assert _max_diff(outputs(SD2, modules), expected) <= 1e-4


# --- metadata --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "module", "args"), [
    (settings_for("lora"), "networks.lora", {"conv_dim": "2", "conv_alpha": "1.0"}),
    (settings_for("lora", conv=False), "networks.lora", {}),
    (settings_for("loha"), "lycoris.kohya", {"algo": "loha", "preset": "full", "conv_dim": "2", "conv_alpha": "1.0"}),
    (settings_for("lokr", conv=False, lokr_factor=8), "lycoris.kohya",
     {"algo": "lokr", "preset": "attn-mlp", "factor": "8", "decompose_both": "True"}),
    (settings_for("dora", conv=False), "lycoris.kohya",
     {"algo": "lora", "preset": "attn-mlp", "dora_wd": "True", "wd_on_output": "False"}),
    (settings_for("dora"), "lycoris.kohya", {"algo": "locon", "preset": "full", "conv_dim": "2", "conv_alpha": "1.0",
                                             "dora_wd": "True", "wd_on_output": "False"}),
], ids=["locon", "lora", "loha", "lokr", "dora", "dora-conv"])
def test_metadata_is_kohyas_and_lycoris(tmp_path, settings, module, args):
    """``ss_network_module`` / ``ss_network_args`` as kohya's trainer writes them with that network module and
    ``--network_args`` (string values); the file's own metadata cannot be overridden by the caller."""
    meta = lora_metadata(SD1, settings, "zwx")
    assert (meta["ss_network_module"], json.loads(meta["ss_network_args"])) == (module, args)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
    network = LoraNetwork(build(SD1), settings, SD1)
    path = save_lora(tmp_path / "f.safetensors", network, {"ss_network_module": "networks.lora",
                                                           "ss_network_args": "{}"})
    with safe_open(str(path), "pt") as fh:
        saved = fh.metadata()
    assert (saved["ss_network_module"], json.loads(saved["ss_network_args"])) == (module, args)


def test_settings_are_checked():
    for bad in ({"type": "oft"}, {"type": "lokr", "lokr_factor": 0}, {"lokr_factor": -2}, {"lokr_factor": 2.0}):
        with pytest.raises(UserError):
            LoraSettings(**bad)


def test_lokr_settings_show_for_lokr_only(tmp_path):
    """The tab and the API schema say the LoKr settings apply to LoRA type lokr (``requires``), the type to LoRA."""
    controls = config_controls()
    index = {c.spec.name: i for i, c in enumerate(controls)}
    for kind in LORA_TYPES:
        visible = shown_for_method("lora", controls, "adamw", {"lora_type": kind})
        assert visible[index["lora_lokr_factor"]] == visible[index["lora_lokr_decompose_both"]] == (kind == "lokr")
        assert visible[index["lora_type"]] and visible[index["lora_rank"]]
    assert not shown_for_method("dreambooth", controls, "adamw", {"lora_type": "lokr"})[index["lora_lokr_factor"]]
    fields = {f["name"]: f for f in make_client(Host(tmp_path)).get("/dreambooth/schema").json()["config"]}
    assert fields["lora_lokr_factor"]["requires"] == fields["lora_lokr_decompose_both"]["requires"] == {
        "lora_type": ["lokr"]}
    assert fields["lora_type"]["choices"] == list(LORA_TYPES) and fields["lora_type"]["requires"] is None
