"""Image files: decoding any mode to gray/RGB, scanning folders, unlabeled and class-folder datasets.

Every dataset hands PIL images of mode ``L`` (``in_chans=1``) or ``RGB`` (``in_chans=3``) to its transform, so
one transform works whatever the files hold (CMYK, palette, alpha, 16-bit ...). ``n_skipped`` in an item is 1
when the requested file was unreadable and another one was returned in its place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image

from fcmae.data.protocol import SampleBase

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

OnBadImage = Literal["skip", "error"]
Transform = Callable[[Image.Image], Any]
# (file bytes, in_chans, name for errors) -> the decoded image
Decoder = Callable[[bytes, int, str], Any]


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


def load_image(path: str | Path | BinaryIO, in_chans: int = 3, name: str | None = None) -> Image.Image:
    """Decode one image fully to mode ``L`` or ``RGB``; raise :class:`BadImageError` naming the file if not.

    ``path``: a file path, or a binary file object (e.g. ``io.BytesIO`` of bytes already read) named ``name`` in
    errors. ``img.load()`` forces the whole decode here, so a truncated JPEG/PNG raises (PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False: we never set it).
    """
    try:
        with Image.open(path) as img:
            img.load()  # the first frame of animated GIF/WebP and multi-page TIFF
            img = _exif_upright(img)
            return to_model_mode(img, in_chans)
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error ...
        raise BadImageError(f"cannot read image {name or path}: {type(exc).__name__}: {exc}") from exc


def read_file(path: str | Path) -> bytes:
    """A file's bytes; :class:`BadImageError` naming the file if it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that PIL's error messages name by their file, not as ``<_io.BytesIO object at 0x..>``."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name)


def decode_pil(data: bytes, in_chans: int = 3, name: str = "image bytes") -> Image.Image:
    """An encoded image's bytes -> ``load_image`` (PIL, mode ``L``/``RGB``); ``ImageFiles``' default decoder."""
    return load_image(_NamedBytes(data, name), in_chans, name=name)


def class_folders(root: Path) -> list[str]:
    """The class folder names of an ImageNet-style ``root`` (sorted; hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


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
        # regular files only (isfile follows links): a named pipe or device called x.png would block a reader
        found.extend(Path(dirpath, f) for f in filenames if _is_image(f) and os.path.isfile(os.path.join(dirpath, f)))
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
class PathList(Sequence):
    """File paths kept compactly: one UTF-8 byte buffer and an offset array, not a list of ``Path`` objects.

    Why: with 1.28 M ImageNet files a list of ``Path`` objects is ~400 MB per process, and every DataLoader worker
    (a fork) slowly copies it, page by page, as reading the objects touches their reference counts; two NumPy
    arrays are a few tens of MB and never copied. ``paths[i]`` -> ``Path``.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - Sequence's int | slice
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, IndexError
        return Path(os.fsdecode(self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes()))


def read_file_list(path: str | Path, root: str | Path) -> list[Path]:
    """A file list (one path per line, relative to ``root`` or absolute; ``#`` comments) -> paths."""
    base = Path(root).expanduser()
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [base / line for line in (x.strip() for x in lines) if line and not line.startswith("#")]


def scan_or_read_file_list(root: str | Path, file_list: str = "") -> list[Path]:
    """The images under ``root``: read from ``file_list`` when that file exists, else scanned (``find_images``).
    (The pretraining recipe writes a scanned list to ``file_list`` for the next reader: with several processes the
    trainer builds the data on the main process first, so one process scans and the others read its list.)"""
    if file_list and Path(file_list).expanduser().is_file():
        paths = read_file_list(file_list, root)
        if not paths:
            raise DataError(f"data.file_list {file_list} lists no files")
        return paths
    return find_images(root)


