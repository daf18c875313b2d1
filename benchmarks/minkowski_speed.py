"""FCMAE training-step throughput and peak memory: our sparse encoder, the MinkowskiEngine formulation, masked-dense.

Same protocol as ``pretrain_speed.py``: each measurement runs in its own process (fresh allocator, same glibc
tunables, same thread count), the sides alternate over ``--rounds`` rounds, the best round of each is reported and
ratios are taken between numbers of the same run. A step is forward, loss, backward and AdamW, fp32. The
MinkowskiEngine column appears when ``import MinkowskiEngine`` works (``scripts/install_minkowski.sh``).

    python benchmarks/minkowski_speed.py             # atto b32 and tiny b16 at 224^2, 2 threads
    python benchmarks/minkowski_speed.py --quick     # atto b8 at 128^2, one round: a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import current_rss_mib, median_step_seconds, peak_rss_mib, run_isolated

IMPLS = {"sparse": "ours", "minkowski": "MinkowskiEngine", "reference": "masked-dense"}


def build(impl: str, variant: str):
    """``sparse`` (ours, the default backend), ``minkowski`` (``backend="minkowski"``) or ``reference``."""
    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.reference import create_reference_fcmae

    if impl == "reference":
        return create_reference_fcmae(variant)
    return create_fcmae(variant, backend="minkowski" if impl == "minkowski" else "torch")


def worker(impl: str, variant: str, batch: int, size: int, steps: int) -> dict:
    """Median images/s over ``steps`` timed steps (after 2 warm-up steps) and the peak RSS growth in MiB."""
    import torch

    from fcmae.models.masking import random_masking

    torch.manual_seed(0)
    base_rss = current_rss_mib()
    model = build(impl, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size)

    def step() -> None:
        loss = model(imgs, random_masking(batch, size // 32, 0.6, generator=gen))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"img_s": batch / median_step_seconds(step, 2, steps), "peak_mib": peak_rss_mib() - base_rss}


def minkowski_importable() -> bool:
    from fcmae.models.minkowski import minkowski_available

    return minkowski_available()


def load() -> str:
    """The 1/5/15-minute load averages (``uptime``): the machine may be shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(script: Path, impls: list[str], variant: str, batch: str, args: argparse.Namespace) -> dict[str, dict]:
    """Best round of each implementation, the implementations alternating within every round."""
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl in impls:
            r = run_isolated(script, [impl, variant, batch, str(args.size), str(args.steps)], args.threads)
            msg = f"  {variant} b{batch} {IMPLS[impl]}: {r['img_s']:.2f} img/s, {r['peak_mib']:.0f} MiB"
            print(msg, file=sys.stderr)
            if impl not in best or r["img_s"] > best[impl]["img_s"]:
                best[impl] = {"img_s": r["img_s"], "peak_mib": min(r["peak_mib"], best.get(impl, r)["peak_mib"])}
    return best


def print_table(rows: list[tuple[str, int, dict[str, dict]]], impls: list[str]) -> None:
    """Markdown table: images/s and peak MiB per implementation, ratios ours/ME and ours/masked-dense."""
    names = [IMPLS[i] for i in impls]
    head = [f"{n} img/s" for n in names] + [f"ours / {IMPLS[i]}" for i in impls[1:]] + [f"{n} MiB" for n in names]
    print("| variant | batch | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for variant, batch, best in rows:
        ours = best["sparse"]["img_s"]
        cells = [f"{best[i]['img_s']:.2f}" for i in impls] + [f"{ours / best[i]['img_s']:.1f}x" for i in impls[1:]]
        cells += [f"{best[i]['peak_mib']:.0f}" for i in impls]
        print(f"| {variant} | {batch} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="atto only, batch 8, 128px, 1 round")
    ap.add_argument("--configs", default="convnextv2_atto:32,convnextv2_tiny:16")
    args = ap.parse_args()
    if args.worker is not None:
        impl, variant, batch, size, steps = args.worker
        print(json.dumps(worker(impl, variant, int(batch), int(size), int(steps))))
        return
    if args.quick:
        args.configs, args.size, args.rounds, args.steps = "convnextv2_atto:8", 128, 1, 2
    impls = ["sparse", "minkowski", "reference"] if minkowski_importable() else ["sparse", "reference"]
    if "minkowski" not in impls:
        print("MinkowskiEngine is not importable (scripts/install_minkowski.sh): no column for it", file=sys.stderr)
    load_before = load()
    script = Path(__file__).resolve()
    rows = []
    for item in args.configs.split(","):
        variant, batch = item.split(":")
        rows.append((variant, int(batch), measure(script, impls, variant, batch, args)))
    print(f"\nFCMAE training step, fp32, {args.size}x{args.size}, {args.threads} threads, best of {args.rounds} rounds "
          f"of {args.steps} steps; load average {load_before} before, {load()} after")
    print_table(rows, impls)


if __name__ == "__main__":
    main()
