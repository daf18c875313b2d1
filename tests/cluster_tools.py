"""Helpers for tests that start fcmae in child processes: their environment and a free port; for the multi-process
fault tests, launch a 2-process job the way a cluster user does (torchrun, accelerate launch), find its ranks and
their DataLoader workers, wait for its progress, signal them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# a tiny pretraining run: 2 processes x 4 images, 32 demo images -> 4 steps an epoch; sleep0.2 after each step
TINY_DDP = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
            "data.input_size=64", "data.limit=32", "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=10",
            "optim.warmup_epochs=0.5", "model.drop_path_rate=0.2", "run.batch_size=4", "run.progress=false",
            "run.log_every=1", "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no",
            "run.threads=1", "run.save_every_steps=4", "run.keep_last=20"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process: this checkout's fcmae first on the path, one OpenMP thread (two
    cores are shared by every process of a test), no inherited rank; ``extra`` set on top."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def torchrun(*args: str, restarts: int = 0, rdzv: str = "c10d") -> list[str]:
    """``torchrun`` with 2 processes on this machine; ``rdzv``: c10d (a fresh port) or static."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--max-restarts={restarts}",
            "--monitor-interval=0.2"]
    if rdzv == "c10d":
        base += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=fcmae-test"]
    else:
        base += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [*base, *args]


def accelerate_launch(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "accelerate"
    exe = str(exe) if exe.exists() else shutil.which("accelerate") or "accelerate"
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def script(name: str, *args: str) -> list[str]:
    return [str(ROOT / "tests" / name), *args]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in children(todo.pop()):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)


def ranks(launcher: int, timeout: float = 120) -> dict[int, int]:
    """``{rank: pid}`` of the launcher's worker processes (the trainers, not their DataLoader workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for pid in children(launcher):
            e = proc_env(pid)
            if "RANK" in e:
                found[int(e["RANK"])] = pid
        if len(found) == 2:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the launcher {launcher} has no 2 ranks after {timeout} s")


def steps_logged(out: Path) -> int:
    """The newest step in ``metrics.jsonl`` (0: none yet)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "train":
            steps.append(int(rec["step"]))
    return max(steps)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while (now := steps_logged(out)) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {step} after {timeout} s (at {now})")
        time.sleep(0.02)
    return now
