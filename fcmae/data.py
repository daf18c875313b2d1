"""Datasets and transforms: image folders, ImageNet layout, Fashion-MNIST IDX files and the embedded demo set.

Every dataset hands PIL images of mode ``L`` (``in_chans=1``) or ``RGB`` (``in_chans=3``) to its transform, so
one transform works whatever the files hold (CMYK, palette, alpha, 16-bit ...). The pretraining datasets built
by :func:`build_pretrain_dataset` all return ``(image (C, H, W) float32, n_skipped int)``; ``n_skipped`` is 1 when
the requested file was unreadable and another one was returned in its place, so summing it over the batches of
an epoch counts every unreadable file once, in the main process, even with DataLoader workers.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from fcmae.config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# one-channel statistics: the means of the ImageNet RGB statistics
GRAY_MEAN: tuple[float] = (0.449,)
GRAY_STD: tuple[float] = (0.226,)

DATASET_DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEMO_ASSET = "fashion_mnist_demo.npz"

OnBadImage = Literal["skip", "error"]
Transform = Callable[[Image.Image], Any]


class DataError(ValueError):
    """A dataset that cannot be built: missing path, no images, malformed IDX file. The message names the path."""


class BadImageError(DataError):
    """One image file that cannot be decoded (corrupt, truncated, empty, unsupported)."""


# --------------------------------------------------------------------------------------------- decoding
def check_in_chans(in_chans: int) -> int:
    """Images are decoded to 1 (gray) or 3 (RGB) channels; anything else is a clear error."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for image data, got {in_chans}")
    return in_chans


def mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics for ``in_chans`` channels: ImageNet's for RGB, their channel means for gray."""
    return (GRAY_MEAN, GRAY_STD) if check_in_chans(in_chans) == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float gray -> 8-bit ``L`` by scaling; PIL's own conversion clips everything above 255."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.float64) / 257.0
    elif img.mode == "I":  # 16-bit PNGs may open as "I"; 8-bit range data is kept as is
        a = a.astype(np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0
    else:  # "F": [0, 1] floats are scaled, anything else is taken as 0..255
        a = a.astype(np.float64)
        if np.nanmax(a, initial=0.0) <= 1.0:
            a = a * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8), mode="L")


def to_model_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert a decoded image of any mode to ``L`` (``in_chans=1``) or ``RGB`` (``in_chans=3``).

    Transparent pixels are composited on white (as a viewer shows them) rather than exposing whatever colour
    the file stores under alpha 0.
    """
    target = "L" if check_in_chans(in_chans) == 1 else "RGB"
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img if img.mode == target else img.convert(target)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a broken EXIF block is ignored, the pixels are still good."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # EXIF parsers raise all sorts of errors on junk
        return img
    if orientation in (None, 1):
        return img
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # same: keep the pixels, ignore the orientation
        return img


def load_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """Decode one image file fully to mode ``L`` or ``RGB``; raise :class:`BadImageError` naming the file if not.

    ``img.load()`` forces the whole decode here, so a truncated JPEG/PNG raises (PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False: we never set it).
    """
    try:
        with Image.open(path) as img:
            img.load()  # the first frame of animated GIF/WebP and multi-page TIFF
            img = _exif_upright(img)
            return to_model_mode(img, in_chans)
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error ...
        raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------- scanning
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, symlinks followed once, hidden entries skipped), sorted."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or two links to one folder: visit it once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath, f) for f in filenames if _is_image(f))
    # sort whole paths (by their parts) so the order does not depend on the walk
    return sorted(found, key=lambda p: p.parts)


def _no_images_message(root: Path | str, what: str = "no image files") -> str:
    exts = ", ".join(IMAGE_EXTENSIONS)
    return f"{what} found under {root} (searched recursively for {exts}, any case; hidden files skipped)"


def find_images(root: str | Path) -> list[Path]:
    """Sorted image paths under ``root``; :class:`DataError` naming the path when it is missing or has none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected a folder of images)")
    paths = _walk_images(root)
    if not paths:
        raise DataError(_no_images_message(root))
    return paths


