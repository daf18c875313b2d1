"""``fcmae pretrain [CONFIG] [key=value ...] [--batch-size N ...] [--print-config]``: FCMAE pretraining.

Results: ``<run.output_dir>/summary.json``, ``metrics.jsonl`` (and the lines printed here).
"""

from __future__ import annotations

import argparse

from fcmae.commands._flags import TRAIN_FLAGS

FLAGS = TRAIN_FLAGS
EXAMPLES = ("demo", "pretrain/convnextv2_atto data.path=...")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._flags import add_config_arguments

    add_config_arguments(p, "pretrain", EXAMPLES, FLAGS, "model, data, optim, run, monitor")


def _pretrain(args: argparse.Namespace) -> int:
    from fcmae.commands._common import tune_malloc
    from fcmae.commands._flags import load_command_config
    from fcmae.config import PretrainConfig, config_yaml

    cfg = load_command_config(PretrainConfig, args, FLAGS)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    tune_malloc(args)
    from fcmae.commands._common import is_main_process, print_run_tail
    from fcmae.train.pretraining import run_pretraining

    s = run_pretraining(cfg)
    if not is_main_process() or s.get("already_finished"):  # a finished run: the trainer said so in one line
        return 0
    if s.get("figure"):
        print(f"reconstruction figure: {s['figure']}")
    print(f"encoder weights: {s.get('encoder')}")
    print_run_tail(s)
    return 0


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_guarded

    return run_guarded("pretrain", lambda: _pretrain(args))
