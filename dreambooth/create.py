"""Create a trainable model dir from a single-file checkpoint or a diffusers folder.

Everything is built in a temporary folder beside the target and renamed into place at the end, so a bad input or a
crash leaves no model dir behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from .atomic import atomic_dir
from .checkpoint_file import read_checkpoint, read_metadata
from .config import FILE_DTYPES, TrainConfig
from .dtypes import torch_dtype
from .errors import CheckpointError, StoreError, UserError
from .families import SD2, SD2V, get_family
from .families.architecture import check_shapes, configs_from_metadata, default_configs
from .families.detect import detect_diffusers_folder, detect_ldm_family, resolve_v_prediction
from .families.layout import split_ldm
from .store import SUBDIRS, ModelDir, model_dir
from .working import CONFIG_COMPONENT, read_component, read_configs, write_working

log = logging.getLogger(__name__)



def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


Loaded = tuple[str, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, dict]]


def load_source(source: Path, family: str | None = None, extract_ema: bool = False) -> Loaded:
    """Read a single-file checkpoint or diffusers folder into (family, components, extras, configs).

    The weights are checked against the architecture before anything is written.
    """
    fam_id, components, extras, configs = _read_source(source, family, extract_ema)
    label = get_family(fam_id).label
    for component, tensors in components.items():
        check_shapes(component, configs[CONFIG_COMPONENT.get(component, component)], tensors, label)
    return fam_id, components, extras, configs


def _read_source(source: Path, family: str | None, extract_ema: bool) -> Loaded:
    if source.is_dir():
        detected = detect_diffusers_folder(source)
        if family is not None and family != detected and {family, detected} != {SD2, SD2V}:
            raise CheckpointError(f"{source.name} is a {get_family(detected).label} model, not "
                                  f"{get_family(family).label}", "leave the model type on auto-detect")
        fam = get_family(family or detected)
        components = {c: read_component(source / c, c) for c in fam.components}
        if extract_ema and (source / "unet_ema").is_dir():
            components["unet"] = read_component(source / "unet_ema", "unet_ema")
        return fam.id, components, {}, read_configs(source, fam.components)

    state = read_checkpoint(source)
    detected = detect_ldm_family({k: tuple(v.shape) for k, v in state.items()})
    fam_id = resolve_v_prediction(source, detected, family)
    components, extras = split_ldm(state, fam_id)
    if extract_ema:
        if "unet_ema" not in components:
            raise CheckpointError(f"{source.name} has no EMA weights to extract",
                                  "turn 'extract EMA' off; this file holds only one set of UNet weights")
        components["unet"] = components.pop("unet_ema")
        for key in ("model_ema.decay", "model_ema.num_updates"):
            extras.pop(key, None)
    configs = configs_from_metadata(read_metadata(source), fam_id) or default_configs(fam_id)
    return fam_id, components, extras, configs


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def create_model(source: str | os.PathLike[str], name: str, root: str | os.PathLike[str] | None = None, *,
                 family: str | None = None, extract_ema: bool = False, dtype: str = "keep",
                 compute_hash: bool = True) -> ModelDir:
    """Create ``<root>/dreambooth/<name>/`` from ``source``. Returns the new model dir."""
    if dtype not in FILE_DTYPES:
        raise UserError(f"unknown working dtype {dtype!r}", f"use one of: {', '.join(FILE_DTYPES)}")
    if family is not None:
        get_family(family)
    target = model_dir(name, root)
    if target.path.exists():
        raise StoreError(f"a model named {name!r} already exists at {target.path}",
                         "pick another name, or delete the old model dir first")
    source = Path(source).expanduser()
    if not source.exists():
        raise CheckpointError(f"source checkpoint {source} does not exist",
                              "pick a file from the checkpoint list or give the full path")

    fam_id, components, extras, configs = load_source(source, family, extract_ema)
    cast = torch_dtype(dtype)
    components = {c: _cast(t, cast) for c, t in components.items()}
    log.info("creating %s model %r from %s", get_family(fam_id).label, name, source)

    cfg = TrainConfig(model_name=name, family=fam_id, source_checkpoint=str(source.resolve()),
                      source_sha256=file_sha256(source) if compute_hash and source.is_file() else "")
    cfg.resolution = get_family(fam_id).resolution
    with atomic_dir(target.path) as tmp:
        for sub in SUBDIRS:
            (tmp / sub).mkdir()
        write_working(tmp / "working", fam_id, components, extras, configs)
        cfg.save(tmp)
    log.info("created %s", target.path)
    return target
