"""The command line: every command works end to end; errors are one line plus a hint, tracebacks only with --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_info_export(tmp_path, capsys, tiny_checkpoint):
    source = tiny_checkpoint("sdxl")
    root = str(tmp_path)
    code, out, _ = run(capsys, "create", str(source), "xl", "--models-root", root)
    assert code == 0 and "created" in out

    code, out, _ = run(capsys, "info", "xl", "--models-root", root, "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "sdxl" and info["ema"] is False
    assert set(info["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}

    code, out, _ = run(capsys, "info", str(source))
    assert code == 0 and "SDXL base" in out and "text_encoder_2=" in out

    code, out, _ = run(capsys, "export", "xl", "--models-root", root, "--dtype", "keep")
    exported = tmp_path / "Stable-diffusion" / "xl.safetensors"
    assert code == 0 and str(exported) in out
    a, b = load_file(str(source)), load_file(str(exported))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_info_of_a_checkpoint_with_ema(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "info", str(tiny_checkpoint("sd1", with_ema=True)), "--json")
    info = json.loads(out)
    assert code == 0 and info["ema"] is True and info["tensors"] == 1831


@pytest.mark.parametrize("argv, words", [
    (["create", "missing.safetensors", "m"], "does not exist"),
    (["info", "no-such-model"], "no model named"),
    (["export", "ghost"], "no model named"),
    (["create", "SRC", "../escape"], "model name"),
])
def test_errors_are_one_line_and_a_hint(tmp_path, capsys, tiny_checkpoint, argv, words):
    argv = [str(tiny_checkpoint("sd1")) if a == "SRC" else a for a in argv]
    code, out, err = run(capsys, *argv, "--models-root", str(tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("error: ") and words in lines[0]
    assert lines[1].startswith("hint: ") and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "--debug", "create", "missing.safetensors", "m", "--models-root", str(tmp_path))
    assert code == 2 and "Traceback" in err


def test_help_everywhere():
    for argv in ([], ["create"], ["export"], ["info"], ["demo"]):
        proc = subprocess.run([sys.executable, "-m", "dreambooth", *argv, "--help"], capture_output=True, text=True,
                              cwd=ROOT)
        assert proc.returncode == 0 and "usage:" in proc.stdout, argv


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"))
    assert code == 0 and "round trip exact" in out and "lower)" in out
    assert (tmp_path / "demo" / "models" / "Stable-diffusion" / "demo-sd1_90.safetensors").is_file()
    assert len(list((tmp_path / "demo" / "models" / "dreambooth" / "demo-sd1" / "samples").glob("*.png"))) == 6
