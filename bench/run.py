"""``python -m bench``: run a matrix of configurations with our trainer and the baseline loop, print the table and
write the JSON. See ``bench/README.md``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .baseline import BaselineSettings, eight_bit_status, like_settings, run_baseline, variant_settings
from .flops import datasheet_peak, device_name, flops_per_sample, measure_peak_flops
from .matrix import BASELINE_VARIANTS, LIKE_PREFIX, MATRICES, Case, Matrix, profile_overrides, wants_eight_bit
from .measure import StepClock, free_memory, is_oom, peak_memory
from .models import write_images, write_random_model
from .ours import run_ours, unavailable_settings
from .report import ROW_KEYS, build_result, format_table, write_result

log = logging.getLogger("bench")

LOCK_ENV = "BENCH_LOCK"  # a lock file every row (and model writing) holds exclusively, as --lock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--matrix", choices=sorted(MATRICES), default=None,
                   help="gpu (full-size models), cpu-full (full-size models on the CPU), cpu (tiny models, every "
                        "family), cpu-smoke (the quick sentinel); default: gpu on a GPU, cpu-smoke on the CPU")
    p.add_argument("--out", type=Path, default=Path("bench_results.json"), help="where the JSON goes")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per row (10; cpu-full: 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps per row, the last one tracked for memory (3; cpu-full: 2; at least 2)")
    p.add_argument("--memory-only", action="store_true",
                   help="no timed steps: only the warm-up steps and the memory of the last one (every row)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every row this many times, interleaved (row A, B, ..., A, B, ...): the speed is the "
                        "median, the ratios' spread over the rounds shows the noise")
    p.add_argument("--only", action="append", default=[],
                   help="run only rows whose 'case profile' contains this text (repeatable; any match runs)")
    p.add_argument("--compile", action="store_true", help="ours-fast also sets compile_unet (torch.compile)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each row in a process of its own (default: on for cpu-full)")
    p.add_argument("--lock", type=Path, default=os.environ.get(LOCK_ENV) or None,
                   help=f"hold this file locked (exclusively) while each row runs and while models are written, "
                        f"so big rows never overlap with other big jobs (default: ${LOCK_ENV})")
    p.add_argument("--workdir", type=Path, default=None, help="where the random models go (default: a temp dir, "
                                                              "deleted at the end)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # "<case> <profile>": one row (isolated runs)
    p.add_argument("--write-model", default=None, help=argparse.SUPPRESS)  # a family's random model, then exit
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
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


@contextlib.contextmanager
def exclusive(path: Path | None) -> Iterator[None]:
    """Hold ``path`` locked exclusively for the block (waits for the holder); nothing when ``path`` is None."""
    if path is None:
        yield
        return
    with open(path, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def plan(matrix: Matrix, eight_bit: bool) -> tuple[list[tuple[Case, str]], list[tuple[str, str, str]]]:
    """The rows of a run, and the like-for-like pairs (case, ours row, baseline row).

    Each of our timed rows is paired with the recipe run with its gradient checkpointing, mixed precision and
    optimizer: a baseline row of the case with those already, else a ``baseline-as-<ours row>`` row added for it.
    A pair's rows run one right after the other (the machine's load drifts less between them).
    """
    rows: list[tuple[Case, str]] = []
    pairs: list[tuple[str, str, str]] = []
    for case in matrix.cases:
        ours_rows = [p for p in case.profiles if p not in BASELINE_VARIANTS]
        recipes = [p for p in case.profiles if p in BASELINE_VARIANTS]
        if case.memory_only or not recipes:
            rows += [(case, p) for p in case.profiles]
            continue
        keys = {baseline_settings(p, eight_bit).like_key(case.method): p for p in recipes}
        order: list[str] = []
        for ours in ours_rows:
            key = baseline_settings(LIKE_PREFIX + ours, eight_bit).like_key(case.method)
            keys.setdefault(key, LIKE_PREFIX + ours)
            pairs.append((case.key, ours, keys[key]))
            order += [p for p in (ours, keys[key]) if p not in order]
        order += [p for p in recipes if p not in order]
        rows += [(case, p) for p in order]
    return rows, pairs


def baseline_settings(profile: str, eight_bit: bool) -> BaselineSettings:
    if profile.startswith(LIKE_PREFIX):
        ours = profile[len(LIKE_PREFIX):]
        return like_settings(profile_overrides(ours, eight_bit=eight_bit, compile_unet=False), eight_bit)
    return variant_settings(profile, eight_bit)


class Bench:
    """One run: the models and images it shares between rows, and the rows it has measured."""

    def __init__(self, args: argparse.Namespace, device: torch.device, matrix_name: str, workdir: Path) -> None:
        matrix = MATRICES[matrix_name]
        self.args, self.device, self.matrix, self.workdir = args, device, matrix, workdir
        self.matrix_name = matrix_name
        self.size = matrix.size
        self.models: dict[str, object] = {}
        self.images: dict[tuple[int, int], Path] = {}
        self.flops: dict[tuple[str, str, int], tuple[int, str]] = {}
        self.eight_bit, self.eight_bit_why = eight_bit_status(device)
        self.warmup = max(args.warmup, 2)  # the last warm-up step is tracked for memory, after a first full step

    def model(self, family: str, in_child: bool = False):
        """The random model of ``family`` (written once). ``in_child``: written by a process of its own, so the
        memory of building it (10 GB for SDXL) is not kept by this one while the rows run."""
        if family not in self.models:
            started = time.perf_counter()
            if in_child:
                with exclusive(self.args.lock):
                    subprocess.run(self._child_command("--write-model", family), check=True,
                                   cwd=Path(__file__).resolve().parent.parent, env=child_env())
            with exclusive(self.args.lock if not in_child else None):
                self.models[family] = write_random_model(self.workdir / "models", family, self.size)
            log.info("random %s %s model ready in %.1f s", self.size, family, time.perf_counter() - started)
        return self.models[family]

    def _child_command(self, *extra: str) -> list[str]:
        args = self.args
        cmd = [sys.executable, "-m", "bench", "--device", str(self.device), "--matrix", self.matrix_name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir", str(self.workdir),
               "--no-isolate", *extra]
        cmd += ["--compile"] * args.compile + ["-v"] * args.verbose + ["--memory-only"] * args.memory_only
        return cmd + (["--threads", str(args.threads)] if args.threads else [])

    def image_folder(self, resolution: int, batch: int) -> Path:
        key = (resolution, batch)
        if key not in self.images:
            self.images[key] = write_images(self.workdir / f"images-{resolution}-b{batch}",
                                            self.matrix.images_per_slot * batch, resolution)
        return self.images[key]

    def unet_flops(self, case: Case) -> tuple[int, str]:
        key = (case.family, case.method, case.resolution)
        if key not in self.flops:
            config = json.loads((self.model(case.family).working / "unet" / "config.json").read_text("utf-8"))
            # the count does not depend on the device: the meta device gives it without the time and memory
            where = self.device if self.device.type == "cuda" else torch.device("meta")
            free_memory(self.device)
            self.flops[key] = flops_per_sample(config, case.resolution, case.method, case.family == "sdxl", where)
            free_memory(self.device)
        return self.flops[key]

    def row(self, case: Case, profile: str) -> dict:
        row = {k: None for k in ROW_KEYS}
        row.update(case=case.key, family=case.family, method=case.method, resolution=case.resolution,
                   batch=case.batch, lora_rank=case.lora_rank if case.method == "lora" else None, profile=profile,
                   kind="ours" if profile.startswith("ours-") else "baseline", notes=[])
        row["flops_per_sample"], row["flops_counted_on"] = self.unet_flops(case)
        md, images = self.model(case.family), self.image_folder(case.resolution, case.batch)
        if row["kind"] == "ours":
            settings = profile_overrides(profile, eight_bit=self.eight_bit, compile_unet=self.args.compile)
            row["settings"] = settings
            missing = unavailable_settings(settings)
            if missing:
                row["status"] = "unavailable: " + ", ".join(missing)
                return row
            extra = [self.eight_bit_why] if wants_eight_bit(profile) and not self.eight_bit else []
            run = lambda clock: run_ours(md, case, settings, images, self.device, clock)  # noqa: E731
        else:
            settings = baseline_settings(profile, self.eight_bit)
            row["settings"] = dict(vars(settings))
            extra = [self.eight_bit_why] if profile == "baseline-lowmem" and not self.eight_bit else []
            run = lambda clock: run_baseline(md.working, case, settings, images, self.device, clock)  # noqa: E731
        free_memory(self.device)
        memory_only = case.memory_only or self.args.memory_only
        clock = StepClock(self.device, self.warmup, 0 if memory_only else self.args.steps)
        try:
            with exclusive(self.args.lock):
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
        finally:
            clock.close()
        row.update(measured)
        row["notes"] = measured["notes"] + extra
        row.update(peak_memory(self.device))
        row["status"] = "ok"
        free_memory(self.device)
        return row


def child_env() -> dict[str, str]:
    """This process's environment for a child ``python -m bench`` run from the repository root (the parent holds
    the lock while the child runs)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop(LOCK_ENV, None)
    return env


