"""benchmarks/gpu_suite.py --smoke: the GPU suite's code runs on the CPU and writes its JSON and markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_gpu_suite_smoke_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert {"smoke", "device", "torch", "exactness", "sync_free", "throughput", "ratios", "decode", "goals",
            "seconds"} <= set(res)
    assert res["smoke"] and res["device"] == "cpu"
    assert set(res["exactness"]) == {"sparse_vs_masked_dense_fp32_loss", "sparse_vs_masked_dense_fp32_grad",
                                     "sparse_vs_masked_dense_bf16_loss", "per_sample_grn", "dense_vs_timm_logits"}
    assert all(c["ok"] for c in res["exactness"].values()), res["exactness"]
    assert res["sync_free"]["ok"] and not res["sync_free"]["checked"]  # set_sync_debug_mode needs CUDA
    assert sorted(r["impl"] for r in res["throughput"]) == sorted(
        ["ours", "ours-compiled", "masked-dense", "timm-dense"])
    assert all(r["img_s"] > 0 and r["peak_mib"] > 0 for r in res["throughput"])
    assert set(res["ratios"][0]) == {"variant", "batch", "ours_vs_masked_dense", "compiled_vs_eager",
                                     "ours_vs_timm_dense"}
    assert res["decode"]["img_s"] > 0
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| variant | batch | ours eager | ours compiled | masked-dense | timm dense (fine-tune) |" in md
    assert "## Exactness" in md and "GPU JPEG decode" in md
