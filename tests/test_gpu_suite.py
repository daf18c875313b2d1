"""benchmarks/gpu_suite.py --smoke: the GPU suite's code runs on the CPU; it cannot come back empty. A section made
to fail and one made to hang (``--inject-fault``) become rows, every other section still runs and is written, the
files are rewritten after every section, and the run ends within its budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
BUDGET = 150.0


def test_gpu_suite_smoke_records_a_failure_and_a_hang_and_keeps_its_budget(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path),
           "--inject-fault", "--budget-s", str(BUDGET), "--min-timeout-s", "20"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUDGET + 120, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert wall <= BUDGET + 30, wall  # the interpreter's own start and exit on top of the budget
    assert "plan (" in proc.stderr and "estimated" in proc.stderr  # printed before the first section
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["smoke"] and res["device"] == "cpu" and res["missing"] == [] and res["seconds"] <= BUDGET
    rows = {r["section"]: r for r in res["rows"]}
    assert [r["section"] for r in res["rows"]] == [p["key"] for p in res["plan"]]  # every planned section a row
    assert rows["injected failure"]["status"] == "failed" and "injected failure" in rows["injected failure"]["error"]
    assert rows["injected hang"]["status"] == "timeout"
    assert rows["exactness"]["status"] == "ok", rows["exactness"]
    assert all(c["ok"] for c in rows["exactness"]["result"]["checks"].values())
    assert rows["sync-free step"]["status"] == "ok"
    steps = [r for r in res["rows"] if r["kind"] == "step" and r["status"] == "ok"]
    assert len(steps) >= 2 and all(r["result"]["img_s"] > 0 and r["result"]["peak_mib"] > 0 for r in steps)
    assert {r["status"] for r in res["rows"]} <= {"ok", "failed", "timeout", "skipped"}
    assert all(p["est_s"] > 0 for p in res["plan"])
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| injected hang | timeout |" in md and "| exactness | ok |" in md
