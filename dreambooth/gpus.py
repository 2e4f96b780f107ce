"""Which devices a run trains on, and in how many processes: the "GPUs" setting, ``--gpus`` / ``--processes`` /
``--device``, and the GPUs this machine has.

The setting holds GPU numbers as torch counts them in the process that starts the run (``"0,1"``; empty: the default
device). One GPU trains in one process on that GPU, as always; two or more train data-parallel, one process per GPU
(``train/launch.py`` starts them, ``train/distributed.py`` runs them); ``--processes N --device cpu`` runs N
processes on the CPU (gloo). Every refusal here comes before a process starts or a file is written.

No torch at import: the tab and the job layer import this; torch is asked only when a plan needs the GPU count.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

_FORMAT = re.compile(r"\s*\d+\s*(,\s*\d+\s*)*")
NOT_FOUND = "not found on this machine"


def text_problem(text: str) -> str | None:
    """Why ``text`` is not a GPUs setting (comma-separated distinct GPU numbers, or empty), else None."""
    if not text.strip():
        return None
    if not _FORMAT.fullmatch(text):
        return f"expected GPU numbers separated by commas such as 0,1 (or nothing), got {text!r}"
    numbers = [int(n) for n in text.split(",")]
    if len(set(numbers)) != len(numbers):
        return f"a GPU is listed twice in {text!r}"
    return None


def parse(text: str) -> list[int]:
    """The GPU numbers of a GPUs setting, in the order given; raises a UserError naming the problem."""
    problem = text_problem(text)
    if problem is not None:
        raise UserError(f"GPUs: {problem}", "list GPU numbers separated by commas, e.g. 0,1, or leave it empty")
    return [int(n) for n in text.split(",")] if text.strip() else []


def machine_gpus() -> list[str]:
    """This machine's CUDA GPUs as labels ``"<n>: <name> (<memory> GB)"``, numbered as torch numbers them here."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        labels = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            labels.append(f"{index}: {props.name} ({props.total_memory / 2**30:.0f} GB)")
        return labels
    except Exception:  # noqa: BLE001 - a broken driver lists no GPU; a run then says what is wrong
        return []


def choices(text: str, machine: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The tab's GPU list: (every choice, the chosen ones) for a setting ``text``; a GPU the setting names that this
    machine lacks (a config from another machine) is listed as not found, so saving the form keeps it visibly."""
    machine = machine_gpus() if machine is None else machine
    by_number = {int(label.split(":")[0]): label for label in machine}
    chosen = parse(text) if text_problem(text) is None else []
    for number in chosen:
        by_number.setdefault(number, f"{number}: {NOT_FOUND}")
    return [by_number[n] for n in sorted(by_number)], [by_number[n] for n in chosen]


def from_choices(selected: list[str] | None) -> str:
    """The setting for the GPUs ticked in the tab (labels from :func:`choices`)."""
    return ",".join(str(int(str(label).split(":")[0])) for label in selected or [])


@dataclass(frozen=True)
class Plan:
    """How a run uses the machine: ``processes`` processes; one process trains on ``device`` (None: CUDA when there
    is one, else the CPU); several train on the CPU (``device`` "cpu") or on ``gpus`` (torch's numbers in this
    process), one each."""

    processes: int = 1
    device: str | None = None
    gpus: list[int] = field(default_factory=list)

    @property
    def on_gpus(self) -> bool:
        return self.processes > 1 and self.device != "cpu"

    def visible_devices(self) -> str | None:
        """``$CUDA_VISIBLE_DEVICES`` for the processes of a multi-GPU run (they see only their GPUs, as 0..N-1),
        given in this process's terms (mapped through its own ``$CUDA_VISIBLE_DEVICES``)."""
        if not self.on_gpus:
            return None
        visible = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
        return ",".join(visible[n] if n < len(visible) else str(n) for n in self.gpus) if visible else \
            ",".join(map(str, self.gpus))


def plan(cfg: Any, device: str | None = None, processes: int | None = None, gpus: str | None = None) -> Plan:
    """The run's plan from the command line (``device``, ``processes``, ``gpus``: None when not given) and the
    config's GPUs setting; raises a UserError for a plan this machine cannot run."""
    chosen = parse(cfg.gpus if gpus is None else gpus)
    kind = (device or "").strip().lower()
    if processes is not None and processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}", "give the number of processes, e.g. 2")
    if kind and kind != "cuda":  # an explicit device: the GPUs setting does not apply
        if gpus is not None and chosen:
            raise UserError(f"--gpus {gpus} and --device {device} contradict each other",
                            "give one of them: --gpus for GPUs, --device cpu for the CPU")
        result = Plan(processes or 1, device)
        if result.processes > 1 and kind != "cpu":
            raise UserError(f"--device {device} names one device; several processes need several GPUs or the CPU",
                            "choose GPUs with --gpus 0,1 (or the GPUs setting), or use --device cpu")
    elif chosen:
        if processes is not None and processes != len(chosen):
            raise UserError(f"--processes {processes} does not match the {len(chosen)} GPUs chosen "
                            f"({', '.join(map(str, chosen))})", "leave --processes out: one process per GPU")
        _check_gpus_exist(chosen)
        result = Plan(1, f"cuda:{chosen[0]}") if len(chosen) == 1 else Plan(len(chosen), "cuda", chosen)
    elif processes and processes > 1:
        count = _gpu_count()
        if count < processes:
            raise UserError(f"--processes {processes} needs {processes} GPUs, and {count} "
                            f"{'is' if count == 1 else 'are'} visible here",
                            "use fewer processes, choose GPUs with --gpus, or train on the CPU with --device cpu")
        result = Plan(processes, "cuda", list(range(processes)))
    else:
        result = Plan(1, device)
    if result.processes > 1:
        check_several_processes(cfg)
    return result


def check_several_processes(cfg: Any) -> None:
    """Refuse what data-parallel training cannot do, naming the setting (also checked by each process)."""
    import torch.distributed

    if not torch.distributed.is_available():
        raise UserError("this torch has no torch.distributed, which training with several processes needs",
                        "train with one process, or install a torch build with distributed support")
    if cfg.fused_backward_step:
        raise UserError("'Optimizer step in backward' cannot be used with several processes: each weight's update "
                        "needs the gradients of every process first",
                        "turn 'Optimizer step in backward' off, or train with one process")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_gpus_exist(chosen: list[int]) -> None:
    count = _gpu_count()
    missing = [n for n in chosen if n >= count]
    if missing:
        have = f"GPUs 0 to {count - 1}" if count > 1 else "GPU 0" if count == 1 else "no CUDA GPU"
        raise UserError(f"the GPUs setting names GPU {', '.join(map(str, missing))}, and this machine has {have}",
                        "choose GPUs this machine has (the tab lists them), or clear the setting")
