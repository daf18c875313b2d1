"""Builders: the pretraining set, the labelled fine-tuning sets with a label budget, and dataset specs.

The sources themselves are modules of ``fcmae.data`` listed in ``fcmae.data.sources``; here the parts every
map-style source shares (``SeededSamples``, the two-phase decode, limits and label budgets) are put around them.

A dataset spec names a labelled set in one string, the same in every command and config:
``fashion_mnist[:train|:test]`` (IDX files in the Debian location or ``root``), or a folder of class folders
(an ImageNet-style root holding ``train/`` and ``val/`` means ``val/``, or ``train/`` with ``:train``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fcmae.data.fashion_mnist import DATASET_DEFAULT_FASHION_MNIST, FashionMNIST
from fcmae.data.folders import class_folder
from fcmae.data.images import DataError, ImageFiles, LabeledImageFolder
from fcmae.data.protocol import FinetuneData, SampleBase
from fcmae.data.sampling import SeededSamples
from fcmae.data.sources import builder, get_source
from fcmae.data.transforms import (
    DecodeCrop,
    build_eval_transform,
    build_finetune_transform,
)


# --------------------------------------------------------------------------------------------- pretraining
def build_pretrain_dataset(cfg: Any, in_chans: int, deferred: bool = False) -> SampleBase:
    """The pretraining set of a map-style ``cfg.source`` (``fcmae.data.sources``); items ``(image (C, S, S), -1,
    n_skipped)``, the first ``cfg.limit`` when that is > 0. With ``deferred`` (or ``data.decode=gpu``) image files
    come as ``JpegItem`` (bytes and crop), decoded later: by ``DecodeCrop`` in the worker or by ``DeviceDecoder`` on
    the device."""
    return builder(cfg.source, "pretrain")(cfg, in_chans, deferred)


def build_pretrain_train_set(cfg: Any, in_chans: int, seed: int, mask_grid: tuple[int, int], mask_ratio: float
                             ) -> Any:
    """The pretraining training set with its seeded augmentation and masks: ``SeededSamples`` over
    ``build_pretrain_dataset``, or the source's own stream (``webdataset``). Items: ``Sample(image uint8 (C, S, S),
    mask (h*w,) bool, skipped)``."""
    if get_source(cfg.source).streamed:
        return builder(cfg.source, "pretrain")(cfg, in_chans, seed, mask_grid, mask_ratio)
    base = build_pretrain_dataset(cfg, in_chans, deferred=True)
    # image bytes with data.decode=cpu: each batch's crops are drawn first, then decoded in the worker (DecodeCrop)
    finish = DecodeCrop(cfg.input_size, in_chans) if isinstance(base, ImageFiles) and cfg.decode == "cpu" else None
    # our uint8 transforms draw from the per-sample generator: no global seeding needed
    return SeededSamples(base, seed=seed, labelled=False, mask_grid=mask_grid, mask_ratio=mask_ratio,
                         seed_globals=False, finish=finish)


# --------------------------------------------------------------------------------------------- label budget
def budget_counts(class_sizes: Mapping[int, int], fraction: float = 1.0, per_class: int = 0) -> dict[int, int]:
    """Images kept per class: ``round(fraction * n_c)`` (halves round up), capped at ``per_class`` when > 0.

    With ``fraction == 1`` that is exactly ``per_class`` images of every class, and a class with fewer is an error
    naming it; with ``fraction < 1`` too, ``per_class`` is only a cap. A class never drops to zero images (a class
    without a labelled example cannot be learned).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    out = {}
    for c, n in sorted(class_sizes.items()):
        k = max(1, math.floor(fraction * n + 0.5))
        if per_class > 0:
            if per_class > n and fraction == 1.0:
                raise DataError(f"class {c} has only {n} training images, fewer than labels_per_class={per_class}")
            k = min(k, per_class)
        out[c] = k
    return out


