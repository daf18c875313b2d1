"""Source ``hf``: Hugging Face datasets, read with the ``datasets`` library (the optional extra ``fcmae[hf]``).

``data.path`` (pretraining; fine-tuning: ``data.train_path`` and ``data.val_path``, or ``data.path`` holding the
splits) is a local folder of
- parquet files, e.g. a download of the Hub's ``ILSVRC/imagenet-1k`` (``data/train-00000-of-00294.parquet`` ...):
  a split's files are those whose name starts with the split (``train``, ``validation``/``val``, ``test``), else all;
  ``datasets`` converts them once into its Arrow cache (``HF_DATASETS_CACHE``) and memory-maps that;
- Arrow files (``*.arrow``), memory-mapped in place; or
- a ``save_to_disk`` folder of a ``Dataset`` or a ``DatasetDict`` (its ``train`` and ``validation`` splits).

Columns: ``data.image_column`` (default ``image``: the ``Image`` feature, ``{bytes, path}`` rows) and, for
fine-tuning, ``data.label_column`` (default ``label``; a ``ClassLabel`` names its classes). The rows are a map-style
``SampleBase`` like image files (``ImageFiles``: the same decoders, the same bad-image policy), so everything the
folder path has holds here too: ``SeededSamples``' seeded per-sample augmentation and masks, the two-phase decode,
the trainer's seeded epoch order (every row once per epoch, equal steps per rank) and its exact mid-epoch resume.
A parquet file whose footer cannot be read is left out with one line naming it (``data.on_bad_image=error``:
stops) and counted under ``unreadable`` once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcmae.data.decode import decode_bytes, jpeg_or_image
from fcmae.data.images import BadImageError, DataError, ImageFiles, decode_pil, read_file
from fcmae.data.policy import BAD_IMAGE, UNREADABLE, bad_data, skip_vector
from fcmae.data.transforms import DeferredCropU8, build_pretrain_transform

logger = logging.getLogger("fcmae.data")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}


def require_datasets() -> Any:
    """The ``datasets`` module, or an ImportError saying which extra to install."""
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source=hf and hf_stream need the `datasets` library: pip install 'fcmae[hf]'") from None
    return datasets


def split_files(files: Sequence[str], split: str) -> list[str]:
    """The files of ``split`` among ``files`` (paths or URLs): those whose name starts with one of its names, else
    all."""
    names = SPLIT_NAMES.get(split, (split,))
    mine = [f for f in files if f.rsplit("/", 1)[-1].lower().startswith(names)]
    return mine or list(files)


def readable_parquet(files: Sequence[str], on_bad: str, opener: Any = None) -> tuple[list[str], list[int], int]:
    """The files among ``files`` whose parquet footer reads, their row counts (from the footer: no data is read),
    and how many could not be read; those are reported (``bad_data``: one line, or a stop). ``opener``: opens a
    file for reading (``fsspec``'s for remote files; default the local ``open``)."""
    import pyarrow.parquet as pq

    good, rows, bad = [], [], 0
    for f in files:
        try:
            with (opener or open)(f, "rb") as fh:
                rows.append(pq.ParquetFile(fh).metadata.num_rows)
            good.append(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError ... on a damaged file
            bad_data(on_bad, f"parquet file {f} is unreadable ({type(exc).__name__}: {exc}); left out")
            bad += 1
    return good, rows, bad


def open_rows(path: str, split: str, on_bad: str = "skip") -> tuple[Any, int, str]:
    """The ``datasets.Dataset`` of ``split`` at ``path`` (see the module docstring), the number of unreadable
    parquet files left out, and a name for messages."""
    datasets = require_datasets()
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"Hugging Face dataset folder {root} does not exist")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            names = [n for n in SPLIT_NAMES.get(split, (split,)) if n in ds]
            if not names:
                raise DataError(f"{root} holds the splits {sorted(ds)}, none of them {split}")
            ds = ds[names[0]]
        return ds, 0, str(root)
    parquet = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    arrow = sorted(root.rglob("*.arrow")) if root.is_dir() else []
    if not parquet and not arrow:
        raise DataError(f"no parquet or arrow files under {root} (and it is no save_to_disk folder)")
    if parquet:
        files, _, bad = readable_parquet(split_files([str(f) for f in parquet], split), on_bad)
    else:
        files, bad = split_files([str(f) for f in arrow], split), 0
    if not files:
        raise DataError(f"no readable {split} files under {root}")
    kind = "parquet" if parquet else "arrow"
    ds = datasets.load_dataset(kind, data_files=files, split="train")
    return ds, bad, str(root)


class _RowNames(Sequence):
    """``names[i]``: how row ``i`` is named in messages (``ImageFiles`` names its items by ``paths``)."""

    def __init__(self, n: int, where: str) -> None:
        self.n, self.where = n, where

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - Sequence's int | slice
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        return f"{self.where}[row {range(self.n)[i]}]"


class HFImages(ImageFiles):
    """The image column of a ``datasets.Dataset`` as image files: ``sample(i)`` -> ``(transform(image), -1,
    skipped)``, a row whose image does not decode replaced by the next (``ImageFiles``' policy). ``fetch`` reads a
    batch's rows in one Arrow read. ``unreadable``: parquet files left out, counted on row 0 (once per epoch)."""

    def __init__(self, rows: Any, image_column: str, where: str, transform: Any, in_chans: int, on_bad_image: str,
                 decoder: Any, unreadable: int = 0) -> None:
        datasets = require_datasets()
        if image_column not in rows.column_names:
            raise DataError(f"{where} has no image column {image_column!r} (columns {rows.column_names}); set "
                            "data.image_column")
        if isinstance(rows.features[image_column], datasets.Image):  # bytes and path, not decoded PIL images
            rows = rows.cast_column(image_column, datasets.Image(decode=False))
        self.rows, self.image_column, self.unreadable = rows, image_column, unreadable
        super().__init__(["-"], transform, in_chans, on_bad_image, decoder)
        self.paths = _RowNames(len(rows), where)  # type: ignore[assignment]

    @contextlib.contextmanager
    def fetch(self, indices: Sequence[int]) -> Iterator[None]:
        n = len(self.paths)
        wanted = sorted({i % n for i in indices if -n <= i < n and i % n not in self._bad})
        self._fetched = dict(zip(wanted, self.rows[wanted][self.image_column])) if wanted else {}
        try:
            yield
        finally:
            self._fetched = {}

    def _decode(self, j: int) -> Any:
        value = self._fetched.pop(j) if j in self._fetched else self.rows[j][self.image_column]
        return self.decoder(self._image_bytes(value, j), self.in_chans, self.paths[j])

    def _image_bytes(self, value: Any, j: int) -> bytes:
        """A cell of the image column -> the encoded image (``{bytes, path}`` rows, raw bytes, or a path)."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return read_file(value["path"])
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise BadImageError(f"cannot read image {self.paths[j]}: the {self.image_column!r} cell holds no image bytes")

    def sample(self, index: int) -> tuple[Any, int, Any]:
        x, label, skipped = super().sample(index)
        if self.unreadable and index == 0:
            counts = skip_vector(BAD_IMAGE, skipped)
            counts[UNREADABLE] += self.unreadable
            return x, label, counts
        return x, label, skipped


class LabelledHFImages(HFImages):
    """``HFImages`` with labels (``targets``, from ``label_column``): ``sample(i)`` -> ``(image, label, skipped)``;
    a replaced row comes with its own label."""

    def __init__(self, rows: Any, label_column: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(rows, *args, **kwargs)
        if label_column not in self.rows.column_names:
            raise DataError(f"{self.paths.where} has no label column {label_column!r} (columns "
                            f"{self.rows.column_names}); set data.label_column")
        self.targets = np.asarray(self.rows[label_column], dtype=np.int64)
        feature = self.rows.features[label_column]
        names = getattr(feature, "names", None)
        self.classes = list(names) if names else [str(i) for i in range(int(self.targets.max(initial=-1)) + 1)]

    def sample(self, index: int) -> tuple[Any, int, Any]:
        img, used = self._load(index)
        x = self.transform(img) if self.transform is not None else img
        skipped: Any = int(used != index % len(self.paths))
        if self.unreadable and index == 0:
            skipped = skip_vector(BAD_IMAGE, skipped) + skip_vector(UNREADABLE, self.unreadable)
        return x, int(self.targets[used]), skipped


# --------------------------------------------------------------------------------------------- the source
def pretrain_rows(cfg: Any, in_chans: int, deferred: bool) -> HFImages:
    """``data.source=hf`` pretraining (``fcmae.data.sources``): the ``train`` rows at ``data.path`` (the first
    ``data.limit``); ``deferred``: JPEG bytes + crop (``JpegItem``), decoded by ``DecodeCrop``."""
    rows, bad, where = open_rows(cfg.path, "train", cfg.on_bad_image)
    if cfg.limit > 0:
        rows = rows.select(range(min(cfg.limit, len(rows))))
    if deferred or getattr(cfg, "decode", "cpu") == "gpu":
        tf, decoder = DeferredCropU8(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip), jpeg_or_image
    else:
        tf, decoder = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans), decode_bytes
    return HFImages(rows, cfg.image_column, where, tf, in_chans, cfg.on_bad_image, decoder, bad)


def finetune_rows(cfg: Any, in_chans: int, train_tf: Any, val_tf: Any) -> tuple[Any, Any, list[str]]:
    """``data.source=hf`` fine-tuning: ``data.train_path`` / ``data.val_path``, or the ``train`` and
    ``validation`` splits at ``data.path``; labels from ``data.label_column``."""
    sets = []
    for split, path, tf in (("train", cfg.train_path or cfg.path, train_tf), ("validation", cfg.val_path or cfg.path,
                                                                            val_tf)):
        rows, bad, where = open_rows(path, split, cfg.on_bad_image)
        sets.append(LabelledHFImages(rows, cfg.label_column, cfg.image_column, where, tf, in_chans,
                                     cfg.on_bad_image, decode_pil, bad))
    train, val = sets
    if len(val.classes) > len(train.classes):
        raise DataError(f"the validation rows hold labels up to {len(val.classes) - 1}, the training rows only up to "
                        f"{len(train.classes) - 1}")
    return train, val, train.classes

