"""Speed and memory benchmarks: our trainer against a baseline loop written the way the common recipes write it.

``python -m bench --device cuda --matrix gpu --out bench_results.json`` (see ``bench/README.md``). Nothing here
touches the network: models are random weights in the real architectures, built from the configs shipped in
``dreambooth/assets``.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # a benchmark box may have no internet; never ask a hub for anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
