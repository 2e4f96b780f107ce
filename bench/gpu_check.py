"""``python -m bench.gpu_check --out DIR``: the one-call GPU check (bench/README.md, "The one-call GPU check").

On one CUDA GPU, in one command of under 8 minutes: the paths only a GPU runs, each through our real trainer,
then as much of the GPU benchmark matrix as the time budget leaves, written as one table (``DIR/gpu_check.txt``)
and JSON (``DIR/gpu_check.json``).

Checks (each PASS, FAIL or SKIP with its reason and numbers):
- ``fp16_grad_scaler``: full-size SD 1.5 at 256 px, fp16 mixed precision (autocast + GradScaler): every logged loss
  and every trained weight finite, the scale still above 1.
- ``adamw_8bit``: the same with bitsandbytes' 8-bit AdamW: the optimizer that ran is AdamW8bit, with uint8 states in
  the resume state, and no fallback note.
- ``resume_exact``: tiny SD 1.x LoRA with dropout (draws from the CUDA generator): cancel after a save, resume, and
  compare with an uninterrupted run; two uninterrupted runs are compared too, so a non-deterministic kernel is told
  apart from a resume that lost state.
- ``sdxl_preview``: full-size SDXL (random weights) trained one step in fp16 mixed precision, then its preview at
  512 px: not black, not uniform (fp16 VAE decodes overflow to black or NaN).
- ``xformers``: a few steps with attention xformers, when xformers is installed.

On the CPU (``--device cpu``) the same checks run on tiny models where the CPU can (fp16 through ``cpu_fp16`` on
torch 2.3+, 8-bit where bitsandbytes runs on the CPU); that is how the test suite keeps this script working.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth import compat, tiny
from dreambooth.config import load_config
from dreambooth.create import create_model
from dreambooth.store import ModelDir
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.optimizers import adamw_8bit_problem
from dreambooth.train.resume import latest_state
from dreambooth.train.status import request_cancel

from .models import concept, write_images, write_random_model

log = logging.getLogger("bench.gpu_check")

DEFAULT_BUDGET_S = 7 * 60  # the whole command, checks and matrix, stays under 8 minutes


class Skip(Exception):
    """A check that cannot run here, and why."""


class CheckContext:
    """What the checks share: the device, a work folder, and the random models made once."""

    def __init__(self, device: torch.device, workdir: Path, size: str) -> None:
        self.device, self.workdir, self.size = device, workdir, size
        self._models: dict[str, ModelDir] = {}

    @property
    def cpu_fp16(self) -> bool:
        return self.device.type == "cpu"

    def model(self, family: str, name: str) -> ModelDir:
        """A fresh copy of the random ``family`` model (full size on a GPU, tiny on the CPU) as model dir ``name``."""
        if family not in self._models:
            self._models[family] = write_random_model(self.workdir / "base", family, self.size)
        source = self._models[family]
        target = self.workdir / "runs" / "dreambooth" / name
        shutil.copytree(source.path, target)
        return ModelDir(target)

    def configure(self, md: ModelDir, resolution: int, **settings: object) -> None:
        cfg = load_config(md.path)
        images = write_images(self.workdir / f"images-{resolution}", 2, resolution)
        cfg.concepts = [concept(images)]
        base = dict(resolution=resolution, epochs=2, save_every_n_epochs=0, preview_every_n_epochs=0,
                    save_checkpoint=False, enable_buckets=False, text_encoder_ratio=0.0, learning_rate=1e-5,
                    lr_scheduler="constant", seed=1234)
        for key, value in {**base, **settings}.items():
            setattr(cfg, key, value)
        cfg.save(md.path)

    def train(self, md: ModelDir, **options: object) -> Trainer:
        trainer = Trainer(md, RunOptions(device=str(self.device), install_signal_handlers=False,
                                         cpu_fp16=self.cpu_fp16, **options))
        trainer.run()
        return trainer


def _losses(md: ModelDir) -> list[float]:
    with open(md.logs / "loss.csv", encoding="utf-8") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def _unet(md: ModelDir) -> dict[str, torch.Tensor]:
    return load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))


def _uint8_count(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return int(obj.dtype == torch.uint8)
    if isinstance(obj, dict):
        return sum(_uint8_count(v) for v in obj.values())
    return 0


def check_fp16_grad_scaler(ctx: CheckContext) -> str:
    if ctx.device.type == "cpu" and not compat.grad_scaler_available("cpu"):
        raise Skip(f"torch {torch.__version__} has no CPU grad scaler (a GPU or torch 2.3+ runs this check)")
    md = ctx.model("sd1", "fp16")
    ctx.configure(md, 256 if ctx.size == "full" else 64, mixed_precision="fp16", epochs=3)
    trainer = ctx.train(md)
    losses = _losses(md)
    bad = [k for k, v in _unet(md).items() if not torch.isfinite(v).all()]
    scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
    assert trainer.scaler is not None, "no GradScaler ran (fp16 mixed precision without loss scaling)"
    assert losses and all(math.isfinite(v) for v in losses), f"non-finite losses: {losses}"
    assert not bad, f"non-finite weights: {bad[:3]}"
    assert scale is not None and scale > 1, f"grad scale fell to {scale}"
    return f"{len(losses)} steps, losses {min(losses):.4g}..{max(losses):.4g}, grad scale {scale:g}"


def check_adamw_8bit(ctx: CheckContext) -> str:
    problem = adamw_8bit_problem(ctx.device.type)
    if problem is not None:
        raise Skip(problem)
    md = ctx.model("sd1", "adamw8bit")
    ctx.configure(md, 256 if ctx.size == "full" else 64, optimizer="adamw_8bit", mixed_precision="bf16",
                  save_every_n_epochs=2)
    trainer = ctx.train(md)
    name = type(trainer.optimizer).__name__
    states = _uint8_count(latest_state(md.checkpoints).trainer["optimizer"])
    assert name == "AdamW8bit", f"{name} ran instead: {trainer.status.status.get('note')}"
    assert states > 0, "no uint8 optimizer state in the resume state"
    assert "note" not in trainer.status.status, trainer.status.status["note"]
    return f"AdamW8bit, {states} uint8 state tensors saved, last loss {_losses(md)[-1]:.4g}"


def check_resume_exact(ctx: CheckContext) -> str:
    """LoRA with dropout on a tiny model: the run's randomness comes from the device's generator too."""
    source = tiny.write_tiny_checkpoint(ctx.workdir / "tiny" / "tiny-sd1.safetensors", "sd1")
    settings = dict(method="lora", lora_rank=4, lora_dropout=0.1, learning_rate=1e-3, epochs=4,
                    save_every_n_epochs=1, save_on_cancel=True, mixed_precision="no")

    def fresh(name: str) -> ModelDir:
        md = create_model(source, name, ctx.workdir / "resume", compute_hash=False)
        ctx.configure(md, tiny.TINY_RESOLUTION, **settings)
        return md

    first, second, resumed = fresh("a"), fresh("b"), fresh("c")
    ctx.train(first)
    ctx.train(second)
    trainer = Trainer(resumed, RunOptions(device=str(ctx.device), install_signal_handlers=False))
    original = trainer._check_controls

    def cancel_at_4() -> None:  # as if the user pressed Cancel after the second save (2 steps an epoch)
        if trainer.step == 4:
            request_cancel(resumed)
        original()

    trainer._check_controls = cancel_at_4
    trainer.run()
    assert latest_state(resumed.checkpoints).step == 4, "the cancelled run did not save at step 4"
    ctx.train(resumed, resume=True)

    def lora(md: ModelDir) -> dict[str, torch.Tensor]:
        return load_file(str(md.path / "lora" / f"{md.name}.safetensors"))

    def max_diff(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)

    run_to_run = max_diff(lora(first), lora(second))
    resume = max_diff(lora(first), lora(resumed))
    assert resume <= run_to_run, (f"the resumed run differs by {resume:.3g}, more than two uninterrupted runs "
                                  f"({run_to_run:.3g}): the resume state lost something")
    return f"resumed vs uninterrupted max |diff| {resume:.3g}; two uninterrupted runs {run_to_run:.3g}"


def check_sdxl_preview(ctx: CheckContext) -> str:
    md = ctx.model("sdxl", "sdxl-preview")
    resolution = 512 if ctx.size == "full" else 64
    ctx.configure(md, resolution, mixed_precision="fp16" if ctx.device.type == "cuda" else "bf16", epochs=1,
                  preview_every_n_epochs=1, method="lora", lora_rank=4)
    load = load_config(md.path)
    load.concepts[0].n_samples = 1
    load.concepts[0].sample_steps = 4
    load.concepts[0].sample_seed = 7
    load.save(md.path)
    trainer = ctx.train(md)
    samples = trainer.status.status.get("samples") or []
    assert samples, "no preview was written"
    pixels = np.asarray(Image.open(samples[0]).convert("RGB"), dtype=np.float32)
    mean, std = float(pixels.mean()), float(pixels.std())
    assert mean > 8 and std > 1, f"the preview is black or uniform (mean {mean:.1f}, std {std:.2f})"
    return f"{resolution} px preview, pixel mean {mean:.1f}, std {std:.1f}"


def check_xformers(ctx: CheckContext) -> str:
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise Skip("xformers is not installed") from None
    if ctx.device.type != "cuda":
        raise Skip("xformers runs on CUDA only")
    md = ctx.model("sd1", "xformers")
    ctx.configure(md, 256, attention="xformers", mixed_precision="fp16")
    trainer = ctx.train(md)
    losses = _losses(md)
    assert trainer.attention == "xformers", f"attention {trainer.attention} ran"
    assert all(math.isfinite(v) for v in losses), losses
    return f"{len(losses)} steps with xformers, last loss {losses[-1]:.4g}"


CHECKS: dict[str, Callable[[CheckContext], str]] = {
    "fp16_grad_scaler": check_fp16_grad_scaler,
    "adamw_8bit": check_adamw_8bit,
    "resume_exact": check_resume_exact,
    "sdxl_preview": check_sdxl_preview,
    "xformers": check_xformers,
}


def run_checks(ctx: CheckContext, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        check = CHECKS[name]
        started = time.perf_counter()
        try:
            detail, result = check(ctx), "PASS"
        except Skip as why:
            detail, result = str(why), "SKIP"
        except AssertionError as err:
            detail, result = str(err), "FAIL"
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            detail, result = f"{type(err).__name__}: {err}", "FAIL"
            log.debug("%s", traceback.format_exc())
        rows.append({"check": name, "result": result, "detail": detail,
                     "seconds": round(time.perf_counter() - started, 1)})
        log.warning("%s: %s (%s)", name, result, detail)
    return rows


def run_matrix(device: torch.device, out: Path, budget_s: float, matrix: str) -> tuple[dict | None, str]:
    """As much of the benchmark matrix as fits in ``budget_s``: rows in the matrix's order, each in full."""
    from . import run as bench_run

    if budget_s <= 30:
        return None, f"matrix not run: {budget_s:.0f} s of the budget left"
    args = bench_run.parse_args(["--device", str(device), "--matrix", matrix, "--out", str(out)])
    return bench_run.run_matrix_within(args, device, budget_s), ""


