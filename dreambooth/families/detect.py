"""Tell which model family a checkpoint file or a diffusers folder holds, and refuse everything else clearly.

Single-file (ldm/sgm layout) checkpoints are recognised from key names and shapes alone; SD 2.x epsilon vs
v-prediction cannot be told from keys (both yamls give identical key sets), so :func:`resolve_v_prediction`
decides it from an explicit choice or from a ``.yaml`` beside the file, as the WebUI does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import FAMILIES, FAMILY_IDS, SD1, SD2, SD2V, SDXL

logger = logging.getLogger(__name__)

SUPPORTED = "supported families: SD 1.x, SD 2.x (512 epsilon or 768 v-prediction) and SDXL base"
_HINT_FULL = "choose a full checkpoint (UNet + VAE + text encoder) of a supported family"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
_CONV_IN = UNET + "input_blocks.0.0.weight"
_SD1_TOKEN_EMB = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight",  # legacy name, renamed by the WebUI
)
_SD2_TOKEN_EMB = "cond_stage_model.model.token_embedding.weight"
_SDXL_CLIP_L_TOKEN_EMB = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_BIGG_TOKEN_EMB = "conditioner.embedders.1.model.token_embedding.weight"

_CONTEXT_LABEL = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}
_IN_CHANNELS_LABEL = {
    9: "inpainting model (9 UNet input channels)",
    8: "InstructPix2Pix model (8 UNet input channels)",
    5: "depth-to-image model (5 UNet input channels)",
    7: "upscaler model (7 UNet input channels)",
}


def _refuse(name: str, looks_like: str, hint: str = _HINT_FULL) -> CheckpointError:
    return CheckpointError(f"{name} looks like {looks_like}, which is not supported; {SUPPORTED}", hint)


def _shape_of(value: Any) -> tuple[int, ...]:
    """Accept a shape, a ``(shape, dtype)`` pair as returned by ``read_header``, or a tensor."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return tuple(int(d) for d in value[0])
    shape = getattr(value, "shape", value)
    return tuple(int(d) for d in shape)


# ----------------------------------------------------------------------------------------- single files


