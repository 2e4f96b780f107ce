"""LoRA network: the WebUI maps every module we save, diffusers loads the file to the same outputs, and the
network itself behaves (scaling, multiplier, remove, frozen base, state dict round trip, dropout, LoCon, merge).

The WebUI mapping test re-implements, independently of ``dreambooth.train.lora``, the rules by which the WebUI's
built-in Lora extension (v1.10.1, ``extensions-builtin/Lora/networks.py``) finds the layer for a kohya key, on the
module names of the real single-file (ldm/sgm) model of each family. The extension drops keys it cannot map
silently, so the test counts them.
"""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
import torch
from conftest import REFERENCE_LDM, reference_keys
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dreambooth.errors import UserError
from dreambooth.families import SD1, SD2, SD2V, SDXL, get_family
from dreambooth.families.architecture import build_empty
from dreambooth.families.layout import split_ldm
from dreambooth.tiny import TEXT_WIDTH, tiny_configs, tiny_state_dict
from dreambooth.train.lora import LoraNetwork, LoraSettings, addnet_hash, lora_metadata, save_lora
from dreambooth.train.models import load_canonical

LOCON = LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
PLAIN = LoraSettings(rank=4, alpha=2.0)


# --- models --------------------------------------------------------------------------------------------------------

@cache
def _ldm(family: str) -> dict[str, torch.Tensor]:
    return tiny_state_dict(family)


@cache
def _components(family: str) -> dict[str, dict[str, torch.Tensor]]:
    return split_ldm(_ldm(family), family)[0]


def _instantiate(component: str, config: dict) -> nn.Module:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.get("architectures", []) \
        else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build(family: str, components: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, nn.Module]:
    """The tiny model's UNet and text encoder(s), on the CPU in fp32 with the tiny checkpoint's weights."""
    components = components or _components(family)
    out = {}
    for name, config in tiny_configs(family).items():
        if name == "vae":
            continue
        module = _instantiate(name, config)
        load_canonical(name, module, components[name])
        out[name] = module.eval()
    return out


def build_meta(family: str) -> dict[str, nn.Module]:
    return {n: build_empty(n, c) for n, c in tiny_configs(family).items() if n != "vae"}


def _unet_inputs(family: str, unet: nn.Module) -> tuple:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 6, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if family == SDXL:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, TEXT_WIDTH, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return sample, context, kwargs


