"""``python -m bench quality --out FILE``: does training teach? A DreamBench-style table for every method.

One subject of the synthetic world (``world.py``) is trained into the tiny pretrained base model
(``assets/world-sd1.safetensors``) with each training method, through the same worker the Dreambooth tab starts
(``dreambooth.jobs.start``: ``python -m dreambooth train``). Each run's exported file (checkpoint, LoRA, embedding,
hypernetwork) is then loaded the way the ecosystem loads it (``stock.py``: diffusers' own single-file converter and
stock pipeline, the WebUI's LoRA and hypernetwork formulas) and sampled; the analyser reads the samples and
``measures.py`` turns them into subject fidelity, prompt fidelity, prior drift and diversity. The untrained base is
the row to beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import stock
from .measures import CLASS_PROMPT, MEASURES, SUBJECT_PROMPTS, measure
from .world import CLASS_WORD, SUBJECT_WORD, subject_images

log = logging.getLogger("bench.quality")

BASE_MODEL = Path(__file__).resolve().parent / "assets" / "world-sd1.safetensors"
INSTANCE_PROMPT = f"a {SUBJECT_WORD} {CLASS_WORD}"
CLASS_PROMPT_TEXT = f"a {CLASS_WORD}"

# every method's settings, on top of COMMON. Learning rates are set per method (the right ones differ by orders of
# magnitude); the step counts are what a user would run on five images.
COMMON = dict(resolution=64, mixed_precision="no", gradient_checkpointing=False, lr_scheduler="constant",
              lr_warmup_steps=0, save_every_n_epochs=0, preview_every_n_epochs=0, save_checkpoint=True,
              export_dtype="fp32", cache_latents=True, seed=1234)
METHODS: dict[str, dict] = {
    "dreambooth": dict(method="dreambooth", learning_rate=2e-4, epochs=60),
    "dreambooth_prior": dict(method="dreambooth", learning_rate=2e-4, epochs=60, prior_loss_weight=1.0,
                             concept=dict(num_class_images_per=4, class_prompt=CLASS_PROMPT_TEXT,
                                          class_infer_steps=20, class_guidance_scale=stock.GUIDANCE)),
    "lora": dict(method="lora", learning_rate=1e-3, epochs=60, lora_rank=8, lora_alpha=8.0),
    "textual_inversion": dict(method="textual_inversion", learning_rate=5e-3, epochs=60, embedding_token=SUBJECT_WORD,
                              embedding_init_word=CLASS_WORD, embedding_vectors=1),
    "hypernetwork": dict(method="hypernetwork", learning_rate=1e-3, epochs=60, hypernetwork_layer_structure="1, 2, 1"),
}


def write_instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(subject_images()):
        Image.fromarray(image).save(folder / f"{SUBJECT_WORD}_{i}.png")
    return folder


def sample_all(pipe, count: int, seed: int) -> dict[str, list[np.ndarray]]:
    prompts = [*(p.text for p in SUBJECT_PROMPTS), CLASS_PROMPT.text]
    return {text: stock.sample(pipe, text, count, seed + i) for i, text in enumerate(prompts)}


def subject_model(root: Path, name: str, settings: dict, base: Path = BASE_MODEL):
    """A model dir created from ``base`` (as the tab's Create does) with the subject as its concept and ``settings``
    (on top of COMMON; a ``concept`` entry holds concept settings)."""
    from dreambooth.config import Concept, load_config
    from dreambooth.create import create_model

    instances = root / "instances"
    if not instances.is_dir():
        write_instance_images(instances)
    md = create_model(base, name, root)
    cfg = load_config(md.path)
    settings = {**COMMON, **settings}
    concept = dict(instance_data_dir=str(instances), instance_prompt=INSTANCE_PROMPT, instance_token=SUBJECT_WORD,
                   class_token=CLASS_WORD, class_data_dir=str(root / f"class-{name}"), n_samples=0,
                   **settings.pop("concept", {}))
    cfg.concepts = [Concept(**concept)]
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.save(md.path)
    return md


def train_method(name: str, settings: dict, root: Path, base: Path, timeout: float) -> Path:
    """Create a model from the base, configure the method, train it in the tab's worker; the exported file."""
    from dreambooth import jobs

    md = subject_model(root, name, settings, base)
    jobs.start(md, models_root=root, device="cpu", export_dir=root / "Stable-diffusion", lora_dir=root / "Lora",
               embeddings_dir=root / "embeddings", hypernetworks_dir=root / "hypernetworks")
    status = jobs.wait(md, timeout)
    if status.get("state") != "done" or not status.get("last_export"):
        raise RuntimeError(f"{name}: training ended {status.get('state')!r}: {status.get('message', '')}\n"
                           f"{jobs.log_tail(md)}")
    return Path(status["last_export"])


def loader(method: str, base: Path, exported: Path, config_folder: Path) -> Callable[[], object]:
    """How the ecosystem loads what a training ``method`` exported, on top of the base where it is an add-on
    (``method`` "base": the base itself)."""

    def load():
        if method == "dreambooth":
            return stock.load_pipeline(exported, config_folder)
        pipe = stock.load_pipeline(base, config_folder)
        if method == "lora":
            stock.merge_kohya_lora(pipe, exported)
        elif method == "textual_inversion":
            stock.load_embedding(pipe, exported, SUBJECT_WORD)
        elif method == "hypernetwork":
            stock.hook_hypernetwork(pipe, exported)
        return pipe
    return load


def format_table(rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    header = f"{'method':<20}" + "".join(f"{m:>18}" for m in MEASURES) + f"{'train s':>10}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<20}" + "".join(f"{row[m]:>18.3f}" for m in MEASURES)
                     + (f"{seconds[name]:>10.0f}" if name in seconds else f"{'':>10}"))
    return "\n".join(lines)


def run(out: Path, methods: list[str], samples: int, seed: int, workdir: Path, base: Path = BASE_MODEL,
        timeout: float = 900.0) -> dict:
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    config_folder = stock.write_config_folder(workdir / "config", stock.file_configs(base))
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    pipe = loader("base", base, base, config_folder)()
    rows["base"] = measure(sample_all(pipe, samples, seed))
    log.info("base: %s", rows["base"])
    for name in methods:
        t = time.time()
        exported = train_method(name, METHODS[name], workdir / "models", base, timeout)
        seconds[name] = time.time() - t
        pipe = loader(METHODS[name]["method"], base, exported, config_folder)()
        rows[name] = measure(sample_all(pipe, samples, seed))
        log.info("%s (%.0f s training): %s", name, seconds[name], rows[name])
    result = {**rows, "_run": {
        "seconds_total": round(time.time() - started, 1), "seconds_training": {k: round(v, 1) for k, v in
                                                                                 seconds.items()},
        "load_average_before": load_before, "load_average_after": os.getloadavg() if load_before else None,
        "samples_per_prompt": samples, "seed": seed, "base_model": str(base),
        "subject_prompts": [p.text for p in SUBJECT_PROMPTS], "class_prompt": CLASS_PROMPT.text,
        "settings": {name: {**COMMON, **METHODS[name]} for name in methods},
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
    }}
    print(format_table(rows, seconds))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("quality.json"))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--samples", type=int, default=16, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="every method's epochs (default: each method's own)")
    p.add_argument("--base", type=Path, default=BASE_MODEL, help="the base checkpoint (default: the shipped one)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp dir)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.base.is_file():
        p.error(f"no base model at {args.base}: build it with `python -m bench.quality.pretrain --out {args.base}` "
                "(tens of minutes on a CPU), or pass --base FILE")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    # one thread, here and in the workers: on a busy CPU, torch's default of one thread per core leaves its threads
    # waiting on each other (a tiny model's step measured 20x slower with two threads on two loaded cores)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if args.epochs is not None:
        for settings in METHODS.values():
            settings["epochs"] = args.epochs
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.out, args.methods, args.samples, args.seed, args.workdir, args.base)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
            run(args.out, args.methods, args.samples, args.seed, Path(tmp), args.base)
    return 0
