"""``fcmae evaluate CHECKPOINT --data VAL [--model NAME] [--input-size N] [--in-chans C]``: top-1/top-5 accuracy.

CHECKPOINT is a weight file or accelerate checkpoint directory in any layout ``fcmae convert`` reads (it needs a
classifier head), or a ``fcmae finetune`` output directory (its ``best.safetensors``, else ``last.safetensors``,
else the newest ``checkpoints/step_N``). VAL is a folder of class folders (an ImageNet-style root with ``train/``
and ``val/`` means its ``val/``), or ``fashion_mnist[:test|:train]`` (IDX files in ``--data-root``).

Defaults come from the checkpoint where it records them (our exports store ``image_size`` and ``crop_pct``):
the variant from the weights' shapes, ``in_chans`` from the stem, 224 / 0.875 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="weights (any layout) or a finetune output directory")
    p.add_argument("--data", required=True, metavar="VAL",
                   help="folder of class folders, or fashion_mnist[:test|:train]")
    p.add_argument("--model", default=None, help="variant, e.g. convnextv2_atto (default: inferred from the shapes)")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: from the checkpoint, or 224)")
    p.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                   help="decode images to 1 (gray) or 3 (RGB) channels (default: the stem's); the stem is adapted")
    p.add_argument("--crop-pct", type=float, default=None, help="centre crop fraction (default: checkpoint's, .875)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0 = all)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the Debian location)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16", "auto"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_checkpoint(path: str | Path) -> Path:
    """A weight file/accelerate directory as given, or the best weights inside a finetune output directory."""
    from fcmae.engine import find_latest_checkpoint

    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        latest = find_latest_checkpoint(p / "checkpoints")
        if latest is not None:
            return latest
    return p


def _build_dataset(spec: str, transform: Any, in_chans: int, data_root: str | None) -> tuple[Any, list[str]]:
    from fcmae.data import DATASET_DEFAULT_FASHION_MNIST, FashionMNIST, LabeledImageFolder

    name, _, split = spec.partition(":")
    if name == "fashion_mnist" and not Path(spec).exists():
        split = split or "test"
        if split not in ("test", "train"):
            raise ValueError(f"--data {spec}: the split must be 'test' or 'train'")
        ds = FashionMNIST(data_root or DATASET_DEFAULT_FASHION_MNIST, split, transform, in_chans)  # type: ignore
        return ds, list(ds.classes)
    root = Path(spec).expanduser()
    if (root / "val").is_dir() and (root / "train").is_dir():
        root = root / "val"
    ds = LabeledImageFolder(root, transform, in_chans)
    return ds, list(ds.classes)


def _evaluate(args: argparse.Namespace) -> list[str]:
    import json

    import torch
    from accelerate import Accelerator

    from fcmae.convert import check_against_model, infer_in_chans, infer_variant, to_dense
    from fcmae.data import build_eval_transform
    from fcmae.engine import resolve_mixed_precision
    from fcmae.finetuning import LabeledSamples, evaluate, fold_probe_head
    from fcmae.io import load_state_dict_file
    from fcmae.models.convnextv2 import check_image_size, create_model

    src = resolve_checkpoint(args.checkpoint)
    raw, meta = load_state_dict_file(src)
    dense, layout = to_dense(fold_probe_head(raw))
    if "head.weight" not in dense:
        raise ValueError(f"{src}: no classifier head in these weights ({layout} layout, encoder only?); "
                         "fine-tune them first (fcmae finetune --init ...)")
    name = check_against_model(dense, args.model) if args.model else infer_variant(dense)
    num_classes = int(dense["head.weight"].shape[0])
    weight_chans = infer_in_chans(dense)
    in_chans = args.in_chans or weight_chans
    size = args.input_size or int(meta.get("image_size", 224))
    crop_pct = args.crop_pct or float(meta.get("crop_pct", 0.875))
    check_image_size(size, size)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    if in_chans != weight_chans:
        from timm.models import adapt_input_conv

        stem = dense["downsample_layers.0.0.weight"]
        dense["downsample_layers.0.0.weight"] = adapt_input_conv(in_chans, stem, base_chans=stem.shape[1])
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected or [k for k in missing if not k.startswith("norm.")]:
        raise ValueError(f"{src}: weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")

    ds, classes = _build_dataset(args.data, build_eval_transform(size, crop_pct, in_chans), in_chans, args.data_root)
    n = min(args.limit, len(ds)) if args.limit else len(ds)
    if len(classes) > num_classes:
        raise ValueError(f"--data {args.data} has {len(classes)} classes but the head predicts {num_classes}")
    lines = [f"checkpoint: {src} ({layout} layout), {name}, {num_classes} classes, in_chans {in_chans}"
             + (f" (stem adapted from {weight_chans})" if in_chans != weight_chans else "")]
    if missing:
        lines.append(f"note: no final norm in the weights ({', '.join(missing)} left at their initial values)")
    if meta.get("classes"):
        try:
            trained = json.loads(meta["classes"])
        except ValueError:
            trained = None
        if isinstance(trained, list) and trained != classes:
            lines.append("warning: the class names of the data differ from those the checkpoint was trained on")
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision))
    loader = torch.utils.data.DataLoader(LabeledSamples(ds, range(n)), batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)
    model, loader = accelerator.prepare(model, loader)
    res = evaluate(model, loader, accelerator, "evaluate", progress=not args.no_progress)
    resize = int(size / crop_pct + 1e-6)
    lines.append(f"data: {args.data}, {res['images']} images, input {size} (resize {resize}, centre crop {size}, "
                 "bicubic)")
    lines.append(f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  loss {res['loss']:.4f}")
    return lines


def run(args: argparse.Namespace) -> int:
    from fcmae.data import DataError

    try:
        lines = _evaluate(args)
    except (ValueError, OSError, DataError) as exc:  # CheckpointError/ConversionError are ValueErrors
        print(f"fcmae evaluate: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
