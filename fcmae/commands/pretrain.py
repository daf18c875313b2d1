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


def _report(s: dict) -> None:
    if s.get("figure"):
        print(f"reconstruction figure: {s['figure']}")
    print(f"encoder weights: {s.get('encoder')}")


def _pretrain(args: argparse.Namespace) -> int:
    from fcmae.commands._flags import run_training_command
    from fcmae.config import PretrainConfig

    return run_training_command(PretrainConfig, args, FLAGS, "fcmae.train.pretraining:run_pretraining", _report)


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_guarded

    return run_guarded("pretrain", lambda: _pretrain(args))
