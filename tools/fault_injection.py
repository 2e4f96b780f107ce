#!/usr/bin/env python3
"""Crash tests: kill training workers with SIGKILL, resume them, and check every file they left behind.

Each trial builds a tiny SD 1.x model with a synthetic concept (prior preservation with class images made by the
worker in some trials, LoRA in some, EMA in some), saves, previews and exports every epoch, and starts the worker
(``python -m dreambooth train``). The worker is killed once or twice: at a random moment (a timer), or at a chosen
one through the test hook ``$DREAMBOOTH_FAULT_AT`` (see ``dreambooth.atomic.fault_point``): mid optimizer step,
between the parts of a save, mid file write inside a save (temporary file written, not renamed yet), mid preview,
mid class-image generation, or at any atomic write. Then ``--resume`` runs until the run is done.

Checked after every kill: every file in the model dir and the export folders is complete (each ``.safetensors``
loads, each ``.json``/``.yaml`` parses, each ``.png`` passes PIL's verify, ``trainer_state.pt`` loads with the
weights-only loader, ``loss.csv`` has whole rows), and every resume state loads. After the last resume also: the run
is ``done`` at the planned step count, every planned export, preview and class image is there, no temporary file is
left, the lock is released, and the trained weights equal those of an uninterrupted run of the same settings.

Usage::

    python tools/fault_injection.py --trials 20 [--seed N] [--out DIR] [--keep] [--no-compare]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dreambooth.atomic import FAULT_ENV, temp_target  # noqa: E402
from dreambooth.config import Concept, load_config  # noqa: E402
from dreambooth.create import create_model  # noqa: E402
from dreambooth.demo import make_concept_images  # noqa: E402
from dreambooth.lock import LOCK_FILE  # noqa: E402
from dreambooth.store import ModelDir  # noqa: E402
from dreambooth.tiny import TINY_RESOLUTION, write_tiny_checkpoint  # noqa: E402
from dreambooth.train.loop import RunOptions, Trainer  # noqa: E402
from dreambooth.train.resume import STATE_FILE, list_states, load_state  # noqa: E402

log = logging.getLogger("fault_injection")

NAME = "m"
EPOCHS = 3
IMAGES = 2
CLASS_PER_IMAGE = 2
# the moments a first kill is aimed at, in turn; "random" is a timer, the others go through $DREAMBOOTH_FAULT_AT
KINDS = ("save", "class", "step", "preview", "save-write", "random", "write")
SECOND_KINDS = ("random", "step", "save", "write")
ATTEMPTS = 6  # worker starts per trial at most (the kills, then resumes until done)
WORKER_TIMEOUT = 300.0


@dataclass
class Fault:
    kind: str
    env: str | None = None  # the $DREAMBOOTH_FAULT_AT value
    delay: float | None = None  # for "random": seconds after the worker's first status (its imports done)

    def describe(self) -> str:
        return f"random kill {self.delay:.1f} s into the run" if self.env is None else f"kill at {self.env}"


@dataclass
class Plan:
    index: int
    prior: bool
    lora: bool
    ema: bool
    faults: list[Fault]
    epochs: int = EPOCHS  # one save, one preview and one export per epoch

    @property
    def steps_per_epoch(self) -> int:
        return IMAGES * (2 if self.prior else 1)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def config_key(self) -> tuple[bool, bool, bool, int]:
        return self.prior, self.lora, self.ema, self.epochs

    def describe(self) -> str:
        parts = ["lora" if self.lora else "full", "prior" if self.prior else "no-prior"]
        if self.ema:
            parts.append("ema")
        return " ".join(parts)


@dataclass
class Attempt:
    resume: bool
    fault: Fault | None
    returncode: int | None
    seconds: float
    active: float  # seconds from the worker's first status to its end
    killed_at: str | None  # where the kill hit: the hook's point, or the run's state for a timer kill
    log_tail: str = ""

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


@dataclass
class TrialResult:
    plan: Plan
    attempts: list[Attempt] = field(default_factory=list)
    files_checked: int = 0
    corrupted: list[str] = field(default_factory=list)  # files that do not load, resume states that do not load
    problems: list[str] = field(default_factory=list)  # anything else: stray temporaries, missing files, state
    temps_after_kills: int = 0
    final_step: int | None = None
    matches_reference: bool | None = None  # None: not compared
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.final_step == self.plan.total_steps and not self.problems and not self.corrupted

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)

    def line(self) -> str:
        """One line for the trial (plus one per problem)."""
        faults = []
        for a in self.attempts:
            if a.fault is not None:
                outcome = f"killed at {a.killed_at or '?'}" if a.killed else f"finished first (exit {a.returncode})"
                faults.append(f"{a.fault.describe()}: {outcome}")
        resumes = sum(a.resume for a in self.attempts)
        verdict = "OK" if self.complete else "FAILED"
        text = (f"trial {self.plan.index + 1:2d}  {self.plan.describe():<17} {verdict:<6} "
                f"step {self.final_step}/{self.plan.total_steps}  {self.kills} kill(s), {resumes} resume(s), "
                f"{self.files_checked} file checks, {len(self.corrupted)} corrupted  [{'; '.join(faults)}]  "
                f"{self.seconds:.1f} s")
        return text + "".join(f"\n      corrupted: {p}" for p in self.corrupted) + \
            "".join(f"\n      problem: {p}" for p in self.problems)


# -------------------------------------------------------------------------------------------------------- planning


def make_plans(trials: int, seed: int) -> list[Plan]:
    """Trial plans: the first kill of trial i aims at KINDS[i % 7]; some trials get a second kill in the resume."""
    rng = random.Random(seed)
    plans = []
    for index in range(trials):
        kind = KINDS[index % len(KINDS)]
        lora = index % 3 == 1
        plan = Plan(index, prior=kind == "class" or index % 2 == 0, lora=lora, ema=not lora and index % 4 == 3,
                    faults=[])
        plan.faults.append(make_fault(kind, plan, rng))
        if rng.random() < 0.4:
            plan.faults.append(make_fault(rng.choice(SECOND_KINDS), plan, rng))
        plans.append(plan)
    return plans


def make_fault(kind: str, plan: Plan, rng: random.Random, expected_seconds: float = 12.0) -> Fault:
    """A fault of ``kind`` at a random place of that kind (counts are per worker process)."""
    saves = plan.epochs
    if kind == "random":
        return Fault(kind, delay=rng.uniform(0.0, expected_seconds))
    if kind == "step":
        return Fault(kind, f"step:{rng.randint(1, plan.total_steps)}")
    if kind == "save":  # 3 points per save: after the resume state, after the weights (or LoRA), after progress
        return Fault(kind, f"save:{rng.randint(1, 3 * saves)}")
    if kind == "save-write":  # 3 .safetensors writes per save: resume state, working weights (LoRA), export
        return Fault(kind, f"write.safetensors:{rng.randint(1, 3 * saves)}")
    if kind == "preview":
        return Fault(kind, f"preview:{rng.randint(1, plan.epochs)}")
    if kind == "class":
        needed = IMAGES * CLASS_PER_IMAGE
        return Fault(kind, f"class:{rng.randint(1, needed - 1)}")
    if kind == "write":
        return Fault(kind, f"write:{rng.randint(1, 30)}")
    raise ValueError(f"unknown fault kind {kind!r}")


# -------------------------------------------------------------------------------------------------------- models


def tiny_source(folder: Path) -> Path:
    path = folder / "tiny-sd1.safetensors"
    if not path.exists():
        write_tiny_checkpoint(path, "sd1")
    return path


def make_model(root: Path, source: Path, plan: Plan, concept_dir: Path) -> ModelDir:
    """The trial's model dir: a tiny SD 1.x model, one synthetic concept, saves/previews/exports every epoch."""
    md = create_model(source, NAME, root)
    make_concept_images(concept_dir, count=IMAGES)
    cfg = load_config(md.path)
    concept = dict(instance_data_dir=str(concept_dir), instance_prompt="a photo of zwx disc", instance_token="zwx",
                   class_token="disc", n_samples=1, sample_steps=1, sample_seed=7)
    if plan.prior:
        concept.update(class_prompt="a photo of a disc", num_class_images_per=CLASS_PER_IMAGE, class_infer_steps=2,
                       class_guidance_scale=1.0)
    cfg.concepts = [Concept(**concept)]
    settings = dict(resolution=TINY_RESOLUTION, epochs=plan.epochs, save_every_n_epochs=1, preview_every_n_epochs=1,
                    mixed_precision="no", learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=1,
                    gradient_checkpointing=False, save_checkpoint=True, keep_resume_states=2, export_dtype="fp16",
                    method="lora" if plan.lora else "dreambooth", lora_rank=4, lora_alpha=4.0,
                    use_ema=plan.ema, ema_decay=0.9, seed=1234)
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.save(md.path)
    return md


