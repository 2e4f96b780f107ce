"""Every file we write gets the normal mode (0666 less the umask; folders 0777 less the umask), like any file the
user creates, so a WebUI or a file server running as another user can read the LoRA, the checkpoint, the previews.
A temporary file from mkstemp (0600) renamed into place would keep 0600, and so would a file safetensors 0.5+
writes (it makes its files 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import make_training_model

from dreambooth.atomic import atomic_dir, write_bytes, write_json, write_with

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX; Windows files inherit ACLs")


@pytest.fixture()
def umask():
    """Sets the process umask for the test (and puts the old one back)."""
    old = os.umask(0o022)
    os.umask(old)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_give_the_umasks_mode(tmp_path, umask, mask):
    umask(mask)
    write_bytes(tmp_path / "a.bin", b"x")
    write_json(tmp_path / "sub" / "b.json", {"v": 1})

    def private(path: Path) -> None:  # a writer that replaces the file with a 0600 one, as safetensors 0.5+ does
        path.unlink(missing_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    write_with(tmp_path / "c.safetensors", private)
    write_bytes(tmp_path / "a.bin", b"again")  # replacing a file: the new one has the normal mode too
    with atomic_dir(tmp_path / "state") as folder:
        (folder / "inner.bin").write_bytes(b"z")
        (folder / "deeper").mkdir(mode=0o700)
        private(folder / "deeper" / "weights.safetensors")
    for name in ("a.bin", "sub/b.json", "c.safetensors", "state/inner.bin", "state/deeper/weights.safetensors"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, name
    for name in ("sub", "state", "state/deeper"):
        assert _mode(tmp_path / name) == 0o777 & ~mask, name


def test_a_training_run_writes_every_output_with_the_normal_mode(tmp_path, tiny_checkpoint, umask):
    """A LoRA run that creates its model, saves a resume state, makes previews, exports the LoRA and a merged
    checkpoint, and writes its config, status and loss log: each file is 0664 and each folder 0775 (umask 002)."""
    from dreambooth.train.loop import RunOptions, Trainer

    umask(0o002)
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="lora", lora_rank=4, images=2, epochs=2,
                             save_every_n_epochs=1, preview_every_n_epochs=1, save_checkpoint=True,
                             lora_merge_export=True)
    Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "Lora",
                           export_dir=tmp_path / "Stable-diffusion")).run()
    files = [p for root in (md.path, tmp_path / "Lora", tmp_path / "Stable-diffusion") for p in root.rglob("*")]
    kinds = {p.suffix for p in files if p.is_file()}
    assert {".safetensors", ".png", ".json", ".csv"} <= kinds, kinds
    assert list((tmp_path / "Lora").glob("*.safetensors")) and list((tmp_path / "Stable-diffusion").glob("m_*"))
    assert any(p.is_dir() for p in md.checkpoints.iterdir())  # a resume state
    wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in [md.path, *files]
             if _mode(p) != (0o775 if p.is_dir() else 0o664)}
    assert not wrong