def stratified_subset(targets: Sequence[int] | np.ndarray, fraction: float = 1.0, per_class: int = 0,
                      seed: int = 0) -> list[int]:
    """Sorted indices of a seeded, stratified subset of a labelled set (see ``budget_counts`` for the sizes).

    Each class draws from its own generator seeded by ``(seed, class)``, so the subset of one class does not
    depend on the others, and for one seed smaller budgets are subsets of larger ones.
    """
    targets = np.asarray(targets, dtype=np.int64)
    classes, sizes = np.unique(targets, return_counts=True)
    counts = budget_counts(dict(zip(classes.tolist(), sizes.tolist())), fraction, per_class)
    chosen = []
    for c, k in counts.items():
        idx = np.flatnonzero(targets == c)
        perm = np.random.default_rng([seed, c]).permutation(len(idx))
        chosen.append(idx[perm[:k]])
    return sorted(np.concatenate(chosen).tolist()) if chosen else []


def dataset_targets(ds: Dataset) -> list[int]:
    """Labels of a labelled dataset without decoding images (``targets`` or ``labels`` attribute)."""
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- dataset specs
def labelled_dataset(spec: str, transform: Any, in_chans: int, root: str | None = None,
                     on_bad_image: str = "skip") -> tuple[Dataset, list[str]]:
    """The labelled set a spec names (see the module docstring) -> ``(dataset, class names)``.

    Items are ``(transform(image), label[, n_skipped])``; ``root`` is the Fashion-MNIST IDX folder.
    """
    name, _, split = spec.partition(":")
    if name == "fashion_mnist" and not Path(spec).exists():
        split = split or "test"
        if split not in ("test", "train"):
            raise DataError(f"dataset {spec}: the Fashion-MNIST split must be 'test' or 'train'")
        ds = FashionMNIST(root or DATASET_DEFAULT_FASHION_MNIST, split, transform, in_chans)  # type: ignore[arg-type]
        return ds, list(ds.classes)
    path, split = (Path(name), split) if split in ("train", "val") else (Path(spec), "")
    path = path.expanduser()
    if (path / "val").is_dir() and (path / "train").is_dir():
        path = path / (split or "val")
    ds = LabeledImageFolder(class_folder(path, "dataset"), transform, in_chans, on_bad_image)  # type: ignore
    return ds, list(ds.classes)


def first_per_class(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """A seeded, stratified subset of about ``n`` indices (all when ``n`` is 0 or at least the set's size)."""
    if n <= 0 or n >= len(targets):
        return list(range(len(targets)))
    return stratified_subset(targets, fraction=n / len(targets), seed=seed)


# --------------------------------------------------------------------------------------------- fine-tuning
def build_finetune_data(cfg: Any, in_chans: int, seed: int) -> FinetuneData:
    """The labelled sets of ``cfg.source`` (a fine-tuning ``data`` section; ``fcmae.data.sources``) with their
    transforms. Map-style sources: training keeps the first ``limit`` images (if > 0), then the label budget
    (``train_fraction`` / ``labels_per_class``, seeded by ``label_seed``); validation the first ``val_limit``.
    """
    if get_source(cfg.source).streamed:
        return builder(cfg.source, "finetune")(cfg, in_chans, seed)
    train_tf = build_finetune_transform(
        cfg.input_size, in_chans, auto_augment=cfg.auto_augment or None, color_jitter=cfg.color_jitter,
        scale=tuple(cfg.crop_scale), hflip=cfg.hflip, interpolation=cfg.interpolation)  # erasing: on the device
    val_tf = build_eval_transform(cfg.input_size, cfg.crop_pct, in_chans)
    train_base, val_base, classes = builder(cfg.source, "finetune")(cfg, in_chans, train_tf, val_tf)
    targets = dataset_targets(train_base)
    pool = list(range(min(cfg.limit, len(targets)) if cfg.limit else len(targets)))
    total = len(pool)
    if cfg.train_fraction < 1.0 or cfg.labels_per_class > 0:
        sub = stratified_subset([targets[i] for i in pool], cfg.train_fraction, cfg.labels_per_class, cfg.label_seed)
        pool = [pool[i] for i in sub]
    counts: dict[int, int] = {}
    for i in pool:
        counts[targets[i]] = counts.get(targets[i], 0) + 1
    n_val = len(val_base)  # type: ignore[arg-type]
    val_idx = range(min(cfg.val_limit, n_val) if cfg.val_limit else n_val)
    return FinetuneData(SeededSamples(train_base, pool, seed), SeededSamples(val_base, val_idx), classes,
                        total, dict(sorted(counts.items())))

