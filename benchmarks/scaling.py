"""How the FCMAE training step scales with work: step time and peak memory of ours vs masked-dense over variants,
image sizes and batch sizes, every measurement in its own process (``pretrain_speed.py``'s worker, fp32).

    python benchmarks/scaling.py                          # atto and tiny, 160/224/288 px, batch 8/16/32
    python benchmarks/scaling.py --variants convnextv2_atto --sizes 160 --batches 8   # one cell
    python benchmarks/scaling.py --json scaling.json      # also write the rows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import run_isolated

WORKER = Path(__file__).resolve().with_name("pretrain_speed.py")


def measure(impl: str, variant: str, batch: int, size: int, steps: int, threads: int) -> dict:
    r = run_isolated(WORKER, [impl, variant, str(batch), str(size), str(steps), "fp32"], threads)
    return {"img_s": r["img_s"], "step_ms": 1000.0 * batch / r["img_s"], "peak_mib": r["peak_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["convnextv2_atto", "convnextv2_tiny"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[160, 224, 288])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median), after 2 warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    print(f"FCMAE training step, fp32, {args.threads} threads, median of {args.steps} steps; ref = masked-dense")
    print("| variant | size | batch | ref ms/step | ours ms/step | speed ratio | ours ms/img | ref peak MiB "
          "| ours peak MiB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        for size in args.sizes:
            for batch in args.batches:
                ref = measure("reference", variant, batch, size, args.steps, args.threads)
                ours = measure("sparse", variant, batch, size, args.steps, args.threads)
                rows.append({"variant": variant, "size": size, "batch": batch, "reference": ref, "ours": ours})
                print(f"| {variant} | {size} | {batch} | {ref['step_ms']:.0f} | {ours['step_ms']:.0f} | "
                      f"{ref['step_ms'] / ours['step_ms']:.2f}x | {ours['step_ms'] / batch:.1f} | "
                      f"{ref['peak_mib']:.0f} | {ours['peak_mib']:.0f} | {ours['peak_mib'] / ref['peak_mib']:.2f} |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
