"""``fcmae finetune [CONFIG] [key=value ...] [--init PATH] [--batch-size N ...] [--print-config]``: fine-tuning.

Results: ``<run.output_dir>/summary.json``, ``metrics.jsonl`` (and the lines printed here). ``--limit N`` limits
both sets (``data.limit`` and ``data.val_limit``).
"""

from __future__ import annotations

import argparse

from fcmae.commands._flags import TRAIN_FLAGS

FLAGS = {**TRAIN_FLAGS, "limit": ("data.limit={}", "data.val_limit={}"), "init": ("model.init={}",)}
EXAMPLES = ("finetune/fashion_mnist", "finetune/convnextv2_atto data.path=... --init encoder.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._flags import add_config_arguments

    add_config_arguments(p, "finetune", EXAMPLES, FLAGS, "model, data, optim, mixup, ema, run")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _report(s: dict) -> None:
    ema = f"; EMA: top-1 {_pct(s['ema_top1'])} top-5 {_pct(s['ema_top5'])}" if s.get("ema_top1") is not None else ""
    print(f"model: top-1 {_pct(s['val_top1'])} top-5 {_pct(s['val_top5'])}{ema}")
    print(f"best top-1 {s['best_top1']:.2f} top-5 {s['best_top5']:.2f} ({s['best_source']} weights, "
          f"epoch {s['best_epoch']}): {s['best']}")
    print(f"last weights: {s['last']}")


def _finetune(args: argparse.Namespace) -> int:
    from fcmae.commands._flags import run_training_command
    from fcmae.config import FinetuneConfig

    return run_training_command(FinetuneConfig, args, FLAGS, "fcmae.train.finetuning:run_finetuning", _report)


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_guarded

    return run_guarded("finetune", lambda: _finetune(args))
