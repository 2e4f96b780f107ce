"""Two quick trials of tools/fault_injection.py: a worker SIGKILLed mid-save and mid class-image generation resumes
to the planned step, with every file complete and no temporary file left (the full 20-trial run is the tool's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two trials of two worker processes each: about 50 s on a 2-core CPU

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fault_injection.py"


@pytest.fixture(scope="module")
def fi():
    spec = importlib.util.spec_from_file_location("fault_injection", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_injection"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fault_injection", None)


def test_kill_mid_save_resumes_complete(fi, tmp_path, tiny_checkpoint):
    # full training, 2 epochs of 2 steps; each save writes 3 .safetensors files (resume state, working UNet, export):
    # the 5th is the last save's working UNet, killed after its temporary file is written and before the rename
    plan = fi.Plan(0, prior=False, lora=False, ema=False, epochs=2,
                   faults=[fi.Fault("save-write", "write.safetensors:5")])
    result = fi.run_trial(plan, tmp_path, tiny_checkpoint("sd1"), references={})
    assert [a.killed for a in result.attempts] == [True, False], result.line()
    assert result.attempts[0].killed_at == "write.safetensors:5"
    assert result.temps_after_kills >= 1  # the kill did leave a temporary file, and the resume removed it
    assert result.complete and not result.corrupted, result.line()
    assert result.final_step == 4 and result.files_checked > 20


def test_kill_during_class_generation_resumes_complete(fi, tmp_path, tiny_checkpoint):
    plan = fi.Plan(1, prior=True, lora=True, ema=False, epochs=1, faults=[fi.Fault("class", "class:2")])
    result = fi.run_trial(plan, tmp_path, tiny_checkpoint("sd1"), references={})
    assert [a.killed for a in result.attempts] == [True, False], result.line()
    assert result.attempts[0].killed_at == "class:2"
    assert result.complete and not result.corrupted, result.line()
    assert result.final_step == 4  # 2 instance images, each paired with a class image
    classes = sorted(p.name for p in (tmp_path / "trial_02" / "dreambooth" / "m" / "classes" / "concept_0").iterdir())
    assert len(classes) == 4 and all(name.startswith("class_") for name in classes)  # none made twice, none lost
