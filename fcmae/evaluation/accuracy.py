"""Evaluation of a classifier: top-1/top-5 accuracy and cross-entropy over a labelled loader, on all processes."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator, desc: str = "eval", progress: bool = False,
             prepare: Callable[[Tensor], Tensor] | None = None, split: bool = False) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (all processes).

    ``loader`` yields ``(images (B, C, H, W), labels (B,), ...)``; with fewer than 5 classes "top-5" is top-C.
    ``prepare``: applied to the images on the device (e.g. uint8 -> normalised float). ``split``: the loader is not
    prepared by accelerate and every process holds its own share (shards): batches are moved to the device here and
    the sums are reduced once at the end (processes may hold different numbers of batches); otherwise logits are
    gathered per batch (``gather_for_metrics`` drops accelerate's padding). Returns ``{"top1", "top5", "loss",
    "images"}``.
    """
    from accelerate.utils import send_to_device
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # correct@1, correct@5, loss, n
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process and sys.stderr.isatty()))  # no \r in a log
    for batch in bar:
        if split:
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        images, labels = batch[0], batch[1]
        images = prepare(images) if prepare is not None else images
        with accelerator.autocast():
            logits = model(images).float()
        if not split:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        if labels.numel():
            sums += _batch_sums(logits, labels)
    bar.close()
    model.train(was_training)
    if split:
        sums = accelerator.reduce(sums, reduction="sum")
    c1, c5, loss_sum, n = sums.tolist()
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "images": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "images": int(n)}


def _batch_sums(logits: Tensor, labels: Tensor) -> Tensor:
    """``[correct top-1, correct top-5 (top-C for fewer classes), summed cross-entropy, count]`` of one batch, on the
    device (no host read per batch)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels.unsqueeze(1)
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    # the count as a fill on the device: torch.tensor(n, device=...) would copy a host value every batch
    count = loss.new_full((), labels.numel())
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), loss, count]).double()
