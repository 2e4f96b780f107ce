"""read_checkpoint / read_header / read_metadata: formats, WebUI key clean-up, and every refusal."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreambooth.checkpoint_file import read_checkpoint, read_header, read_metadata
from dreambooth.errors import CheckpointError

# Real SD1 key names (tests/reference/sd15_ldm_keys.tsv), tiny shapes.
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
TOKEN_EMB = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
FINAL_LN = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
ENC_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
VAE_CONV = "first_stage_model.decoder.conv_out.weight"
LEGACY = {
    TOKEN_EMB: "cond_stage_model.transformer.embeddings.token_embedding.weight",
    POS_IDS: "cond_stage_model.transformer.embeddings.position_ids",
    FINAL_LN: "cond_stage_model.transformer.final_layer_norm.weight",
    ENC_Q: "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight",
}


def tiny_sd1() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        CONV_IN: torch.randn(8, 4, 3, 3, generator=g).half(),
        TOKEN_EMB: torch.randn(10, 6, generator=g),
        POS_IDS: torch.arange(7).unsqueeze(0),
        FINAL_LN: torch.ones(6),
        ENC_Q: torch.randn(6, 6, generator=g).to(torch.bfloat16),
        VAE_CONV: torch.randn(3, 4, 3, 3, generator=g),
        "model_ema.decay": torch.tensor(0.9999),
        "betas": torch.zeros(0),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def raises(path: Path, *fragments: str, fn=read_checkpoint) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        fn(path)
    err = info.value
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert err.hint, err.message
    return err


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ------------------------------------------------------------------------------------------ happy paths


def test_safetensors_roundtrip_header_and_metadata(tmp_path: Path) -> None:
    sd = tiny_sd1()
    p = tmp_path / "model.safetensors"
    save_file(sd, str(p), metadata={"modelspec.title": "tiny", "ss_v2": "False"})
    assert_same(read_checkpoint(p), sd)
    header = read_header(p)
    assert header[CONV_IN] == ((8, 4, 3, 3), "float16")
    assert header[ENC_Q] == ((6, 6), "bfloat16")
    assert header[POS_IDS] == ((1, 7), "int64")
    assert header["model_ema.decay"] == ((), "float32")
    assert header["betas"] == ((0,), "float32")
    assert read_metadata(p) == {"modelspec.title": "tiny", "ss_v2": "False"}
    assert read_checkpoint(str(p)).keys() == sd.keys()  # str paths work too


def test_upper_case_extension(tmp_path: Path) -> None:
    sd = tiny_sd1()
    p = tmp_path / "MODEL.SafeTensors"
    save_file(sd, str(p))
    assert_same(read_checkpoint(p), sd)


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin"])
def test_torch_save_current_format_loads_weights_only(tmp_path: Path, ext: str) -> None:
    sd = tiny_sd1()
    p = tmp_path / f"model{ext}"
    torch.save(sd, p)  # current torch zip format (with .format_version etc.)
    assert_same(read_checkpoint(p), sd)
    assert read_header(p)[CONV_IN] == ((8, 4, 3, 3), "float16")
    assert read_metadata(p) == {}


def test_state_dict_unwrap_and_lightning_extras(tmp_path: Path) -> None:
    sd = tiny_sd1()
    p = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
                "callbacks": {"x": {"best": 1.0}}}, p)
    assert_same(read_checkpoint(p), sd)
    assert set(read_header(p)) == set(sd)


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_model_or_module_unwrap(tmp_path: Path, wrapper: str) -> None:
    sd = tiny_sd1()
    p = tmp_path / "wrapped.pt"
    torch.save({wrapper: sd, "step": 5}, p)
    assert_same(read_checkpoint(p), sd)


def test_model_key_not_unwrapped_when_top_level_has_tensors(tmp_path: Path) -> None:
    p = tmp_path / "flat.pt"
    torch.save({"a.weight": torch.ones(2), "model": {"b.weight": torch.zeros(2)}}, p)
    assert set(read_checkpoint(p)) == {"a.weight"}


def test_non_tensor_entries_are_dropped(tmp_path: Path) -> None:
    sd = tiny_sd1()
    p = tmp_path / "mixed.ckpt"
    torch.save({**sd, "note": "hello", "count": 3}, p)
    assert_same(read_checkpoint(p), sd)


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_legacy_sd1_rename(tmp_path: Path, ext: str) -> None:
    sd = tiny_sd1()
    legacy = {LEGACY.get(k, k): v for k, v in sd.items()}
    assert set(legacy) != set(sd)
    p = tmp_path / f"old{ext}"
    if ext == ".safetensors":
        save_file(legacy, str(p))
    else:
        torch.save({"state_dict": legacy}, p)
    assert_same(read_checkpoint(p), sd)
    assert set(read_header(p)) == set(sd)


def test_sd2_turbo_sgm_rename(tmp_path: Path) -> None:
    turbo = {
        "conditioner.embedders.0.model.ln_final.weight": torch.ones(1024),
        "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(3, 1024),
        CONV_IN: torch.zeros(2, 4, 3, 3),
    }
    p = tmp_path / "sd_turbo.safetensors"
    save_file(turbo, str(p))
    assert set(read_checkpoint(p)) == {"cond_stage_model.model.ln_final.weight",
                                       "cond_stage_model.model.token_embedding.weight", CONV_IN}
    # an SDXL-refiner-like file (bigG, width 1280) is left alone
    refiner = {"conditioner.embedders.0.model.ln_final.weight": torch.ones(1280)}
    q = tmp_path / "refiner.safetensors"
    save_file(refiner, str(q))
    assert set(read_header(q)) == set(refiner)


def test_lightning_callback_and_numpy_scalars_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real SD training checkpoints carry a pickled Lightning ModelCheckpoint and numpy scalars beside the
    state dict; those are read as inert stand-ins (torch >= 2.6), never by importing or calling the real class."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):
        pytest.skip("named safe globals need torch >= 2.6")
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    sd = tiny_sd1()
    p = tmp_path / "sd-v1-like.ckpt"
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: ModelCheckpoint()},
                "global_step": np.int64(470000), "lr": np.float64(1e-4), "arr": np.zeros(3)}, p)
    for fake in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, fake)
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):  # plain weights_only refuses it
        torch.load(p, weights_only=True)
    assert_same(read_checkpoint(p), sd)
    assert set(read_header(p)) == set(sd)


# --------------------------------------------------------------------------- malicious pickles: never run


class _OpenPayload:
    """Unpickling this calls builtins.open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_OpenPayload, _SystemPayload, _ExecPayload])