class ImageFiles(SampleBase):
    """Unlabeled image files. ``ds[i]`` -> ``(transform(image), n_skipped)``.

    With ``on_bad_image="skip"`` an unreadable file ``i`` is replaced by the next readable one (i+1, i+2, ...
    wrapping) and ``n_skipped`` is 1, else 0; files met while searching are counted at their own index, so the
    sum over an epoch is the number of bad files. Each bad file is logged once per process (each DataLoader
    worker is a process). With ``"error"`` a :class:`BadImageError` naming the file is raised.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Transform | None = None, in_chans: int = 3,
                 on_bad_image: OnBadImage = "skip", decoder: Decoder | None = None) -> None:
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.paths = PathList(paths)
        if not len(self.paths):
            raise DataError("ImageFiles: the list of image paths is empty")
        self.transform = transform
        self.in_chans = check_in_chans(in_chans)
        self.on_bad_image = on_bad_image
        # how a file's bytes are decoded: decode_pil (a PIL image, for PIL-based transforms such as timm's) by
        # default, or fcmae.data.decode.decode_bytes (a uint8 tensor through the fast JPEG path) for our uint8 ones
        self.decoder = decoder or decode_pil
        self._bad: set[int] = set()  # indices found unreadable in this process: not decoded (or logged) again
        self._fetched: dict[int, bytes | BadImageError] = {}  # the current batch's files (fetch)
        self.last_used = -1

    def __len__(self) -> int:
        return len(self.paths)

    @contextlib.contextmanager
    def fetch(self, indices: Sequence[int]) -> Iterator[None]:
        """Within: the files of a batch's ``indices`` are read already, so that decoding them does not alternate
        with reading files: measured per core (``benchmarks/input_pipeline.py``), reading each file just before
        decoding it made the pretraining path ~8 % slower here (the decoder then runs after a system call, with
        colder caches and branch predictors). The bytes not used within are dropped on the way out."""
        n = len(self.paths)
        self._fetched = {}
        for i in indices:
            if -n <= i < n and i % n not in self._bad:
                try:
                    self._fetched[i % n] = read_file(self.paths[i % n])
                except BadImageError as exc:  # raised when the item is decoded, as without fetching
                    self._fetched[i % n] = exc
        try:
            yield
        finally:
            self._fetched = {}

    def __getitems__(self, indices: list[int]) -> list:
        """A batch, as the DataLoader fetches one: the files are read first (``fetch``), then decoded one by one."""
        with self.fetch(indices):
            return [self[i] for i in indices]

    def _decode(self, j: int) -> Any:
        """File ``j`` decoded by ``self.decoder`` (its fetched bytes if any); :class:`BadImageError` if unreadable."""
        data = self._fetched.pop(j, None)
        if isinstance(data, BadImageError):
            raise data
        path = self.paths[j]
        return self.decoder(read_file(path) if data is None else data, self.in_chans, str(path))

    def reject(self, j: int, exc: BadImageError) -> None:
        """File ``j`` is unreadable (``exc``, naming it): raise with ``on_bad_image="error"``, else log it once and
        never use it again in this process (the next index replaces it). Also called by ``SeededSamples`` when a
        file fails in its second phase (``finish``: the decode that follows the batch's first pass)."""
        if self.on_bad_image == "error":
            raise exc
        self._bad.add(j)
        logger.warning("skipping unreadable image (data.on_bad_image=skip): %s", exc)

    def _load(self, index: int) -> tuple[Any, int]:
        """The image at ``index`` or its replacement: ``(PIL image or uint8 tensor, index actually used)``."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                img = self._decode(j)
            except BadImageError as exc:
                self.reject(j, exc)
                continue
            self.last_used = j  # the file behind the last item (what ``reject`` takes)
            return img, j
        raise DataError(f"all {n} image files are unreadable (first: {self.paths[0]}, last: {self.paths[-1]})")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, used = self._load(index)
        x = self.transform(img) if self.transform is not None else img
        return x, int(used != index % len(self.paths))

    def sample(self, index: int) -> tuple[Any, int, int]:
        """``SampleBase``: ``(image, -1, n_skipped)``."""
        x, skipped = self[index]
        return x, -1, skipped


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
        self.classes = class_folders(root)
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
        # compact, like the paths (a PathList): one int64 array, not a list of Python ints per process
        self.targets = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        super().__init__([p for p, _ in samples], transform, in_chans, on_bad_image)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """``[(path, label)]`` (built on demand from the compact lists)."""
        return [(self.paths[i], int(t)) for i, t in enumerate(self.targets)]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:  # type: ignore[override]
        img, used = self._load(index)
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.targets[used]), int(used != index % len(self.paths))

    def sample(self, index: int) -> tuple[Any, int, int]:
        """``SampleBase``: ``(image, label, n_skipped)``."""
        return self[index]


