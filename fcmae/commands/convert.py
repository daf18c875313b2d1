"""``fcmae convert IN OUT [--to dense|timm|transformers] [--model NAME] [--ema]``: convert checkpoints.

IN is a weight file (``.safetensors``, ``.pt/.pth/.bin``) or a folder holding one (accelerate checkpoint, timm or
Hugging Face export) in any layout ``fcmae.weights.layouts.detect_layout`` knows: ours (dense or FCMAE pretraining), the
official MinkowskiEngine FCMAE checkpoint, the released FCMAE weights, official dense / fine-tuned weights and the
official trainer's ``checkpoint-N.pth`` (``--ema`` takes its ``model_ema``), timm, Hugging Face. Pickles are read
safely (``fcmae.weights.files.safe_torch_load``).

OUT gets:
- ``--to dense`` (default): our dense layout, one file, safetensors unless it ends in ``.pt``/``.pth``;
- ``--to timm``: a file as above in timm's names, or, when OUT is a folder (exists, or ends in ``/``), a
  ``local-dir`` folder (``config.json`` + ``model.safetensors``) for ``timm.create_model("local-dir:OUT",
  pretrained=True)``;
- ``--to transformers``: a folder for ``transformers.ConvNextV2Model.from_pretrained(OUT)`` (needs the
  ``interop`` extra).

timm and transformers exports of an FCMAE encoder get the identity final LayerNorm so they load strictly. File
metadata: ``variant``, ``in_chans``, ``source_layout``, ``format``. On any error nothing is written at OUT. An
existing OUT (a file, or the files of a folder export) is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

_LAYOUT_TEXT = {
    "fcmae": "our FCMAE pretraining checkpoint",
    "dense": "our dense ConvNeXt V2",
    "official_sparse": "official FCMAE pretraining checkpoint (MinkowskiEngine sparse encoder)",
    "official_dense": "official dense ConvNeXt V2 (fine-tuned weights or fine-tuning checkpoint)",
    "official_fcmae": "released official FCMAE weights (dense names, GRN (1, 4C))",
    "timm": "timm ConvNeXt V2",
    "transformers": "Hugging Face transformers ConvNextV2",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument
    from fcmae.commands._flags import add_flag

    p.add_argument("input", metavar="IN", help="weight file, or a folder holding model.safetensors / pytorch_model.bin")
    p.add_argument("output", metavar="OUT",
                   help="file to write (.safetensors by default; .pt/.pth for torch.save), or a folder (existing or "
                        "ending in /) for --to timm; always a folder for --to transformers")
    p.add_argument("--to", choices=("dense", "timm", "transformers"), default="dense",
                   help="target layout (default: dense)")
    p.add_argument("--model", default=None,
                   help="variant the weights must fit, e.g. convnextv2_atto (default: inferred from the shapes)")
    p.add_argument("--ema", action="store_true",
                   help="take the EMA weights (model_ema / state_dict_ema) of a training checkpoint")
    add_flag(p, "overwrite")
    add_json_argument(p)


def _wants_folder(output: str, to: str) -> bool:
    """Folder output: always for transformers; for timm when OUT is an existing folder or ends in a separator."""
    if to == "transformers":
        return True
    return to == "timm" and (Path(output).is_dir() or output.endswith(("/", os.sep)))


def _image_size(metadata: dict[str, str]) -> int:
    size = metadata.get("image_size", "")
    return int(size) if size.isdigit() and int(size) > 0 else 224


def _write(
    args: argparse.Namespace, dense: dict[str, Tensor], variant: str, metadata: dict[str, str]
) -> tuple[int, str]:
    """Write OUT in the target layout; returns (tensors written, description of what was written)."""
    from fcmae.weights.exports import export_timm_folder, export_transformers_folder, with_identity_norm
    from fcmae.weights.files import save_state_dict
    from fcmae.weights.layouts import dense_to_timm

    out_path = Path(args.output)
    if args.to == "transformers" and out_path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"{out_path}: --to transformers writes a folder (config.json + model.safetensors); "
                         "give a folder name")
    if _wants_folder(args.output, args.to):
        export = export_timm_folder if args.to == "timm" else export_transformers_folder
        sd = export(out_path, dense, variant, {**metadata, "layout": args.to}, _image_size(metadata))
        how = (f'timm.create_model("local-dir:{out_path}", pretrained=True)' if args.to == "timm"
               else f"transformers.ConvNextV2{'ForImageClassification' if 'head.weight' in dense else 'Model'}"
                    f".from_pretrained({str(out_path)!r})")
        return len(sd), f"{out_path}{os.sep} (config.json + model.safetensors; load with {how})"
    if out_path.is_dir() or args.output.endswith(("/", os.sep)):
        raise ValueError(f"{out_path}: is a directory; --to {args.to} writes one file (folders are written for "
                         "--to timm and --to transformers)")
    out = dense_to_timm(with_identity_norm(dense)[0], variant) if args.to == "timm" else dense
    save_state_dict(out_path, out, {**metadata, "format": args.to})
    return len(out), str(out_path)


def _convert(args: argparse.Namespace) -> dict[str, object]:
    """Do the work; returns the results, with the ``lines`` to print. Raises ValueError subclasses on bad input."""
    from fcmae.weights.files import read_checkpoint
    from fcmae.weights.layouts import (
        check_against_model,
        infer_in_chans,
        infer_variant,
        is_decoder_key,
        strip_wrapper_prefixes,
        to_dense,
    )

    out = Path(args.output)
    taken = [q for q in ([out / "config.json", out / "model.safetensors"] if out.is_dir() else [out]) if q.is_file()]
    if taken and not args.overwrite:
        raise ValueError(f"{taken[0]} exists; give --overwrite to replace it")
    ckpt = read_checkpoint(args.input, ema=args.ema)
    sd = ckpt.state_dict
    dense, layout = to_dense(sd)
    dropped = sum(is_decoder_key(k) for k in strip_wrapper_prefixes(sd))
    variant = check_against_model(dense, args.model or infer_variant(dense))
    in_chans = infer_in_chans(dense)
    # keep what the source recorded (image size, config, trainer args), but the conversion facts win
    metadata = {**ckpt.metadata, "variant": variant, "in_chans": str(in_chans), "source_layout": layout}
    count, written = _write(args, dense, variant, metadata)
    lines = [
        f"read: {ckpt.source}",
        f"recognised: {layout} ({_LAYOUT_TEXT[layout]}), {len(sd)} tensors",
        f"variant: {variant}, in_chans: {in_chans}",
        f"converted {len(dense)} tensors to the {args.to} layout ({count} written)"
        + (f"; dropped {dropped} decoder tensors" if dropped else ""),
    ]
    if "norm.weight" not in dense:
        lines.append("note: encoder only, no final norm/head in these weights (load with strict=False)"
                     if args.to == "dense" else
                     "note: encoder only (no final norm): wrote the identity LayerNorm (weight 1, bias 0) as the "
                     "final norm, so the export loads strictly; no classifier (num_classes 0)")
    lines.append(f"wrote {written}")
    result = {"lines": lines, "input": str(args.input), "output": written, "read": ckpt.source, "layout": layout,
              "variant": variant, "in_chans": in_chans, "to": args.to, "tensors_written": count,
              "decoder_tensors_dropped": dropped}
    return result


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("convert", lambda: _convert(args), lambda r: print("\n".join(r.pop("lines"))), args.json)
