"""install.py installs only what is missing (diffusers, and the bitsandbytes release that accepts the installed torch)
and pins the WebUI's own libraries, torch first, with constraints; inside the WebUI through ``launch.run_pip``, run by
hand through pip in a subprocess."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_installer():
    spec = importlib.util.spec_from_file_location("dreambooth_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def installer(monkeypatch):
    """install.py with the WebUI's ``launch`` module stood in; ``calls``: (pip args, desc, constraints text)."""
    module = load_installer()
    calls = []

    def run_pip(args, desc=None):
        constraints = args.split('-c "')[1].rstrip('"')
        calls.append((args, desc, Path(constraints).read_text()))

    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=run_pip, is_installed=lambda p: True))
    return module, calls


def _versions(monkeypatch, module, versions):
    monkeypatch.setattr(module, "installed_version", lambda dist: versions.get(dist))


WEBUI = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "gradio": "3.41.2", "numpy": "1.26.2",
         "safetensors": "0.4.2"}


def test_webui_torch_gets_diffusers_and_bitsandbytes_0_45_5_with_torch_pinned(installer, monkeypatch):
    module, calls = installer
    _versions(monkeypatch, module, WEBUI)
    assert module.plan() == (["diffusers==0.31.0"], [], ["bitsandbytes==0.45.5"])
    module.main()
    assert [args.split(" -c ")[0] for args, _, _ in calls] == ['install "diffusers==0.31.0"',
                                                              'install "bitsandbytes==0.45.5"']
    for _, _, constraints in calls:
        for pin in ("torch==2.1.2+cu121", "transformers==4.30.2", "gradio==3.41.2", "numpy==1.26.2",
                    "safetensors==0.4.2"):
            assert pin in constraints.splitlines()


def test_numpy_stays_below_2_beside_an_old_torch_when_none_is_installed(installer, monkeypatch):
    module, _ = installer
    _versions(monkeypatch, module, {"torch": "2.1.2"})  # a bare venv: diffusers would pull NumPy 2
    assert "numpy<2" in module.constraints_text().splitlines()
    _versions(monkeypatch, module, {"torch": "2.1.2", "numpy": "1.26.2"})
    assert "numpy<2" not in module.constraints_text() and "numpy==1.26.2" in module.constraints_text()
    _versions(monkeypatch, module, {"torch": "2.13.0"})
    assert "numpy" not in module.constraints_text()


@pytest.mark.parametrize(("torch", "release"), [("2.13.0+cpu", "0.50.2"), ("2.4.0", "0.50.2"), ("2.3.1", "0.49.2"),
                                                ("2.2.2+cu121", "0.47.0"), ("2.1.2", "0.45.5"), ("2.0.1", "0.45.5")])
def test_bitsandbytes_release_follows_the_installed_torch(installer, monkeypatch, torch, release):
    module, _ = installer
    _versions(monkeypatch, module, {"torch": torch, "diffusers": "0.31.0"})
    assert module.plan() == ([], [], [f"bitsandbytes=={release}"])


@pytest.mark.parametrize("torch", ["1.13.1", "3.0.0", None])
def test_no_bitsandbytes_without_a_release_for_this_torch(installer, monkeypatch, capsys, torch):
    module, calls = installer
    _versions(monkeypatch, module, {"torch": torch, "diffusers": "0.31.0"})
    module.main()
    assert calls == []
    assert "8-bit AdamW will train as plain AdamW" in capsys.readouterr().out


def test_no_bitsandbytes_on_macos(installer):
    module, _ = installer
    assert isinstance(module.bitsandbytes_requirement("2.1.2", platform="darwin"), str)
    assert module.bitsandbytes_requirement("2.1.2", platform="win32")[1] == "bitsandbytes==0.45.5"


