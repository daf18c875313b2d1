"""``fcmae finetune CONFIG [key=value ...] [--init PATH] [--resume auto|DIR]``: supervised fine-tuning."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (e.g. configs/finetune/fashion_mnist.yaml); defaults otherwise")
    # REMAINDER (not "*"): argparse cannot take positionals after an option, so `CONFIG --init X k=v` would fail;
    # options met among the overrides are picked out in `run`
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="key=value overrides, e.g. optim.blr=1e-4 data.labels_per_class=10")
    p.add_argument("--init", default=None,
                   help="weights to start from, any layout `fcmae convert` reads (same as model.init=...)")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (same as run.resume=...)")


def _pick_options(items: list[str], args: argparse.Namespace) -> list[str]:
    """Move ``--init X`` / ``--resume X`` (or ``--opt=X``) found among the overrides onto ``args``."""
    rest: list[str] = []
    it = iter(items)
    for item in it:
        name, eq, value = item.partition("=")
        if name in ("--init", "--resume"):
            if not eq:
                value = next(it, "")
                if not value:
                    raise ValueError(f"{name} needs a value")
            setattr(args, name[2:], value)
        elif item.startswith("-"):
            raise ValueError(f"unknown option {item} (options: --init PATH, --resume auto|DIR)")
        else:
            rest.append(item)
    return rest


def run(args: argparse.Namespace) -> int:
    from fcmae.config import ConfigError, FinetuneConfig, load_config

    config = args.config
    try:
        overrides = _pick_options(list(args.overrides), args)
    except ValueError as exc:
        print(f"fcmae finetune: error: {exc}", file=sys.stderr)
        return 2
    if config is not None and "=" in config:  # only overrides given
        overrides.insert(0, config)
        config = None
    if args.init:
        overrides.append(f"model.init={args.init}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(FinetuneConfig, config, overrides)
    except ConfigError as exc:
        print(f"fcmae finetune: config error: {exc}", file=sys.stderr)
        return 2
    from fcmae.data import DataError
    from fcmae.engine import NonFiniteLossError
    from fcmae.finetuning import run_finetuning
    from fcmae.io import CheckpointError

    try:
        s = run_finetuning(cfg)
    except NonFiniteLossError as exc:
        print(f"fcmae finetune: error: {exc}", file=sys.stderr)
        return 3
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fcmae finetune: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    print(f"model: top-1 {pct(s['val_top1'])} top-5 {pct(s['val_top5'])}"
          + (f"; EMA: top-1 {pct(s['ema_top1'])} top-5 {pct(s['ema_top5'])}" if s.get("ema_top1") is not None else ""))
    print(f"best top-1 {s['best_top1']:.2f} top-5 {s['best_top5']:.2f} ({s['best_source']} weights, "
          f"epoch {s['best_epoch']}): {s['best']}")
    print(f"last weights: {s['last']}")
    print(f"checkpoint: {s['checkpoint']}")
    print(f"metrics: {s['output_dir']}/metrics.jsonl")
    print(f"final loss {s['final_loss']:.4f} after {s['steps']} steps, {s['wall_s']:.0f} s, "
          f"{s['img_per_s']:.1f} img/s")
    return 0
