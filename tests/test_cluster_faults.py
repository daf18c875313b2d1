"""A job of 2 processes (gloo, CPU) under the launchers cluster users use, with the faults clusters inflict: a
preemption that signals every process at once, SIGTERM to one rank, a SIGKILLed trainer restarted at once, elastic
restarts after a rank dies, a frozen rank, a dead rank. Every test is bounded in time; the resumed runs must equal
an uninterrupted one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster_tools import (
    ROOT,
    TINY_DDP,
    accelerate_launch,
    child_env,
    descendants,
    ranks,
    script,
    steps_logged,
    torchrun,
    wait_for_step,
)
from safetensors.torch import load_file

from fcmae.train.rundir import LOCK_NAME
from fcmae.weights.checkpoints import checkpoint_status, find_latest_checkpoint

pytestmark = pytest.mark.slow


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _job(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=child_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise AssertionError(f"the job did not end within {timeout} s") from None


def _our_tracebacks(text: str) -> list[str]:
    """Traceback frames in our code (the launcher's own ChildFailedError report is torch's, not ours)."""
    return [x for x in text.splitlines() if x.strip().startswith("File ") and ("/fcmae/" in x or "/tests/" in x)]


def _pretrain(out: Path, action: str = "sleep0.1", *extra: str) -> list[str]:
    return script("signal_run.py", "pretrain", action, *TINY_DDP, f"run.output_dir={out}", "run.resume=auto",
                  *extra)


@pytest.fixture(scope="module")
def ddp_ref(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (40 steps) every interrupted one must equal."""
    out = tmp_path_factory.mktemp("ddp") / "ref"
    p = _job(accelerate_launch(*_pretrain(out, "none")), out.parent / "ref.log")
    assert _finish(p, 300) == 0, (out.parent / "ref.log").read_text()[-3000:]
    assert steps_logged(out) == 40
    return out


# ------------------------------------------------------------------------------------------- preemption
def test_preemption_signalling_every_process_at_once_keeps_the_stop_checkpoint(tmp_path, ddp_ref):
    """SIGTERM to the launcher, both ranks and their DataLoader workers at the same moment (what Slurm and
    Kubernetes do), 5 times in one run: each stop saves the step it reached, and the run resumed 5 times equals the
    uninterrupted one. The launcher forwards its SIGTERM to the ranks again while they save."""
    out, stops = tmp_path / "run", []
    for i in range(6):
        log = tmp_path / f"segment{i}.log"
        p = _job(accelerate_launch(*_pretrain(out, "sleep0.1", "data.num_workers=2")), log)
        if i < 5:
            wait_for_step(out, steps_logged(out) + 3, p)
            everyone = [p.pid, *descendants(p.pid)]
            assert len(everyone) >= 7, everyone  # launcher, 2 ranks, 4 workers
            for pid in everyone:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        t0 = time.monotonic()
        code = _finish(p, 180)
        text = log.read_text()
        if i == 5:
            assert code == 0, text[-3000:]
            break
        took = time.monotonic() - t0
        assert code != 0, text[-3000:]
        found = re.findall(r"fcmae pretrain: stopped by SIGTERM after step (\d+): checkpoint (\S+);", text)
        assert len(found) == 1, text[-4000:]  # one line, from rank 0
        step, ckpt = int(found[0][0]), Path(found[0][1])
        assert ckpt.name == f"step_{step:08d}" and checkpoint_status(ckpt) == ("ok", None), text[-3000:]
        assert "aborted" not in text and not _our_tracebacks(text), text[-4000:]
        assert "exitcode: 143" in text or "exitcode" not in text, text[-3000:]
        stops.append((step, round(took, 1)))
    print("stops (step, seconds to exit):", stops)
    assert len({s for s, _ in stops}) == 5  # five different steps: every stop moved the run on
    assert _max_diff(ddp_ref, out) <= 1e-6


