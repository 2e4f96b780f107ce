"""The tiny pretrained world model shipped in bench/quality/assets: an SD 1.x single file in the real key layout
that our Create accepts and our export writes back exactly, with the quality the issue asks of it under diffusers'
stock pipeline; and the reference loop that built it runs without any of our trainer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REFERENCE_LDM, reference_keys
from safetensors.torch import load_file
from world_learning import BASE, pipeline

from bench.quality import pretrain, run, stock
from bench.quality.analyse import analyse
from bench.quality.measures import MEASURES
from dreambooth.create import create_model
from dreambooth.export import export_checkpoint

needs_base = pytest.mark.skipif(not BASE.is_file(), reason=f"{BASE.name} not built yet "
                                "(python -m bench.quality.pretrain --out <it>)")


@needs_base
def test_the_base_is_a_small_sd1_single_file():
    assert BASE.stat().st_size <= 8.5e6
    state = load_file(str(BASE))
    assert sorted(state) == sorted(reference_keys(REFERENCE_LDM["sd1"]))  # every key of a real SD 1.5 file
    assert stock.file_configs(BASE) == pretrain.model_configs()  # the architecture the script builds


@needs_base
def test_create_accepts_the_base_and_export_writes_it_back_exactly(tmp_path):
    md = create_model(BASE, "world", tmp_path)
    out = export_checkpoint(md, tmp_path / "again.safetensors", dtype="keep")
    original, again = load_file(str(BASE)), load_file(str(out))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


@needs_base
def test_the_stock_pipeline_draws_what_the_prompt_asks():
    """'a red circle on a blue background' shows a red circle on blue in >= 80% of samples, per the analyser."""
    images = stock.sample(pipeline(), "a red circle on a blue background", 20, seed=0)
    readings = [analyse(i) for i in images]
    hits = [r.colour == "red" and not r.colour2 and r.shape == "circle" and r.background == "blue" for r in readings]
    assert np.mean(hits) >= 0.8, readings


def test_the_reference_pretraining_imports_none_of_our_trainer():
    code = ("import sys; import bench.quality.pretrain; "
            "print([m for m in sys.modules if m.startswith('dreambooth.train')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_pretraining_script_writes_a_base_the_benchmark_runs_on(tmp_path, monkeypatch):
    out = tmp_path / "tiny-world.safetensors"
    assert pretrain.main(["--out", str(out), "--vae-steps", "2", "--vae-images", "64", "--steps", "2", "--images",
                          "64", "--calibration-images", "16", "--eval-every", "0", "--final-samples", "2"]) == 0
    assert sorted(load_file(str(out))) == sorted(reference_keys(REFERENCE_LDM["sd1"]))
    create_model(out, "smoke", tmp_path)
    # python -m bench quality on it, two methods at smoke size: each trains in the tab's worker, the JSON has the
    # base's row and each method's, with the four measures
    monkeypatch.setattr(run, "METHODS", copy.deepcopy(run.METHODS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run.main sets it for its workers
    assert run.main(["--out", str(tmp_path / "q.json"), "--base", str(out), "--methods", "lora", "textual_inversion",
                     "--epochs", "1", "--samples", "1", "--workdir", str(tmp_path / "bench")]) == 0
    table = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    assert [k for k in table if not k.startswith("_")] == ["base", "lora", "textual_inversion"]
    for row in ("base", "lora", "textual_inversion"):
        assert set(table[row]) == set(MEASURES) and all(0 <= v <= 1 for v in table[row].values()), table[row]
    assert table["_run"]["settings"]["lora"]["epochs"] == 1
