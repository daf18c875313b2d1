"""Training engine on accelerate: optimiser groups, schedule, seeded data, train step, checkpoints, the loop.

Reproducibility by construction: every sample's augmentation and mask are drawn from a generator seeded by
``(seed, epoch, index)``, and the per-epoch order comes from a sampler seeded by ``(seed, epoch)``. So the data
a step sees does not depend on the number of processes, DataLoader workers, or whether the run was resumed;
together with accelerate's model/optimiser/RNG state this makes a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from fcmae.masking import random_masking

CKPT_RE = re.compile(r"^step_(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops without writing a checkpoint."""


# ------------------------------------------------------------------------------------------- optimisation
def no_weight_decay(name: str, param: Tensor) -> bool:
    """Biases, norm weights, GRN gamma/beta and the mask token (all 1-D) are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed (conv/linear weights) and not decayed (see ``no_weight_decay``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule used by the paper: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256.0


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Per-step schedule: linear warmup from 0 over ``warmup_steps``, then half-cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------- data plumbing
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, sample index)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


class EpochSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``; ``use_epoch`` picks the epoch.

    Deliberately not named ``set_epoch``: accelerate calls ``set_epoch(<its own iteration count>)`` on samplers,
    which restarts at 0 in a resumed process and would replay the wrong epoch's order.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class MaskedSamples(Dataset):
    """Wraps a pretraining dataset of ``(image, n_skipped)``; adds a random mask; seeds both per sample.

    Item: ``(image (C, H, W), mask (L,) bool, n_skipped int)``. Set ``epoch`` before iterating an epoch
    (DataLoader workers are re-created every epoch, so they see it).
    """

    def __init__(self, base: Dataset, grid: tuple[int, int], mask_ratio: float, seed: int) -> None:
        self.base = base
        self.grid = grid
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        s = sample_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            item = self.base[index]
        img, skipped = item[0], item[-1] if len(item) > 1 else 0
        if not isinstance(skipped, int):
            skipped = 0
        g = torch.Generator().manual_seed(s ^ 0x5DEECE66D)
        mask = random_masking(1, self.grid, self.mask_ratio, generator=g)[0]
        return img, mask, skipped


# ------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Progress counters saved with every checkpoint (accelerate ``register_for_checkpointing``)."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches (per process) consumed in the current epoch
    images_seen: int = 0
    skipped_files: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict[str, int]) -> None:
        for k, v in d.items():
            setattr(self, k, int(v))


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """Newest complete checkpoint directory ``root/step_N`` (temp directories are never picked)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(accelerator, root: Path, step: int, keep_last: int) -> Path:
    """accelerate ``save_state`` into a temp dir, then an atomic rename to ``root/step_N``; prune old ones."""
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        olds = sorted((int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name)))
        for _, p in olds[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------- the step
def train_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    accelerator,
    lr: float,
    clip_grad: float | None = None,
) -> dict[str, Any]:
    """One micro-batch: forward, loss, backward, and (at accumulation boundaries) clip + AdamW step.

    batch: ``(imgs (B, C, H, W), mask (B, L) bool, n_skipped (B,))``. Returns ``{"loss": float (mean over
    processes), "stepped": bool, "grad_norm": float | None}``. Raises ``NonFiniteLossError`` before any update.
    """
    imgs, mask = batch[0], batch[1]
    with accelerator.accumulate(model):
        return backward_and_step(model(imgs, mask)["loss"], optimizer, accelerator, lr, clip_grad)


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, accelerator, lr: float,
                      clip_grad: float | None = None) -> dict[str, Any]:
    """Shared tail of every train step, inside ``accelerator.accumulate``: check the loss on all processes, backward,
    and at accumulation boundaries set ``lr * lr_scale`` per group, clip the optimised parameters, step.

    Returns ``{"loss": float (mean over processes), "stepped": bool, "grad_norm": float | None}``; raises
    ``NonFiniteLossError`` before any update.
    """
    all_losses = accelerator.gather(loss.detach().float().reshape(1))
    if not bool(torch.isfinite(all_losses).all()):
        raise NonFiniteLossError(f"non-finite loss {all_losses.tolist()}")
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if clip_grad:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = float(accelerator.clip_grad_norm_(params, clip_grad))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(all_losses.mean()), "stepped": accelerator.sync_gradients, "grad_norm": grad_norm}


def setup_run(run_cfg: Any, cfg: Any) -> tuple[Any, str, Path]:
    """Accelerator (mixed precision, accumulation, gloo on CPU-only multi-process), seed, output dir with the merged
    config saved by the main process. ``run_cfg`` is the config's ``run`` section. -> (accelerator, mp, out_dir)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from fcmae.config import save_config

    if run_cfg.threads > 0:
        torch.set_num_threads(run_cfg.threads)
    mp = resolve_mixed_precision(run_cfg.mixed_precision)
    # several processes on a machine without CUDA: accelerate only picks gloo/MULTI_CPU when told cpu=True
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=run_cfg.accum_iter,
                              step_scheduler_with_optimizer=False, cpu=cpu_ddp)
    set_seed(run_cfg.seed)
    out_dir = Path(run_cfg.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    return accelerator, mp, out_dir


# ------------------------------------------------------------------------------------------- logging
class MetricsLogger:
    """JSONL metrics (always) and TensorBoard scalars (when tensorboard is installed); main process only."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32 (CPU bf16 is slow without AMX/AVX512-BF16)."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def print_main(accelerator, *args: Any) -> None:
    if accelerator.is_main_process:
        print(*args, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