def run_isolated(bench: Bench, case: Case, profile: str) -> dict:
    """One row in a fresh process (``python -m bench --row``), under the lock: all its memory comes back after."""
    out = bench.workdir / "row.json"
    out.unlink(missing_ok=True)
    cmd = bench._child_command("--row", f"{case.key} {profile}", "--out", str(out))
    with exclusive(bench.args.lock):
        done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=child_env(),
                              stdout=subprocess.DEVNULL if not bench.args.verbose else None)
    if done.returncode == 0 or out.is_file():
        rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
        if rows:
            return rows[0]
    row = {k: None for k in ROW_KEYS}
    row.update(case=case.key, family=case.family, method=case.method, resolution=case.resolution, batch=case.batch,
               lora_rank=case.lora_rank if case.method == "lora" else None, profile=profile, notes=[],
               kind="ours" if profile.startswith("ours-") else "baseline")
    killed = done.returncode in (-9, 137)
    row["status"] = "oom" if killed else f"error: the row's process exited with code {done.returncode}"
    if killed:
        row["notes"] = ["the row's process was killed (SIGKILL): most likely out of RAM"]
    return row


def merge_runs(runs: list[dict]) -> dict:
    """A row measured in several rounds: memory and notes from the first that ran, speed the median, every round's
    samples/s kept (``samples_per_s_runs``, None where a round failed)."""
    ok = [r for r in runs if r["status"] == "ok"]
    row = dict(ok[0] if ok else runs[0])
    row["samples_per_s_runs"] = [r["samples_per_s"] if r["status"] == "ok" else None for r in runs]
    timed = [r for r in ok if r["samples_per_s"] is not None]
    if len(timed) > 1:
        row["samples_per_s"] = statistics.median(r["samples_per_s"] for r in timed)
        row["step_time_s"] = statistics.median(r["step_time_s"] for r in timed)
        row["step_time_min_s"] = min(r["step_time_min_s"] for r in timed)
        row["step_time_max_s"] = max(r["step_time_max_s"] for r in timed)
    return row


