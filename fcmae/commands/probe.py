"""``fcmae probe WEIGHTS --train SPEC --val SPEC``: frozen-feature k-NN and linear-probe top-1 of an encoder.

WEIGHTS is any file ``fcmae convert`` reads (an FCMAE export, our dense or classifier weights, the official
releases, timm, transformers) or a run directory; ``--random-init VARIANT`` probes a randomly initialised encoder
(the baseline any pretraining must beat) and ``--raw-pixels`` the images themselves (logistic regression and k-NN
on pixels). Features (global average pool of the final stage, standardised with the labelled set's statistics)
are computed once per image and reused by every label budget, seed, the k-NN and the linear probe.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument
    from fcmae.commands._flags import add_flag
    from fcmae.commands.evaluate import add_data_arguments

    p.add_argument("weights", nargs="?", default=None, metavar="WEIGHTS",
                   help="encoder weights (any layout fcmae convert reads) or a run directory")
    add_flag(p, "random_init", None, "none; probe weights")
    add_flag(p, "random_init_no_grn", None, "none")
    p.add_argument("--no-grn", action="store_true", help=argparse.SUPPRESS)  # old spelling: --random-init V --no-grn
    p.add_argument("--raw-pixels", action="store_true", help="probe the (resized, normalised) pixels themselves")
    add_flag(p, "seed", 0)
    p.add_argument("--train", required=True, metavar="SPEC", help="labelled set the classifiers learn from")
    p.add_argument("--val", required=True, metavar="SPEC", help="labelled set they are scored on")
    p.add_argument("--labels-per-class", type=int, nargs="+", default=[0], metavar="K",
                   help="label budgets: K labelled images per class, seeded and stratified (0 = all; several allowed)")
    p.add_argument("--label-seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds of the labelled subsets (budgets below 'all' are drawn once per seed)")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours that vote (DINO: 20)")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the vote weights exp(sim / T)")
    p.add_argument("--no-linear", action="store_true", help="k-NN only")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a checkpoint that holds both")
    add_data_arguments(p)
    add_json_argument(p)


def _check_args(args: argparse.Namespace) -> None:
    if args.no_grn:
        if not args.random_init:
            raise ValueError("--no-grn goes with --random-init (weights say themselves whether they have GRN)")
        args.random_init, args.random_init_no_grn, args.no_grn = None, args.random_init, False
    chosen = [x for x in (args.weights, args.random_init, args.random_init_no_grn, args.raw_pixels or None) if x]
    if len(chosen) != 1:
        raise ValueError("give exactly one of WEIGHTS, --random-init VARIANT, --random-init-no-grn VARIANT, "
                         "--raw-pixels")
    if any(k < 0 for k in args.labels_per_class):
        raise ValueError("--labels-per-class must be >= 0 (0 = all)")
    if args.knn_k < 1 or args.knn_t <= 0:
        raise ValueError("--knn-k must be >= 1 and --knn-t > 0")
    from fcmae.commands.evaluate import check_data_arguments

    check_data_arguments(args)


def build_encoder(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(dense model without head, or None for raw pixels; description)`` from the command's arguments."""
    import torch

    from fcmae.models.registry import canonical_name
    from fcmae.weights.loader import create_model, load_encoder

    if args.raw_pixels:
        return None, {"what": "raw pixels", "model": None, "layout": None, "use_grn": None, "metadata": {}}
    if args.random_init or args.random_init_no_grn:
        torch.manual_seed(args.seed)
        grn = None if args.random_init else False  # None: the record's block (V2: GRN, V1: LayerScale)
        name = canonical_name(args.random_init or args.random_init_no_grn)
        model = create_model(name, num_classes=0, in_chans=args.in_chans or 3, use_grn=grn).eval()
        return model, {"what": f"random init of {name} (seed {args.seed})", "model": name, "layout": None,
                       "use_grn": model.use_grn, "metadata": {}}
    model, info = load_encoder(args.weights, args.in_chans, args.ema)
    return model, {"what": info["path"], "model": info["name"], "layout": info["layout"], "use_grn": model.use_grn,
                   "metadata": info["metadata"]}


def _budgets(targets: list[int], budgets: list[int], seeds: list[int]) -> list[tuple[int, int, list[int]]]:
    """``[(labels per class, seed, sorted indices)]``; the full set (0) is drawn once, whatever the seeds."""
    from fcmae.data import stratified_subset

    out = []
    for k in budgets:
        for s in seeds if k > 0 else seeds[:1]:
            out.append((k, s, stratified_subset(targets, per_class=k, seed=s) if k > 0 else list(range(len(targets)))))
    return out


def _loader(ds: Any, indices: list[int], args: argparse.Namespace) -> Any:
    import torch

    from fcmae.data import SeededSamples

    return torch.utils.data.DataLoader(SeededSamples(ds, indices), batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.num_workers)


