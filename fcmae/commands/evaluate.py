"""``fcmae evaluate CHECKPOINT --data SPEC``: top-1/top-5 accuracy of a classifier.

CHECKPOINT is a weight file or accelerate checkpoint directory in any layout ``fcmae convert`` reads (it needs a
classifier head), or a ``fcmae finetune`` output directory (its ``best.safetensors``, else ``last.safetensors``,
else the newest complete ``checkpoints/step_N``). SPEC is a dataset spec (``fcmae.data.builders``): a folder of
class folders (an ImageNet-style root with ``train/`` and ``val/`` means its ``val/``) or ``fashion_mnist[:test]``.
Defaults come from the checkpoint where it records them (our exports store ``image_size`` and ``crop_pct``).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_data_arguments(p: argparse.ArgumentParser, limit: int = 0) -> None:
    """Flags shared by the commands that read labelled data (evaluate, probe, diagnose)."""
    from fcmae.commands._flags import add_flag

    add_flag(p, "input_size", None, "from the checkpoint, or 224")
    p.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                   help="decode images to 1 (gray) or 3 (RGB) channels (default: the stem's); the stem is adapted")
    p.add_argument("--crop-pct", type=float, default=None, help="centre crop fraction (default: checkpoint's, .875)")
    add_flag(p, "batch_size", 64)
    add_flag(p, "num_workers", 2)
    add_flag(p, "limit", limit, f"{limit or 'all'}; of a labelled set, a seeded class-stratified subset")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the Debian location)")
    add_flag(p, "mixed_precision", "auto")
    add_flag(p, "no_progress")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument

    p.add_argument("checkpoint", metavar="CHECKPOINT", help="weights (any layout) or a finetune output directory")
    p.add_argument("--data", required=True, metavar="SPEC", help="folder of class folders, or fashion_mnist[:test]")
    p.add_argument("--model", default=None, help="variant, e.g. convnextv2_atto (default: inferred from the shapes)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a checkpoint that holds both")
    add_data_arguments(p)
    add_json_argument(p)


def check_data_arguments(args: argparse.Namespace) -> None:
    """Range checks of the flags ``add_data_arguments`` adds (one-line errors)."""
    for flag in ("batch_size", "input_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.num_workers < 0 or args.limit < 0:
        raise ValueError("--num-workers and --limit must be >= 0")


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from fcmae.commands._common import tune_malloc

    check_data_arguments(args)
    tune_malloc(args)  # after the checks: a usage error is fast
    import torch
    from accelerate import Accelerator

    from fcmae.data import SeededSamples, build_eval_transform, dataset_targets, first_per_class, labelled_dataset
    from fcmae.evaluation.accuracy import evaluate
    from fcmae.models.convnextv2 import check_image_size
    from fcmae.train.trainer import resolve_mixed_precision
    from fcmae.weights.loader import load_classifier

    model, info = load_classifier(args.checkpoint, args.model, args.in_chans, args.ema)
    meta = info["metadata"]
    size = args.input_size or int(meta.get("image_size", 224))
    crop_pct = args.crop_pct or float(meta.get("crop_pct", 0.875))
    check_image_size(size, size)
    tf = build_eval_transform(size, crop_pct, model.in_chans)
    ds, classes = labelled_dataset(args.data, tf, model.in_chans, args.data_root)
    if len(classes) > info["num_classes"]:
        raise ValueError(f"--data {args.data} has {len(classes)} classes but the head predicts {info['num_classes']}")
    picked = first_per_class(dataset_targets(ds), args.limit)  # --limit: a stratified subset of that size
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision))
    loader = torch.utils.data.DataLoader(SeededSamples(ds, picked), batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)
    model, loader = accelerator.prepare(model, loader)
    res = evaluate(model, loader, accelerator, "evaluate", progress=not args.no_progress)
    return {**res, "checkpoint": info["path"], "layout": info["layout"], "model": info["name"],
            "num_classes": info["num_classes"], "in_chans": model.in_chans, "weight_in_chans": info["weight_in_chans"],
            "fresh": info["fresh"], "data": args.data, "input_size": size, "crop_pct": crop_pct,
            "classes_match": _classes_match(meta, classes)}


def _classes_match(meta: dict[str, str], classes: list[str]) -> bool | None:
    import json

    try:
        trained = json.loads(meta["classes"])
    except (KeyError, ValueError):
        return None
    return trained == classes if isinstance(trained, list) else None


def _report(r: dict[str, Any]) -> None:
    adapted = f" (stem adapted from {r['weight_in_chans']})" if r["in_chans"] != r["weight_in_chans"] else ""
    print(f"checkpoint: {r['checkpoint']} ({r['layout']} layout), {r['model']}, {r['num_classes']} classes, "
          f"in_chans {r['in_chans']}{adapted}")
    if r["fresh"]:
        print(f"note: not in the weights ({', '.join(r['fresh'])}): left at their initial values")
    if r["classes_match"] is False:
        print("warning: the class names of the data differ from those the checkpoint was trained on")
    resize = int(r["input_size"] / r["crop_pct"] + 1e-6)
    print(f"data: {r['data']}, {r['images']} images, input {r['input_size']} (resize {resize}, centre crop "
          f"{r['input_size']}, bicubic)")
    print(f"top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  loss {r['loss']:.4f}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("evaluate", lambda: _evaluate(args), _report, args.json)
