"""WebUI install hook: installs only what is missing, never upgrading the WebUI's own libraries.

The WebUI runs this file (with its root on PYTHONPATH) while preparing its environment. Every pip call carries a
constraints file that pins the protected host packages at the versions installed right now, so pip fails rather
than upgrade torch, gradio, transformers & co. A failure here is reported by the WebUI, not fatal.
This file is self-contained on purpose: it must not import our package (the WebUI may hold another `dreambooth`).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import tempfile

# packages the WebUI owns: never upgraded, downgraded or reinstalled by us
PROTECTED = ("torch", "torchvision", "gradio", "transformers", "fastapi", "pydantic", "numpy", "Pillow",
             "safetensors", "huggingface_hub", "accelerate", "tokenizers", "protobuf", "starlette", "httpx",
             "open-clip-torch", "pytorch_lightning", "xformers")

# (distribution, pip requirement when missing, lowest supported, highest supported or None)
# diffusers: 0.29.2 to 0.31.0 import beside the WebUI's transformers 4.30.2; 0.32+ does not (HOST_API.md).
REQUIREMENTS = (
    ("diffusers", "diffusers==0.31.0", "0.29.2", "0.31.0"),
)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def constraints_text() -> str:
    """pip constraints pinning every protected package that is installed to its current version."""
    lines = []
    for dist in PROTECTED:
        version = installed_version(dist)
        if version is not None:
            lines.append(f"{dist}=={version}")
    return "\n".join(lines) + "\n"


def plan() -> tuple[list[str], list[str]]:
    """(pip requirements to install, warnings about installed versions we do not support)."""
    to_install, warnings = [], []
    for dist, requirement, low, high in REQUIREMENTS:
        version = installed_version(dist)
        if version is None:
            to_install.append(requirement)
        elif version_tuple(version) < version_tuple(low) or high and version_tuple(version) > version_tuple(high):
            warnings.append(f"[Dreambooth] {dist} {version} is installed, but this extension is tested with "
                            f"{low} to {high}; if the Dreambooth tab fails to load, run: "
                            f"pip install {requirement} (in the WebUI's venv)")
    return to_install, warnings


def main() -> None:
    import launch  # the WebUI's launcher module; only present when the WebUI runs this file

    to_install, warnings = plan()
    for warning in warnings:
        print(warning)
    if not to_install:
        return
    fd, constraints = tempfile.mkstemp(prefix="dreambooth-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(constraints_text())
        for requirement in to_install:
            launch.run_pip(f'install "{requirement}" -c "{constraints}"',
                           f"{requirement} for the Dreambooth extension")
    finally:
        os.unlink(constraints)


if __name__ == "__main__":  # the WebUI runs `python install.py` in a subprocess
    main()
