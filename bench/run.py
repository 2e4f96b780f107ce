"""``python -m bench``: run a matrix of configurations with our trainer and the baseline loop, print the table and
write the JSON. See ``bench/README.md``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .baseline import eight_bit_status, run_baseline, variant_settings
from .flops import datasheet_peak, device_name, flops_per_sample, measure_peak_flops
from .matrix import BASELINE_VARIANTS, MATRICES, Case, profile_overrides
from .measure import StepClock, free_memory, is_oom, peak_memory
from .models import write_images, write_random_model
from .ours import run_ours, unavailable_settings
from .report import ROW_KEYS, build_result, format_table, write_result

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--matrix", choices=sorted(MATRICES), default=None,
                   help="gpu (full-size models), cpu (tiny models, every family), cpu-smoke (the quick sentinel); "
                        "default: gpu on a GPU, cpu-smoke on the CPU")
    p.add_argument("--out", type=Path, default=Path("bench_results.json"), help="where the JSON goes")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per row")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per row (at least one epoch: 2)")
    p.add_argument("--only", action="append", default=[],
                   help="run only rows whose 'case profile' contains this text (repeatable; any match runs)")
    p.add_argument("--compile", action="store_true", help="ours-fast also sets compile_unet (torch.compile)")
    p.add_argument("--workdir", type=Path, default=None, help="where the random models go (default: a temp dir, "
                                                              "deleted at the end)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": _version("diffusers"),
           "transformers": _version("transformers"), "bitsandbytes": _version("bitsandbytes") or "absent",
           "xformers": _version("xformers") or "absent", "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


class Bench:
    """One run: the models and images it shares between rows, and the rows it has measured."""

    def __init__(self, args: argparse.Namespace, device: torch.device, size: str, workdir: Path) -> None:
        self.args, self.device, self.size, self.workdir = args, device, size, workdir
        self.models: dict[str, object] = {}
        self.images: dict[tuple[int, int], Path] = {}
        self.flops: dict[tuple[str, str, int], tuple[int, str]] = {}
        self.eight_bit, self.eight_bit_why = eight_bit_status(device)
        self.warmup = max(args.warmup, 2)  # two images per batch slot: one epoch (cache fill) is 2 steps

    def model(self, family: str):
        if family not in self.models:
            started = time.perf_counter()
            self.models[family] = write_random_model(self.workdir / "models", family, self.size)
            log.info("random %s %s model written in %.1f s", self.size, family, time.perf_counter() - started)
        return self.models[family]

    def image_folder(self, resolution: int, batch: int) -> Path:
        key = (resolution, batch)
        if key not in self.images:
            self.images[key] = write_images(self.workdir / f"images-{resolution}-b{batch}", 2 * batch, resolution)
        return self.images[key]

    def unet_flops(self, case: Case) -> tuple[int, str]:
        key = (case.family, case.method, case.resolution)
        if key not in self.flops:
            config = json.loads((self.model(case.family).working / "unet" / "config.json").read_text("utf-8"))
            free_memory(self.device)
            self.flops[key] = flops_per_sample(config, case.resolution, case.method, case.family == "sdxl",
                                               self.device)
            free_memory(self.device)
        return self.flops[key]

    def row(self, case: Case, profile: str) -> dict:
        row = {k: None for k in ROW_KEYS}
        row.update(case=case.key, family=case.family, method=case.method, resolution=case.resolution,
                   batch=case.batch, lora_rank=case.lora_rank if case.method == "lora" else None, profile=profile,
                   kind="baseline" if profile in BASELINE_VARIANTS else "ours", notes=[])
        row["flops_per_sample"], row["flops_counted_on"] = self.unet_flops(case)
        md, images = self.model(case.family), self.image_folder(case.resolution, case.batch)
        if row["kind"] == "ours":
            settings = profile_overrides(profile, eight_bit=self.eight_bit, compile_unet=self.args.compile)
            row["settings"] = settings
            missing = unavailable_settings(settings)
            if missing:
                row["status"] = "unavailable: " + ", ".join(missing)
                return row
            extra = [self.eight_bit_why] if profile == "ours-lowmem" and not self.eight_bit else []
            run = lambda clock: run_ours(md, case, settings, images, self.device, clock)  # noqa: E731
        else:
            settings = variant_settings(profile, self.eight_bit)
            row["settings"] = dict(vars(settings))
            extra = [self.eight_bit_why] if profile == "baseline-lowmem" and not self.eight_bit else []
            run = lambda clock: run_baseline(md.working, case, settings, images, self.device, clock)  # noqa: E731
        free_memory(self.device)
        clock = StepClock(self.device, self.warmup, self.args.steps)
        try:
            measured = run(clock)
        except Exception as err:  # noqa: BLE001 - one failing row must not end the benchmark; the row says why
            if is_oom(err):
                row["status"] = "oom"
            else:
                row["status"] = f"error: {type(err).__name__}: {err}"
                log.exception("%s %s failed", case.key, profile)
            row.update(peak_memory(self.device))
            free_memory(self.device)
            return row
        row.update(measured)
        row["notes"] = measured["notes"] + extra
        row.update(peak_memory(self.device))
        row["status"] = "ok"
        free_memory(self.device)
        return row


def selected(case: Case, profile: str, only: list[str]) -> bool:
    return not only or any(text in f"{case.key} {profile}" for text in only)


def run_matrix_within(args: argparse.Namespace, device: torch.device, budget_s: float | None = None) -> dict:
    """Run the matrix's selected rows in order and return the result; with ``budget_s``, a row that would start
    after the budget is spent is recorded as not run instead (the GPU check's time limit)."""
    matrix = args.matrix or ("gpu" if device.type == "cuda" else "cpu-smoke")
    size, cases = MATRICES[matrix]
    started = time.perf_counter()
    peak, how = measure_peak_flops(device)
    name = device_name(device)
    meta = {"matrix": matrix, "model_size": size, "steps": args.steps, "warmup": max(args.warmup, 2),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(device),
            "device": {"type": device.type, "name": name, "measured_peak_flops": peak, "peak_method": how,
                       "datasheet_peak_flops": datasheet_peak(name) if device.type == "cuda" else None}}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dreambooth-bench-"))
    bench = Bench(args, device, size, workdir)
    rows = []
    try:
        for case in cases:
            for profile in case.profiles:
                if not selected(case, profile, args.only):
                    continue
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    rows.append({**{k: None for k in ROW_KEYS}, "case": case.key, "profile": profile,
                                 "kind": "baseline" if profile in BASELINE_VARIANTS else "ours", "notes": [],
                                 "status": "not run: time budget spent"})
                    continue
                log.info("running %s %s", case.key, profile)
                rows.append(bench.row(case, profile))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = build_result(meta, rows)
    write_result(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the clock's CUDA events go on the current device's stream
    result = run_matrix_within(args, device)
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 1 if any(r["status"].startswith("error") for r in result["rows"]) else 0
