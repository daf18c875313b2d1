"""``fcmae visualize CHECKPOINT IMAGES... --out fig.png``: reconstruction figure of a pretraining checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="pretraining output dir, its checkpoints/step_N dir, or a model.safetensors")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default="reconstruction.png", help="PNG to write")
    p.add_argument("--size", type=int, default=None, help="input size (default: the run's data.input_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the run's model.mask_ratio")
    p.add_argument("--max-images", type=int, default=8)


def _find_run(ckpt: Path) -> tuple[Path, Path | None]:
    """-> (weights file, config.yaml of the run if found)."""
    from fcmae.engine import find_latest_checkpoint

    if ckpt.is_file():
        weights = ckpt
    elif (ckpt / "model.safetensors").is_file():
        weights = ckpt / "model.safetensors"
    else:
        latest = find_latest_checkpoint(ckpt / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"{ckpt}: no model.safetensors and no checkpoints/step_N inside")
        weights = latest / "model.safetensors"
    for d in [weights.parent, *weights.parents]:
        if (d / "config.yaml").is_file():
            return weights, d / "config.yaml"
    return weights, None


def run(args: argparse.Namespace) -> int:
    import torch

    from fcmae.config import PretrainConfig, load_config
    from fcmae.data import build_eval_transform, find_images, load_image
    from fcmae.io import load_state_dict_file
    from fcmae.masking import random_masking
    from fcmae.pretraining import build_model, normalization
    from fcmae.visualize import save_reconstruction_figure

    try:
        weights, cfg_path = _find_run(Path(args.checkpoint))
        sd, meta = load_state_dict_file(weights)
        if cfg_path is not None:
            cfg = load_config(PretrainConfig, cfg_path)
        elif "config" in meta:
            cfg = PretrainConfig()
            from fcmae.config import _apply

            _apply(cfg, json.loads(meta["config"]))
        else:
            raise ValueError(f"{weights}: cannot find the run's config.yaml to rebuild the model")
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: not an FCMAE pretraining checkpoint (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        size = args.size or cfg.data.input_size
        if size % 32:
            raise ValueError(f"--size {size} must be a multiple of 32")
        paths: list[Path] = []
        for item in args.images:
            p = Path(item)
            paths.extend(find_images(p) if p.is_dir() else [p])
        paths = paths[: args.max_images]
        tf = build_eval_transform(size, crop_pct=1.0, in_chans=cfg.model.in_chans)
        imgs = torch.stack([tf(load_image(p, cfg.model.in_chans)) for p in paths])
    except (OSError, ValueError) as exc:
        print(f"fcmae visualize: error: {exc}", file=sys.stderr)
        return 1
    ratio = cfg.model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    mask = random_masking(len(paths), size // 32, ratio, generator=torch.Generator().manual_seed(args.seed))
    mean, std = normalization(cfg.model.in_chans)
    out = save_reconstruction_figure(model, imgs, mask, mean, std, args.out)
    print(f"wrote {out} ({len(paths)} images: original | masked | reconstruction | reconstruction + visible)")
    return 0