def selected(case: Case, profile: str, only: list[str]) -> bool:
    return not only or any(text in f"{case.key} {profile}" for text in only)


def prepare(args: argparse.Namespace, device: torch.device) -> tuple[str, Matrix, bool, Path, Bench]:
    """The matrix, its defaults (steps, warm-up, isolation) filled into ``args``, the work folder and the Bench."""
    matrix_name = args.matrix or ("gpu" if device.type == "cuda" else "cpu-smoke")
    matrix = MATRICES[matrix_name]
    full_cpu = matrix.size == "full" and device.type == "cpu"
    args.steps = args.steps or (2 if full_cpu else 10)
    args.warmup = max(args.warmup or (2 if matrix.images_per_slot == 1 else 3), 2)
    isolate = matrix.isolate if args.isolate is None else args.isolate
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dreambooth-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return matrix_name, matrix, isolate, workdir, Bench(args, device, matrix_name, workdir)


def run_matrix_within(args: argparse.Namespace, device: torch.device, budget_s: float | None = None) -> dict:
    """Run the matrix's selected rows in order and return the result; with ``budget_s``, a row that would start
    after the budget is spent is recorded as not run instead (the GPU check's time limit)."""
    matrix_name, matrix, isolate, workdir, bench = prepare(args, device)
    rows_planned, pairs = plan(matrix, bench.eight_bit)
    started = time.perf_counter()
    peak, how = measure_peak_flops(device)
    name = device_name(device)
    meta = {"matrix": matrix_name, "model_size": matrix.size, "steps": args.steps, "warmup": args.warmup,
            "repeat": args.repeat, "isolated": isolate, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(device),
            "device": {"type": device.type, "name": name, "measured_peak_flops": peak, "peak_method": how,
                       "datasheet_peak_flops": datasheet_peak(name) if device.type == "cuda" else None}}
    todo = [(c, p) for c, p in rows_planned if selected(c, p, args.only)]
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for round_ in range(args.repeat):
            for case, profile in todo:
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    row = {**{k: None for k in ROW_KEYS}, "case": case.key, "profile": profile, "notes": [],
                           "kind": "baseline" if profile in BASELINE_VARIANTS else "ours",
                           "status": "not run: time budget spent"}
                elif isolate:
                    log.info("running %s %s (round %d)", case.key, profile, round_ + 1)
                    bench.model(case.family, in_child=True)  # written once, before its first row (rows find it)
                    bench.image_folder(case.resolution, case.batch)
                    row = run_isolated(bench, case, profile)
                else:
                    log.info("running %s %s (round %d)", case.key, profile, round_ + 1)
                    row = bench.row(case, profile)
                runs.setdefault((case.key, profile), []).append(row)
                if isolate:  # a long run: the rows so far are on disk if it is stopped
                    write_result(args.out, {**collect(meta, runs, pairs, started), "partial": True})
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = collect(meta, runs, pairs, started)
    write_result(args.out, result)
    return result


def collect(meta: dict, runs: dict[tuple[str, str], list[dict]], pairs: list[tuple[str, str, str]],
            started: float) -> dict:
    """The result of the rows measured so far (a row measured in several rounds merged into one)."""
    rows = [merge_runs(r) for r in runs.values()]
    meta = {**meta, "wall_s": time.perf_counter() - started}
    return build_result(meta, rows, [p for p in pairs if (p[0], p[1]) in runs and (p[0], p[2]) in runs])


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
    if args.write_model is not None or args.row is not None:  # a child of an isolated run
        _, matrix, _, workdir, bench = prepare(args, device)
        if args.write_model is not None:
            write_random_model(workdir / "models", args.write_model, matrix.size)
            return 0
        todo = [(c, p) for c, p in plan(matrix, bench.eight_bit)[0] if f"{c.key} {p}" == args.row]
        write_result(args.out, {"rows": [bench.row(c, p) for c, p in todo]})  # the parent reads the JSON
        return 0
    result = run_matrix_within(args, device)
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 1 if any(r["status"].startswith("error") for r in result["rows"]) else 0
