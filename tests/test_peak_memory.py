"""status.json's peak memory is the worker's own and says what it measures (issue: a worker started by the WebUI
reported the WebUI's peak, because Linux hands ``ru_maxrss`` on across exec)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dreambooth import platform_compat
from dreambooth.store import model_dir
from dreambooth.train import status as st
from dreambooth.ui.output import status_html

ROOT = Path(__file__).resolve().parents[1]

# A big parent (1.5 GB touched, like the WebUI with a model loaded) starts a small worker, which writes status.json
# through the real StatusWriter on the CPU.
PARENT = """
import json, subprocess, sys
import numpy as np
from dreambooth import platform_compat
big = np.ones(1536 * 2**20, dtype=np.uint8)  # 1.5 GB, every page touched
child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
print(json.dumps({"parent_peak": platform_compat.peak_rss_bytes(), "big": int(big[::4096].sum()),
                  "child": json.loads(child.stdout.strip().splitlines()[-1])}))
"""
CHILD = """
import json, torch
from dreambooth.store import model_dir
from dreambooth.train.status import StatusWriter
model = model_dir("m", ROOT_DIR)
writer = StatusWriter(model, torch.device("cpu"))
writer.update(force=True, state="running")
writer.close()
status = json.loads(model.status_path.read_text())
print(json.dumps({k: status[k] for k in ("peak_memory_mb", "peak_memory_measure")}))
"""


def test_a_worker_reports_its_own_peak_not_the_bigger_parents(tmp_path):
    model_dir("m", tmp_path).path.mkdir(parents=True)
    child = f"ROOT_DIR = {str(tmp_path)!r}\n" + textwrap.dedent(CHILD)
    parent = f"CHILD = {child!r}\n" + textwrap.dedent(PARENT)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    parent_mb = result["parent_peak"] / 2**20
    child = result["child"]
    assert parent_mb > 1536  # the parent really held 1.5 GB
    assert child["peak_memory_measure"] == st.PEAK_PROCESS_RSS
    # the worker's own peak (Python + torch, a few hundred MB) is far below the parent's, never the parent's carried
    # over: with ru_maxrss on Linux it was at least the parent's 1.5 GB
    assert 0 < child["peak_memory_mb"] < parent_mb - 1024


def test_peak_rss_grows_with_this_process(tmp_path):
    before = platform_compat.peak_rss_bytes()
    code = ("from dreambooth import platform_compat as p; import numpy as np; a = p.peak_rss_bytes(); "
            "b = np.ones(512 * 2**20, dtype=np.uint8); print(a, p.peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    start, end = (int(n) for n in out.stdout.split())
    assert before > 0 and end - start > 400 * 2**20  # 512 MB touched shows up in the peak


def test_cuda_devices_report_cuda_peak_allocated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert st.peak_memory(torch.device("cuda", 0)) == (3072.0, st.PEAK_CUDA_ALLOCATED)
    monkeypatch.setattr(platform_compat, "peak_rss_bytes", lambda: None)  # nothing readable: no number, no guess
    assert st.peak_memory(torch.device("cpu")) == (None, st.PEAK_PROCESS_RSS)


def test_the_tab_says_what_the_peak_measures():
    base = {"state": "running", "step": 1, "total_steps": 4}
    rss = status_html({**base, "peak_memory_mb": 5324.8, "peak_memory_measure": st.PEAK_PROCESS_RSS}, True, "m")
    cuda = status_html({**base, "peak_memory_mb": 812.0, "peak_memory_measure": st.PEAK_CUDA_ALLOCATED}, True, "m")
    assert "peak RSS 5.2 GB (this process)" in rss and "peak CUDA allocated 812 MB" in cuda
    assert "peak" not in status_html({**base, "peak_memory_mb": None}, True, "m")
