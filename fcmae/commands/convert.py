"""``fcmae convert IN OUT [--to dense|timm] [--model NAME]``: convert checkpoints between layouts.

IN is a weight file (``.safetensors``, ``.pt/.pth/.bin``) or an accelerate checkpoint directory in any layout
``fcmae.convert.detect_layout`` knows (ours, our FCMAE pretraining, official MinkowskiEngine FCMAE, official
dense, timm). OUT gets our dense layout (default) or timm's, as safetensors unless it ends in ``.pt``/``.pth``,
with metadata ``variant``, ``in_chans``, ``source_layout``, ``format``. On any error nothing is written at OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_LAYOUT_TEXT = {
    "fcmae": "our FCMAE pretraining checkpoint",
    "dense": "our dense ConvNeXt V2",
    "official_sparse": "official FCMAE checkpoint (MinkowskiEngine sparse encoder)",
    "official_dense": "official dense ConvNeXt V2",
    "timm": "timm ConvNeXt V2",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="weight file or accelerate checkpoint directory")
    p.add_argument("output", metavar="OUT", help="file to write (.safetensors by default; .pt/.pth for torch.save)")
    p.add_argument("--to", choices=("dense", "timm"), default="dense", help="target layout (default: dense)")
    p.add_argument("--model", default=None,
                   help="variant the weights must fit, e.g. convnextv2_atto (default: inferred from the shapes)")


def _convert(args: argparse.Namespace) -> list[str]:
    """Do the work; returns the lines to print. Raises ValueError subclasses on bad input."""
    from fcmae.convert import (
        check_against_model,
        dense_to_timm,
        infer_in_chans,
        infer_variant,
        is_decoder_key,
        strip_wrapper_prefixes,
        to_dense,
    )
    from fcmae.io import load_state_dict_file, save_state_dict

    out_path = Path(args.output)
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a directory; OUT must be a file path")
    sd, src_metadata = load_state_dict_file(args.input)
    dense, layout = to_dense(sd)
    dropped = sum(is_decoder_key(k) for k in strip_wrapper_prefixes(sd))
    variant = check_against_model(dense, args.model) if args.model else infer_variant(dense)
    in_chans = infer_in_chans(dense)
    out = dense_to_timm(dense, variant) if args.to == "timm" else dense
    # keep what our own exports recorded (image size, config), but the conversion facts win
    metadata = {**src_metadata, "variant": variant, "in_chans": str(in_chans), "source_layout": layout,
                "format": args.to}
    save_state_dict(out_path, out, metadata)
    lines = [
        f"recognised: {layout} ({_LAYOUT_TEXT[layout]}), {len(sd)} tensors",
        f"variant: {variant}, in_chans: {in_chans}",
        f"converted {len(out)} tensors to the {args.to} layout"
        + (f" (dropped {dropped} decoder tensors)" if dropped else ""),
    ]
    if "norm.weight" not in dense:
        lines.append("note: encoder only, no final norm/head in these weights (load with strict=False)")
    lines.append(f"wrote {out_path}")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        lines = _convert(args)
    except (ValueError, OSError) as exc:  # CheckpointError and ConversionError are ValueErrors
        print(f"fcmae convert: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
