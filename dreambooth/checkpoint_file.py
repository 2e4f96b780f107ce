"""Read single-file checkpoints (``.safetensors``, ``.ckpt``/``.pt``/``.pth``/``.bin``) safely.

* ``.safetensors``: the header is checked by hand before anything is loaded, so a truncated file or a
  header that lies about sizes gives a clear :class:`CheckpointError` instead of a cryptic library error.
* Pickle-based files are only ever opened with ``torch.load(..., weights_only=True)``; pickled code is never
  run. Files in the legacy (pre-1.6, non-zip) torch format and plain pickles are refused without unpickling.
* The result gets the same clean-up the WebUI applies (``modules/sd_models.get_state_dict_from_checkpoint``):
  a top-level ``"state_dict"`` is unwrapped and the legacy SD1 text-encoder keys are renamed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS

# safetensors dtype -> (bytes per element, torch dtype name as in ``str(torch.float16)`` without "torch.")
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "F64": (8, "float64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# modules/sd_models.py: checkpoint_dict_replacements_sd1 / checkpoint_dict_replacements_sd2_turbo
SD1_LEGACY_RENAMES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
SD2_TURBO_RENAMES = {"conditioner.embedders.0.": "cond_stage_model."}
_SD2_TURBO_MARKER = "conditioner.embedders.0.model.ln_final.weight"

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_HINT_REDOWNLOAD = "re-download or re-export it"
_HINT_CONVERT = "convert it to .safetensors from a trusted source, or download the .safetensors version of the model"

Header = dict[str, tuple[tuple[int, ...], str]]


# --------------------------------------------------------------------------------------------- public API


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint file onto the CPU, with WebUI-compatible key clean-up."""
    p = _check_file(path)
    if p.suffix.lower() in SAFETENSORS_EXTENSIONS:
        _validate_safetensors(p)
        try:
            from safetensors.torch import load_file

            raw: Mapping[str, Any] = load_file(str(p), device="cpu")
        except Exception as exc:  # the header was fine, so this is an I/O or library problem
            raise CheckpointError(f"{p.name} could not be read: {exc}", _HINT_REDOWNLOAD) from exc
    else:
        raw = _torch_load(p, mmap=False)
    state = _clean_state_dict(_unwrap(raw, p), p)
    logger.info("read %d tensors from %s", len(state), p)
    return state