@pytest.mark.parametrize("bnb", ["0.45.5", "0.44.1", "0.43.0"])
def test_installed_bitsandbytes_in_range_is_left_alone(installer, monkeypatch, capsys, bnb):
    module, calls = installer
    _versions(monkeypatch, module, {**WEBUI, "diffusers": "0.31.0", "bitsandbytes": bnb})
    module.main()
    assert calls == [] and capsys.readouterr().out == ""


@pytest.mark.parametrize("bnb", ["0.50.2", "0.42.0"])
def test_installed_bitsandbytes_out_of_range_warns_and_changes_nothing(installer, monkeypatch, capsys, bnb):
    module, calls = installer
    _versions(monkeypatch, module, {**WEBUI, "diffusers": "0.31.0", "bitsandbytes": bnb})
    module.main()
    assert calls == []
    out = capsys.readouterr().out
    assert f"bitsandbytes {bnb} is installed" in out and "pip install bitsandbytes==0.45.5" in out


def test_unsupported_diffusers_warns_and_changes_nothing(installer, monkeypatch, capsys):
    module, calls = installer
    _versions(monkeypatch, module, {**WEBUI, "diffusers": "0.33.1", "bitsandbytes": "0.45.5"})
    module.main()
    assert calls == []
    out = capsys.readouterr().out
    assert "diffusers 0.33.1 is installed" in out and "pip install diffusers==0.31.0" in out


def test_a_failing_bitsandbytes_install_does_not_stop_the_webui(installer, monkeypatch, capsys):
    module, _ = installer
    _versions(monkeypatch, module, {**WEBUI, "diffusers": "0.31.0"})

    def run_pip(args, desc=None):
        raise RuntimeError("Couldn't install bitsandbytes")

    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(run_pip=run_pip))
    module.main()  # returns: the tab works, 8-bit AdamW falls back
    assert "could not install bitsandbytes==0.45.5" in capsys.readouterr().out
    _versions(monkeypatch, module, WEBUI)
    with pytest.raises(RuntimeError):  # diffusers is not optional: the WebUI reports the failure
        module.main()


def test_run_by_hand_pip_runs_in_a_subprocess_with_the_same_constraints(monkeypatch):
    module = load_installer()
    monkeypatch.setitem(sys.modules, "launch", None)  # not inside the WebUI: `import launch` fails
    _versions(monkeypatch, module, WEBUI)
    runs = []

    def run(cmd, check):
        runs.append((cmd, Path(cmd[cmd.index("-c") + 1]).read_text()))

    monkeypatch.setattr(module.subprocess, "run", run)
    module.main()
    assert [cmd[:5] for cmd, _ in runs] == [[sys.executable, "-m", "pip", "install", "diffusers==0.31.0"],
                                           [sys.executable, "-m", "pip", "install", "bitsandbytes==0.45.5"]]
    assert all("torch==2.1.2+cu121" in constraints.splitlines() for _, constraints in runs)


def test_requirement_files_pin_what_install_py_installs():
    """CI runs what a WebUI user gets: the host profile's torch 2.1.2 -> 0.45.5, the current profile's -> 0.50.2."""
    module = load_installer()

    def pin(profile):
        return re.search(r"^bitsandbytes==(\S+)", (ROOT / "requirements" / f"{profile}.txt").read_text(), re.M)[1]

    assert module.bitsandbytes_requirement("2.1.2")[1] == f"bitsandbytes=={pin('host')}" == "bitsandbytes==0.45.5"
    assert module.bitsandbytes_requirement("2.13.0")[1] == f"bitsandbytes=={pin('current')}" == "bitsandbytes==0.50.2"


def test_no_torchvision_or_open_clip_requirement():
    text = (ROOT / "install.py").read_text() + "".join(p.read_text() for p in (ROOT / "requirements").glob("*.txt"))
    text += (ROOT / "pyproject.toml").read_text()
    requirement_lines = [line for line in text.splitlines() if "==" in line or line.strip().startswith('"')]
    assert not [line for line in requirement_lines if "torchvision" in line and "PROTECTED" not in line
                and "==" in line]
    assert "open-clip-torch==" not in text and "open_clip_torch" not in text
