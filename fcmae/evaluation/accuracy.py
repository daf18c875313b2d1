"""Evaluation of a classifier: top-1/top-5 accuracy and cross-entropy over a labelled loader, on all processes."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator, desc: str = "eval", progress: bool = False
             ) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (all processes).

    ``loader`` yields ``(images (B, C, H, W), labels (B,), ...)``; with fewer than 5 classes "top-5" is top-C.
    Returns ``{"top1", "top5", "loss", "images"}``.
    """
    from timm.utils import accuracy
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    c1 = c5 = loss_sum = 0.0
    n = 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process and sys.stderr.isatty()))  # no \r in a log
    for batch in bar:
        images, labels = batch[0], batch[1]
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        if labels.numel() == 0:
            continue
        top1, top5 = accuracy(logits, labels, topk=(1, 5))
        b = labels.shape[0]
        c1 += float(top1) * b / 100.0
        c5 += float(top5) * b / 100.0
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += b
    bar.close()
    model.train(was_training)
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "images": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "images": n}
