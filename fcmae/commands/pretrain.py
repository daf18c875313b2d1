"""``fcmae pretrain CONFIG [key=value ...]``: FCMAE pretraining."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (e.g. configs/demo.yaml); defaults otherwise")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4 run.batch_size=32")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (same as run.resume=...)")


def run(args: argparse.Namespace) -> int:
    from fcmae.config import ConfigError, PretrainConfig, load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides given
        overrides.insert(0, config)
        config = None
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(PretrainConfig, config, overrides)
    except ConfigError as exc:
        print(f"fcmae pretrain: config error: {exc}", file=sys.stderr)
        return 2
    from fcmae.engine import NonFiniteLossError
    from fcmae.pretraining import run_pretraining

    try:
        summary = run_pretraining(cfg)
    except NonFiniteLossError as exc:
        print(f"fcmae pretrain: error: {exc}", file=sys.stderr)
        return 3
    if summary.get("figure"):
        print(f"reconstruction figure: {summary['figure']}")
    print(f"encoder weights: {summary.get('encoder')}")
    print(f"checkpoint: {summary.get('checkpoint')}")
    print(f"metrics: {summary['output_dir']}/metrics.jsonl")
    print(f"final loss {summary['final_loss']:.4f} after {summary['steps']} steps, {summary['wall_s']:.0f} s, "
          f"{summary['img_per_s']:.1f} img/s")
    return 0
