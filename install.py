"""WebUI install hook: installs only what is missing, never upgrading the WebUI's own libraries.

The WebUI runs this file (with its root on PYTHONPATH) while preparing its environment. Every pip call carries a
constraints file that pins the protected host packages at the versions installed right now, so pip fails rather
than upgrade torch, gradio, transformers & co. A failure here is reported by the WebUI, not fatal. Run by hand
(``python install.py`` in a venv, where the WebUI's ``launch`` module is missing), it runs pip itself, with the same
constraints. This file is self-contained on purpose: it must not import our package (the WebUI may hold another
`dreambooth`).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

# packages the WebUI owns: never upgraded, downgraded or reinstalled by us
PROTECTED = ("torch", "torchvision", "gradio", "transformers", "fastapi", "pydantic", "numpy", "Pillow",
             "safetensors", "huggingface_hub", "accelerate", "tokenizers", "protobuf", "starlette", "httpx",
             "open-clip-torch", "pytorch_lightning", "xformers")

# diffusers: 0.29.2 to 0.31.0 import beside the WebUI's transformers 4.30.2; 0.32+ does not (HOST_API.md).
DIFFUSERS = ("diffusers", "diffusers==0.31.0", "0.29.2", "0.31.0")

# bitsandbytes (8-bit AdamW, the "fits in 6 GB / 8 GB" profiles): the newest release whose torch requirement accepts
# the installed torch, as (lowest torch, release), newest first. Read off the wheels' Requires-Dist on PyPI, all
# with Linux and Windows (win_amd64) wheels: 0.50.x torch>=2.4 (also runs 8-bit AdamW on the CPU); 0.48-0.49
# torch>=2.3; 0.46-0.47 torch>=2.2; 0.45.5 torch>=2.0 (the WebUI v1.10.1's torch 2.1.2; GPU only); all torch<3.
BITSANDBYTES_FOR_TORCH = (((2, 4), "0.50.2"), ((2, 3), "0.49.2"), ((2, 2), "0.47.0"), ((2, 0), "0.45.5"))
BITSANDBYTES_TORCH_BELOW = (3, 0)
BITSANDBYTES_LOWEST = "0.43.0"  # an installed release older than this is reported, not replaced

Requirement = tuple[str, str, str, str | None]  # (distribution, pip requirement when missing, lowest, highest)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def constraints_text() -> str:
    """pip constraints pinning every protected package that is installed to its current version (and NumPy below 2
    beside a torch older than 2.3, built against NumPy 1, when no NumPy is installed yet)."""
    lines = []
    for dist in PROTECTED:
        version = installed_version(dist)
        if version is not None:
            lines.append(f"{dist}=={version}")
    torch = installed_version("torch")
    if torch is not None and version_tuple(torch)[:2] < (2, 3) and installed_version("numpy") is None:
        lines.append("numpy<2")
    return "\n".join(lines) + "\n"


def bitsandbytes_requirement(torch_version: str | None, platform: str = sys.platform) -> Requirement | str:
    """The bitsandbytes requirement for this torch, or why there is none (8-bit AdamW then falls back to AdamW)."""
    if platform == "darwin":
        return "bitsandbytes is not installed on macOS (no release for the WebUI's torch there)"
    if torch_version is None:
        return "torch is not installed, so no bitsandbytes release can be chosen"
    torch = version_tuple(torch_version)[:2]
    if torch < BITSANDBYTES_TORCH_BELOW:
        for index, (lowest_torch, release) in enumerate(BITSANDBYTES_FOR_TORCH):
            if torch >= lowest_torch:
                highest = None if index == 0 else release  # newer releases need a newer torch
                return ("bitsandbytes", f"bitsandbytes=={release}", BITSANDBYTES_LOWEST, highest)
    return f"no bitsandbytes release is known to accept torch {torch_version}"


def plan() -> tuple[list[str], list[str], list[str]]:
    """(pip requirements to install, warnings about installed versions we do not support, optional requirements
    to install: a failure there only costs a feature)."""
    to_install, warnings, optional = [], [], []
    bitsandbytes = bitsandbytes_requirement(installed_version("torch"))
    if isinstance(bitsandbytes, str):
        warnings.append(f"[Dreambooth] {bitsandbytes}; 8-bit AdamW will train as plain AdamW")
    for requirement in (DIFFUSERS, bitsandbytes):
        if isinstance(requirement, str):
            continue
        dist, pip_requirement, low, high = requirement
        version = installed_version(dist)
        if version is None:
            (to_install if requirement is DIFFUSERS else optional).append(pip_requirement)
        elif version_tuple(version) < version_tuple(low) or high and version_tuple(version) > version_tuple(high):
            warnings.append(f"[Dreambooth] {dist} {version} is installed, but this extension is tested with "
                            f"{low} to {high or 'newer'}; if the Dreambooth tab fails to load, run: "
                            f"pip install {pip_requirement} (in the WebUI's venv)")
    return to_install, warnings, optional


def pip_installer() -> Callable[[str, str], None]:
    """``install(requirement, constraints_path)``: the WebUI's ``launch.run_pip`` inside the WebUI, else pip in a
    subprocess of this Python (run by hand)."""
    try:
        import launch  # the WebUI's launcher module; only present when the WebUI runs this file
    except ImportError:
        def install(requirement: str, constraints: str) -> None:
            print(f"[Dreambooth] installing {requirement}")
            subprocess.run([sys.executable, "-m", "pip", "install", requirement, "-c", constraints], check=True)

        return install

    def run_pip(requirement: str, constraints: str) -> None:
        launch.run_pip(f'install "{requirement}" -c "{constraints}"', f"{requirement} for the Dreambooth extension")

    return run_pip


def main() -> None:
    to_install, warnings, optional = plan()
    for warning in warnings:
        print(warning)
    if not to_install and not optional:
        return
    install = pip_installer()
    torch_before = installed_version("torch")
    fd, constraints = tempfile.mkstemp(prefix="dreambooth-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(constraints_text())
        for requirement in to_install:
            install(requirement, constraints)
        for requirement in optional:
            try:
                install(requirement, constraints)
            except Exception as err:  # noqa: BLE001 - an optional package: the WebUI starts, the feature is missing
                print(f"[Dreambooth] could not install {requirement} ({type(err).__name__}: {err}); 8-bit AdamW "
                      "will train as plain AdamW")
    finally:
        os.unlink(constraints)
    if installed_version("torch") != torch_before:  # the constraints make this impossible; say so loudly if not
        print(f"[Dreambooth] WARNING: torch changed from {torch_before} to {installed_version('torch')}")


if __name__ == "__main__":  # the WebUI runs `python install.py` in a subprocess
    main()
