"""install.py installs only what is missing and pins the WebUI's own libraries with constraints."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def installer(monkeypatch):
    spec = importlib.util.spec_from_file_location("dreambooth_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def run_pip(args, desc=None):
        constraints = args.split('-c "')[1].rstrip('"')
        calls.append((args, desc, Path(constraints).read_text()))

    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=run_pip, is_installed=lambda p: True))
    return module, calls


def _versions(monkeypatch, module, versions):
    monkeypatch.setattr(module, "installed_version", lambda dist: versions.get(dist))


def test_missing_diffusers_is_installed_with_host_pins(installer, monkeypatch):
    module, calls = installer
    _versions(monkeypatch, module, {"torch": "2.1.2+cu121", "transformers": "4.30.2", "gradio": "3.41.2",
                                    "numpy": "1.26.2", "safetensors": "0.4.2"})
    module.main()
    assert len(calls) == 1
    args, _, constraints = calls[0]
    assert args.startswith('install "diffusers==0.31.0" -c ')
    for pin in ("torch==2.1.2+cu121", "transformers==4.30.2", "gradio==3.41.2", "numpy==1.26.2",
                "safetensors==0.4.2"):
        assert pin in constraints.splitlines()


def test_nothing_installed_when_present(installer, monkeypatch, capsys):
    module, calls = installer
    _versions(monkeypatch, module, {"diffusers": "0.30.3"})
    module.main()
    assert calls == [] and capsys.readouterr().out == ""


def test_unsupported_version_warns_and_changes_nothing(installer, monkeypatch, capsys):
    module, calls = installer
    _versions(monkeypatch, module, {"diffusers": "0.33.1"})
    module.main()
    assert calls == []
    out = capsys.readouterr().out
    assert "diffusers 0.33.1 is installed" in out and "pip install diffusers==0.31.0" in out


def test_no_torchvision_or_open_clip_requirement():
    text = (ROOT / "install.py").read_text() + "".join(p.read_text() for p in (ROOT / "requirements").glob("*.txt"))
    text += (ROOT / "pyproject.toml").read_text()
    requirement_lines = [line for line in text.splitlines() if "==" in line or line.strip().startswith('"')]
    assert not [line for line in requirement_lines if "torchvision" in line and "PROTECTED" not in line
                and "==" in line]
    assert "open-clip-torch==" not in text and "open_clip_torch" not in text
