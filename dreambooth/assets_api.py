"""Offline assets shipped with the extension: diffusers/transformers configs, the CLIP tokenizer, the ldm yaml.

Nothing here touches the network. The files live under ``dreambooth/assets``:

- ``clip/vocab.json``, ``clip/merges.txt``: the CLIP BPE tokenizer (49408 tokens), shared by every family
  (built by ``tools/build_tokenizer.py``).
- ``families/<sd1|sd2|sdxl>/``: ``unet.json``, ``vae.json``, ``text_encoder.json`` (``text_encoder_2.json`` for
  SDXL), ``scheduler.json``, ``tokenizer_config.json`` (``tokenizer_2_config.json`` for SDXL) and
  ``model_index.json``. ``sd2`` and ``sd2v`` share the ``sd2`` folder; the per-variant values (prediction type,
  UNet sample size, attention upcast) are filled in here.
- ``v2-inference-v.yaml``: the ldm config the WebUI needs beside an SD 2.x v-prediction single-file checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import write_bytes, write_json, write_text
from .families import SD2, SD2V, Family, get_family

log = logging.getLogger(__name__)

ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
CLIP_DIR: Path = ASSETS_DIR / "clip"
FAMILIES_DIR: Path = ASSETS_DIR / "families"
LDM_V_YAML: Path = ASSETS_DIR / "v2-inference-v.yaml"

COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
TOKENIZERS: tuple[str, ...] = ("tokenizer", "tokenizer_2")
DIFFUSERS_COMPONENTS: frozenset[str] = frozenset({"unet", "vae", "scheduler"})
TRANSFORMERS_COMPONENTS: frozenset[str] = frozenset({"text_encoder", "text_encoder_2"})

# Values that differ between the two SD 2.x variants sharing the ``sd2`` folder (hub repos
# stabilityai/stable-diffusion-2-1-base and stabilityai/stable-diffusion-2-1).
_SD2_UNET_OVERRIDES: dict[str, dict[str, Any]] = {
    SD2: {"sample_size": 64, "upcast_attention": False},
    SD2V: {"sample_size": 96, "upcast_attention": True},
}


@cache
def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@cache
def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _family(family: str) -> Family:
    return get_family(family)


def _asset(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"shipped asset missing: {path} (the extension install is incomplete)")
    return path


def _check_component(fam: Family, component: str) -> None:
    if component == "scheduler":
        return
    if component not in COMPONENTS or component not in fam.components:
        allowed = ", ".join((*fam.components, "scheduler"))
        raise ValueError(f"family {fam.id!r} has no component {component!r} (one of: {allowed})")


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def family_config(family: str, component: str) -> dict[str, Any]:
    """The config dict of one component of a family; a fresh copy the caller may change.

    ``component`` is one of ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` (SDXL only) or ``scheduler``.
    The scheduler's ``prediction_type`` is the family's (``v_prediction`` for ``sd2v``); the SD 2.x UNet gets the
    variant's ``sample_size`` (64 for 512 px ``sd2``, 96 for 768 px ``sd2v``) and ``upcast_attention``.
    """
    fam = _family(family)
    _check_component(fam, component)
    cfg = copy.deepcopy(_read_json(_asset(FAMILIES_DIR / fam.assets_dir / f"{component}.json")))
    if component == "scheduler":
        cfg["prediction_type"] = fam.prediction_type
    elif component == "unet" and fam.id in _SD2_UNET_OVERRIDES:
        cfg.update(_SD2_UNET_OVERRIDES[fam.id])
    return cfg


def write_component_config(family: str, component: str, dest_dir: Path) -> None:
    """Atomically write ``dest_dir/config.json`` (``scheduler_config.json`` for the scheduler).

    ``dest_dir`` is the component folder itself (e.g. ``<pipeline>/unet``). The library version key that
    ``save_pretrained`` would write (``_diffusers_version`` / ``transformers_version``) is added from the installed
    package when it is available.
    """
    cfg = family_config(family, component)
    if component in DIFFUSERS_COMPONENTS:
        version = _installed_version("diffusers")
        if version and "_diffusers_version" not in cfg:
            cfg = {"_class_name": cfg.pop("_class_name"), "_diffusers_version": version, **cfg}
    elif component in TRANSFORMERS_COMPONENTS:
        version = _installed_version("transformers")
        if version and "transformers_version" not in cfg:
            cfg["transformers_version"] = version
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    target = Path(dest_dir) / name
    write_json(target, cfg)
    log.debug("wrote %s config for %s to %s", component, family, target)


def tokenizer_config(family: str, name: str = "tokenizer") -> dict[str, Any]:
    """The ``tokenizer_config.json`` dict of a family's tokenizer (``tokenizer`` or ``tokenizer_2``); a copy."""
    fam = _family(family)
    if name not in TOKENIZERS or name not in fam.tokenizers:
        raise ValueError(f"family {fam.id!r} has no tokenizer {name!r} (one of: {', '.join(fam.tokenizers)})")
    return copy.deepcopy(_read_json(_asset(FAMILIES_DIR / fam.assets_dir / f"{name}_config.json")))


def special_tokens_map(family: str, name: str = "tokenizer") -> dict[str, str]:
    """The ``special_tokens_map.json`` dict matching :func:`tokenizer_config`."""
    cfg = tokenizer_config(family, name)
    return {key: cfg[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}


def write_tokenizer(family: str, name: str, dest_dir: Path) -> None:
    """Write a complete ``CLIPTokenizer`` folder into ``dest_dir`` (e.g. ``<pipeline>/tokenizer``).

    Files: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``, each written
    atomically. SD1 and SDXL ``tokenizer`` pad with ``<|endoftext|>``; SD2 and SDXL ``tokenizer_2`` pad with ``!``.
    """
    cfg = tokenizer_config(family, name)
    dest = Path(dest_dir)
    write_bytes(dest / "vocab.json", _read_bytes(_asset(CLIP_DIR / "vocab.json")))
    write_bytes(dest / "merges.txt", _read_bytes(_asset(CLIP_DIR / "merges.txt")))
    write_json(dest / "tokenizer_config.json", cfg)
    write_json(dest / "special_tokens_map.json", special_tokens_map(family, name))
    log.debug("wrote %s %s to %s", family, name, dest)


def model_index(family: str) -> dict[str, Any]:
    """The ``model_index.json`` template of a family (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``).

    Components the extension does not ship (safety checker, feature extractor, image encoder) are ``[null, null]``.
    """
    fam = _family(family)
    return copy.deepcopy(_read_json(_asset(FAMILIES_DIR / fam.assets_dir / "model_index.json")))


def write_model_index(family: str, dest_dir: Path) -> None:
    """Atomically write ``dest_dir/model_index.json`` (with ``_diffusers_version`` of the installed diffusers)."""
    index = model_index(family)
    version = _installed_version("diffusers")
    if version and "_diffusers_version" not in index:
        index = {"_class_name": index.pop("_class_name"), "_diffusers_version": version, **index}
    write_json(Path(dest_dir) / "model_index.json", index)


def ldm_yaml_text(family: str) -> str | None:
    """The ldm ``v2-inference-v.yaml`` text for ``sd2v``; ``None`` for families the WebUI detects by itself."""
    fam = _family(family)
    if fam.id != SD2V:
        return None
    return _read_bytes(_asset(LDM_V_YAML)).decode("utf-8")


def write_ldm_yaml(family: str, checkpoint: Path) -> Path | None:
    """Write the ldm yaml beside a single-file checkpoint (``model.safetensors`` -> ``model.yaml``) if needed."""
    text = ldm_yaml_text(family)
    if text is None:
        return None
    target = Path(checkpoint).with_suffix(".yaml")
    write_text(target, text)
    return target