def _features(model: Any, ds: Any, indices: list[int], args: argparse.Namespace, desc: str) -> tuple[Any, Any]:
    """Features ``(N, D)`` and labels ``(N,)`` of ``ds[indices]`` (autocast bf16/fp16 on CUDA when asked)."""
    import contextlib

    import torch

    from fcmae.evaluation.features import extract_features
    from fcmae.train.trainer import resolve_mixed_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mp = resolve_mixed_precision(args.mixed_precision)
    if model is not None:
        model.to(device)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16 if mp == "bf16" else torch.float16)
           if device == "cuda" and mp in ("bf16", "fp16") else contextlib.nullcontext())
    with ctx:
        return extract_features(model, _loader(ds, indices, args), device, not args.no_progress, desc)


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command: data, features, every (budget, seed), summary dict (also the JSON)."""
    from fcmae.commands._common import tune_malloc

    _check_args(args)
    tune_malloc(args)  # after the checks: a usage error is fast
    from fcmae.data import build_eval_transform, dataset_targets, first_per_class, labelled_dataset
    from fcmae.evaluation.features import evaluate_features, summarise
    from fcmae.models.convnextv2 import check_image_size

    model, desc = build_encoder(args)
    meta = desc.pop("metadata")
    in_chans = model.in_chans if model is not None else (args.in_chans or 3)
    size = args.input_size or int(meta.get("image_size", 224))
    crop_pct = args.crop_pct or float(meta.get("crop_pct", 0.875))
    check_image_size(size, size)
    tf = build_eval_transform(size, crop_pct, in_chans)
    train_ds, classes = labelled_dataset(args.train, tf, in_chans, args.data_root)
    val_ds, val_classes = labelled_dataset(args.val, tf, in_chans, args.data_root)
    if val_classes != classes:
        raise ValueError(f"--train {args.train} and --val {args.val} have different classes")
    train_targets = dataset_targets(train_ds)
    pool = first_per_class(train_targets, args.limit)  # --limit: a stratified subset of that size
    runs = _budgets([train_targets[i] for i in pool], list(dict.fromkeys(args.labels_per_class)),
                    args.label_seeds)
    union = sorted({pool[i] for _, _, idx in runs for i in idx})
    pos = {j: n for n, j in enumerate(union)}
    t0 = time.perf_counter()
    tr_x, tr_y = _features(model, train_ds, union, args, "train features")
    va_x, va_y = _features(model, val_ds, first_per_class(dataset_targets(val_ds), args.limit), args, "val features")
    t_feat = time.perf_counter() - t0
    results = []
    for k, seed, idx in runs:
        sel = [pos[pool[i]] for i in idx]
        res = evaluate_features(tr_x[sel], tr_y[sel], va_x, va_y, len(classes), args.knn_k, args.knn_t,
                                not args.no_linear, seed)
        results.append({"labels_per_class": k, "label_seed": seed, "train_images": len(sel), **res})
    return {**desc, "feature_dim": int(tr_x.shape[1]), "input_size": size, "crop_pct": crop_pct, "in_chans": in_chans,
            "train": args.train, "val": args.val, "train_pool": len(pool), "val_images": int(va_x.shape[0]),
            "knn_k": args.knn_k, "knn_t": args.knn_t, "runs": results, "summary": summarise(results),
            "feature_seconds": t_feat, "probe_seconds": time.perf_counter() - t0 - t_feat}


def _fmt(row: dict[str, Any], metric: str) -> str:
    if f"{metric}_mean" not in row:
        return "-"
    m, s = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{m:.2f} ± {s:.2f}" if row["seeds"] > 1 else f"{m:.2f}"


def report(r: dict[str, Any]) -> None:
    grn = "" if r["use_grn"] is None else (", GRN" if r["use_grn"] else ", no GRN")
    layout = f" ({r['layout']} layout)" if r["layout"] else ""
    print(f"probe: {r['what']}{layout}{', ' + r['model'] if r['model'] else ''}{grn}; {r['feature_dim']}-d features, "
          f"input {r['input_size']} (crop {r['crop_pct']:g})")
    print(f"train: {r['train']} ({r['train_pool']} images), val: {r['val']} ({r['val_images']} images); k-NN k="
          f"{r['knn_k']} T={r['knn_t']:g}; features {r['feature_seconds']:.0f} s, classifiers "
          f"{r['probe_seconds']:.0f} s")
    print(f"{'labels/class':>12}  {'seeds':>5}  {'train images':>12}  {'k-NN top-1':>14}  {'linear top-1':>14}")
    for row in r["summary"]:
        k = row["labels_per_class"] or "all"
        print(f"{k:>12}  {row['seeds']:>5}  {row['train_images']:>12}  {_fmt(row, 'knn_top1'):>14}  "
              f"{_fmt(row, 'linear_top1'):>14}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("probe", lambda: probe(args), report, args.json)