def export_dirs(root: Path) -> tuple[Path, Path]:
    return root / "Stable-diffusion", root / "Lora"


def trained_weights(md: ModelDir, plan: Plan) -> dict[str, torch.Tensor]:
    """The weights a run produces: the LoRA file, or the working UNet."""
    if plan.lora:
        return load_file(str(md.path / "lora" / f"{NAME}.safetensors"))
    return load_file(str(md.working / "unet" / "diffusion_pytorch_model.safetensors"))


def reference_weights(plan: Plan, work: Path, source: Path, cache: dict) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted run with the plan's settings (in this process, once per setting)."""
    if plan.config_key not in cache:
        root = work / f"reference-{'-'.join(str(int(k)) for k in plan.config_key)}"
        shutil.rmtree(root, ignore_errors=True)
        md = make_model(root, source, plan, root / "concept")
        sd, lora = export_dirs(root)
        Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, export_dir=sd, lora_dir=lora)).run()
        cache[plan.config_key] = trained_weights(md, plan)
    return cache[plan.config_key]


# -------------------------------------------------------------------------------------------------------- workers


def run_worker(md: ModelDir, root: Path, *, resume: bool, fault: Fault | None,
               timeout: float = WORKER_TIMEOUT) -> Attempt:
    """One worker process (``python -m dreambooth train``), killed as ``fault`` says."""
    sd, lora = export_dirs(root)
    cmd = [sys.executable, "-m", "dreambooth", "train", md.name, "--models-root", str(root), "--device", "cpu",
           "--export-dir", str(sd), "--lora-dir", str(lora)]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop(FAULT_ENV, None)
    if fault is not None and fault.env is not None:
        env[FAULT_ENV] = fault.env
    md.logs.mkdir(parents=True, exist_ok=True)
    log_path = md.logs / "worker.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    start = time.monotonic()
    killed_at = None
    running_since = None  # when the worker wrote its first status (its imports are done, the run has begun)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"the worker took longer than {timeout:.0f} s; see {log_path}")
            if running_since is None:
                if (_read_json(md.status_path) or {}).get("pid") == proc.pid:
                    running_since = now
            elif fault is not None and fault.delay is not None and now >= running_since + fault.delay:
                status = _read_json(md.status_path) or {}
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = f"{status.get('state', '?')}, step {status.get('step', '?')}"
            time.sleep(0.02)
    end = time.monotonic()
    seconds, active = end - start, end - running_since if running_since is not None else 0.0
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("fault injection: killing"):
            killed_at = line.rsplit(" at ", 1)[-1]
    return Attempt(resume, fault, proc.returncode, seconds, active, killed_at, "\n".join(text.splitlines()[-15:]))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------------------------------------- checks


