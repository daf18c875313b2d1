"""examples/slurm/pretrain.sbatch against a real one-node Slurm cluster the test starts itself (Debian's
slurm-wlm; skipped with the reason where it is not installed or not root): preempted twice mid-run, by
``scontrol requeue`` (Slurm kills and requeues) and by ``scancel --signal=TERM`` (the run stops, the script
requeues), the job resumes each time and its final weights equal an uninterrupted run's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster_tools import ROOT, TINY_DDP, child_env, steps_logged, torchrun
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, missing

from fcmae.weights.checkpoints import find_latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing() is not None, reason=f"Slurm: {missing()}")]

SBATCH = ROOT / "examples" / "slurm" / "pretrain.sbatch"
# 200 steps (2 processes x 4 images, 32 images an epoch), a checkpoint every 50
RUN = [*TINY_DDP, "optim.epochs=50", "run.save_every_steps=50", "run.keep_last=3", "run.log_every=5"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def _wait(what: str, ready, timeout: float, slurm: SlurmCluster, job: str) -> None:
    """Poll ``ready`` until it holds (``job`` names the job in the error)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s: {slurm.job(job)}\n{slurm.logs()[-3000:]}")
        time.sleep(0.2)


def test_sbatch_preempted_twice_requeues_resumes_and_equals_an_uninterrupted_run(tmp_path, slurm):
    ref = tmp_path / "ref"
    reference = subprocess.run(torchrun("-m", "fcmae", "pretrain", "demo", *RUN, f"run.output_dir={ref}",
                                        "run.resume=auto"), env=child_env(), cwd=ROOT, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, log = tmp_path / "run", tmp_path / "job.log"
    e = {**child_env(), "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "SLURM_CONF": slurm.env["SLURM_CONF"]}
    sub = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--cpus-per-task=2", str(SBATCH), "demo",
                          *RUN, f"run.output_dir={out}"], env=e, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    t0 = time.monotonic()

    _wait("step 40", lambda: steps_logged(out) >= 40, 300, slurm, job)
    slurm.run("scontrol", "requeue", job)  # Slurm: SIGTERM to every process of the job, requeue
    first = steps_logged(out)
    _wait("a requeued start", lambda: "start 1 " in log.read_text(), 300, slurm, job)
    _wait("progress after the requeue", lambda: steps_logged(out) >= first + 40, 300, slurm, job)
    slurm.run("scancel", "--signal=TERM", job)  # the steps get SIGTERM: the run stops, the script requeues
    _wait("the job to finish", lambda: slurm.job(job).get("JobState") in ("COMPLETED", "FAILED", None), 600,
          slurm, job)
    text = log.read_text()
    info = slurm.job(job)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{text[-4000:]}\n{slurm.logs()[-6000:]}"
    assert int(info["Restarts"]) == 2, (info, text[-3000:])
    stops = [x for x in text.splitlines() if x.startswith("fcmae pretrain: stopped by SIGTERM after step")]
    assert len(stops) == 2 and text.count("resumed from") == 2, text[-4000:]
    assert "torchrun exit" in text and "run finished" in text, text[-2000:]
    wa, wb = _weights(ref), _weights(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    print(f"Slurm job {job}: 2 preemptions, {stops}; finished in {time.monotonic() - t0:.0f} s")
