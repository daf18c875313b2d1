"""``fcmae visualize CHECKPOINT IMAGES... --out fig.png``: reconstruction figure of a pretraining checkpoint.

CHECKPOINT is a pretraining output directory, one of its ``checkpoints/step_N`` directories, or a
``model.safetensors`` written by one: the reconstruction needs the decoder, so the exported ``encoder.safetensors``
or fine-tuning weights are refused with a line saying so. Unreadable images are skipped and reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument
    from fcmae.commands._flags import add_flag

    p.add_argument("checkpoint", help="pretraining output dir, its checkpoints/step_N dir, or a model.safetensors")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    add_flag(p, "out", "reconstruction.png", "reconstruction.png; a PNG")
    add_flag(p, "input_size", None, "the run's data.input_size")
    add_flag(p, "seed", 0, "0; it draws the masks")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the run's model.mask_ratio")
    add_flag(p, "limit", 8, "8; the first N images found")
    add_json_argument(p)


def _image_paths(items: list[str]) -> list[Path]:
    from fcmae.data import find_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"image or folder not found: {p}")
        paths.extend(find_images(p) if p.is_dir() else [p])
    return paths


def _visualize(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fcmae.data import BadImageError, build_eval_transform, load_image
    from fcmae.evaluation.figures import save_reconstruction_figure
    from fcmae.models.masking import check_mask_ratio, random_masking
    from fcmae.models.registry import mean_std
    from fcmae.train.pretraining import load_pretraining_model

    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    model, cfg, weights = load_pretraining_model(args.checkpoint)
    size = args.input_size or cfg.data.input_size
    if size < 32 or size % 32:
        raise ValueError(f"--input-size {size} must be a positive multiple of 32")
    ratio = cfg.model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    check_mask_ratio(ratio)
    tf = build_eval_transform(size, crop_pct=1.0, in_chans=cfg.model.in_chans)
    imgs, used, skipped = [], [], []
    for p in _image_paths(args.images):
        if len(used) == args.limit:
            break
        try:
            imgs.append(tf(load_image(p, cfg.model.in_chans)))
            used.append(str(p))
        except BadImageError as exc:
            skipped.append(str(exc))
    if not imgs:
        raise ValueError(f"no readable image among {', '.join(args.images)}")
    mask = random_masking(len(imgs), size // 32, ratio, generator=torch.Generator().manual_seed(args.seed))
    mean, std = mean_std(cfg.model.in_chans)
    out = save_reconstruction_figure(model, torch.stack(imgs), mask, mean, std, args.out)
    return {"figure": str(out), "weights": str(weights), "images": used, "skipped": skipped, "mask_ratio": ratio,
            "input_size": size}


def _report(r: dict[str, Any]) -> None:
    for why in r["skipped"]:
        print(f"skipped: {why}")
    print(f"wrote {r['figure']} ({len(r['images'])} images; columns: original | masked | reconstruction (at the "
          "removed patches) | reconstruction + visible)")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("visualize", lambda: _visualize(args), _report, args.json)