def format_checks(rows: list[dict]) -> str:
    lines = [f"{'check':<18} {'result':<6} {'s':>6}  detail", "-" * 100]
    lines += [f"{r['check']:<18} {r['result']:<6} {r['seconds']:>6.1f}  {r['detail']}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.txt / .json")
    p.add_argument("--device", default=None, help="cuda (default when available), cuda:N, or cpu (tiny models)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"the whole command's time budget in seconds (default {DEFAULT_BUDGET_S})")
    p.add_argument("--no-matrix", action="store_true", help="run the checks only")
    p.add_argument("--checks", default=",".join(CHECKS),
                   help=f"comma-separated checks to run (default: all of {', '.join(CHECKS)})")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device; run with --device cpu for the tiny CPU version", file=sys.stderr)
        return 2
    size, matrix = ("full", "gpu") if device.type == "cuda" else ("tiny", "cpu-smoke")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dreambooth-gpu-check-"))
    try:
        checks = run_checks(CheckContext(device, workdir, size), names)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    left = args.budget_s - (time.perf_counter() - started)
    result, why = (None, "matrix not run: --no-matrix") if args.no_matrix else \
        run_matrix(device, args.out / "bench.json", left, matrix)
    from .report import format_table

    text = "\n".join([
        f"GPU check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", "", format_checks(checks), "",
        format_table(result) if result is not None else why,
        f"\ntotal {time.perf_counter() - started:.0f} s"])
    (args.out / "gpu_check.txt").write_text(text + "\n", encoding="utf-8")
    (args.out / "gpu_check.json").write_text(json.dumps({"checks": checks, "bench": result}, indent=2, default=str),
                                             encoding="utf-8")
    print(text)
    return 1 if any(r["result"] == "FAIL" for r in checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
