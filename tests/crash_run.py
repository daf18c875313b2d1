"""Run a recipe and SIGKILL the process right after optimizer step N, through the trainer's documented
``hooks`` (step hooks) (no test-only code path in the package). Usage:

    python tests/crash_run.py pretrain|finetune N key=value ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> None:
    from fcmae.config import FinetuneConfig, PretrainConfig, load_config
    from fcmae.train.finetuning import run_finetuning
    from fcmae.train.pretraining import run_pretraining

    kind, kill_step, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    cls, run = {"pretrain": (PretrainConfig, run_pretraining), "finetune": (FinetuneConfig, run_finetuning)}[kind]

    def kill(trainer) -> None:
        if trainer.state.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    run(load_config(cls, None, overrides), hooks=[kill])


def kill_and_resume(out: Path, kind: str, kill_step: int, args: list[str], env: dict[str, str], cwd: Path
                    ) -> subprocess.CompletedProcess:
    """Run ``fcmae KIND ARGS`` into ``out``, SIGKILLed after step ``kill_step`` (asserted), then resume it with
    ``run.resume=auto``; returns the resumed run (its exit status is for the caller to check)."""
    crash = subprocess.run([sys.executable, __file__, kind, str(kill_step), *args, f"run.output_dir={out}"], env=env,
                           capture_output=True, text=True, timeout=600, cwd=cwd)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    return subprocess.run([sys.executable, "-m", "fcmae", kind, *args, f"run.output_dir={out}", "run.resume=auto"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between the model weights of the newest checkpoints of runs ``a`` and
    ``b``."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(sorted((r / "checkpoints").glob("step_*"))[-1] / "model.safetensors")) for r in (a, b))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


if __name__ == "__main__":
    main()