@torch.no_grad()
def outputs(family: str, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """UNet noise prediction and text encoder hidden states on fixed inputs."""
    sample, context, kwargs = _unet_inputs(family, modules["unet"])
    out = {"unet": modules["unet"](sample, 10, context, **kwargs).sample}
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
    for name in ("text_encoder", "text_encoder_2"):
        if name in modules:
            out[name] = modules[name](ids).last_hidden_state
    return out


def randomize(network: LoraNetwork, seed: int = 3, scale: float = 0.2) -> None:
    """Non-zero up (and new down) weights, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _modules_of(network: LoraNetwork) -> dict[str, dict[str, torch.Tensor]]:
    """kohya state dict grouped by module: {name: {lora_down.weight, lora_up.weight, alpha}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in network.kohya_state_dict().items():
        name, part = key.split(".", 1)
        out.setdefault(name, {})[part] = value
    return out


# --- the WebUI's key mapping (extensions-builtin/Lora/networks.py, A1111 v1.10.1), re-implemented -------------------

_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _groups(pattern: str, key: str) -> list | None:
    m = re.match(pattern, key)  # the WebUI uses re.match: anchored at the start only
    if not m:
        return None
    return [int(g) if re.match(r"\d+", g) else g for g in m.groups()]


def _openclip_suffix(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def webui_convert(key: str, is_sd2: bool) -> str:
    """``convert_diffusers_name_to_compvis``: diffusers-style kohya names -> ldm module names with ``_``."""
    if (g := _groups(r"lora_unet_conv_in(.*)", key)) is not None:
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if (g := _groups(r"lora_unet_conv_out(.*)", key)) is not None:
        return f"diffusion_model_out_2{g[0]}"
    if (g := _groups(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)) is not None:
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if (g := _groups(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)) is not None:
        suffix = _RESNET_SUFFIX.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if (g := _groups(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)) is not None:
        suffix = _RESNET_SUFFIX.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if (g := _groups(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)) is not None:
        suffix = _RESNET_SUFFIX.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if (g := _groups(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)) is not None:
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if (g := _groups(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)) is not None:
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    if (g := _groups(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)) is not None:
        if is_sd2:
            return f"model_transformer_resblocks_{g[0]}_{_openclip_suffix(g[1])}"
        return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"
    if (g := _groups(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)) is not None:
        return f"1_model_transformer_resblocks_{g[0]}_{_openclip_suffix(g[1])}"
    return key


@cache
def webui_layer_mapping(family: str) -> dict[str, str]:
    """``network_layer_mapping`` as ``assign_network_names_to_compvis_modules`` builds it: every module name of
    ``sd_model.model`` (the UNet as ``diffusion_model.*``) and of the text conditioner (SD: the wrapped
    ``cond_stage_model``; SDXL: ``conditioner.embedders[i]``, prefixed ``i_``), dots as ``_``. Derived from the
    full-size ldm key list of the family. Value: the module's key prefix in the single-file state dict."""
    mapping: dict[str, str] = {}
    for key in reference_keys(REFERENCE_LDM[family]):
        if key.startswith("model.diffusion_model."):
            outer, inner = "model.", key[len("model."):]
        elif family == SDXL and key.startswith("conditioner.embedders."):
            outer, inner = "conditioner.embedders.", key[len("conditioner.embedders."):]
        elif family != SDXL and key.startswith("cond_stage_model."):
            outer, inner = "cond_stage_model.", key[len("cond_stage_model."):]
        else:
            continue
        parts = inner.split(".")[:-1]  # named_modules() also lists every parent module
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            mapping.setdefault(dotted.replace(".", "_"), outer + dotted)
    return mapping


def webui_find(name: str, mapping: dict[str, str]) -> tuple[str, str | None, bool]:
    """``load_network``'s lookup of one kohya module name: (sd_key, module prefix or None, via the q/k/v rule)."""
    is_sd2 = "model_transformer_resblocks" in mapping
    key = webui_convert(name, is_sd2)
    module = mapping.get(key)
    via_mha = False
    if module is None and (m := _X_PROJ.match(key)):
        module = mapping.get(m.group(1))
        via_mha = module is not None
    if module is None and "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        module = mapping.get(key)
    elif module is None and "lora_te1_text_model" in name:
        key = name.replace("lora_te1_text_model", "0_transformer_text_model")
        module = mapping.get(key)
        if module is None:
            key = name.replace("lora_te1_text_model", "transformer_text_model")
            module = mapping.get(key)
    return key, module, via_mha


def webui_match(network: LoraNetwork, family: str) -> tuple[dict[str, tuple[str, str, bool]], list[str]]:
    mapping = webui_layer_mapping(family)
    matched, unmatched = {}, []
    for name in network.names():
        key, module, via_mha = webui_find(name, mapping)
        if module is None:
            unmatched.append(f"{name} -> {key}")
        else:
            matched[name] = (key, module, via_mha)
    return matched, unmatched


def webui_apply(ldm: dict[str, torch.Tensor], network: LoraNetwork, family: str, te_multiplier: float = 1.0,
                unet_multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """What the WebUI does to the single-file weights with this LoRA loaded: ``weight += up @ down * alpha / dim *
    multiplier`` per matched module (``network_apply_weights``), q/k/v stacked into an OpenCLIP ``in_proj_weight``
    only when the layer has all of q, k, v and out_proj."""
    matched, unmatched = webui_match(network, family)
    assert not unmatched
    modules = _modules_of(network)
    by_key = {key: name for name, (key, _, _) in matched.items()}
    out = dict(ldm)
    for name, (key, module, via_mha) in matched.items():
        w = modules[name]
        up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()
        multiplier = te_multiplier if "transformer" in key[:20] else unet_multiplier
        updown = (up.flatten(1) @ down.flatten(1)) * (w["alpha"].item() / down.shape[0]) * multiplier
        if via_mha:
            base = key.rsplit("_", 2)[0]  # ..._attn
            assert all(f"{base}_{p}" in by_key for p in ("q_proj", "k_proj", "v_proj", "out_proj")), key
            target = module + ".in_proj_weight"
            index = "qkv".index(key[-6])
            chunks = list(out[target].chunk(3, 0))
            chunks[index] = chunks[index] + updown.reshape(chunks[index].shape)
            out[target] = torch.cat(chunks, 0)
        else:
            target = module + ".weight"
            out[target] = out[target] + updown.reshape(out[target].shape)
    return out


EXPECTED_MODULES = {  # full-size kohya LoRA module counts (UNet + text encoders), LoCon adds the resnet/sampler layers
    SD1: (192 + 72, 86), SD2: (192 + 23 * 6, 86), SD2V: (192 + 23 * 6, 86), SDXL: (722 + 72 + 192, 66),
}


@pytest.mark.parametrize("locon", [False, True], ids=["lora", "locon"])
@pytest.mark.parametrize("family", [SD1, SD2, SD2V, SDXL])
def test_webui_maps_every_module(family, locon):
    network = LoraNetwork(build_meta(family), LOCON if locon else PLAIN, family)
    matched, unmatched = webui_match(network, family)
    total = len(network.names())
    print(f"{family} {'LoCon' if locon else 'LoRA'}: WebUI matched {len(matched)} of {total} modules")
    assert not unmatched, f"{len(unmatched)} of {total} modules the WebUI would drop:\n" + "\n".join(unmatched)
    plain, conv = EXPECTED_MODULES[family]
    assert total == plain + (conv if locon else 0)

    shapes = {k: tuple(v.shape) for k, v in _ldm(family).items()}
    modules = _modules_of(network)
    targets: dict[str, str] = {}
    for name, (key, module, via_mha) in matched.items():
        # the WebUI applies te_multiplier to the text encoder and unet_multiplier to the rest by this test
        assert ("transformer" in key[:20]) == name.startswith("lora_te"), (name, key)
        down, up = modules[name]["lora_down.weight"], modules[name]["lora_up.weight"]
        if via_mha:
            out_rows, in_cols = shapes[module + ".in_proj_weight"]
            target, kernel = (out_rows // 3, in_cols), ()
            slot = f"{module}.in_proj_weight[{key[-6]}]"
        else:
            weight = shapes[module + ".weight"]  # a layer with a weight, not a container
            target, kernel = weight[:2], weight[2:]
            slot = module
            assert down.ndim == len(weight), (name, module, weight)  # Linear <-> Linear, Conv2d <-> Conv2d
        assert (up.shape[0], down.shape[1]) == target, (name, module)
        assert tuple(down.shape[2:]) == kernel, (name, module)
        assert slot not in targets, f"{name} and {targets[slot]} both land on {slot}"
        targets[slot] = name


@pytest.mark.parametrize("family", [SD1, SD2, SDXL])
def test_webui_application_gives_our_outputs(family):
    """The LDM weights as the WebUI patches them, converted to diffusers, compute what our wrapped model does."""
    modules = build(family)
    network = LoraNetwork(modules, LOCON, family)
    randomize(network)
    network.multiplier = 0.7
    ours = outputs(family, modules)
    patched = webui_apply(_ldm(family), network, family, te_multiplier=0.7, unet_multiplier=0.7)
    theirs = outputs(family, build(family, split_ldm(patched, family)[0]))
    diff = _max_diff(ours, theirs)
    print(f"{family}: LoRA effect {_max_diff(ours, outputs(family, build(family))):.3g}, WebUI vs ours {diff:.3g}")
    assert diff <= 1e-4


# --- diffusers as a second client ------------------------------------------------------------------------------------

def _peft_backend() -> str:
    """Why diffusers cannot load LoRA files here, or ''."""
    import diffusers
    import transformers
    from diffusers.utils import constants

    minimum = getattr(constants, "MIN_TRANSFORMERS_VERSION", "4.34.0")
    have = transformers.__version__
    if tuple(int(p) for p in have.split(".")[:2]) < tuple(int(p) for p in minimum.split(".")[:2]):
        return (f"diffusers loads LoRA files only through its PEFT backend, which diffusers {diffusers.__version__} "
                f"switches off below transformers {minimum}; this profile has transformers {have} (the WebUI's "
                "pin), so no peft version can enable it")
    try:
        import peft
    except ImportError:
        return "peft is not installed (requirements/current.txt lists it)"
    if not constants.USE_PEFT_BACKEND:
        return f"diffusers {diffusers.__version__} does not enable its PEFT backend with peft {peft.__version__}"
    return ""


@pytest.mark.parametrize(("family", "settings"), [(SD1, PLAIN), (SD1, LOCON), (SDXL, LOCON)],
                         ids=["sd1-lora", "sd1-locon", "sdxl-locon"])
def test_diffusers_load_lora_weights_gives_our_outputs(tmp_path, tiny_checkpoint, family, settings):
    """diffusers' ``load_lora_weights`` (its kohya converter + PEFT) reads every module and computes our outputs."""
    reason = _peft_backend()
    if reason:
        pytest.skip(reason)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dreambooth.create import create_model
    from dreambooth.train.models import load_models

    md = create_model(tiny_checkpoint(family), "m", tmp_path)
    theirs, ours = load_models(md.working, family), load_models(md.working, family)
    names = ["unet", *(n for n in ("text_encoder", "text_encoder_2") if n in get_family(family).components)]
    mods_theirs = dict(zip(names, [theirs.unet, *theirs.text_encoders], strict=True))
    mods_ours = dict(zip(names, [ours.unet, *ours.text_encoders], strict=True))
    base = outputs(family, mods_theirs)
    network = LoraNetwork(ours, settings, family)
    randomize(network)
    path = save_lora(tmp_path / "lora.safetensors", network, {}, dtype=torch.float32)

    cls = StableDiffusionXLPipeline if family == SDXL else StableDiffusionPipeline
    extra = {} if family == SDXL else {"safety_checker": None, "feature_extractor": None,
                                       "requires_safety_checker": False}
    pipe = cls(**theirs.modules_for_pipeline(), scheduler=theirs.noise_scheduler, **extra)
    pipe.load_lora_weights(str(path))
    loaded = {n: sum(1 for m in module.modules() if hasattr(m, "lora_A") and len(m.lora_A))
              for n, module in mods_theirs.items()}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if family == SDXL else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    assert loaded == {n: sum(k.startswith(prefixes[n]) for k in network.names()) for n in names}

    ours_out, theirs_out = outputs(family, mods_ours), outputs(family, mods_theirs)
    assert _max_diff(ours_out, base) > 1e-3  # the LoRA does change the model
    diff = _max_diff(ours_out, theirs_out)
    print(f"{family}: LoRA effect {_max_diff(ours_out, base):.3g}, diffusers vs ours {diff:.3g}")
    assert diff <= 1e-4


# --- the network -----------------------------------------------------------------------------------------------------

def _first(network: LoraNetwork, fragment: str) -> str:
    return next(n for n in network.names() if fragment in n)


def test_alpha_over_rank_scaling_and_multiplier():
    modules = build(SD1)
    base = outputs(SD1, modules)
    full = LoraNetwork(modules, LoraSettings(rank=4, alpha=4.0), SD1)
    randomize(full)
    state = full.kohya_state_dict()
    name = _first(full, "attn1_to_q")
    layer = modules["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = nn.functional.linear(x, layer.weight, layer.bias)
        delta_full = layer(x) - plain
        full.multiplier = 0.0
        assert _equal(outputs(SD1, modules), base)  # multiplier 0: exactly the base model
        assert torch.equal(layer(x), plain)
        full.multiplier = 1.0
    full.remove()

    half = LoraNetwork(modules, LoraSettings(rank=4, alpha=2.0), SD1)
    with torch.no_grad():  # the same weights, alpha = rank / 2
        for key, value in state.items():
            if not key.endswith(".alpha"):
                half.get_parameter(key).copy_(value)
        delta_half = layer(x) - plain
    assert delta_full.abs().max() > 1e-3
    torch.testing.assert_close(delta_half, delta_full / 2, rtol=1e-5, atol=1e-6)
    assert half.get_submodule(name).alpha.item() == 2.0
    half.remove()


def test_fresh_network_changes_nothing_and_remove_restores_exactly():
    modules = build(SDXL)
    base = outputs(SDXL, modules)
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    grads = {n: [p.requires_grad for p in m.parameters()] for n, m in modules.items()}

    network = LoraNetwork(modules, LOCON, SDXL)
    assert _equal(outputs(SDXL, modules), base)  # lora_up starts at zero: bitwise the base model
    assert not any(p.requires_grad for m in modules.values() for p in m.parameters())
    randomize(network)
    assert _max_diff(outputs(SDXL, modules), base) > 1e-3
    with pytest.raises(UserError, match="already has a LoRA"):
        LoraNetwork(modules, LOCON, SDXL)

    network.remove()
    network.remove()  # idempotent
    assert _equal(outputs(SDXL, modules), base)
    for n, m in modules.items():
        assert all(not sub._forward_hooks for sub in m.modules())
        assert [p.requires_grad for p in m.parameters()] == grads[n]
        assert _equal(m.state_dict(), weights[n])


def test_training_steps_change_only_the_lora_weights():
    modules = build(SD1)
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    network = LoraNetwork(modules, LoraSettings(rank=4, alpha=4.0, conv_rank=2, dropout=0.1), SD1)
    network.train()
    modules["unet"].train()
    modules["text_encoder"].train()
    before = {k: v.clone() for k, v in network.kohya_state_dict().items()}
    params = network.parameters_for("unet") + network.parameters_for("text_encoder")
    assert len(params) == len(list(network.parameters())) == 2 * len(network.names())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    # 16x16 latents: every attention block (the mid block's too, after the down blocks halve the size) sees several
    # tokens. Over a single token softmax is constant, so to_q / to_k get an exactly zero gradient there and their
    # LoRA could not move on a CPU whose kernels compute that zero exactly. With several tokens every LoRA module
    # gets a nonzero gradient, and AdamW moves every weight with a nonzero gradient by about lr: each lora_up changes.
    sample = torch.randn(1, modules["unet"].config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    assert 16 // 2 ** (len(modules["unet"].down_blocks) - 1) >= 2  # the mid block's side: >= 2x2 tokens
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        context = modules["text_encoder"](ids).last_hidden_state
        loss = modules["unet"](sample, 10, context).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = network.kohya_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("lora_up.weight"))
    for n, m in modules.items():
        assert all(p.grad is None for p in m.parameters())
        assert _equal(m.state_dict(), weights[n])


def test_state_dict_round_trip_and_saved_file(tmp_path):
    modules = build(SD2)
    network = LoraNetwork(modules, LOCON, SD2)
    randomize(network)
    expected = outputs(SD2, modules)
    state = network.kohya_state_dict()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    path32 = save_lora(tmp_path / "a32.safetensors", network, {"ss_seed": 7}, dtype=torch.float32)
    path16 = save_lora(tmp_path / "a16.safetensors", network, {})
    network.remove()

    again = LoraNetwork(modules, LOCON, SD2)
    again.load_kohya_state_dict(state)
    assert _equal(outputs(SD2, modules), expected)
    again.load_kohya_state_dict(load_file(str(path32)))
    assert _equal(outputs(SD2, modules), expected)
    saved16 = load_file(str(path16))
    assert {v.dtype for v in saved16.values()} == {torch.float16} and saved16.keys() == state.keys()
    again.load_kohya_state_dict(saved16)
    assert _max_diff(outputs(SD2, modules), expected) < 1e-2
    with pytest.raises(UserError, match="do not fit"):
        again.load_kohya_state_dict({k: v for k, v in state.items() if "lora_te_" not in k})
    with pytest.raises(UserError, match="rank"):
        again.load_kohya_state_dict({k: torch.zeros(8, *v.shape[1:]) if k.endswith("lora_down.weight") else v
                                     for k, v in state.items()})
    again.remove()

    raw = path32.read_bytes()
    with safe_open(str(path32), framework="pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == addnet_hash(raw)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")
    assert meta["ss_output_name"] == "a32" and meta["ss_seed"] == "7"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "a32"


def test_lora_metadata():
    meta = lora_metadata(SDXL, LoraSettings(rank=8, alpha=0), "zwx", {"zwx person": 3, "photo": 1}, "ab" * 32,
                         {"ss_num_train_images": 4, "modelspec.resolution": "832x1216"})
    for key in ("ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_base_model_version", "ss_v2", "ss_tag_frequency", "ss_new_sd_model_hash",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title", "modelspec.date",
                "modelspec.implementation", "modelspec.prediction_type"):
        assert key in meta, key
    assert all(isinstance(v, str) for v in meta.values())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")  # alpha 0 means alpha = rank (kohya)
    assert json.loads(meta["ss_network_args"]) == {}
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert json.loads(meta["ss_tag_frequency"]) == {"zwx": {"zwx person": 3, "photo": 1}}  # the WebUI's nesting
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_num_train_images"] == "4" and meta["modelspec.resolution"] == "832x1216"
    assert lora_metadata(SD1, PLAIN, "x", {}, "", {})["ss_base_model_version"] == "sd_v1"
    assert lora_metadata(SD2V, PLAIN, "x", {}, "", {})["modelspec.prediction_type"] == "v"


def test_dropout_only_in_train_mode():
    modules = build(SD1)
    network = LoraNetwork(modules, LoraSettings(rank=4, alpha=4.0, dropout=0.5), SD1)
    randomize(network)
    layer = modules["unet"].get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.2")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        network.eval()
        layer.eval()
        clean = layer(x)
        network.train()
        assert torch.equal(layer(x), clean)  # the model is in eval mode (previews): no dropout
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        second = layer(x)
        assert not torch.equal(first, second) and not torch.equal(first, clean)
        network.eval()
        assert torch.equal(layer(x), clean)


def test_locon_adds_the_conv_layers():
    plain = LoraNetwork(build_meta(SD1), PLAIN, SD1)
    locon = LoraNetwork(build_meta(SD1), LOCON, SD1)
    added = sorted(set(locon.names()) - set(plain.names()))
    assert set(plain.names()) < set(locon.names())
    state = _modules_of(locon)
    kernels = {n: tuple(state[n]["lora_down.weight"].shape[2:]) for n in added}
    for name in ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_up_blocks_3_resnets_2_conv2",
                 "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert kernels[name] == (3, 3) and state[name]["lora_down.weight"].shape[0] == 2, name
        assert locon.get_submodule(name).scale == 0.5  # conv_alpha / conv_rank
    for name in ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", "lora_unet_mid_block_resnets_0_time_emb_proj"):
        assert state[name]["lora_down.weight"].shape[0] == 4, name  # 1x1 and Linear layers use rank / alpha
    assert not any("conv_in" in n or "conv_out" in n for n in locon.names())
    assert all("attentions" in n for n in plain.names("unet"))
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in plain.names("text_encoder"))


def test_sdxl_names():
    network = LoraNetwork(build_meta(SDXL), LOCON, SDXL)
    unet, te = network.names("unet"), network.names("text_encoder")
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", n) for n in unet), unet[:3]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_output_blocks_2_2_conv" in unet and "lora_unet_input_blocks_1_0_in_layers_2" in unet
    te1 = [n for n in te if n.startswith("lora_te1_text_model_encoder_layers_")]
    te2 = [n for n in te if n.startswith("lora_te2_text_model_encoder_layers_")]
    assert len(te1) == 12 * 6 and len(te2) == 32 * 6 and len(te1) + len(te2) == len(te)
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in te

    only_unet = LoraNetwork(build_meta(SDXL), LoraSettings(train_text_encoder=False), SDXL)
    assert only_unet.names("text_encoder") == [] and only_unet.parameters_for("text_encoder") == []
    with pytest.raises(ValueError):
        only_unet.parameters_for("vae")


def test_merge_into_matches_the_wrapped_model():
    modules = build(SD1)
    network = LoraNetwork(modules, LOCON, SD1)
    randomize(network)
    network.multiplier = 0.8
    wrapped = outputs(SD1, modules)
    network.merge_into()
    assert all(not sub._forward_hooks for m in modules.values() for sub in m.modules())
    assert _max_diff(outputs(SD1, modules), wrapped) <= 1e-4


def test_settings_are_checked():
    for bad in ({"rank": 0}, {"rank": 2.5}, {"alpha": -1}, {"dropout": 1.0}, {"conv_rank": -1},
                {"train_unet": False, "train_text_encoder": False}):
        with pytest.raises(UserError):
            LoraSettings(**bad)