def read_header(path: str | Path) -> Header:
    """Key -> (shape, dtype name such as ``"float16"``) without loading tensor data.

    ``.safetensors`` is read from its header; pickle-based files are opened memory-mapped where torch can.
    The same key clean-up as :func:`read_checkpoint` is applied, so the keys match.
    """
    p = _check_file(path)
    if p.suffix.lower() in SAFETENSORS_EXTENSIONS:
        header, _ = _validate_safetensors(p)
        shapes: Header = {
            key: (tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]][1])
            for key, info in header.items()
            if key != "__metadata__"
        }
        if not shapes:
            raise CheckpointError(f"{p.name} contains no tensors", "choose a model checkpoint file")
        return _rename_keys(shapes)
    state = _clean_state_dict(_unwrap(_torch_load(p, mmap=True), p), p)
    return {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in state.items()}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file; ``{}`` for other formats (nothing is loaded)."""
    p = _check_file(path)
    if p.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        return {}
    _, metadata = _validate_safetensors(p)
    return dict(metadata)


# ------------------------------------------------------------------------------------------- file checks


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}", "check the path, or refresh the model list")
    if p.is_dir():
        if (p / "model_index.json").is_file():
            raise CheckpointError(f"{p.name} is a diffusers folder, not a single checkpoint file",
                                  "load it as a diffusers model folder instead")
        raise CheckpointError(f"{p.name} is a folder, not a checkpoint file",
                              "choose a .safetensors or .ckpt file")
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise CheckpointError(f"{p.name} has an unsupported file type {ext or '(no extension)'!r}",
                              f"use one of: {', '.join(SUPPORTED_EXTENSIONS)}")
    try:
        size = p.stat().st_size
        with p.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"{p.name} cannot be opened: {exc.strerror or exc}",
                              "check the file's permissions") from exc
    if size == 0:
        raise CheckpointError(f"{p.name} is empty (0 bytes)", _HINT_REDOWNLOAD)
    return p


def _sniff(p: Path) -> tuple[str, str]:
    """(kind, description) of a file from its first bytes: kind is one of
    ``safetensors``, ``zip``, ``torch-legacy``, ``pickle`` or ``other``."""
    with p.open("rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip", "a PyTorch zip checkpoint"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy", "a PyTorch file in the legacy (pre-1.6, non-zip) format"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle", "a plain Python pickle"
    if len(head) >= 10:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":  # may still be truncated: checked later
            return "safetensors", "a safetensors file"
    return "other", _describe_foreign(head)


def _describe_foreign(head: bytes) -> str:
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"GIF8", "a GIF image"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
        (b"Rar!", "a RAR archive"),
        (b"GGUF", "a GGUF file"),
        (b"\x89HDF", "an HDF5 file"),
        (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded)"),
    )
    for magic, what in signatures:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "a web page (probably a failed download)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the end of the 512 bytes is still text
        try:
            head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return "unknown binary data"
    if any(b < 0x20 and b not in b"\t\n\r\f" for b in head):
        return "unknown binary data"
    if stripped.startswith((b"{", b"[")):
        return "a JSON/text file"
    return "a text file"


# ------------------------------------------------------------------------------------------- safetensors


def _validate_safetensors(p: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a safetensors file's header against the file; return (header, metadata)."""
    name = p.name
    size = p.stat().st_size
    kind, what = _sniff(p)
    if kind in ("zip", "torch-legacy", "pickle"):
        raise CheckpointError(f"{name} is not a safetensors file: it is {what}",
                              "rename it to .ckpt if it is a PyTorch checkpoint you trust")
    if kind == "other" and what != "unknown binary data":
        raise CheckpointError(f"{name} is not a safetensors file: it looks like {what}",
                              "choose the model file itself; " + _HINT_REDOWNLOAD)
    if size < 8:
        raise CheckpointError(f"{name} is truncated: {size} bytes, too short for a safetensors header",
                              _HINT_REDOWNLOAD)
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n < 2:
            raise CheckpointError(f"{name} is not a safetensors file (its first 8 bytes give a header length "
                                  f"of {n})", _HINT_REDOWNLOAD)
        if 8 + n > size:
            raise CheckpointError(f"{name} is truncated: header says it is {n} bytes long, file has "
                                  f"{size - 8} bytes after the length field", _HINT_REDOWNLOAD)
        raw_header = f.read(n)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name} is not a valid safetensors file: its header is not JSON ({exc})",
                              _HINT_REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is not a valid safetensors file: its header is not a JSON object",
                              _HINT_REDOWNLOAD)

    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(f"{name} has a corrupt safetensors header: {problem}", _HINT_REDOWNLOAD)

    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise corrupt("__metadata__ must map strings to strings")

    regions: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise corrupt(f"entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {key!r} has an unknown dtype {dtype!r} (written by a newer tool?)")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise corrupt(f"tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {key!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * SAFETENSORS_DTYPES[dtype][0]
        begin, end = offsets
        if end - begin != need:
            raise corrupt(f"tensor {key!r} is {dtype} {shape} ({need} bytes) but its data_offsets "
                          f"[{begin}, {end}] span {end - begin} bytes")
        regions.append((begin, end, key))

    data_size = size - 8 - n
    regions.sort()
    pos = 0
    prev_key = ""
    for begin, end, key in regions:
        if begin < pos:
            raise corrupt(f"tensors {prev_key!r} and {key!r} overlap (bytes {begin} to {min(end, pos)} "
                          "are claimed twice)")
        if begin > pos:
            if begin > data_size:
                break  # reported as truncation below
            raise corrupt(f"{begin - pos} bytes before tensor {key!r} (offset {pos}) belong to no tensor")
        pos = end
        prev_key = key
    total = max((end for _, end, _ in regions), default=0)
    if total > data_size:
        raise CheckpointError(f"{name} is truncated: header says {total} bytes of tensor data, file has "
                              f"{data_size}", _HINT_REDOWNLOAD)
    if total < data_size:
        raise corrupt(f"{data_size - total} bytes after the last tensor belong to no tensor")
    return header, metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ pickle files


class _Ignored:
    """Stand-in for harmless non-tensor objects found in training checkpoints (Lightning callbacks, numpy
    scalars). Building it runs no code from the file and keeps nothing; such entries are dropped later."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _ignored(*args: Any, **kwargs: Any) -> _Ignored:
    return _Ignored()


# Names that real SD training checkpoints (e.g. ``sd-v1-4.ckpt``, ``v1-5-pruned-emaonly.ckpt``) carry outside
# their state dict. They are mapped to inert stand-ins; anything else outside torch's own allowlist is refused.
_INERT_GLOBALS: dict[str, Callable[..., Any]] = {
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": _Ignored,
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint": _Ignored,
    "numpy.core.multiarray.scalar": _ignored,
    "numpy._core.multiarray.scalar": _ignored,
    "numpy.core.multiarray._reconstruct": _ignored,
    "numpy._core.multiarray._reconstruct": _ignored,
    "numpy.dtype": _ignored,
    "numpy.ndarray": _Ignored,
}


@contextmanager
def _inert_globals() -> Iterator[None]:
    """Allow the names in ``_INERT_GLOBALS`` as stand-ins, where torch supports named safe globals (>= 2.6)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if safe_globals is None or version < (2, 6):
        yield
        return
    with safe_globals([(obj, fqn) for fqn, obj in _INERT_GLOBALS.items()]):
        yield


def _check_torch_zip(p: Path) -> None:
    """A torch zip checkpoint has ``<archive>/data.pkl``; list the entries (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{p.name} is damaged or truncated: its zip archive cannot be read ({exc})",
                              _HINT_REDOWNLOAD) from None
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{p.name} is a zip archive but not a PyTorch checkpoint (no data.pkl inside)",
                              "choose the model file itself")


def _torch_load(p: Path, mmap: bool) -> Any:
    name = p.name
    kind, what = _sniff(p)
    if kind == "safetensors":
        raise CheckpointError(f"{name} is a safetensors file with a {p.suffix} extension",
                              "rename it to .safetensors")
    if kind in ("torch-legacy", "pickle"):
        raise CheckpointError(f"{name} is {what}; it was refused without unpickling, because only the zip "
                              "format can be loaded safely", _HINT_CONVERT)
    if kind != "zip":
        raise CheckpointError(f"{name} is not a PyTorch checkpoint: it looks like {what}",
                              "choose the model file itself; " + _HINT_REDOWNLOAD)
    _check_torch_zip(p)
    try:
        with _inert_globals():
            try:
                obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
            except (TypeError, RuntimeError) as exc:
                if not mmap or "mmap" not in str(exc):
                    raise
                logger.debug("%s: memory-mapped load not possible (%s); loading normally", name, exc)
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported class ([\w.]+)", text)
        detail = f" (it asks for {match.group(1)})" if match else ""
        logger.warning("refused %s: it references a Python global%s that weights_only loading does not allow",
                       p, detail)
        logger.debug("torch.load said: %s", text)
        raise CheckpointError(f"{name} contains code that was not run{detail}: only plain tensors are loaded "
                              "from pickle-based checkpoints, so it was refused", _HINT_CONVERT) from None
    except Exception as exc:  # torch raises many types for damaged files; all mean "cannot be read"
        text = str(exc)
        if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
            raise CheckpointError(f"{name} is damaged or truncated: {text.splitlines()[0] if text else exc!r}",
                                  _HINT_REDOWNLOAD) from None
        raise CheckpointError(f"{name} could not be read: {text.splitlines()[0] if text else exc!r}",
                              _HINT_REDOWNLOAD) from None
    if obj is None:
        # the WebUI's replacement torch.load returns None after its own safety check refused the file
        raise CheckpointError(f"{name} was refused by the WebUI's checkpoint safety check",
                              "convert it to .safetensors from a trusted source")
    return obj


# ---------------------------------------------------------------------------------------- key clean-up


def _unwrap(obj: Any, p: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p.name} does not contain a state dict (found {type(obj).__name__})",
                              "choose a model checkpoint file")
    if isinstance(obj.get("state_dict"), Mapping):
        logger.debug("%s: unwrapping top-level 'state_dict'", p.name)
        obj = obj["state_dict"]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.debug("%s: unwrapping top-level %r", p.name, key)
                obj = inner
                break
    return obj


def _clean_state_dict(obj: Mapping[str, Any], p: Path) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    dropped = [str(k) for k in obj if k not in tensors]
    if dropped:
        logger.debug("%s: ignoring %d non-tensor entries: %s", p.name, len(dropped), ", ".join(dropped[:10]))
    if not tensors:
        looks = ""
        if "string_to_param" in obj:
            looks = " (it looks like a textual-inversion embedding)"
        raise CheckpointError(f"{p.name} contains no tensors{looks}", "choose a model checkpoint file")
    return _rename_keys(tensors)


def _rename_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The WebUI's legacy renames: old SD1 text-encoder names, and SD 2.1 Turbo's SGM layout."""
    turbo = _SD2_TURBO_MARKER in state and _first_dim(state[_SD2_TURBO_MARKER]) == 1024
    renames = SD2_TURBO_RENAMES if turbo else SD1_LEGACY_RENAMES
    out: dict[str, Any] = {}
    renamed = 0
    for key, value in state.items():
        new = key
        for old, repl in renames.items():
            if new.startswith(old):
                new = repl + new[len(old):]
        renamed += new != key
        out[new] = value
    if renamed:
        logger.info("renamed %d legacy %s keys", renamed, "SD 2.1 Turbo" if turbo else "SD1 text-encoder")
    return out


def _first_dim(value: Any) -> int | None:
    shape = value[0] if isinstance(value, tuple) else getattr(value, "shape", None)
    return int(shape[0]) if shape else None