def check_file(path: Path) -> None:
    """Raise if ``path`` is not a complete file of its type."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        load_file(str(path))
    elif suffix in (".json", ".lock"):
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".png":
        with Image.open(path) as image:
            image.verify()
    elif suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)
    elif suffix in (".yaml", ".yml"):
        yaml.safe_load(path.read_text(encoding="utf-8"))
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        width = len(rows[0])
        for number, row in enumerate(rows[1:], 2):
            if len(row) != width or not row[0].isdigit():
                raise ValueError(f"row {number} is not a whole row: {row}")
            float(row[2])
    elif suffix == ".txt":
        path.read_text(encoding="utf-8")


def check_tree(folders: list[Path]) -> tuple[int, list[Path], list[str]]:
    """Check every file under ``folders``: (files checked, temporary entries, corrupted files).

    Temporary entries (a crash's leftovers) are expected right after a kill, never after the final resume.
    """
    checked, temps, corrupted = 0, [], []
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            base = Path(dirpath)
            temps += [base / name for name in [*dirnames, *filenames] if temp_target(name) is not None]
            dirnames[:] = [d for d in dirnames if temp_target(d) is None]
            for name in filenames:
                if temp_target(name) is not None or name == "worker.log":
                    continue
                checked += 1
                try:
                    check_file(base / name)
                except Exception as err:  # noqa: BLE001 - any failure to read is what we look for
                    corrupted.append(f"{base / name}: {type(err).__name__}: {err}")
    return checked, temps, corrupted


def check_states(md: ModelDir) -> list[str]:
    """Resume states that do not load (each is also a corrupted file)."""
    problems = []
    for path in list_states(md.checkpoints):
        try:
            state = load_state(path)
            if not (path / STATE_FILE).is_file() or not state.weights:
                problems.append(f"incomplete resume state {path}")
        except Exception as err:  # noqa: BLE001
            problems.append(f"resume state {path} does not load: {type(err).__name__}: {err}")
    return problems


def check_final(md: ModelDir, root: Path, plan: Plan) -> list[str]:
    """What a finished run must have: done at the planned step, every planned file, no lock."""
    problems = []
    status = _read_json(md.status_path) or {}
    if status.get("state") != "done" or status.get("step") != plan.total_steps:
        problems.append(f"status is {status.get('state')} at step {status.get('step')}, not done at "
                        f"{plan.total_steps}: {status.get('message')}")
    cfg = load_config(md.path)
    if cfg.revision != plan.total_steps:
        problems.append(f"db_config.json says {cfg.revision} steps trained, not {plan.total_steps}")
    if (md.path / LOCK_FILE).exists():
        problems.append("train.lock is still there")
    states = list_states(md.checkpoints)
    if not states or states[-1].name != f"step_{plan.total_steps:08d}":
        problems.append(f"the newest resume state is not the one at step {plan.total_steps}")
    sd, lora = export_dirs(root)
    saves = [epoch * plan.steps_per_epoch for epoch in range(1, plan.epochs + 1)]
    for step in saves:
        export = (lora if plan.lora else sd) / f"{NAME}_{step}.safetensors"
        if not export.is_file():
            problems.append(f"missing export {export}")
        preview = md.samples / f"step{step:06d}_c0_0.png"
        if not preview.is_file():
            problems.append(f"missing preview {preview}")
    if plan.prior:
        folder = md.path / "classes" / "concept_0"
        count = len([p for p in folder.glob("*.png")]) if folder.is_dir() else 0
        if count != IMAGES * CLASS_PER_IMAGE:
            problems.append(f"{count} class images in {folder}, not {IMAGES * CLASS_PER_IMAGE}")
    return problems


def compare(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    if found.keys() != expected.keys():
        return "the trained weights have other keys than those of the uninterrupted run"
    worst = max((float((found[k].float() - expected[k].float()).abs().max()) for k in found), default=0.0)
    ok = all(torch.allclose(found[k].float(), expected[k].float(), rtol=1e-4, atol=1e-5) for k in found)
    return None if ok else f"the trained weights differ from the uninterrupted run's (max difference {worst:.3g})"


# -------------------------------------------------------------------------------------------------------- trials


def run_trial(plan: Plan, work: Path, source: Path, references: dict | None = None) -> TrialResult:
    """Run one trial in ``work/trial_<n>``: the kills of ``plan``, then resumes until done, checking as it goes."""
    started = time.monotonic()
    root = work / f"trial_{plan.index + 1:02d}"
    shutil.rmtree(root, ignore_errors=True)
    md = make_model(root, source, plan, root / "concept")
    result = TrialResult(plan)
    folders = [md.path, *export_dirs(root)]
    faults = list(plan.faults)
    for number in range(ATTEMPTS):
        fault = faults.pop(0) if faults else None
        attempt = run_worker(md, root, resume=number > 0, fault=fault)
        result.attempts.append(attempt)
        if attempt.killed:
            checked, temps, corrupted = check_tree(folders)
            result.files_checked += checked
            result.temps_after_kills += len(temps)
            result.corrupted += [f"after kill {result.kills}: {p}" for p in corrupted + check_states(md)]
            continue
        if attempt.returncode != 0:
            result.problems.append(f"worker exited with {attempt.returncode}:\n{attempt.log_tail}")
            break
        if not faults:
            break
    status = _read_json(md.status_path) or {}
    result.final_step = status.get("step") if status.get("state") == "done" else None
    checked, temps, corrupted = check_tree(folders)
    result.files_checked += checked
    result.corrupted += corrupted + check_states(md)
    result.problems += [f"stray temporary {p}" for p in temps] + check_final(md, root, plan)
    if references is not None and not result.problems and not result.corrupted:
        difference = compare(trained_weights(md, plan), reference_weights(plan, work, source, references))
        result.matches_reference = difference is None
        if difference:
            result.problems.append(difference)
    result.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trial plans and random kills (default 0)")
    parser.add_argument("--out", help="working folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the comparison with uninterrupted runs (saves a few runs' time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    torch.set_num_threads(1)
    work = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="dreambooth-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = tiny_source(work)
    references: dict | None = None if args.no_compare else {}
    plans = make_plans(args.trials, args.seed)
    rng = random.Random(args.seed + 1)
    durations: list[float] = []
    results = []
    print(f"{args.trials} trials, seed {args.seed}, in {work}", flush=True)
    try:
        for plan in plans:
            if durations:  # aim the random kills at the span of a whole run, as measured so far
                expected = sum(durations) / len(durations)
                for fault in plan.faults:
                    if fault.kind == "random":
                        fault.delay = rng.uniform(0.0, expected)
            result = run_trial(plan, work, source, references)
            durations.append(sum(a.active for a in result.attempts))
            results.append(result)
            print(result.line(), flush=True)
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(work, ignore_errors=True)
    complete = sum(r.complete for r in results)
    corrupted = sum(len(r.corrupted) for r in results)
    kills = sum(r.kills for r in results)
    hit = {kind: sum(1 for r in results for a in r.attempts if a.killed and a.fault and a.fault.kind == kind)
           for kind in KINDS}
    stray = sum(sum(p.startswith("stray temporary") for p in r.problems) for r in results)
    print(f"kills: {kills} ({', '.join(f'{k} {v}' for k, v in hit.items())}); files checked: "
          f"{sum(r.files_checked for r in results)}; temporaries left by the kills: "
          f"{sum(r.temps_after_kills for r in results)}, left after the resumes: {stray}")
    if references is not None:
        matched = sum(r.matches_reference is True for r in results)
        print(f"trained weights equal to an uninterrupted run's (rtol 1e-4): {matched}/{len(results)}")
    print(f"{complete}/{len(results)} resumed and complete, {corrupted} corrupted files "
          f"({time.monotonic() - started:.0f} s)")
    return 0 if complete == len(results) and corrupted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
