"""Write tiny random-weight single-file checkpoints of each family, in the real key layout.

    python tests/make_fixtures.py OUT_DIR [--dtype fp32|fp16] [--ema]

Writes tiny-sd1.safetensors, tiny-sd2.safetensors, tiny-sd2v.safetensors (+ .yaml), tiny-sdxl.safetensors.
The suite builds the same files itself (tests/conftest.py); this script is for trying things by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.families import FAMILY_IDS  # noqa: E402
from dreambooth.tiny import write_tiny_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--ema", action="store_true", help="add model_ema.* keys (SD 1.x / 2.x)")
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    for family in FAMILY_IDS:
        path = write_tiny_checkpoint(args.out / f"tiny-{family}.safetensors", family,
                                     with_ema=args.ema and family != "sdxl", dtype=dtype)
        print(path)


if __name__ == "__main__":
    main()
