"""Supervised training-step throughput: our dense ConvNeXt V2 vs timm's, same variant, same weights' shapes.

A training step is forward, cross-entropy, backward and an AdamW step on a fixed random batch, fp32. Each
measurement runs in its own process (fresh allocator, same glibc malloc tunables, same thread count); the sides
alternate over ``--rounds`` rounds and the best round of each is reported. timm is measured both with plain
(NCHW) input and with channels_last input, and the ratio is taken against timm's faster setting.

    python benchmarks/finetune_speed.py             # convnextv2_atto, batch 32, 224^2, 2 threads, 2 rounds
    python benchmarks/finetune_speed.py --quick     # smoke run: batch 4, 64px, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _common import median_step_seconds, run_isolated

# (label, implementation, memory format of the input batch)
SIDES = (("ours", "ours", "channels_last"), ("timm", "timm", "contiguous"), ("timm-cl", "timm", "channels_last"))


def worker(impl: str, variant: str, batch: int, size: int, steps: int, fmt: str, warmup: int = 2) -> dict:
    """Median seconds per training step of one side, as images/s."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if impl == "ours":
        from fcmae.weights.loader import create_model

        model = create_model(variant, num_classes=1000)
    else:
        import timm

        model = timm.create_model(variant, pretrained=False, num_classes=1000)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    imgs = torch.randn(batch, 3, size, size)
    if fmt == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(imgs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"img_s": batch / median_step_seconds(step, warmup, steps), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="convnextv2_atto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median taken)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 4, 64px, 1 round, 2 steps")
    args = ap.parse_args()
    if args.worker is not None:
        impl, variant, batch, size, steps, fmt = args.worker
        print(json.dumps(worker(impl, variant, int(batch), int(size), int(steps), fmt)))
        return
    if args.quick:
        args.batch, args.size, args.rounds, args.steps = 4, 64, 1, 2
    script = Path(__file__).resolve()
    load_before = os.getloadavg()[0]
    best: dict[str, float] = {}
    for rnd in range(args.rounds):
        # alternate the order each round so neither side always runs on a "warmer" machine
        for label, impl, fmt in SIDES if rnd % 2 == 0 else SIDES[::-1]:
            cmd = [impl, args.variant, str(args.batch), str(args.size), str(args.steps), fmt]
            r = run_isolated(script, cmd, args.threads)
            print(f"round {rnd + 1} {label}: {r['img_s']:.2f} img/s", file=sys.stderr)
            best[label] = max(best.get(label, 0.0), r["img_s"])
    timm_label = max(("timm", "timm-cl"), key=lambda k: best[k])
    print(f"\n{args.variant} training step (fwd + CE + bwd + AdamW), fp32, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.threads} threads, best of {args.rounds} round(s)")
    print("| side | input format | img/s |")
    print("|---|---|---|")
    for label, _, fmt in SIDES:
        print(f"| {label} | {fmt} | {best[label]:.2f} |")
    print(f"\nratio ours / timm (best timm setting: {timm_label}): {best['ours'] / best[timm_label]:.2f}x")
    load = max(load_before, os.getloadavg()[0])
    if load > args.threads + 0.5:
        # other processes competing for the cores make multi-threaded steps stall unevenly: rerun on a quiet machine
        print(f"warning: 1-min load average reached {load:.1f} on {os.cpu_count()} cores; numbers are unreliable")


if __name__ == "__main__":
    main()
