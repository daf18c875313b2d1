"""Run a recipe and SIGKILL the process right after optimizer step N, through the trainer's documented
``hooks`` (step hooks) (no test-only code path in the package). Usage:

    python tests/crash_run.py pretrain|finetune N key=value ...
"""

from __future__ import annotations

import os
import signal
import sys


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


if __name__ == "__main__":
    main()
