"""Frozen-feature evaluation: features of a frozen encoder, a weighted k-NN classifier and a linear probe.

- :func:`extract_features`: global-average-pooled final-stage features of a dense ConvNeXt V2 (no final norm: an
  FCMAE encoder has none), or the flattened images themselves (the raw-pixel baseline).
- :func:`standardise`: per-dimension z-scores with the statistics of the labelled (training) features.
- :func:`knn_predict`: DINO's k-NN protocol: cosine similarity, the ``k`` nearest training samples vote with
  weight ``exp(similarity / T)``; top-1.
- :func:`linear_probe`: a multinomial logistic regression trained on the cached features (L-BFGS, full batch),
  its L2 penalty picked on a held-out fifth of the labelled set.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(model: nn.Module | None, loader: Iterable, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "features") -> tuple[Tensor, Tensor]:
    """Run ``loader`` (``(images (B, C, H, W), labels (B,), ...)`` batches) through a frozen encoder.

    ``model``: anything with ``forward_features`` ``(B, C, H, W) -> (B, D, h, w)``; the map is averaged over
    ``(h, w)``. ``None`` gives the flattened images ``(B, C*H*W)`` (raw pixels). Returns ``(features (N, D) fp32 on
    the CPU, labels (N,) int64)``.
    """
    from tqdm import tqdm

    if model is not None:
        was_training = model.training
        model.eval()
    feats, labels = [], []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()))
    for batch in bar:
        x = batch[0].to(device)
        f = x.flatten(1) if model is None else model.forward_features(x).float().mean(dim=(2, 3))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(batch[1]).long().cpu())
    if model is not None:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def standardise(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Z-score every dimension with the mean/std of ``train`` ``(N, D)``; ``others`` ``(M, D)`` use the same
    statistics. Returns ``(train', *others')``."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True, unbiased=False) + eps
    return tuple((t - mean) / std for t in (train, *others))


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Weighted k-NN (DINO): predicted class per query.

    train_x ``(N, D)``, train_y ``(N,)`` int64 in ``[0, num_classes)``, query_x ``(M, D)`` -> ``(M,)`` int64.
    Features are L2-normalised; the ``min(k, N)`` most cosine-similar training samples vote for their class with
    weight ``exp(sim / temperature)``; ties go to the lower class index.
    """
    if train_x.shape[0] == 0:
        raise ValueError("k-NN needs at least one labelled sample")
    tr = F.normalize(train_x.float(), dim=1)
    k = min(k, tr.shape[0])
    preds = []
    for start in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[start:start + chunk].float(), dim=1)
        sim, idx = (q @ tr.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx], (sim.double() / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Top-1 accuracy in percent of predictions ``(M,)`` against labels ``(M,)`` (nan when empty)."""
    return 100.0 * float((pred == target).double().mean()) if target.numel() else math.nan


def _fit_logreg(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int,
                init: nn.Linear | None = None) -> nn.Linear:
    """Multinomial logistic regression on ``x (N, D)``, ``y (N,)``: mean cross-entropy + ``wd/2 * ||W||^2``,
    L-BFGS from zeros or from ``init`` (a warm start)."""
    lin = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.copy_(init.weight if init is not None else torch.zeros_like(lin.weight))
        lin.bias.copy_(init.bias if init is not None else torch.zeros_like(lin.bias))
    xd = x.float()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-8, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xd), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def linear_probe(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int,
                 weight_decays: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4), max_iter: int = 100,
                 seed: int = 0) -> tuple[Tensor, float]:
    """Linear classifier on frozen (standardised) features -> ``(predicted class per query (M,), chosen wd)``.

    train_x ``(N, D)``, train_y ``(N,)``, query_x ``(M, D)``. With several ``weight_decays`` and at least 2 labelled
    samples per class, each is fitted on a seeded stratified 80% of the training set (strongest penalty first, each
    fit warm-started from the previous one) and scored on the other 20%; the best (ties: the larger penalty) is
    refitted on all of it.
    """
    wd = weight_decays[0]
    if len(weight_decays) > 1:
        fit_idx, held_idx = _holdout_split(train_y, seed)
        if held_idx.numel():
            scores, lin = [], None
            for w in sorted(weight_decays, reverse=True):
                lin = _fit_logreg(train_x[fit_idx], train_y[fit_idx], num_classes, w, max_iter, lin)
                with torch.no_grad():
                    scores.append((accuracy(lin(train_x[held_idx].float()).argmax(1), train_y[held_idx]), w))
            wd = max(scores)[1]
    lin = _fit_logreg(train_x, train_y, num_classes, wd, max_iter)
    with torch.no_grad():
        return lin(query_x.float()).argmax(dim=1), wd


def _holdout_split(y: Tensor, seed: int, fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Stratified seeded split of indices of ``y (N,)`` into ``(fit, held-out)``; classes with a single sample
    stay in ``fit``."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_held = int(round(fraction * idx.numel())) if idx.numel() > 1 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def evaluate_features(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                      k: int = 20, temperature: float = 0.07, linear: bool = True, seed: int = 0
                      ) -> dict[str, float]:
    """k-NN and linear-probe top-1 (%) on ``val`` of features standardised with the labelled set's statistics.

    train_x ``(N, D)``, train_y ``(N,)``, val_x ``(M, D)``, val_y ``(M,)``. Returns ``{"knn_top1",
    "linear_top1", "linear_wd"}`` (linear entries only with ``linear``).
    """
    tr, va = standardise(train_x, val_x)
    out = {"knn_top1": accuracy(knn_predict(tr, train_y, va, num_classes, k, temperature), val_y)}
    if linear:
        pred, wd = linear_probe(tr, train_y, va, num_classes, seed=seed)
        out.update(linear_top1=accuracy(pred, val_y), linear_wd=wd)
    return out


def summarise(runs: Sequence[dict[str, float]], group_key: str = "labels_per_class") -> list[dict[str, float]]:
    """Mean and (population) std over seeds of ``knn_top1`` / ``linear_top1`` for every value of ``group_key``, in
    the order of first appearance. Each input dict holds ``group_key``, ``train_images`` and the accuracies."""
    groups: dict[float, list[dict[str, float]]] = {}
    for r in runs:
        groups.setdefault(r[group_key], []).append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, float] = {group_key: key, "seeds": len(rs), "train_images": rs[0]["train_images"]}
        for metric in ("knn_top1", "linear_top1"):
            vals = torch.tensor([r[metric] for r in rs if metric in r], dtype=torch.float64)
            if vals.numel():
                row[f"{metric}_mean"] = float(vals.mean())
                row[f"{metric}_std"] = float(vals.std(unbiased=False))
        out.append(row)
    return out
