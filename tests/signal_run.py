"""Run a recipe with a step hook that signals the process itself, through ``run_guarded`` (the exit status a shell
sees from ``fcmae pretrain``/``finetune``). Usage:

    python tests/signal_run.py pretrain|finetune ACTION key=value ...

ACTION: ``SIGTERM@3`` (send SIGTERM to this process right after optimizer step 3), ``SIGTERM@2,3`` (step 2 on rank 0,
step 3 on rank 1 of a multi-process launch), ``sleep0.5`` (sleep after every step: a slow run), ``none``.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    from fcmae.commands._common import run_guarded
    from fcmae.config import FinetuneConfig, PretrainConfig, load_config
    from fcmae.train.finetuning import run_finetuning
    from fcmae.train.pretraining import run_pretraining

    kind, action, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cls, run = {"pretrain": (PretrainConfig, run_pretraining), "finetune": (FinetuneConfig, run_finetuning)}[kind]
    hooks = []
    if "@" in action:
        name, steps = action.split("@")
        sig = getattr(signal, name)
        at = [int(x) for x in steps.split(",")][min(int(os.environ.get("RANK", "0")), steps.count(","))]
        hooks.append(lambda ctx: os.kill(os.getpid(), sig) if ctx.state.step == at else None)
    elif action.startswith("sleep"):
        pause = float(action[len("sleep"):])
        hooks.append(lambda ctx: time.sleep(pause))
    return run_guarded(kind, lambda: run(load_config(cls, None, overrides), hooks=hooks) and 0)


if __name__ == "__main__":
    sys.exit(main())
