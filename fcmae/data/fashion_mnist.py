"""Fashion-MNIST from its IDX files and the 1024-image demo subset shipped in the package."""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fcmae.data.images import DataError, Transform, check_in_chans
from fcmae.data.protocol import SampleBase

logger = logging.getLogger(__name__)

DATASET_DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEMO_ASSET = "fashion_mnist_demo.npz"


# --------------------------------------------------------------------------------------------- Fashion-MNIST
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: uint8 with 3 dims; 0x0801: uint8 with 1 dim


def read_idx(path: str | Path, kind: Literal["images", "labels"]) -> np.ndarray:
    """Parse an IDX file (gzip or raw, detected from its bytes) -> uint8 ``(N, rows, cols)`` or ``(N,)``.

    The magic number and the size are checked; :class:`DataError` names the file on any mismatch.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    expected = _IDX_MAGIC[kind]
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is not an IDX {kind} file: only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected:
        raise DataError(f"{path} is not an IDX {kind} file: magic number {magic}, expected {expected}")
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    size = math.prod(dims)
    if len(data) - header != size:
        raise DataError(f"{path}: header says {dims} = {size} bytes of data, the file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    """``<stem>`` or ``<stem>.gz`` in ``root`` or torchvision's ``raw/`` / ``FashionMNIST/raw/`` subfolders."""
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} (nor in {root}/raw, {root}/FashionMNIST/raw)")


def load_fashion_mnist_arrays(root: str | Path = DATASET_DEFAULT_FASHION_MNIST,
                              split: Literal["train", "test"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(N, 28, 28)`` and labels ``(N,)`` of one split, read from the IDX files in ``root``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist")
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, "images")
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


class _GrayArrayDataset(SampleBase):
    """uint8 gray images kept in memory -> ``(transform(PIL image), label)``."""

    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) integer
    base_size: int | None = None

    def __init__(self, transform: Transform | None, in_chans: int) -> None:
        self.transform = transform
        self.in_chans = check_in_chans(in_chans)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(np.ascontiguousarray(self.images[index]), mode="L")
        if self.base_size is not None and img.size != (self.base_size, self.base_size):
            img = img.resize((self.base_size, self.base_size), Image.Resampling.BICUBIC)
        if self.in_chans == 3:
            img = img.convert("RGB")  # the gray channel replicated
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[index])

    def sample(self, index: int) -> tuple[Any, int, int]:
        """``SampleBase``: ``(image, label, 0)``."""
        x, label = self[index]
        return x, label, 0


class FashionMNIST(_GrayArrayDataset):
    """Fashion-MNIST from its IDX files (``.gz`` or raw). ``ds[i]`` -> ``(transform(28x28 image), label)``."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path = DATASET_DEFAULT_FASHION_MNIST, split: Literal["train", "test"] = "train",
                 transform: Transform | None = None, in_chans: int = 1) -> None:
        super().__init__(transform, in_chans)
        self.root = Path(root)
        self.split = split
        self.images, self.labels = load_fashion_mnist_arrays(root, split)


def demo_asset_path() -> Path:
    """Path of the embedded demo set (``fcmae/assets/fashion_mnist_demo.npz``)."""
    return Path(str(importlib.resources.files("fcmae") / "assets" / DEMO_ASSET))


class DemoImages(_GrayArrayDataset):
    """The embedded demo set: 1024 Fashion-MNIST training images, no download needed.

    The 28x28 images are upsampled (bicubic) to ``base_size`` squared before the transform so that random crops
    of the model's input size are meaningful. ``ds[i]`` -> ``(transform(image), label)`` like :class:`FashionMNIST`.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, transform: Transform | None = None, in_chans: int = 1, base_size: int | None = 128) -> None:
        super().__init__(transform, in_chans)
        path = demo_asset_path()
        if not path.is_file():
            raise DataError(f"the demo data set {path} is missing: reinstall the package (it ships fcmae/assets/)")
        with np.load(path, allow_pickle=False) as f:
            self.images = f["images"]
            self.labels = f["labels"].astype(np.int64)
            self.source_index = f["index"]  # positions in the Fashion-MNIST training files
        self.base_size = base_size


def make_demo_asset(out_path: str | Path, per_class: int | Sequence[int] = (103,) * 4 + (102,) * 6,
                    root: str | Path = DATASET_DEFAULT_FASHION_MNIST) -> Path:
    """Regenerate the demo set: the first ``per_class`` training images of each class, in file order.

    The default takes 103 images of classes 0-3 and 102 of the others: 1024 in all. Saved with
    ``np.savez_compressed``: ``images`` uint8 ``(N, 28, 28)``, ``labels`` uint8 ``(N,)``, ``index`` int32 ``(N,)``
    (positions in the training files), ``classes`` (names).
    """
    images, labels = load_fashion_mnist_arrays(root, "train")
    quotas = [per_class] * len(FASHION_MNIST_CLASSES) if isinstance(per_class, int) else list(per_class)
    if len(quotas) != len(FASHION_MNIST_CLASSES):
        raise ValueError(f"per_class needs {len(FASHION_MNIST_CLASSES)} counts, got {len(quotas)}")
    chosen = []
    for c, q in enumerate(quotas):
        idx = np.flatnonzero(labels == c)
        if len(idx) < q:
            raise DataError(f"class {c} has only {len(idx)} training images, {q} requested")
        chosen.append(idx[:q])
    index = np.sort(np.concatenate(chosen))  # file order, so the classes stay interleaved (a `limit` mixes them)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other suffixes
        np.savez_compressed(f, images=images[index], labels=labels[index], index=index.astype(np.int32),
                            classes=np.array(FASHION_MNIST_CLASSES))
    return out


# --------------------------------------------------------------------------------------------- adapters
class DropLabels(SampleBase):
    """``(image, label, ...)`` -> ``(image, 0)``: the pretraining item layout for sets that never skip files."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index][0], 0

    def sample(self, index: int) -> tuple[Any, int, int]:
        return self.dataset[index][0], -1, 0




# --------------------------------------------------------------------------------------------- the sources
def demo_pretrain(cfg: Any, in_chans: int, deferred: bool = False) -> SampleBase:
    """``data.source=demo`` (``fcmae.data.sources``): the embedded set, unlabelled, the first ``data.limit``."""
    from fcmae.data.transforms import build_pretrain_transform

    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return _first(DropLabels(DemoImages(tf, in_chans, base_size=max(cfg.input_size, 28))), cfg.limit)


def fashion_pretrain(cfg: Any, in_chans: int, deferred: bool = False) -> SampleBase:
    """``data.source=fashion_mnist`` pretraining: the training split in ``data.path`` (default: Debian's)."""
    from fcmae.data.transforms import build_pretrain_transform

    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return _first(DropLabels(FashionMNIST(cfg.path or DATASET_DEFAULT_FASHION_MNIST, "train", tf, in_chans)),
                  cfg.limit)


def fashion_splits(cfg: Any, in_chans: int, train_tf: Any, val_tf: Any) -> tuple[Any, Any, list[str]]:
    """``data.source=fashion_mnist`` fine-tuning: the train and test IDX files in ``data.path``."""
    root = cfg.path or DATASET_DEFAULT_FASHION_MNIST
    return (FashionMNIST(root, "train", train_tf, in_chans), FashionMNIST(root, "test", val_tf, in_chans),
            list(FashionMNIST.classes))


def _first(ds: SampleBase, limit: int) -> SampleBase:
    from torch.utils.data import Subset

    from fcmae.data.protocol import Items

    return Items(Subset(ds, range(limit))) if 0 < limit < len(ds) else ds  # type: ignore[arg-type]
