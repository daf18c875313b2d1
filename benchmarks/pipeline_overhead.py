"""Cost of the full pretraining pipeline (JPEG decoding, augmentation, masks, DataLoader, accelerate, logging,
checkpointing) over the bare model training step, measured side by side.

(a) model alone: FCMAE train steps (forward, loss, backward, AdamW) on tensors already in memory;
(b) pipeline: ``run_pretraining`` on a folder of real JPEG images (Fashion-MNIST test images upscaled to 256px
    and written as JPEG, so decoding is real work), same variant, batch, size and thread count.
Both run in fresh processes with the same allocator settings; the pipeline's rate is taken from its JSONL
metrics after the first logging window (warm-up excluded), the model's from the median step.

    python benchmarks/pipeline_overhead.py                      # atto, 224^2, batch 32, 2 threads
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import run_isolated


def make_jpegs(folder: Path, n: int) -> None:
    from PIL import Image

    from fcmae.data import DATASET_DEFAULT_FASHION_MNIST, load_fashion_mnist_arrays

    images, _ = load_fashion_mnist_arrays(DATASET_DEFAULT_FASHION_MNIST, "test")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(images[i]).convert("RGB").resize((256, 256), Image.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                                                      quality=90)


def worker_model(variant: str, batch: int, size: int, steps: int) -> dict:
    sys.argv = ["x"]
    from pretrain_speed import worker

    return worker("sparse", variant, batch, size, steps, "fp32")


def worker_pipeline(variant: str, batch: int, size: int, steps: int, folder: str, out: str, workers: int) -> dict:
    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.pretraining import run_pretraining

    cfg = load_config(PretrainConfig, None, [
        f"model.name={variant}", "data.source=folder", f"data.path={folder}", f"data.input_size={size}",
        f"data.num_workers={workers}", f"run.batch_size={batch}", f"run.max_steps={steps}", "run.log_every=2",
        f"run.output_dir={out}", "run.progress=false", "run.mixed_precision=no", "optim.epochs=1",
        "optim.warmup_epochs=0", "run.export_every_epochs=0", "run.num_vis_images=2",
    ])
    run_pretraining(cfg)
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in recs if r.get("type") == "train"][1:]  # drop the first window (warm-up)
    return {"img_s": sum(rates) / len(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="convnextv2_atto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader worker processes for the pipeline")
    args = ap.parse_args()
    if args.worker is not None:
        kind, *rest = args.worker
        if kind == "model":
            res = worker_model(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            res = worker_pipeline(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4], rest[5], int(rest[6]))
        print(json.dumps(res))
        return
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_jpegs(folder, args.batch * (args.steps + 1))
        common = [args.variant, str(args.batch), str(args.size), str(args.steps)]
        model = run_isolated(script, ["model", *common], args.threads)
        pipe = run_isolated(script, ["pipeline", *common, str(folder), str(Path(tmp) / "out"), str(args.workers)],
                            args.threads)
    overhead = model["img_s"] / pipe["img_s"] - 1.0
    print(f"\n{args.variant} {args.size}px batch {args.batch}, {args.threads} threads, "
          f"{args.workers} loader worker(s)")
    print("| model alone img/s | full pipeline img/s | pipeline overhead |")
    print("|---|---|---|")
    print(f"| {model['img_s']:.2f} | {pipe['img_s']:.2f} | {overhead * 100:+.1f}% |")


if __name__ == "__main__":
    main()