def detect_ldm_family(shapes: Mapping[str, Any], name: str = "the checkpoint") -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a single-file checkpoint in the original (ldm/sgm) layout.

    ``shapes`` maps key -> shape (``read_header`` pairs and tensors are accepted too). ``sd2`` means SD 2.x of
    either prediction type; see :func:`resolve_v_prediction`. Anything else raises :class:`CheckpointError`
    naming what the file looks like.
    """
    sh = {k: _shape_of(v) for k, v in shapes.items()}
    keys = set(sh)
    if not keys:
        raise _refuse(name, "an empty file (no tensors)")
    _refuse_foreign(keys, name)

    if not any(k.startswith(UNET) for k in keys):
        raise _refuse(name, _describe_without_unet(keys), _HINT_FULL)

    conv_in = sh.get(_CONV_IN)
    if conv_in is None or len(conv_in) != 4:
        raise _refuse(name, f"a model with an unknown UNet layout (no 4-d {_CONV_IN})")
    context = _cross_attention_width(sh)
    family_label = _CONTEXT_LABEL.get(context or 0, "SD")
    in_ch = conv_in[1]
    if in_ch != 4:
        what = _IN_CHANNELS_LABEL.get(in_ch, f"model with {in_ch} UNet input channels")
        raise _refuse(name, f"an {family_label} {what}",
                      "choose the normal text-to-image version of the model (4 UNet input channels)")
    if context is None:
        raise _refuse(name, "a UNet without cross-attention (not a text-to-image Stable Diffusion model)")

    has_label_emb = any(k.startswith(UNET + "label_emb.") for k in keys)
    family = _family_from_text_encoders(sh, keys, context, has_label_emb, name)

    if not any(k.startswith(VAE) for k in keys):
        raise CheckpointError(f"{name} is an {FAMILIES[family].label} checkpoint without a VAE "
                              f"({VAE}* keys are missing)", "choose a full checkpoint that includes its VAE")
    logger.info("%s: detected %s (cross-attention width %d)", name, FAMILIES[family].label, context)
    return family


def _refuse_foreign(keys: set[str], name: str) -> None:
    """Refuse files that are clearly not a Stable Diffusion checkpoint at all."""
    lora_markers = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1", ".oft_")
    if any(k.startswith(("lora_unet_", "lora_te")) or any(m in k for m in lora_markers) for k in keys):
        raise _refuse(name, "a LoRA/LyCORIS file (an add-on, not a full model)",
                      "put it in the WebUI's Lora folder; train on the full base checkpoint instead")
    if keys & {"emb_params", "clip_l", "clip_g", "string_to_param"} and len(keys) <= 4:
        raise _refuse(name, "a textual-inversion embedding, not a full model",
                      "put it in the WebUI's embeddings folder; train on a full base checkpoint")
    if any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys):
        raise _refuse(name, "a Flux model")
    if any("joint_blocks." in k for k in keys):
        raise _refuse(name, "an SD3/SD3.5 (MMDiT) model")
    if any(k.startswith(UNET) and k[len(UNET):].startswith(("x_embedder", "t_embedder", "pos_embed")) for k in keys):
        raise _refuse(name, "a diffusion-transformer (DiT) model such as PixArt or SD3")


def _describe_without_unet(keys: set[str]) -> str:
    if any(k.startswith(("unet.", "down_blocks.", "conv_in.", "time_embedding.", "text_encoder.", "vae."))
           for k in keys):
        return "a diffusers-layout weights file (one part of a diffusers model folder)"
    rest = {k for k in keys if not k.startswith("model_ema.")}
    vae_prefixes = (VAE, "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    if rest and all(k.startswith(vae_prefixes) for k in rest):
        return "a VAE-only file"
    if rest and all(k.startswith(("cond_stage_model.", "conditioner.", "text_model.", "transformer.",
                                  "text_projection", "logit_scale")) for k in rest):
        return "a text-encoder-only file"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unknown model (no Stable Diffusion UNet '{UNET}*'; first keys: {sample})"


def _cross_attention_width(sh: Mapping[str, tuple[int, ...]]) -> int | None:
    widths = {shape[1] for k, shape in sh.items()
              if k.startswith(UNET) and k.endswith(".attn2.to_k.weight") and len(shape) == 2}
    if len(widths) > 1:
        raise CheckpointError(f"the UNet has mixed cross-attention widths {sorted(widths)}",
                              "the file is damaged or not a Stable Diffusion model")
    return widths.pop() if widths else None


def _family_from_text_encoders(sh: Mapping[str, tuple[int, ...]], keys: set[str], context: int,
                               has_label_emb: bool, name: str) -> str:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        has_clip_l = _SDXL_CLIP_L_TOKEN_EMB in keys
        has_big_g = _SDXL_BIGG_TOKEN_EMB in keys
        if has_clip_l and has_big_g and has_label_emb:
            text_width = sh[_SDXL_CLIP_L_TOKEN_EMB][-1] + sh[_SDXL_BIGG_TOKEN_EMB][-1]
            if text_width == context:
                return SDXL
            raise _refuse(name, f"an SDXL-like model whose text encoders (width {text_width}) do not match its "
                                f"UNet (cross-attention width {context})", "the file may be a broken merge; "
                          + _HINT_FULL)
        if not has_clip_l and any(k.startswith("conditioner.embedders.0.model.") for k in keys) and has_label_emb:
            raise _refuse(name, "an SDXL refiner (OpenCLIP bigG text encoder only)",
                          "train on SDXL base; the refiner is not a DreamBooth base model")
        raise _refuse(name, f"an SGM-layout model that is not SDXL base (cross-attention width {context}, "
                            f"CLIP-L {'present' if has_clip_l else 'missing'}, "
                            f"OpenCLIP bigG {'present' if has_big_g else 'missing'})")

    sd1_emb = next((sh[k] for k in _SD1_TOKEN_EMB if k in sh), None)
    sd2_emb = sh.get(_SD2_TOKEN_EMB)
    if sd1_emb is None and sd2_emb is None:
        label = "an SDXL UNet" if has_label_emb else f"an {_CONTEXT_LABEL.get(context, 'SD')} UNet"
        raise _refuse(name, f"{label} without its text encoder (a UNet-only file)")
    if any(k.startswith(("embedder.", "noise_augmentor.")) for k in keys) or has_label_emb:
        raise _refuse(name, f"an {_CONTEXT_LABEL.get(context, 'SD')} unCLIP / image-variation model")
    if sd1_emb is not None and sd2_emb is None:
        width = sd1_emb[-1] if sd1_emb else 0
        if width == context:
            return SD1
        raise _refuse(name, f"a model whose CLIP text encoder (width {width}) does not match its UNet "
                            f"(cross-attention width {context})", "the file may be a broken merge; " + _HINT_FULL)
    if sd2_emb is not None and sd1_emb is None:
        width = sd2_emb[-1] if sd2_emb else 0
        if width == context:
            return SD2
        raise _refuse(name, f"a model whose OpenCLIP text encoder (width {width}) does not match its UNet "
                            f"(cross-attention width {context})", "the file may be a broken merge; " + _HINT_FULL)
    raise _refuse(name, "a model with both an SD1 and an SD2 text encoder (a broken merge)")


def resolve_v_prediction(ckpt_path: Path, detected: str, explicit: str | None) -> str:
    """The final family id for a single-file checkpoint.

    For ``sd2``: an explicit ``"sd2"``/``"sd2v"`` wins; otherwise a ``<stem>.yaml`` beside the file (the WebUI's
    rule) with ``model.params.parameterization: "v"`` gives ``"sd2v"``, anything else ``"sd2"``. For sd1/sdxl an
    explicit choice of another family is an error.
    """
    ckpt_path = Path(ckpt_path)
    if explicit is not None and explicit not in FAMILY_IDS:
        raise CheckpointError(f"unknown model family {explicit!r}", f"use one of: {', '.join(FAMILY_IDS)}")
    if detected not in FAMILY_IDS:
        raise CheckpointError(f"unknown detected model family {detected!r}", f"use one of: {', '.join(FAMILY_IDS)}")
    name = ckpt_path.name
    if detected in (SD2, SD2V):
        if explicit in (SD2, SD2V):
            logger.info("%s: %s chosen explicitly", name, FAMILIES[explicit].label)
            return explicit
        if explicit is not None:
            raise _wrong_family(name, detected, explicit)
        yaml_path = ckpt_path.with_suffix(".yaml")
        if yaml_path.is_file():
            parameterization = _yaml_parameterization(yaml_path)
            family = SD2V if parameterization == "v" else SD2
            logger.info("%s: %s, from %s (parameterization %r)", name, FAMILIES[family].label, yaml_path.name,
                        parameterization)
            return family
        logger.info("%s: no %s beside it and no explicit choice; assuming %s. SD 2.x v-prediction cannot be "
                    "told from the keys: choose %r for a 768 v-prediction model", name, yaml_path.name,
                    FAMILIES[SD2].label, SD2V)
        return SD2
    if explicit is not None and explicit != detected:
        raise _wrong_family(name, detected, explicit)
    logger.info("%s: %s, from the checkpoint's keys", name, FAMILIES[detected].label)
    return detected


def _wrong_family(name: str, detected: str, explicit: str) -> CheckpointError:
    detected_label = "SD 2.x" if detected in (SD2, SD2V) else FAMILIES[detected].label
    return CheckpointError(f"{name} is an {detected_label} checkpoint, but {FAMILIES[explicit].label} was chosen",
                           f"choose {detected_label} as the model family, or pick a different checkpoint")


def _yaml_parameterization(yaml_path: Path) -> str:
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{yaml_path.name} (the config beside the checkpoint) cannot be read: {first}",
                              "fix or delete the .yaml file") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{yaml_path.name} (the config beside the checkpoint) is not a model config",
                              "fix or delete the .yaml file")
    model = config.get("model")
    params = model.get("params") if isinstance(model, dict) else None
    value = params.get("parameterization", "eps") if isinstance(params, dict) else "eps"
    if value not in ("eps", "v"):
        raise CheckpointError(f"{yaml_path.name} sets parameterization {value!r}; only 'eps' and 'v' are "
                              "supported", "fix or delete the .yaml file")
    return str(value)


# ------------------------------------------------------------------------------------- diffusers folders


def detect_diffusers_folder(folder: Path) -> str:
    """``"sd1"``, ``"sd2"``, ``"sd2v"`` or ``"sdxl"`` for a diffusers pipeline folder (``model_index.json``)."""
    folder = Path(folder)
    name = folder.name or str(folder)
    if not folder.exists():
        raise CheckpointError(f"model folder not found: {folder}", "check the path")
    if not folder.is_dir():
        raise CheckpointError(f"{name} is a file, not a diffusers model folder",
                              "load it as a single-file checkpoint instead")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{name} is not a diffusers model folder (no model_index.json)",
                              "choose a folder saved by diffusers' save_pretrained, or a .safetensors/.ckpt file")
    index = _read_json(index_path, name)
    pipeline = str(index.get("_class_name") or "diffusers pipeline")

    unet_path = folder / "unet" / "config.json"
    if not unet_path.is_file():
        if (folder / "transformer").is_dir():
            raise _refuse(name, f"a transformer-based {pipeline} (SD3, Flux, PixArt, ...)")
        raise CheckpointError(f"{name} has no unet/config.json", "the diffusers folder is incomplete; re-save it")
    unet = _read_json(unet_path, name)

    in_ch = unet.get("in_channels", 4)
    cad = unet.get("cross_attention_dim")
    if isinstance(cad, list):
        cad = cad[0] if len(set(cad)) == 1 else None
    if not isinstance(cad, int):
        raise _refuse(name, f"a {pipeline} with an unsupported UNet (cross_attention_dim "
                            f"{unet.get('cross_attention_dim')!r})")
    if in_ch != 4:
        what = _IN_CHANNELS_LABEL.get(in_ch, f"model with {in_ch} UNet input channels")
        raise _refuse(name, f"an {_CONTEXT_LABEL.get(cad, 'SD')} {what}",
                      "choose the normal text-to-image version of the model (4 UNet input channels)")

    has_te = _has_component(folder, index, "text_encoder")
    has_te2 = _has_component(folder, index, "text_encoder_2")
    prediction = _prediction_type(folder, name)

    # decided by structure, not absolute widths: CLIP-L (quick_gelu) for SD 1.x, OpenCLIP (gelu) for SD 2.x
    te_config = folder / "text_encoder" / "config.json"
    text_act = _read_json(te_config, name).get("hidden_act") if te_config.is_file() else None
    if has_te and has_te2 and unet.get("addition_embed_type") == "text_time":
        family = SDXL
    elif has_te2 and not has_te:
        raise _refuse(name, "an SDXL refiner (OpenCLIP bigG text encoder only)",
                      "train on SDXL base; the refiner is not a DreamBooth base model")
    elif has_te and not has_te2 and (text_act == "quick_gelu" or text_act is None and cad == 768):
        family = SD1
    elif has_te and not has_te2 and (text_act == "gelu" or text_act is None and cad == 1024):
        family = SD2V if prediction == "v_prediction" else SD2
    else:
        raise _refuse(name, f"a {pipeline} with cross_attention_dim {cad} "
                            f"(text_encoder {'present' if has_te else 'missing'}, "
                            f"text_encoder_2 {'present' if has_te2 else 'missing'})")

    if prediction not in (FAMILIES[family].prediction_type, None) and family != SD2V:
        raise _refuse(name, f"an {FAMILIES[family].label} model with {prediction} prediction")

    for component in FAMILIES[family].components:
        if not (folder / component / "config.json").is_file():
            raise CheckpointError(f"{name} is missing its {component} ({component}/config.json not found)",
                                  "the diffusers folder is incomplete; re-download or re-save it")
    logger.info("%s: detected %s from its diffusers configs (cross_attention_dim %d, prediction %s)", name,
                FAMILIES[family].label, cad, prediction or "epsilon (default)")
    return family


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: {path.parent.name}/{path.name} cannot be read: {exc}",
                              "the diffusers folder is damaged; re-download or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{name}: {path.parent.name}/{path.name} is not a JSON object",
                              "the diffusers folder is damaged; re-download or re-save it")
    return data


def _has_component(folder: Path, index: Mapping[str, Any], component: str) -> bool:
    entry = index.get(component)
    listed = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
    return listed or (folder / component / "config.json").is_file()


def _prediction_type(folder: Path, name: str) -> str | None:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        logger.info("%s: no scheduler/scheduler_config.json; assuming epsilon prediction", name)
        return None
    value = _read_json(path, name).get("prediction_type")
    return str(value) if value is not None else None
