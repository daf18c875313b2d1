"""Builders: the pretraining set, the labelled fine-tuning sets with a label budget, and dataset specs.

A dataset spec names a labelled set in one string, the same in every command and config:
``fashion_mnist[:train|:test]`` (IDX files in the Debian location or ``root``), or a folder of class folders
(an ImageNet-style root holding ``train/`` and ``val/`` means ``val/``, or ``train/`` with ``:train``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from fcmae.data.decode import decode_bytes, jpeg_or_image
from fcmae.data.fashion_mnist import DATASET_DEFAULT_FASHION_MNIST, DemoImages, DropLabels, FashionMNIST
from fcmae.data.images import DataError, ImageFiles, LabeledImageFolder, scan_or_read_file_list
from fcmae.data.sampling import SeededSamples
from fcmae.data.transforms import (
    DecodeCrop,
    DeferredCropU8,
    ResizeCenterCropU8,
    build_eval_transform,
    build_finetune_transform,
    build_pretrain_transform,
)


# --------------------------------------------------------------------------------------------- pretraining
def pretrain_image_root(cfg: Any) -> Path:
    """The folder whose images pretraining reads: ``data.path`` (``data.path/train`` for ImageNet when it has one).
    File lists (``data.file_list``) are relative to it."""
    if not cfg.path:
        raise DataError(f"data.path is required for data.source={cfg.source}")
    root = Path(cfg.path).expanduser()
    return root / "train" if cfg.source == "imagenet" and (root / "train").is_dir() else root


def build_pretrain_dataset(cfg: Any, in_chans: int, deferred: bool = False) -> Dataset:
    """The pretraining set named by ``cfg.source`` (a ``data`` config section); items ``(image (C, S, S), n_skipped)``.
    With ``deferred`` (or ``data.decode=gpu``) a folder's images come as ``JpegItem`` (bytes and crop), decoded
    later: by ``DecodeCrop`` in the worker or by ``DeviceDecoder`` on the device.

    demo: the embedded Fashion-MNIST subset; folder: every image under ``cfg.path``; imagenet: every image under
    ``cfg.path/train`` (or ``cfg.path`` without a ``train/``), labels ignored; fashion_mnist: the training split in
    ``cfg.path`` (default :data:`DATASET_DEFAULT_FASHION_MNIST`). ``cfg.limit > 0`` keeps the first ``limit`` items.
    """
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    limit = max(0, int(cfg.limit))
    if cfg.source in ("folder", "imagenet"):
        root = pretrain_image_root(cfg)
        paths = scan_or_read_file_list(root, cfg.file_list)
        # limit the paths (not a Subset) so replacements for bad files come from inside the limit too
        return _pretrain_files(cfg, in_chans, paths[:limit] if limit else paths, deferred)
    if cfg.source == "fashion_mnist":
        ds: Dataset = DropLabels(FashionMNIST(cfg.path or DATASET_DEFAULT_FASHION_MNIST, "train", tf, in_chans))
    elif cfg.source == "demo":
        ds = DropLabels(DemoImages(tf, in_chans, base_size=max(cfg.input_size, 28)))
    else:
        raise DataError(f"data.source={cfg.source!r} is not one of ['demo', 'folder', 'imagenet', 'fashion_mnist']")
    if limit and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    return ds


def build_pretrain_train_set(cfg: Any, in_chans: int, seed: int, mask_grid: tuple[int, int], mask_ratio: float
                             ) -> Any:
    """The pretraining training set with its seeded augmentation and masks: ``SeededSamples`` over
    ``build_pretrain_dataset``, or for ``data.source=webdataset`` a ``ShardStream`` over the shards in ``cfg.path``.
    Items: ``Sample(image uint8 (C, S, S), mask (h*w,) bool, skipped)``."""
    if cfg.source == "webdataset":
        from fcmae.data.shards import ShardStream, open_shards

        tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
        return ShardStream(open_shards(cfg.path, cfg.shard_index), tf, in_chans=in_chans, seed=seed,
                           mask_grid=mask_grid, mask_ratio=mask_ratio, buffer=cfg.shuffle_buffer,
                           on_bad_image=cfg.on_bad_image)
    base = build_pretrain_dataset(cfg, in_chans, deferred=True)
    # folders with data.decode=cpu: each batch's crops are drawn first, then decoded in the worker (DecodeCrop)
    finish = DecodeCrop(cfg.input_size, in_chans) if isinstance(base, ImageFiles) and cfg.decode == "cpu" else None
    # our uint8 transforms draw from the per-sample generator: no global seeding needed
    return SeededSamples(base, seed=seed, labelled=False, mask_grid=mask_grid, mask_ratio=mask_ratio,
                         seed_globals=False, finish=finish)


def _pretrain_files(cfg: Any, in_chans: int, paths: list[Path], deferred: bool) -> ImageFiles:
    """Folder images for pretraining: decoded and cropped; ``deferred`` or ``data.decode=gpu``: JPEG bytes + crop
    parameters (``JpegItem``), decoded later."""
    if deferred or getattr(cfg, "decode", "cpu") == "gpu":
        tf = DeferredCropU8(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip)
        return ImageFiles(paths, tf, in_chans, cfg.on_bad_image, decoder=jpeg_or_image)
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return ImageFiles(paths, tf, in_chans, cfg.on_bad_image, decoder=decode_bytes)


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
    ds = LabeledImageFolder(_class_folder(path, "dataset"), transform, in_chans, on_bad_image)  # type: ignore
    return ds, list(ds.classes)


def _class_folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} folder {p} does not exist" if not p.exists() else f"{what}: {p} is not a folder")
    return p


def first_per_class(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """A seeded, stratified subset of about ``n`` indices (all when ``n`` is 0 or at least the set's size)."""
    if n <= 0 or n >= len(targets):
        return list(range(len(targets)))
    return stratified_subset(targets, fraction=n / len(targets), seed=seed)


# --------------------------------------------------------------------------------------------- fine-tuning
@dataclass
class FinetuneData:
    """Training/validation sets (items ``(image, label, n_skipped)``) and what the run reports about them."""

    train: Any  # SeededSamples, or a ShardStream (webdataset)
    val: Any
    classes: list[str]
    train_total: int  # images available before the label budget (after data.limit)
    train_counts: dict[int, int]  # images per class kept for training

    def describe_budget(self, cfg: Any) -> str:
        if not self.train_counts:  # shards: sized by their index, not counted per class
            return f"{self.train_total} training images in shards"
        n = sum(self.train_counts.values())
        if n == self.train_total:
            return f"{n} training images"
        per = sorted(set(self.train_counts.values()))
        per_txt = str(per[0]) if len(per) == 1 else f"{per[0]}-{per[-1]}"
        return (f"label budget: {n} of {self.train_total} training images ({per_txt} per class; train_fraction "
                f"{cfg.train_fraction:g}, labels_per_class {cfg.labels_per_class}, seed {cfg.label_seed})")


def _train_val_sets(cfg: Any, in_chans: int, train_tf: Any, val_tf: Any) -> tuple[Dataset, Dataset, list[str]]:
    if cfg.source == "fashion_mnist":
        root = cfg.path or DATASET_DEFAULT_FASHION_MNIST
        return (FashionMNIST(root, "train", train_tf, in_chans), FashionMNIST(root, "test", val_tf, in_chans),
                list(FashionMNIST.classes))
    if cfg.source == "imagenet":
        root = _class_folder(cfg.path, "data.path")
        train_dir, val_dir = root / "train", root / "val"
    elif cfg.source == "folder":
        train_dir, val_dir = Path(cfg.train_path), Path(cfg.val_path)
    else:
        raise DataError(f"data.source={cfg.source!r} is not one of ['imagenet', 'folder', 'fashion_mnist']")
    tr = LabeledImageFolder(_class_folder(train_dir, "training"), train_tf, in_chans, cfg.on_bad_image)
    va = LabeledImageFolder(_class_folder(val_dir, "validation"), val_tf, in_chans, cfg.on_bad_image)
    if va.classes != tr.classes:
        only_t = sorted(set(tr.classes) - set(va.classes))[:5]
        only_v = sorted(set(va.classes) - set(tr.classes))[:5]
        raise DataError(f"class folders differ between {train_dir} and {val_dir} (only in train: {only_t}, "
                        f"only in val: {only_v}); labels would not match")
    return tr, va, list(tr.classes)


def build_finetune_data(cfg: Any, in_chans: int, seed: int) -> FinetuneData:
    """The labelled sets named by ``cfg.source`` (a fine-tuning ``data`` section) with their transforms.

    imagenet: ``<path>/train`` and ``<path>/val`` class folders; folder: ``train_path`` and ``val_path``;
    fashion_mnist: the train and test IDX files in ``path``. Training keeps the first ``limit`` images (if > 0),
    then the label budget (``train_fraction`` / ``labels_per_class``, seeded by ``label_seed``).
    """
    if cfg.source == "webdataset":
        return _finetune_shards(cfg, in_chans, seed)
    train_tf = build_finetune_transform(
        cfg.input_size, in_chans, auto_augment=cfg.auto_augment or None, color_jitter=cfg.color_jitter,
        scale=tuple(cfg.crop_scale), hflip=cfg.hflip, interpolation=cfg.interpolation)  # erasing: on the device
    val_tf = build_eval_transform(cfg.input_size, cfg.crop_pct, in_chans)
    train_base, val_base, classes = _train_val_sets(cfg, in_chans, train_tf, val_tf)
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


def _finetune_shards(cfg: Any, in_chans: int, seed: int) -> FinetuneData:
    """Labelled shards (``cls``) for training and validation; classes from the training shards' index."""
    from fcmae.data.shards import ShardStream, open_shards

    train = open_shards(cfg.train_path, cfg.shard_index, labelled=True, label_field=cfg.label_field)
    val = open_shards(cfg.val_path, labelled=True, label_field=cfg.label_field)
    if not train.classes:
        raise DataError(f"the shards of {cfg.train_path} hold no labels (no `cls` members, or no data.label_field="
                        f"{cfg.label_field!r} in their `json` members; fcmae shard stores class folders' as `cls`)")
    if val.classes and val.classes != train.classes and len(val.classes) > len(train.classes):
        raise DataError(f"the validation shards of {cfg.val_path} hold labels the training shards do not "
                        f"({len(val.classes)} classes against {len(train.classes)})")
    tf = build_finetune_transform(cfg.input_size, in_chans, auto_augment=cfg.auto_augment or None,
                                  color_jitter=cfg.color_jitter, scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                                  interpolation=cfg.interpolation)
    bad = {"on_bad_image": cfg.on_bad_image, "label_field": cfg.label_field}
    train_set = ShardStream(train, _ViaPIL(tf), in_chans=in_chans, seed=seed, labelled=True,
                            buffer=cfg.shuffle_buffer, seed_globals=True, **bad)
    val.classes = train.classes  # string labels index the training classes
    val_set = ShardStream(val, ResizeCenterCropU8(cfg.input_size, cfg.crop_pct), in_chans=in_chans, labelled=True,
                          shuffle=False, **bad)
    return FinetuneData(train_set, val_set, list(train.classes), train.total, {})


class _ViaPIL:
    """``(C, H, W)`` uint8 -> PIL image -> ``transform`` (timm's PIL transforms on decoded shard samples)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, x: Any) -> Any:
        from PIL import Image

        a = x.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(a[..., 0] if a.shape[2] == 1 else a))