def test_malicious_ckpt_is_refused_and_never_runs(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned.txt"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd1(), "evil": payload(marker)}, p)
    assert zipfile.is_zipfile(p)
    err = raises(p, "evil.ckpt", "contains code that was not run")
    assert ".safetensors" in err.hint and "trusted" in err.hint
    assert not marker.exists()
    raises(p, "contains code that was not run", fn=read_header)
    assert not marker.exists()
    assert read_metadata(p) == {}  # nothing is unpickled for metadata
    assert not marker.exists()
    # the payload is real: an unsafe load (which the reader never does) would have run it
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_malicious_legacy_format_and_plain_pickle_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"x": _OpenPayload(marker)}, legacy, _use_new_zipfile_serialization=False)
    raises(legacy, "legacy (pre-1.6, non-zip) format", "refused without unpickling")
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"x": _OpenPayload(marker)}, protocol=4))
    raises(plain, "plain Python pickle", "refused without unpickling")
    raises(plain, "plain Python pickle", fn=read_header)
    assert not marker.exists()


def test_benign_legacy_format_is_refused_cleanly(tmp_path: Path) -> None:
    p = tmp_path / "old.pt"
    torch.save(tiny_sd1(), p, _use_new_zipfile_serialization=False)
    err = raises(p, "old.pt", "legacy")
    assert ".safetensors" in err.hint


# ----------------------------------------------------------------------------------- broken safetensors