# --------------------------------------------------------------------------------------------- image files
class ImageFiles(Dataset):
    """Unlabeled image files. ``ds[i]`` -> ``(transform(image), n_skipped)``.

    With ``on_bad_image="skip"`` an unreadable file ``i`` is replaced by the next readable one (i+1, i+2, ...
    wrapping) and ``n_skipped`` is 1, else 0; files met while searching are counted at their own index, so the
    sum over an epoch is the number of bad files. Each bad file is logged once per process (each DataLoader
    worker is a process). With ``"error"`` a :class:`BadImageError` naming the file is raised.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Transform | None = None, in_chans: int = 3,
                 on_bad_image: OnBadImage = "skip") -> None:
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("ImageFiles: the list of image paths is empty")
        self.transform = transform
        self.in_chans = check_in_chans(in_chans)
        self.on_bad_image = on_bad_image
        self._bad: set[int] = set()  # indices found unreadable in this process: not decoded (or logged) again

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image at ``index`` or its replacement: ``(PIL image, index actually used)``."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                return load_image(self.paths[j], self.in_chans), j
            except BadImageError as exc:
                if self.on_bad_image == "error":
                    raise
                self._bad.add(j)
                logger.warning("skipping unreadable image (data.on_bad_image=skip): %s", exc)
        raise DataError(f"all {n} image files are unreadable (first: {self.paths[0]}, last: {self.paths[-1]})")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, used = self._load(index)
        x = self.transform(img) if self.transform is not None else img
        return x, int(used != index % len(self.paths))


class LabeledImageFolder(ImageFiles):
    """``root/<class>/**/<image>``: labels are the indices of the sorted class folder names (``classes``).

    ``ds[i]`` -> ``(transform(image), label, n_skipped)``; a replaced image comes with its own label.
    Files directly in ``root`` are not part of any class and are ignored.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, in_chans: int = 3,
                 on_bad_image: OnBadImage = "skip") -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {root} (expected {root}/<class name>/<images>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = _walk_images(root / c)
            if not files:  # kept in `classes` so label indices match between splits
                logger.warning("class folder %s holds no images", root / c)
            samples.extend((p, self.class_to_idx[c]) for p in files)
        if not samples:
            raise DataError(_no_images_message(root, f"no image files in the {len(self.classes)} class folders"))
        self.samples = samples
        self.targets = [label for _, label in samples]
        super().__init__([p for p, _ in samples], transform, in_chans, on_bad_image)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:  # type: ignore[override]
        img, used = self._load(index)
        x = self.transform(img) if self.transform is not None else img
        return x, self.targets[used], int(used != index % len(self.paths))


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


class _GrayArrayDataset(Dataset):
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
class DropLabels(Dataset):
    """``(image, label, ...)`` -> ``(image, 0)``: the pretraining item layout for sets that never skip files."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index][0], 0


# --------------------------------------------------------------------------------------------- transforms
class _ToRGB:
    """PIL image -> RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


class _FirstChannels:
    """Tensor ``(C, H, W)`` -> ``(k, H, W)``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: Tensor) -> Tensor:
        return x[: self.k]


def build_pretrain_transform(input_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0),
                             hflip: float = 0.5, in_chans: int = 3) -> T.Compose:
    """FCMAE pretraining augmentation: random resized crop (bicubic), flip, normalise -> ``(C, S, S)`` float."""
    mean, std = mean_std(in_chans)
    ops: list[Any] = [T.RandomResizedCrop(input_size, scale=tuple(crop_scale),
                                          interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def build_eval_transform(input_size: int = 224, crop_pct: float = 224 / 256, in_chans: int = 3) -> T.Compose:
    """Resize the shorter side to ``input_size / crop_pct`` (bicubic), center crop, normalise -> ``(C, S, S)``."""
    mean, std = mean_std(in_chans)
    resize = int(math.floor(input_size / crop_pct + 1e-6))  # 224 / 0.875 -> 256, not 255 from rounding error
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_finetune_transform(input_size: int = 224, in_chans: int = 3,
                             auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                             remode: str = "pixel", recount: int = 1,
                             color_jitter: float | None = 0.4, scale: tuple[float, float] = (0.08, 1.0),
                             hflip: float = 0.5, interpolation: str = "bicubic") -> Callable[[Image.Image], Tensor]:
    """timm's training augmentation (RandAugment, random erasing ...) -> ``(C, S, S)`` float.

    timm's RandAugment works on RGB images, so for ``in_chans=1`` the gray image is replicated to RGB, augmented
    with the gray statistics on all three channels and cut back to its first channel; every op but random
    erasing keeps the three channels equal, and erasing's per-channel noise cut to one channel is what it would
    draw for one channel.
    """
    from timm.data import create_transform

    mean, std = mean_std(in_chans)
    tf = create_transform(input_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                          auto_augment=auto_augment or None, interpolation=interpolation, mean=mean * (3 // len(mean)),
                          std=std * (3 // len(std)), re_prob=reprob, re_mode=remode, re_count=recount)
    if in_chans == 3:
        return T.Compose([_ToRGB(), tf])
    return T.Compose([_ToRGB(), tf, _FirstChannels(1)])


# --------------------------------------------------------------------------------------------- builders
def build_pretrain_dataset(cfg: DataConfig, in_chans: int) -> Dataset:
    """The pretraining set named by ``cfg.source``; every item is ``(image (C, S, S) float, n_skipped int)``.

    demo: the embedded Fashion-MNIST subset; folder: every image under ``cfg.path``; imagenet: every image under
    ``cfg.path/train`` (or ``cfg.path`` without a ``train/``), labels ignored; fashion_mnist: the training split in
    ``cfg.path`` (default :data:`DATASET_DEFAULT_FASHION_MNIST`). ``cfg.limit > 0`` keeps the first ``limit`` items.
    """
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    limit = max(0, int(cfg.limit))
    if cfg.source in ("folder", "imagenet"):
        if not cfg.path:
            raise DataError(f"data.path is required for data.source={cfg.source}")
        root = Path(cfg.path).expanduser()
        if cfg.source == "imagenet" and (root / "train").is_dir():
            root = root / "train"
        paths = find_images(root)
        # limit the paths (not a Subset) so replacements for bad files come from inside the limit too
        return ImageFiles(paths[:limit] if limit else paths, tf, in_chans, cfg.on_bad_image)
    if cfg.source == "fashion_mnist":
        ds: Dataset = DropLabels(FashionMNIST(cfg.path or DATASET_DEFAULT_FASHION_MNIST, "train", tf, in_chans))
    elif cfg.source == "demo":
        ds = DropLabels(DemoImages(tf, in_chans, base_size=max(cfg.input_size, 28)))
    else:
        raise DataError(f"data.source={cfg.source!r} is not one of ['demo', 'folder', 'imagenet', 'fashion_mnist']")
    if limit and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    return ds


def collate_pretrain(batch: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``[(image (C, H, W), n_skipped)]`` -> ``(images (N, C, H, W), n_skipped (N,) int64)``; same as the default."""
    images = torch.stack([b[0] for b in batch])
    skipped = torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)
    return images, skipped
