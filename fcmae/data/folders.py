"""Sources ``folder`` and ``imagenet``: image files in folders (``fcmae.data.sources``).

Pretraining reads every image under ``data.path`` (``data.path/train`` for the ImageNet layout when it has one),
or the files ``data.file_list`` names. Fine-tuning reads class folders: ``data.train_path`` and ``data.val_path``
(``folder``) or ``data.path/train`` and ``data.path/val`` (``imagenet``); labels index the sorted class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcmae.data.decode import decode_bytes, jpeg_or_image
from fcmae.data.images import DataError, ImageFiles, LabeledImageFolder, scan_or_read_file_list
from fcmae.data.transforms import DeferredCropU8, build_pretrain_transform


def pretrain_image_root(cfg: Any) -> Path:
    """The folder whose images pretraining reads: ``data.path`` (``data.path/train`` for ImageNet when it has one).
    File lists (``data.file_list``) are relative to it."""
    if not cfg.path:
        raise DataError(f"data.path is required for data.source={cfg.source}")
    root = Path(cfg.path).expanduser()
    return root / "train" if cfg.source == "imagenet" and (root / "train").is_dir() else root


def pretrain_files(cfg: Any, in_chans: int, deferred: bool) -> ImageFiles:
    """Folder images for pretraining (the first ``data.limit``: replacements for bad files come from inside the
    limit too): decoded and cropped; ``deferred`` or ``data.decode=gpu``: JPEG bytes + crop parameters
    (``JpegItem``), decoded later."""
    paths = scan_or_read_file_list(pretrain_image_root(cfg), cfg.file_list)
    paths = paths[:cfg.limit] if cfg.limit > 0 else paths
    if deferred or getattr(cfg, "decode", "cpu") == "gpu":
        tf = DeferredCropU8(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip)
        return ImageFiles(paths, tf, in_chans, cfg.on_bad_image, decoder=jpeg_or_image)
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return ImageFiles(paths, tf, in_chans, cfg.on_bad_image, decoder=decode_bytes)


def class_folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} folder {p} does not exist" if not p.exists() else f"{what}: {p} is not a folder")
    return p


def _labelled_splits(train_dir: Path, val_dir: Path, cfg: Any, in_chans: int, train_tf: Any, val_tf: Any
                     ) -> tuple[LabeledImageFolder, LabeledImageFolder, list[str]]:
    tr = LabeledImageFolder(class_folder(train_dir, "training"), train_tf, in_chans, cfg.on_bad_image)
    va = LabeledImageFolder(class_folder(val_dir, "validation"), val_tf, in_chans, cfg.on_bad_image)
    if va.classes != tr.classes:
        only_t = sorted(set(tr.classes) - set(va.classes))[:5]
        only_v = sorted(set(va.classes) - set(tr.classes))[:5]
        raise DataError(f"class folders differ between {train_dir} and {val_dir} (only in train: {only_t}, "
                        f"only in val: {only_v}); labels would not match")
    return tr, va, list(tr.classes)


def folder_splits(cfg: Any, in_chans: int, train_tf: Any, val_tf: Any) -> tuple[Any, Any, list[str]]:
    """``data.train_path`` and ``data.val_path`` class folders."""
    return _labelled_splits(Path(cfg.train_path), Path(cfg.val_path), cfg, in_chans, train_tf, val_tf)


def imagenet_splits(cfg: Any, in_chans: int, train_tf: Any, val_tf: Any) -> tuple[Any, Any, list[str]]:
    """``data.path/train`` and ``data.path/val`` class folders."""
    root = class_folder(cfg.path, "data.path")
    return _labelled_splits(root / "train", root / "val", cfg, in_chans, train_tf, val_tf)
