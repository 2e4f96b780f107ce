"""Convert state dicts between the single-file ldm/sgm layout (what A1111 loads) and diffusers components.

The conversion is a pure key/tensor mapping, exact in both directions: ``join_ldm(*split_ldm(sd, f), f)`` gives
back exactly the keys of ``sd`` with bitwise-equal tensors. That matters because we read a user's checkpoint,
train some components, and write a single file again; every tensor we do not train (schedule buffers, EMA
scalars, SD2's unused last text layer, keys we do not even know) must come out the way it went in.

Tensors are never copied on the way to diffusers: renames pass the same tensor object, the VAE 1x1 convs are
reshaped views, q/k/v are row slices of the fused OpenCLIP ``in_proj`` and SDXL's ``text_projection.weight`` is a
transposed view. Callers that save split output with safetensors must make tensors contiguous first
(safetensors refuses non-contiguous ones, and some versions refuse tensors sharing storage); ``working.save_tensors``
does this. On the way back only the q/k/v join allocates (``torch.cat``). Everything works on meta tensors.

The key maps themselves live in ``keys_unet``, ``keys_vae`` and ``keys_clip``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ..errors import CheckpointError
from . import SD1, SD2, SD2V, SDXL, get_family
from .keys_clip import CLIP_L_LAYERS, OPEN_CLIP_BIGG_LAYERS, OPEN_CLIP_H_LAYERS, hf_clip_key_map, open_clip_key_map
from .keys_unet import CONV1X1, QKV, RENAME, SD_UNET, SDXL_UNET, TRANSPOSE, KeyMap, unet_key_map
from .keys_vae import vae_key_map

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_COMPONENT = "unet_ema"

# ldm DDPM.register_schedule buffers: derived from the noise schedule, unused by diffusers (the scheduler config
# carries the schedule), but kept so the file we write back is what A1111 expects.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")


@dataclass(frozen=True)
class _Component:
    name: str
    prefix: str  # ldm prefix of every key in ``maps``
    maps: tuple[KeyMap, ...]


@dataclass(frozen=True)
class _Layout:
    label: str
    components: tuple[_Component, ...]  # the UNet first: it is the one that can have an EMA copy
    # (legacy prefix, canonical prefix): applied by split_ldm only when no key has the canonical prefix.
    aliases: tuple[tuple[str, str], ...]
    # ldm keys that are known to have no place in diffusers (regexes, full match); anything else left over is
    # still kept, but logged as unrecognised.
    known_extras: tuple[str, ...]


@cache
def _layout(family: str) -> _Layout:
    label = get_family(family).label  # raises UserError for an unknown family id
    unet = _Component("unet", UNET_PREFIX, tuple(unet_key_map(SDXL_UNET if family == SDXL else SD_UNET)))
    vae = _Component("vae", VAE_PREFIX, tuple(vae_key_map()))
    common_extras = tuple(re.escape(k) for k in (*SCHEDULE_BUFFERS, *EMA_SCALARS))
    if family == SD1:
        te = "cond_stage_model.transformer."
        return _Layout(
            label,
            (unet, vae, _Component("text_encoder", te, tuple(hf_clip_key_map(CLIP_L_LAYERS)))),
            # Very old SD1 files (and A1111's get_state_dict_from_checkpoint) predate transformers' text_model.
            tuple((te + sub, te + "text_model." + sub) for sub in ("embeddings.", "encoder.", "final_layer_norm.")),
            (*common_extras, re.escape(te + "text_model.embeddings.position_ids")),
        )
    if family in (SD2, SD2V):
        te = "cond_stage_model.model."
        last = OPEN_CLIP_H_LAYERS - 1
        return _Layout(
            label,
            (unet, vae, _Component("text_encoder", te, tuple(open_clip_key_map(last, with_projection=False)))),
            # SD2.1-Turbo stores the text tower under the sgm name; A1111 renames it the same way.
            (("conditioner.embedders.0.", "cond_stage_model."),),
            (*common_extras, re.escape(f"{te}transformer.resblocks.{last}.") + r".+",
             re.escape(te + "text_projection"), re.escape(te + "logit_scale")),
        )
    if family == SDXL:
        te1, te2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
        return _Layout(
            label,
            (unet, vae,
             _Component("text_encoder", te1, tuple(hf_clip_key_map(CLIP_L_LAYERS))),
             _Component("text_encoder_2", te2, tuple(open_clip_key_map(OPEN_CLIP_BIGG_LAYERS, with_projection=True)))),
            (),
            (*common_extras, re.escape("denoiser.sigmas"), re.escape(te1 + "text_model.embeddings.position_ids"),
             re.escape(te2 + "logit_scale")),
        )
    raise AssertionError(f"family {family!r} has no layout")  # pragma: no cover - every FAMILY_ID is handled


def ema_key(unet_key: str) -> str:
    """ldm LitEma buffer name of a UNet parameter: ``model_ema.`` + its path under ``model.`` without dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _examples(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _apply_aliases(state: Mapping[str, Tensor], aliases: tuple[tuple[str, str], ...]) -> Mapping[str, Tensor]:
    renames: dict[str, str] = {}
    for legacy, canonical in aliases:
        if any(k.startswith(canonical) for k in state):
            continue
        renames.update({k: canonical + k[len(legacy):] for k in state if k.startswith(legacy)})
    if not renames:
        return state
    log.info("renaming %d legacy checkpoint keys (e.g. %s -> %s)", len(renames), *next(iter(renames.items())))
    return {renames.get(k, k): v for k, v in state.items()}


# --- tensor operations -------------------------------------------------------------------------------------------

def _conv_to_linear(t: Tensor, key: str) -> Tensor:
    if t.ndim == 2:
        return t  # already Linear-shaped (some re-converted files); ldm would need [C, C, 1, 1] again on join
    if t.ndim != 4 or tuple(t.shape[2:]) != (1, 1):
        raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, expected a 1x1 conv weight [C, C, 1, 1]")
    return t.reshape(t.shape[0], t.shape[1])


def _split_qkv(t: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor]:
    if t.ndim < 1 or t.shape[0] % 3:
        raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, expected a fused q/k/v projection [3*D, ...]")
    q, k, v = torch.split(t, t.shape[0] // 3, dim=0)
    return q, k, v


def _transpose(t: Tensor, key: str) -> Tensor:
    if t.ndim != 2:
        raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, expected a matrix")
    return t.t()


def _to_diffusers(comp: _Component, state: Mapping[str, Tensor], ldm_keys: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for m, key in zip(comp.maps, ldm_keys, strict=True):
        t = state[key]
        if m.op == RENAME:
            out[m.diffusers[0]] = t
        elif m.op == CONV1X1:
            out[m.diffusers[0]] = _conv_to_linear(t, key)
        elif m.op == QKV:
            out.update(zip(m.diffusers, _split_qkv(t, key), strict=True))
        elif m.op == TRANSPOSE:
            out[m.diffusers[0]] = _transpose(t, key)
        else:  # pragma: no cover - the key maps only use the ops above
            raise AssertionError(f"unknown key map op {m.op!r}")
    return out


def _to_ldm(comp: _Component, name: str, state: Mapping[str, Tensor], ldm_keys: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for m, key in zip(comp.maps, ldm_keys, strict=True):
        ts = [state[d] for d in m.diffusers]
        if m.op == RENAME:
            out[key] = ts[0]
        elif m.op == CONV1X1:
            t = ts[0]
            if not (t.ndim == 2 or (t.ndim == 4 and tuple(t.shape[2:]) == (1, 1))):
                raise CheckpointError(f"{name} tensor {m.diffusers[0]} has shape {list(t.shape)}, expected [C, C]")
            out[key] = t.reshape(t.shape[0], t.shape[1], 1, 1)
        elif m.op == QKV:
            if len({(t.dtype, tuple(t.shape[1:])) for t in ts}) != 1:
                raise CheckpointError(f"{name} tensors {', '.join(m.diffusers)} differ in dtype or shape, cannot "
                                      "fuse them into one q/k/v projection")
            if all(t.is_meta for t in ts):
                # Same result as torch.cat, without its first-call cost on meta (it imports torch._dynamo, ~2 s).
                shape = (sum(t.shape[0] for t in ts), *ts[0].shape[1:])
                out[key] = torch.empty(shape, dtype=ts[0].dtype, device="meta")
            else:
                out[key] = torch.cat(ts, dim=0)
        elif m.op == TRANSPOSE:
            if ts[0].ndim != 2:
                raise CheckpointError(f"{name} tensor {m.diffusers[0]} has shape {list(ts[0].shape)}, expected a "
                                      "matrix")
            out[key] = ts[0].t()
        else:  # pragma: no cover
            raise AssertionError(f"unknown key map op {m.op!r}")
    return out


# --- public API ---------------------------------------------------------------------------------------------------

def split_ldm(state: Mapping[str, Tensor], family: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Single-file state dict -> ``({component: {diffusers_key: tensor}}, extras)``.

    Components are ``unet``, ``vae``, ``text_encoder`` (and ``text_encoder_2`` for SDXL), plus ``unet_ema`` when
    the file carries the complete ldm EMA copy of the UNet (``model_ema.*``). Keys are the diffusers names with
    transformers-4 text-encoder names and no component prefix. ``extras`` holds every other key verbatim, known
    (schedule buffers, position_ids, SD2's last text layer, ...) or not, so that :func:`join_ldm` can restore the
    file exactly. Raises :class:`CheckpointError` when a component is incomplete: a partial model must not be
    trained on, since A1111 would silently zero-fill the missing weights.
    """
    lay = _layout(family)
    state = _apply_aliases(state, lay.aliases)
    components: dict[str, dict[str, Tensor]] = {}
    consumed: set[str] = set()
    for comp in lay.components:
        ldm_keys = [comp.prefix + m.ldm for m in comp.maps]
        missing = [k for k in ldm_keys if k not in state]
        if missing:
            raise CheckpointError(
                f"the checkpoint is not a complete {lay.label} model: {len(missing)} of {len(ldm_keys)} "
                f"{comp.name} tensors are missing ({_examples(missing)})",
                "check that the right model family is selected and that the file is a full checkpoint "
                "(not a LoRA, a VAE or a pruned part)",
            )
        components[comp.name] = _to_diffusers(comp, state, ldm_keys)
        consumed.update(ldm_keys)

    unet = lay.components[0]
    ema_keys = [ema_key(m.ldm) for m in unet.maps]
    present = sum(k in state for k in ema_keys)
    if present == len(ema_keys):
        components[EMA_COMPONENT] = _to_diffusers(unet, state, ema_keys)
        consumed.update(ema_keys)
    elif present:
        log.warning("the checkpoint has only %d of %d EMA UNet tensors (model_ema.*); they are kept as they are "
                    "but not used", present, len(ema_keys))

    extras = {k: v for k, v in state.items() if k not in consumed}
    known = re.compile("|".join(f"(?:{p})" for p in lay.known_extras))
    unknown = [k for k in extras if not known.fullmatch(k)]
    if unknown:
        log.warning("the checkpoint has %d tensors that are not part of a %s model; they are kept unchanged (%s)",
                    len(unknown), lay.label, _examples(unknown))
    return components, extras


def join_ldm(components: Mapping[str, Mapping[str, Tensor]], extras: Mapping[str, Tensor],
             family: str) -> dict[str, Tensor]:
    """Inverse of :func:`split_ldm`: diffusers components + extras -> single-file state dict.

    All components of the family are required (a single file without, say, its VAE would load in A1111 with that
    part zero-filled). ``unet_ema`` is optional and becomes the ``model_ema.*`` keys. Component dicts must hold
    exactly the canonical keys (run :func:`normalize_diffusers_keys` on anything read from a diffusers folder);
    an unexpected key is an error rather than silently dropped. ``extras`` must not repeat a mapped key.
    """
    lay = _layout(family)
    names = {c.name for c in lay.components}
    stray = set(components) - names - {EMA_COMPONENT}
    if stray:
        raise ValueError(f"unknown component(s) for {lay.label}: {', '.join(sorted(stray))}")

    out: dict[str, Tensor] = {}
    jobs = [(comp, comp.name, [comp.prefix + m.ldm for m in comp.maps]) for comp in lay.components]
    if EMA_COMPONENT in components:
        unet = lay.components[0]
        jobs.append((unet, EMA_COMPONENT, [ema_key(m.ldm) for m in unet.maps]))
    for comp, name, ldm_keys in jobs:
        if name not in components:
            raise CheckpointError(f"cannot write a {lay.label} checkpoint without its {name}")
        state = components[name]
        expected = {d for m in comp.maps for d in m.diffusers}
        missing = expected.difference(state)
        unexpected = set(state).difference(expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of {len(expected)} tensors missing ({_examples(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors ({_examples(unexpected)})")
            raise CheckpointError(f"the {name} weights do not match a {lay.label} {comp.name}: " + "; ".join(parts),
                                  "the weights must come from the same model family")
        out.update(_to_ldm(comp, name, state, ldm_keys))

    clash = out.keys() & extras.keys()
    if clash:
        raise ValueError(f"extras repeat {len(clash)} mapped keys ({_examples(clash)})")
    out.update(extras)
    return out


_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_UNPREFIXED_TEXT = ("embeddings.", "encoder.", "final_layer_norm.")
_POSITION_IDS = ("text_model.embeddings.position_ids", "embeddings.position_ids")
_OLD_VAE_ATTN = re.compile(r"(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)")
_OLD_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTN_WEIGHT = re.compile(r".*\.mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight")


def normalize_diffusers_keys(component: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bring one component's state dict from a diffusers folder to the canonical names used by this module.

    Real folders differ from what current libraries write: transformers >= 5 saves ``CLIPTextModel`` without the
    ``text_model.`` prefix, transformers < 4.31 also saved the constant ``position_ids`` buffer, and diffusers
    < 0.15 VAE files use ``query/key/value/proj_attn`` names, sometimes with 1x1 conv shapes.
    """
    if component in _TEXT_COMPONENTS:
        out: dict[str, Tensor] = {}
        for k, v in state.items():
            if k in _POSITION_IDS:
                continue
            name = "text_model." + k if k.startswith(_UNPREFIXED_TEXT) else k
            if name in out:
                raise CheckpointError(f"the {component} weights hold {name} twice (with and without text_model.)")
            out[name] = v
        return out
    if component == "vae":
        out = {}
        for k, v in state.items():
            m = _OLD_VAE_ATTN.fullmatch(k)
            name = f"{m[1]}{_OLD_VAE_NAMES[m[2]]}.{m[3]}" if m else k
            if _VAE_ATTN_WEIGHT.fullmatch(name) and v.ndim > 2:
                if any(s != 1 for s in v.shape[2:]):
                    raise CheckpointError(f"vae tensor {k} has shape {list(v.shape)}, expected a 1x1 projection")
                v = v.reshape(v.shape[0], v.shape[1])
            if name in out:
                raise CheckpointError(f"the vae weights hold {name} twice (old and new attention names)")
            out[name] = v
        return out
    if component in ("unet", EMA_COMPONENT):
        return dict(state)
    raise ValueError(f"unknown component {component!r}")
