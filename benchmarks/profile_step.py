"""Per-op profile of one training step: where the time of a sparse FCMAE (or dense fine-tuning) step goes.

Runs a few warm-up steps, then profiles ``--steps`` steps with ``torch.profiler`` and prints (and with ``--json``
writes) the self CPU time per op, grouped into categories (depthwise conv forward / backward, matmul, norm,
elementwise, index/copy, optimizer, other), in ms per step and as a share of the step.

    python benchmarks/profile_step.py                          # sparse FCMAE, atto b32 224^2, 2 threads
    python benchmarks/profile_step.py --impl reference         # the masked-dense baseline
    python benchmarks/profile_step.py --impl dense --batch 32  # dense fine-tuning step (classifier)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from _common import ROOT  # noqa: F401  (puts the repository on sys.path)

CATEGORIES = (
    # (category, substrings of op names); the first match wins
    ("dwconv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d", "mkldnn_conv")),
    ("matmul", ("mm", "addmm", "matmul", "linear", "bmm", "baddbmm")),
    ("norm", ("layer_norm", "native_layer_norm")),
    ("optimizer", ("_foreach", "adam")),
    ("index/copy", ("index", "gather", "scatter", "copy_", "clone", "cat", "zero_", "fill_", "contiguous", "to_copy")),
    ("elementwise", ("gelu", "add", "mul", "sub", "div", "sqrt", "pow", "square", "where", "sum", "mean", "neg",
                     "clamp", "exp", "tanh", "erf", "addcmul", "rsqrt", "native_dropout", "bernoulli")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def build_step(impl: str, variant: str, batch: int, size: int):
    """A closure running one training step (forward, loss, backward, AdamW) of the chosen implementation."""
    import torch
    import torch.nn.functional as F

    from fcmae.models.masking import random_masking

    torch.manual_seed(0)
    if impl == "dense":
        from fcmae.weights.loader import create_model

        model = create_model(variant, num_classes=1000)
        imgs = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,))
        loss_fn = lambda: F.cross_entropy(model(imgs), labels)  # noqa: E731
    else:
        from fcmae.models.fcmae import create_fcmae
        from fcmae.models.reference import create_reference_fcmae

        model = create_fcmae(variant) if impl == "sparse" else create_reference_fcmae(variant)
        imgs = torch.randn(batch, 3, size, size)
        gen = torch.Generator().manual_seed(0)
        loss_fn = lambda: model(imgs, random_masking(batch, size // 32, 0.6, generator=gen))["loss"]  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile(impl: str, variant: str, batch: int, size: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = build_step(impl, variant, batch, size)
    for _ in range(2):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        ops[evt.key] += evt.self_cpu_time_total / 1e3 / steps  # ms per step
    total = sum(ops.values())
    cats: dict[str, float] = defaultdict(float)
    for name, ms in ops.items():
        cats[category(name)] += ms
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:20]
    return {"impl": impl, "variant": variant, "batch": batch, "size": size, "threads": torch.get_num_threads(),
            "step_ms": total, "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top_ops": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("sparse", "reference", "dense"), default="sparse")
    ap.add_argument("--variant", default="convnextv2_atto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    from fcmae.runtime import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # the allocator settings of `fcmae` commands and of the other benchmarks
    import torch

    torch.set_num_threads(args.threads)
    res = profile(args.impl, args.variant, args.batch, args.size, args.steps)
    print(f"{args.impl} {args.variant} b{args.batch} {args.size}px, {res['threads']} threads: "
          f"{res['step_ms']:.0f} ms of op self time per step")
    print("| category | ms/step | share |\n|---|---|---|")
    for cat, ms in res["categories"].items():
        print(f"| {cat} | {ms:.1f} | {100 * ms / res['step_ms']:.1f}% |")
    print("\ntop ops (self time, ms/step):")
    for name, ms in res["top_ops"]:
        print(f"  {ms:8.1f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
