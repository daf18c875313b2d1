"""``fcmae pretrain [CONFIG] [key=value ...] [--resume auto|DIR]``: FCMAE pretraining.

Results: ``<run.output_dir>/summary.json`` (and the lines printed here).
"""

from __future__ import annotations

import argparse

OPTIONS = {"--resume": "run.resume"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_config_arguments

    add_config_arguments(p, "demo or configs/pretrain/convnextv2_atto.yaml", OPTIONS)


def _pretrain(args: argparse.Namespace) -> int:
    from fcmae.commands._common import is_main_process, load_command_config, print_run_tail
    from fcmae.config import PretrainConfig
    from fcmae.train.pretraining import run_pretraining

    s = run_pretraining(load_command_config(PretrainConfig, args, OPTIONS))
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
