"""``fcmae diagnose WEIGHTS... --data SPEC --out DIR``: the ConvNeXt V2 paper's feature-collapse analysis.

For every block of every model, the average pairwise cosine distance between the channels of the expansion MLP
layer (``pwconv1`` -> GELU, before GRN) over N images (:mod:`fcmae.evaluation.collapse`), plotted against the block's
normalised depth with all models on one plot (``cosine_distance.png``, the paper's Fig. 4), and the activation maps
of randomly chosen channels of one layer on one image (``activations.png``, Fig. 3). Numbers in
``diagnose.json``. WEIGHTS are any files ``fcmae convert`` reads; ``--random-init VARIANT`` adds a random init
(``--random-init-no-grn VARIANT``: without GRN). ``--limit N`` (old spelling ``--num-images``): the images.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXAMPLES_HINT = "pip install 'fcmae[examples]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument
    from fcmae.commands._flags import add_flag
    from fcmae.commands.evaluate import add_data_arguments

    p.add_argument("weights", nargs="*", metavar="WEIGHTS", help="weights (any layout fcmae convert reads)")
    add_flag(p, "random_init", [], "none; repeatable", action="append")
    add_flag(p, "random_init_no_grn", [], "none; repeatable", action="append")
    p.add_argument("--names", nargs="+", default=None,
                   help="legend names: WEIGHTS first, then the random inits, in order (default: from the paths)")
    p.add_argument("--data", required=True, metavar="SPEC", help="labelled images (a stratified subset is used)")
    add_flag(p, "out", None, "required; a folder for the PNGs and diagnose.json", required=True)
    p.add_argument("--layer", type=int, default=None,
                   help="block (0-based, depth order) whose activations are shown (default: last block of stage 3)")
    p.add_argument("--channels", type=int, default=16, help="randomly chosen channels shown per model")
    add_flag(p, "seed", 0)
    add_data_arguments(p, limit=64)
    p.add_argument("--num-images", dest="limit", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling of --limit
    add_json_argument(p)


def _need_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"the plots need matplotlib: {EXAMPLES_HINT}") from None
    return plt


def _models(args: argparse.Namespace) -> list[tuple[str, Any, dict[str, Any]]]:
    """``[(name, dense model, info)]`` in the order WEIGHTS, --random-init, --random-init-no-grn."""
    import torch

    from fcmae.models.registry import canonical_name
    from fcmae.weights.loader import create_model, load_encoder

    out = []
    for w in args.weights:
        model, info = load_encoder(w, args.in_chans)
        p = Path(info["path"])
        default = p.parent.name if p.stem in ("encoder", "best", "last", "last_ema", "model") else p.stem
        out.append((default, model, {"weights": info["path"], "model": info["name"], "use_grn": model.use_grn,
                                     "image_size": info["metadata"].get("image_size")}))
    for variants, grn in ((args.random_init, None), (args.random_init_no_grn, False)):  # None: the record's block
        for v in variants:
            torch.manual_seed(args.seed)
            name = canonical_name(v)
            chans = args.in_chans or (out[0][1].in_chans if out else 3)
            model = create_model(name, num_classes=0, in_chans=chans, use_grn=grn).eval()
            label = f"random init{'' if grn is None else ', no GRN'}"
            out.append((label, model, {"weights": None, "model": name, "use_grn": model.use_grn, "image_size": None}))
    if not out:
        raise ValueError("nothing to diagnose: give WEIGHTS and/or --random-init VARIANT")
    if args.names:
        if len(args.names) != len(out):
            raise ValueError(f"--names has {len(args.names)} names for {len(out)} models")
        out = [(n, m, i) for n, (_, m, i) in zip(args.names, out)]
    return out


def _images(args: argparse.Namespace, in_chans: int, size: int) -> Any:
    """``(N, C, S, S)`` images: a seeded stratified subset of ``--data``."""
    import torch

    from fcmae.data import build_eval_transform, dataset_targets, first_per_class, labelled_dataset

    crop_pct = args.crop_pct or 0.875
    ds, _ = labelled_dataset(args.data, build_eval_transform(size, crop_pct, in_chans), in_chans, args.data_root)
    idx = first_per_class(dataset_targets(ds), args.limit, seed=args.seed)
    if not idx:
        raise ValueError(f"--data {args.data} has no images")
    return torch.stack([ds[i][0] for i in idx])


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """Distances of every model, the plots, and the results dict (also ``<out>/diagnose.json``)."""
    from fcmae.commands._common import tune_malloc
    from fcmae.commands.evaluate import check_data_arguments

    check_data_arguments(args)
    if args.channels < 1:
        raise ValueError("--channels must be >= 1")
    plt = _need_matplotlib()
    tune_malloc(args)  # after the checks: a usage error is fast
    import torch

    from fcmae.evaluation.collapse import collapse_profile, normalised_depth
    from fcmae.models.convnextv2 import check_image_size
    from fcmae.weights.files import write_json_atomic

    models = _models(args)
    chans = {m.in_chans for _, m, _ in models}
    if len(chans) > 1:
        raise ValueError(f"the models take different input channels {sorted(chans)}; set --in-chans")
    size = args.input_size or int(next((i["image_size"] for _, _, i in models if i["image_size"]), 224))
    check_image_size(size, size)
    images = _images(args, chans.pop(), size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name, model, info in models:
        n_blocks = sum(model.depths)
        layer = args.layer if args.layer is not None else sum(model.depths[:3]) - 1
        if not 0 <= layer < n_blocks:
            raise ValueError(f"--layer {layer} is out of range: {info['model']} has {n_blocks} blocks")
        dist, act = collapse_profile(model, images.split(args.batch_size), layer, device)
        g = torch.Generator().manual_seed(args.seed)
        picked = torch.randperm(act.shape[-1], generator=g)[: args.channels].sort().values
        results.append({"name": name, **info, "depth": normalised_depth(n_blocks),
                        "distance": dist.mean(dim=1).tolist(), "distance_std": dist.std(dim=1).tolist(),
                        "mean_distance": float(dist.mean()), "layer": layer, "channels": picked.tolist(),
                        "_maps": act[0, :, :, picked].permute(2, 0, 1)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot_distances(plt, results, out / "cosine_distance.png", size, len(images))
    _plot_maps(plt, results, out / "activations.png")
    summary = {"data": args.data, "images": len(images), "input_size": size, "out": str(out),
               "plots": [str(out / "cosine_distance.png"), str(out / "activations.png")],
               "models": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
    write_json_atomic(out / "diagnose.json", summary)
    return summary


def _plot_distances(plt: Any, results: list[dict[str, Any]], path: Path, size: int, n: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.plot(r["depth"], r["distance"], marker="o", markersize=3, label=f"{r['name']} ({r['mean_distance']:.3f})")
    ax.set_xlabel("block depth (normalised: 0 = first, 1 = last)")
    ax.set_ylabel("avg. pairwise cosine distance")
    ax.set_title(f"Expansion-layer channel diversity ({n} images, {size} px)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_maps(plt: Any, results: list[dict[str, Any]], path: Path) -> None:
    cols = max(r["_maps"].shape[0] for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(cols * 0.9, len(results) * 1.05 + 0.3), dpi=120,
                             squeeze=False)
    for row, r in zip(axes, results):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < r["_maps"].shape[0]:
                ax.imshow(r["_maps"][j].numpy(), cmap="viridis")
            else:
                ax.axis("off")
        row[0].set_ylabel(r["name"], fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"expansion-layer activations, block {results[0]['layer']}, random channels, one image",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(r: dict[str, Any]) -> None:
    print(f"diagnose: {r['images']} images of {r['data']} at {r['input_size']} px")
    for m in r["models"]:
        grn = "GRN" if m["use_grn"] else "no GRN"
        print(f"  {m['name']:<28} {m['model']}, {grn}: mean channel cosine distance {m['mean_distance']:.4f} "
              f"(first block {m['distance'][0]:.4f}, last {m['distance'][-1]:.4f})")
    print(f"wrote {', '.join(r['plots'])} and {Path(r['out']) / 'diagnose.json'}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("diagnose", lambda: diagnose(args), report, args.json)
