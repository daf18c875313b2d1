"""Source ``hf_stream``: a Hugging Face parquet dataset streamed (``datasets``' ``streaming=True``), for data larger
than the local disk or read once from a store; exact like our shards.

``data.path`` (fine-tuning: ``data.train_path`` / ``data.val_path``, or ``data.path`` holding the splits) names
parquet files: a folder (all ``*.parquet`` below it), a glob, or one file, local or any URL ``fsspec`` opens
(``hf://datasets/ILSVRC/imagenet-1k/data/train-*.parquet``, ``s3://...``; remote stores are untested here: no
network). A split's files are those whose name starts with the split, as for ``data.source=hf``.

Why it is exact: every parquet file is a shard whose row count its footer gives without reading data, so the
files are dealt to the ``processes x workers`` streams exactly as tar shards are (``ShardStream``: a seeded deal
per epoch, a seeded shuffle buffer per stream, equal batches per stream, a resume that reads but does not decode
the rows it skips). Rows are read with ``datasets`` (``IterableDataset.shard`` picks one file, ``iter`` reads it
in Arrow batches; its own per-worker split is not used, the deal is ours). A file whose footer does not read is
left out with one line and counted ``unreadable`` every epoch; one that fails mid-read gives the rows it gave,
then one line (``truncated``); ``data.on_bad_image=error`` stops at either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fcmae.data.hf import readable_parquet, require_datasets, split_files
from fcmae.data.images import DataError
from fcmae.data.policy import NO_IMAGE, NO_LABEL, TRUNCATED, UNREADABLE
from fcmae.data.protocol import FinetuneData
from fcmae.data.shards import ShardSet, ShardStream, stream_transforms
from fcmae.data.transforms import build_pretrain_transform

READ_ROWS = 64  # rows per Arrow read: a few MB of ImageNet JPEGs


def parquet_files(spec: str, split: str) -> tuple[list[str], Any]:
    """The parquet files of ``split`` that ``spec`` names (sorted) and an opener for them (``fsspec``'s)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec)
    if any(c in root for c in "*?["):
        found = fs.glob(root)
    elif fs.isdir(root):
        found = fs.glob(root.rstrip("/") + "/**/*.parquet")
    elif fs.isfile(root):
        found = [root]
    else:
        raise DataError(f"data path {spec} does not exist")
    local = fs.protocol in ("file", "local") or "file" in fs.protocol
    urls = sorted(f if local else fs.unstrip_protocol(f) for f in found if f.endswith(".parquet"))
    if not urls:
        raise DataError(f"no parquet files in {spec}")
    return split_files(urls, split), fs.open


class ParquetSet(ShardSet):
    """Readable parquet files as shards (``urls``, footer row ``counts``, ``classes``), the streaming dataset that
    reads them (``rows``, image cells as bytes), the number of files left out (``left_out``) and how to open a file
    (``opener``)."""

    def __init__(self, spec: str, split: str, image_column: str, label_column: str, on_bad: str) -> None:
        files, opener = parquet_files(spec, split)
        urls, counts, self.left_out = readable_parquet(files, on_bad, opener)
        if not urls:
            raise DataError(f"no readable {split} parquet files in {spec}")
        datasets = require_datasets()
        rows = datasets.load_dataset("parquet", data_files=urls, split="train", streaming=True)
        features = rows.features or {}
        if image_column not in features:
            raise DataError(f"{spec} has no image column {image_column!r} (columns {sorted(features)}); set "
                            "data.image_column")
        if isinstance(features[image_column], datasets.Image):  # bytes and path, not decoded PIL images
            rows = rows.cast_column(image_column, datasets.Image(decode=False))
        self.rows, self.image_column, self.label_column, self.spec = rows, image_column, label_column, spec
        self.opener = opener
        names = getattr(features.get(label_column), "names", None)
        super().__init__(urls, counts, list(names) if names else None)

    def labels_from_columns(self) -> None:
        """``classes`` for integer labels without ``ClassLabel`` names: ``0 .. max`` over the label column (read
        alone, from every file)."""
        import pyarrow.parquet as pq

        if self.label_column not in (self.rows.features or {}):
            raise DataError(f"{self.spec} has no label column {self.label_column!r}; set data.label_column")
        top = -1
        for url in self.urls:
            with self.opener(url, "rb") as fh:
                column = pq.read_table(fh, columns=[self.label_column]).column(0)
            top = max([top, *(int(v) for v in column.to_pylist() if v is not None)])
        self.classes = [str(i) for i in range(top + 1)]


class RowStream(ShardStream):
    """``ShardStream`` over parquet files (``ParquetSet``): a row is a raw sample ``{__key__: row number in its
    file, __url__, jpg|png|webp: image bytes, cls: label}``; damaged files are counted by ``ShardStream``'s rules (class
    docstring there) and the files left out at the start once per epoch, on stream 0."""

    shards: ParquetSet

    def _raw(self, shards: Sequence[int], stream: int) -> Iterator[dict[str, Any]]:
        if stream == 0 and self.shards.left_out:
            self._lost[UNREADABLE] += self.shards.left_out
        return super()._raw(shards, stream)

    def _shard_samples(self, i: int) -> Iterator[dict[str, Any]]:
        url, expected, got, n = self.shards.urls[i], self.shards.counts[i], 0, 0
        part = self.shards.rows.shard(num_shards=len(self.shards.urls), index=i, contiguous=True)
        image_col, label_col = self.shards.image_column, self.shards.label_column
        try:
            for batch in part.iter(batch_size=READ_ROWS):
                for cell, label in zip(batch[image_col], batch.get(label_col, [None] * len(batch[image_col]))):
                    key, n = f"{n:08d}", n + 1
                    data = cell.get("bytes") if isinstance(cell, dict) else cell
                    if not data:
                        self._damaged(NO_IMAGE, f"parquet file {url}: row {key} holds no image bytes")
                        continue
                    got += 1
                    if self.labelled and label is None:
                        self._damaged(NO_LABEL, f"parquet file {url}: row {key} holds no label ({label_col})")
                        continue
                    yield {"__key__": key, "__url__": url, _ext(data): bytes(data), "cls": label}
        except FileNotFoundError as exc:  # a file that vanished is not damaged data: stop (one line)
            raise DataError(f"parquet file {url} is gone: {exc}") from None
        except Exception as exc:  # pyarrow/fsspec raise many kinds on a damaged file; what it gave stays
            self._damaged(UNREADABLE if got == 0 else TRUNCATED, f"parquet file {url}: {type(exc).__name__}: {exc}; "
                          f"read {got} of its {expected} rows", max(1, expected - got))

    def _label(self, s: dict[str, Any]) -> int | None:
        return None if s.get("cls") is None else int(s["cls"])


def _ext(data: bytes) -> str:
    """The member name a row's image bytes go under (``ShardStream`` finds images by it; decoding sniffs anyway)."""
    return "png" if data[:4] == b"\x89PNG" else "webp" if data[8:12] == b"WEBP" else "jpg"


def _open(cfg: Any, path: str, split: str, labelled: bool) -> ParquetSet:
    """The parquet files of ``split`` at ``path`` sized and opened (labelled: with class names)."""
    rows = ParquetSet(path, split, cfg.image_column, cfg.label_column, cfg.on_bad_image)
    if labelled and rows.classes is None:
        rows.labels_from_columns()
    return rows


# --------------------------------------------------------------------------------------------- the source
def pretrain_stream(cfg: Any, in_chans: int, seed: int, mask_grid: tuple[int, int], mask_ratio: float) -> RowStream:
    """``data.source=hf_stream`` pretraining (``fcmae.data.sources``): the ``train`` files of ``data.path``."""
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return RowStream(_open(cfg, cfg.path, "train", False), tf, in_chans=in_chans, seed=seed, mask_grid=mask_grid,
                     mask_ratio=mask_ratio, buffer=cfg.shuffle_buffer, on_bad_image=cfg.on_bad_image)


def finetune_streams(cfg: Any, in_chans: int, seed: int) -> FinetuneData:
    """``data.source=hf_stream`` fine-tuning: ``data.train_path`` / ``data.val_path``, or the ``train`` and
    ``validation`` files of ``data.path``; labels from ``data.label_column``."""
    train = _open(cfg, cfg.train_path or cfg.path, "train", True)
    val = _open(cfg, cfg.val_path or cfg.path, "validation", True)
    if len(val.classes or []) > len(train.classes or []):
        raise DataError(f"the validation rows hold labels up to {len(val.classes or []) - 1}, the training rows only "
                        f"up to {len(train.classes or []) - 1}")
    kw = {"in_chans": in_chans, "labelled": True, "on_bad_image": cfg.on_bad_image}
    train_tf, val_tf = stream_transforms(cfg, in_chans)
    return FinetuneData(RowStream(train, train_tf, seed=seed, buffer=cfg.shuffle_buffer, seed_globals=True, **kw),
                        RowStream(val, val_tf, shuffle=False, **kw), list(train.classes or []), train.total, {})
