"""FSDP that really shards, on the CPU: 2 gloo processes with torch's ``fully_shard`` (see tests/fsdp_run.py for
why not accelerate's FSDP: accelerate enables it on accelerator devices only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_tools import child_env, free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_fully_sharded_training_export_and_resume(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "fsdp_run.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world"] == 2 and res["sharded_halves"]  # every rank holds half of each Block's parameters
    assert max(res["loss_diffs"]) < 1e-5  # the global batch over 2 ranks: one process's loss
    assert res["weights_diff"] < 1e-4  # after two AdamW steps, gathered on every rank
    assert res["export_diff"] < 1e-4 and res["exported"] == ["encoder", "figure"]  # the recipe's export
    assert (tmp_path / "reconstruction.png").is_file()
    assert res["resume_diff"] == 0.0  # sharded save + load (torch.distributed.checkpoint), then a step
    assert res["checkpointing_diff"] <= 1e-6  # activation checkpointing inside the sharded blocks, drop path on
