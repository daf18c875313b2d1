"""FCMAE training-step throughput and peak memory: our sparse model vs the masked-dense reference.

Each measurement runs in its own process (fresh allocator, same glibc tunables, same thread count) and the
two sides alternate over ``--rounds`` rounds; the best round of each side is reported, and the ratio is
taken between numbers measured in the same run. A training step is forward, loss, backward and AdamW.

    python benchmarks/pretrain_speed.py                # atto b32 and tiny b16 at 224^2, 2 threads
    python benchmarks/pretrain_speed.py --quick        # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from _common import current_rss_mib, median_step_seconds, peak_rss_mib, run_isolated


def worker(impl: str, variant: str, batch: int, size: int, steps: int, dtype: str) -> dict:
    import torch

    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.masking import random_masking
    from fcmae.models.reference import create_reference_fcmae

    torch.manual_seed(0)
    base_rss = current_rss_mib()
    model = create_fcmae(variant) if impl == "sparse" else create_reference_fcmae(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size)
    grid = size // 32
    use_bf16 = dtype == "bf16"

    def step() -> float:
        mask = random_masking(batch, grid, 0.6, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(imgs, mask)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return {"img_s": batch / median_step_seconds(step, 2, steps), "peak_mib": peak_rss_mib() - base_rss}


def flops_per_image(impl: str, variant: str, size: int) -> float:
    """Forward+backward FLOPs per image of one training step (matmuls and convolutions), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.masking import random_masking
    from fcmae.models.reference import create_reference_fcmae

    def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        # torch's built-in count ignores `groups` here and counts a depthwise conv's backward as a dense one
        output_mask = args[-1] if args else kwargs.get("output_mask", [True, True, True])
        per_pass = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
        return per_pass * (int(bool(output_mask[0])) + int(bool(output_mask[1])))

    model = create_fcmae(variant) if impl == "sparse" else create_reference_fcmae(variant)
    imgs = torch.randn(2, 3, size, size)
    mask = random_masking(2, size // 32, 0.6, generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(imgs, mask)["loss"].backward()
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="atto only, batch 8, 128px, 1 round")
    ap.add_argument("--configs", default="convnextv2_atto:32,convnextv2_tiny:16")
    args = ap.parse_args()
    if args.worker is not None:
        impl, variant, batch, size, steps, dtype = args.worker
        if impl.startswith("flops-"):
            print(json.dumps({"flops": flops_per_image(impl[6:], variant, int(size))}))
        else:
            print(json.dumps(worker(impl, variant, int(batch), int(size), int(steps), dtype)))
        return
    if args.quick:
        args.configs, args.size, args.rounds, args.steps = "convnextv2_atto:8", 128, 1, 3
    script = Path(__file__).resolve()
    rows = []
    for item in args.configs.split(","):
        variant, batch = item.split(":")
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for impl, dtype in (("reference", "fp32"), ("sparse", "fp32"), ("sparse", "bf16")):
                r = run_isolated(script, [impl, variant, batch, str(args.size), str(args.steps), dtype], args.threads)
                key = f"{impl}-{dtype}"
                if key not in best or r["img_s"] > best[key]["img_s"]:
                    best[key] = {"img_s": r["img_s"], "peak_mib": min(r["peak_mib"], best.get(key, r)["peak_mib"])}
        fl = {impl: run_isolated(script, [f"flops-{impl}", variant, "2", str(args.size), "0", "fp32"], 1)["flops"]
              for impl in ("reference", "sparse")}
        rows.append((variant, int(batch), best, fl))
        ref, ours, bf = best["reference-fp32"], best["sparse-fp32"], best["sparse-bf16"]
        print(
            f"{variant} b{batch} {args.size}px: ref {ref['img_s']:.2f} img/s {ref['peak_mib']:.0f} MiB | "
            f"ours fp32 {ours['img_s']:.2f} img/s {ours['peak_mib']:.0f} MiB | ours bf16 {bf['img_s']:.2f} img/s",
            file=sys.stderr,
        )
    print(f"\nFCMAE training step, {args.size}x{args.size}, {args.threads} threads, best of {args.rounds} rounds")
    print("| variant | batch | ref img/s | ours fp32 img/s | speed ratio | ours bf16 img/s | bf16/fp32 | ref peak MiB "
          "| ours peak MiB | mem ratio | ref GFLOP/img | ours GFLOP/img | FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, batch, best, fl in rows:
        ref, ours, bf = best["reference-fp32"], best["sparse-fp32"], best["sparse-bf16"]
        print(
            f"| {variant} | {batch} | {ref['img_s']:.2f} | {ours['img_s']:.2f} | {ours['img_s'] / ref['img_s']:.2f}x "
            f"| {bf['img_s']:.2f} | {bf['img_s'] / ours['img_s']:.2f}x | {ref['peak_mib']:.0f} | "
            f"{ours['peak_mib']:.0f} | {ours['peak_mib'] / ref['peak_mib']:.2f} | {fl['reference'] / 1e9:.2f} | "
            f"{fl['sparse'] / 1e9:.2f} | {fl['sparse'] / fl['reference']:.2f} |"
        )


if __name__ == "__main__":
    main()
