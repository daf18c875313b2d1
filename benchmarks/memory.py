"""What batch fits: the training memory of every variant, measured on the CPU, with and without checkpointing.

For every variant, pretraining (sparse FCMAE at 224 px, 60 % masked) and fine-tuning (the dense classifier, 1000
classes, at 224 and 384 px):

- fixed memory: fp32 weights, fp32 gradients and AdamW's two moments (16 bytes per parameter), plus the bf16 copies
  of the weights that autocast keeps for a step (2 bytes per parameter): 18 bytes per parameter;
- activation memory per image: the bytes autograd keeps for backward, counted by a saved-tensor hook while the
  forward runs under bf16 autocast on *fake* tensors (``FakeTensorMode``: shapes and dtypes, no values, no time: the
  huge model at 384 px is counted in seconds). Storages are counted once. With checkpointing it is what is kept
  outside the checkpointed blocks, the inputs the checkpoints hold, and the largest block's own activations (they
  exist again while that block is recomputed in backward).

From those it prints the largest batch per GPU for 24 / 80 / 141 GB cards with ``USABLE`` of the card for the model
(the CUDA context, cuDNN workspaces and allocator fragmentation take the rest), alone and under FSDP over 8 GPUs
(weights, gradients and optimizer state sharded 8 ways; activations are not). CPU autocast's op lists are used
(the same matmuls and convolutions run in bf16 as on CUDA). With ``--time`` it also measures, side by side on this
CPU, the step time with checkpointing over without for atto, tiny and base (fp32, small batches).

    python benchmarks/memory.py            # the table (seconds)
    python benchmarks/memory.py --time     # + the CPU time cost of checkpointing (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcmae.models.convnextv2 import build_convnextv2  # noqa: E402
from fcmae.models.fcmae import create_fcmae  # noqa: E402
from fcmae.models.masking import num_kept, random_masking  # noqa: E402
from fcmae.models.registry import list_models  # noqa: E402
from fcmae.models.stage import Stage  # noqa: E402

CARDS_GB = (24, 80, 141)
USABLE = 0.9
FIXED_BYTES_PER_PARAM = 4 + 4 + 8 + 2  # fp32 weights, grads, AdamW moments; bf16 autocast copies
BATCH = 2  # images per counted forward (activation bytes are linear in the batch)
GOAL_RATIO = 0.4  # checkpointing must cut base's activation memory per image to <= 0.4x


class _Saved:
    """Counts the bytes autograd saves (each storage once) and, with checkpointing on, the inputs the checkpoints
    hold and each block's own saves (the recomputation's transient)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: dict[int, int] = {}
        self.block_bytes: list[int] = []
        self._block: list[int] | None = None
        self._hooks = []
        for stage in (m for m in model.modules() if isinstance(m, Stage)):
            for blk in stage:
                self._hooks.append(blk.register_forward_pre_hook(self._enter))
                self._hooks.append(blk.register_forward_hook(self._leave))
            self.ckpt = stage.grad_checkpointing

    def _add(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        if self._block is not None:
            self._block[0] += t.untyped_storage().nbytes()
        return t

    def _enter(self, _mod, args) -> None:
        if self.ckpt and torch.is_tensor(args[0]):
            self._add(args[0])  # the checkpoint keeps the block's input
        self._block = [0]

    def _leave(self, *_a) -> None:
        if self._block is not None:
            self.block_bytes.append(self._block[0])
        self._block = None

    def total(self) -> int:
        for h in self._hooks:
            h.remove()
        return sum(self.seen.values())


def saved_bytes(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], Any], ckpt: bool) -> int:
    """Activation bytes of one forward of ``run(model)`` on fake tensors under bf16 autocast; with ``ckpt``, plus the
    largest block's own activations (measured without checkpointing: they come back during its recomputation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fcmae.models.sparse as sparse

    largest = 0
    if ckpt:
        largest = _largest_block(build, run)
    sparse._MORTON.clear()
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")
        model = build().train()
        model.set_grad_checkpointing(ckpt)
        counter = _Saved(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            run(model)
    sparse._MORTON.clear()
    return counter.total() + largest


def _largest_block(build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module], Any]) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")
        model = build().train()
        counter = _Saved(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            run(model)
    counter.total()
    return max(counter.block_bytes)


def _pretrain(name: str, size: int) -> tuple[Callable, Callable]:
    import fcmae.models.masking as masking

    # the mask count check reads its flag on the host on a CPU; fake tensors have no values (the masks drawn here
    # keep num_kept cells by construction), so it is queued as on a GPU instead
    masking.check_on_device = lambda cond, message: torch._assert_async(cond, message)
    grid = size // 32

    def run(m):
        mask = random_masking(BATCH, grid, 0.6)
        return m(torch.randn(BATCH, 3, size, size), mask, num_keep=num_kept(grid * grid, 0.6))["loss"]

    return (lambda: create_fcmae(name)), run


def _finetune(name: str, size: int) -> tuple[Callable, Callable]:
    def run(m):
        return torch.nn.functional.cross_entropy(m(torch.randn(BATCH, 3, size, size)), torch.zeros(BATCH).long())

    return (lambda: build_convnextv2(name, num_classes=1000)), run


def _params(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def fits(card_gb: float, fixed: float, act: float, shards: int = 1) -> int:
    """The largest batch per GPU: (usable card - fixed / shards) / activation per image."""
    free = card_gb * 1e9 * USABLE - fixed / shards
    return max(0, int(free // act))


def table(variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in variants:
        for task, size, make in (("pretrain", 224, _pretrain), ("finetune", 224, _finetune),
                                 ("finetune", 384, _finetune)):
            build, run = make(name, size)
            p = _params(build)
            fixed = p * FIXED_BYTES_PER_PARAM
            act = {ck: saved_bytes(build, run, ck) / BATCH for ck in (False, True)}
            rows.append({"variant": name, "task": task, "size": size, "params_m": p / 1e6, "fixed_gb": fixed / 1e9,
                         "act_mb": act[False] / 1e6, "act_ckpt_mb": act[True] / 1e6,
                         "ratio": act[True] / act[False],
                         "fits": {ck: [fits(c, fixed, act[ck], s) for s in (1, 8) for c in CARDS_GB]
                                  for ck in (False, True)}})
            print(_line(rows[-1]), flush=True)
    return rows


HEADER = ("| variant | task | px | params M | fixed GB | act MB/img | ckpt MB/img | ratio | batch 24/80/141 GB "
          "| ckpt | FSDP x8: batch | FSDP x8 ckpt |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _line(r: dict[str, Any]) -> str:
    f, c = r["fits"][False], r["fits"][True]
    return (f"| {r['variant'].removeprefix('convnextv2_')} | {r['task']} | {r['size']} | {r['params_m']:.1f} | "
            f"{r['fixed_gb']:.2f} | {r['act_mb']:.1f} | {r['act_ckpt_mb']:.1f} | {r['ratio']:.2f} | "
            f"{'/'.join(map(str, f[:3]))} | {'/'.join(map(str, c[:3]))} | {'/'.join(map(str, f[3:]))} | "
            f"{'/'.join(map(str, c[3:]))} |")


def time_cost(variants: list[str], steps: int = 3) -> None:
    """Step time with checkpointing / without, fp32 on this CPU, the two sides interleaved step by step."""
    print(f"\nCPU time cost of checkpointing ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), fp32, "
          f"median of {steps} steps after one warm-up:\n\n| variant | task | batch x px | without s | with s | "
          "with / without |\n|---|---|---|---|---|---|")
    for name in variants:
        for task, make, batch, size in (("pretrain", _pretrain, 4, 224), ("finetune", _finetune, 2, 224)):
            build, run = make(name, size)
            torch.manual_seed(0)
            models = {ck: build().train() for ck in (False, True)}
            models[True].load_state_dict(models[False].state_dict())
            models[True].set_grad_checkpointing(True)
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(steps + 1):
                for ck, m in models.items():
                    t0 = time.perf_counter()
                    run_b(run, m, batch)
                    if i:
                        times[ck].append(time.perf_counter() - t0)
            med = {ck: sorted(v)[len(v) // 2] for ck, v in times.items()}
            print(f"| {name.removeprefix('convnextv2_')} | {task} | {batch} x {size} | {med[False]:.2f} | "
                  f"{med[True]:.2f} | {med[True] / med[False]:.2f}x |", flush=True)


def run_b(run: Callable, model: torch.nn.Module, batch: int) -> None:
    global BATCH
    old, BATCH = BATCH, batch
    try:
        model.zero_grad(set_to_none=True)
        run(model).backward()
    finally:
        BATCH = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(n for n in list_models() if n != "convnextv2_test"))
    ap.add_argument("--time", action="store_true", help="also the CPU time cost of checkpointing (atto/tiny/base)")
    ap.add_argument("--time-variants", default="convnextv2_atto,convnextv2_tiny,convnextv2_base")
    args = ap.parse_args()
    print(f"Training memory per GPU (bf16 autocast, AdamW; {USABLE:.0%} of a card usable); batch = largest per GPU "
          "for 24/80/141 GB cards\n")
    print(HEADER)
    rows = table(args.variants.split(","))
    base = [r for r in rows if r["variant"] == "convnextv2_base" and r["size"] == 224]
    ok = all(r["ratio"] <= GOAL_RATIO for r in base)
    ratios = ", ".join(f"{r['task']} {r['ratio']:.2f}x" for r in base)
    print(f"\nbase, activation memory per image with checkpointing / without: {ratios} (goal <= {GOAL_RATIO}x): "
          f"{'met' if ok else 'NOT met'}")
    if args.time:
        time_cost(args.time_variants.split(","))
    if base and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