def test_truncated_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    save_file(tiny_sd1(), str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    (n,) = struct.unpack("<Q", data[:8])
    full = len(data) - 8 - n
    err = raises(p, f"model.safetensors is truncated: header says {full} bytes of tensor data, "
                    f"file has {full - 100}")
    assert err.hint == "re-download or re-export it"
    raises(p, "is truncated", fn=read_header)
    raises(p, "is truncated", fn=read_metadata)


def test_truncated_inside_header(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    save_file(tiny_sd1(), str(p))
    p.write_bytes(p.read_bytes()[:40])
    raises(p, "is truncated", "header says it is")


def test_shorter_than_length_field(tmp_path: Path) -> None:
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    raises(p, "tiny.safetensors", "truncated")


def test_header_lies_about_size(tmp_path: Path) -> None:
    p = write_raw_safetensors(tmp_path / "liar.safetensors",
                              {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    raises(p, "liar.safetensors has a corrupt safetensors header", "'a' is F32 [4] (16 bytes)", "span 8 bytes")


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = write_raw_safetensors(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    raises(p, "overlap.safetensors", "'a' and 'b' overlap")
    raises(p, "overlap", fn=read_header)


def test_same_region_twice(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
              "b": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}
    p = write_raw_safetensors(tmp_path / "dup.safetensors", header, b"\0" * 4)
    raises(p, "overlap")


def test_offsets_beyond_file(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [1000, 1004]}}
    p = write_raw_safetensors(tmp_path / "far.safetensors", header, b"\0" * 4)
    raises(p, "is truncated: header says 1004 bytes of tensor data, file has 4")


def test_gap_and_trailing_bytes(tmp_path: Path) -> None:
    gap = write_raw_safetensors(tmp_path / "gap.safetensors",
                                {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8)
    raises(gap, "4 bytes before tensor 'a'", "belong to no tensor")
    tail = write_raw_safetensors(tmp_path / "tail.safetensors",
                                 {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 9)
    raises(tail, "5 bytes after the last tensor")


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, "unknown dtype 'F4'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [1]}, "invalid data_offsets"),
    ("nope", "is not an object"),
])
def test_invalid_header_entries(tmp_path: Path, entry: object, fragment: str) -> None:
    p = write_raw_safetensors(tmp_path / "bad.safetensors", {"a": entry}, b"\0" * 4)
    raises(p, "corrupt safetensors header", fragment)


def test_header_not_json_and_bad_metadata(tmp_path: Path) -> None:
    raw = b"{not json at all}"
    p = tmp_path / "nojson.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    raises(p, "header is not JSON")
    q = write_raw_safetensors(tmp_path / "meta.safetensors",
                              {"__metadata__": {"steps": 5}, "a": {"dtype": "U8", "shape": [1],
                                                                   "data_offsets": [0, 1]}}, b"\0")
    raises(q, "__metadata__ must map strings to strings", fn=read_metadata)


def test_empty_safetensors_has_no_tensors(tmp_path: Path) -> None:
    p = tmp_path / "empty_dict.safetensors"
    save_file({}, str(p))
    raises(p, "contains no tensors")
    raises(p, "contains no tensors", fn=read_header)
    assert read_metadata(p) == {}


# ----------------------------------------------------------------------------- not a checkpoint at all

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
@pytest.mark.parametrize(("content", "fragment"), [
    (PNG_BYTES, "a PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(40), "a JPEG image"),
    (b"These are my training notes.\nStep 1: ...\n" * 3, "a text file"),
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "a web page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n", "Git LFS pointer"),
    (bytes([7, 200, 13, 250, 99, 1, 0, 2, 255, 254, 253, 17]) * 8, "unknown binary data"),
])
def test_foreign_files_renamed(tmp_path: Path, ext: str, content: bytes, fragment: str) -> None:
    p = tmp_path / f"photo{ext}"
    p.write_bytes(content)
    err = raises(p, "photo" + ext)
    assert fragment in err.message or (fragment == "unknown binary data" and "not a safetensors file" in err.message)
    raises(p, fn=read_header)


def test_zip_ckpt_named_safetensors_and_vice_versa(tmp_path: Path) -> None:
    sd = tiny_sd1()
    zipped = tmp_path / "really_a_ckpt.safetensors"
    torch.save(sd, zipped)
    err = raises(zipped, "is not a safetensors file", "PyTorch zip checkpoint")
    assert ".ckpt" in err.hint
    st = tmp_path / "really_st.ckpt"
    save_file(sd, str(st))
    err = raises(st, "is a safetensors file with a .ckpt extension")
    assert "rename it to .safetensors" in err.hint


def test_damaged_zip_and_foreign_zip(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save(tiny_sd1(), good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:300])
    raises(cut, "cut.ckpt is damaged or truncated")
    other = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hello")
    raises(other, "archive.ckpt is a zip archive but not a PyTorch checkpoint")


def test_not_a_state_dict(tmp_path: Path) -> None:
    p = tmp_path / "list.pt"
    torch.save([torch.ones(2)], p)
    raises(p, "does not contain a state dict (found list)")
    q = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "tok", "step": 100}, q)
    raises(q, "contains no tensors", "textual-inversion embedding")


def test_empty_missing_directory_and_extension(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    err = raises(empty, "empty.safetensors is empty (0 bytes)")
    assert err.hint == "re-download or re-export it"
    empty_ckpt = tmp_path / "empty.ckpt"
    empty_ckpt.touch()
    raises(empty_ckpt, "is empty")
    raises(tmp_path / "nope.safetensors", "checkpoint not found", fn=read_header)
    raises(tmp_path / "nope.ckpt", "checkpoint not found", fn=read_metadata)
    folder = tmp_path / "models.safetensors"
    folder.mkdir()
    raises(folder, "is a folder, not a checkpoint file")
    pipeline = tmp_path / "my-diffusers-model"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    raises(pipeline, "is a diffusers folder")
    for name in ("model.gguf", "model.onnx", "model"):
        f = tmp_path / name
        f.write_bytes(b"\0" * 16)
        raises(f, "unsupported file type")


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    p = tmp_path / "locked.safetensors"
    save_file(tiny_sd1(), str(p))
    p.chmod(0)
    try:
        raises(p, "cannot be opened")
    finally:
        p.chmod(0o600)


def test_webui_refusal_returning_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the WebUI, torch.load is replaced by a checker that returns None for files it refuses."""
    p = tmp_path / "new_format.ckpt"
    torch.save(tiny_sd1(), p)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    raises(p, "refused by the WebUI's checkpoint safety check")