def test_sigterm_to_rank_0_alone_stops_both_ranks_without_our_traceback(tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    p = _job(accelerate_launch(*_pretrain(out)), log)
    r = ranks(p.pid)
    wait_for_step(out, 5, p)
    os.kill(r[0], signal.SIGTERM)
    code = _finish(p, 120)
    text = log.read_text()
    assert code != 0, text[-3000:]
    found = re.findall(r"fcmae pretrain: stopped by SIGTERM after step (\d+): checkpoint (\S+);", text)
    assert len(found) == 1 and checkpoint_status(Path(found[0][1])) == ("ok", None), text[-3000:]
    assert not _our_tracebacks(text), text[-4000:]


# ------------------------------------------------------------------------------------------- the lock
def _lock_holders(lock: Path) -> list[int]:
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(f) == str(lock) for f in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return holders


def test_a_restart_0_1_s_after_sigkill_gets_the_lock_although_workers_outlive_the_trainer(tmp_path):
    """The trainer is SIGKILLed with 2 DataLoader workers running: they outlive it for seconds (they poll their
    parent), but none of them holds the run's lock, so a restart 0.1 s later (an elastic agent's) gets in."""
    from test_run_safety import TINY

    out = tmp_path / "run"
    args = [*TINY, "data.num_workers=2", f"run.output_dir={out}"]
    crash = subprocess.Popen([sys.executable, *script("crash_run.py", "pretrain", "3", *args)], env=child_env(),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert crash.wait(timeout=300) == -signal.SIGKILL
    # the orphans: the processes whose command line is the dead trainer's
    argv = [sys.executable, *script("crash_run.py", "pretrain", "3", *args)]
    orphans = [int(x.name) for x in Path("/proc").glob("[0-9]*") if _cmdline(int(x.name)) == argv]
    holders = _lock_holders(out / LOCK_NAME)
    time.sleep(0.1)
    res = subprocess.run([sys.executable, *script("signal_run.py", "pretrain", "none", *args, "run.resume=auto")],
                         env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert orphans, "no DataLoader worker outlived the trainer: the test shows nothing"
    assert holders == [], f"orphaned workers {holders} hold {out / LOCK_NAME}"
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr, res.stderr[-3000:]


def _cmdline(pid: int) -> list[str]:
    try:
        return [x for x in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if x]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------- dead and frozen ranks
@pytest.mark.parametrize("victim", [0, 1])
def test_elastic_restart_after_a_rank_is_killed_resumes_exactly(tmp_path, ddp_ref, victim):
    """``torchrun --max-restarts=2``, ``run.resume=auto``: kill -9 of either rank restarts both, they resume from
    the newest complete checkpoint, and the final weights equal the uninterrupted run's."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    t0 = time.monotonic()
    p = _job(torchrun(*_pretrain(out, "sleep0.1", "run.dist_timeout_s=30"), restarts=2), log)
    r = ranks(p.pid)
    wait_for_step(out, 10, p)
    os.kill(r[victim], signal.SIGKILL)
    code = _finish(p, 180)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert f"rank {1 - victim}: rank {victim} lost at step" in text, text[-4000:]
    assert "resumed from" in text and _max_diff(ddp_ref, out) <= 1e-6
    print(f"rank {victim} killed: finished {time.monotonic() - t0:.0f} s after the start")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_rank_ends_the_survivor_with_one_line_within_the_timeout(tmp_path, victim):
    out, log = tmp_path / "run", tmp_path / "job.log"
    p = _job(accelerate_launch(*_pretrain(out, "sleep0.1", "run.dist_timeout_s=20")), log)
    r = ranks(p.pid)
    wait_for_step(out, 6, p)
    os.kill(r[victim], signal.SIGKILL)
    t0 = time.monotonic()
    code = _finish(p, 60)
    took = time.monotonic() - t0
    text = log.read_text()
    assert code != 0 and took < 20 + 10, (took, text[-3000:])
    lines = [x for x in text.splitlines() if x.startswith("fcmae pretrain: error:")]
    assert len(lines) == 1 and f"rank {1 - victim}: rank {victim} lost at step" in lines[0], text[-3000:]
    assert not _our_tracebacks(text), text[-4000:]
    print(f"rank {victim} killed: the job ended {took:.1f} s later: {lines[0]}")


def test_a_frozen_rank_is_not_waited_for_silently(tmp_path):
    """SIGSTOP of rank 1 past ``run.hang_timeout_s``: rank 0's watchdog writes its stacks and ends it (status 4);
    rank 1, woken, finds itself hung too and does the same. Both within the bound, each with one line."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    p = _job(accelerate_launch(*_pretrain(out, "sleep0.1", "run.hang_timeout_s=4", "run.dist_timeout_s=60")), log)
    r = ranks(p.pid)
    wait_for_step(out, 6, p)
    os.kill(r[1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        deadline = t0 + 30
        while not (out / "hang-0.txt").is_file():
            assert time.monotonic() < deadline and p.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        rank0_s = time.monotonic() - t0
    finally:
        os.kill(r[1], signal.SIGCONT)
    code = _finish(p, 60)
    took = time.monotonic() - t0
    text = log.read_text()
    assert code != 0, text[-3000:]
    for rank in (0, 1):
        stacks = (out / f"hang-{rank}.txt").read_text()
        assert "most recent call first" in stacks and "trainer.py" in stacks, stacks[:2000]
        lines = [x for x in text.splitlines() if f"rank {rank} hung: no step completed for" in x]
        assert len(lines) == 1, text[-3000:]
    assert 4 <= rank0_s < 4 + 15 and took < 60, (rank0_s, took)
    assert "exitcode: 4" in text, text[-3000:]
    print(f"rank 0 wrote its stacks {rank0_s:.1f} s after the SIGSTOP; the job ended after {took:.1f} s")
