"""Sharded datasets: WebDataset tar shards, written by ``fcmae shard`` and streamed by the trainers.

Writing (``write_shards``): the images of a folder (ImageFiles order; ImageFiles-style class folders give ``cls``)
in a seeded random order, their file bytes unchanged, into ``shard-NNNNNN.tar`` files of about ``shard_size``
bytes through webdataset's ``ShardWriter``; ``index.json`` beside them lists every shard with its sample count
(what the reader needs to size an epoch without reading the data) and the class names.

Reading (``ShardStream``): an ``IterableDataset`` over the shards named by ``data.path`` (a folder of ``.tar``
files, a brace pattern ``/data/in1k/train-{000000..001023}.tar``, or any URL / ``pipe:`` spec webdataset opens,
e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``), read with webdataset. One epoch is planned from
``(seed, epoch)`` alone: the shard list is shuffled and dealt to the ``processes x workers`` streams (stream
``rank * workers + worker`` takes every (processes x workers)-th shard), each stream shuffles its samples in a seeded
buffer, and every stream yields the same number of batches (the smallest stream's; the few samples beyond it wait
for another epoch, where the deal differs). So each rank takes the same number of steps, no sample is seen twice in
an epoch, and no process reads another's shards (accelerate's own splitting of iterable datasets would have rank 0
decode everything, or every rank decode everything and keep a share). A resumed epoch skips the batches already
trained on before decoding them: resuming mid-epoch continues exactly, provided ``data.num_workers`` and the number
of processes are unchanged (they shape the deal).
"""

from __future__ import annotations

import json
import math
import random
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fcmae.data.decode import decode_bytes
from fcmae.data.images import DataError, class_folders, find_images
from fcmae.data.sampling import Sample, sample_mask, sample_seed, seeded
from fcmae.models.masking import MASK_RATIO

INDEX_NAME = "index.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_EXT = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".tif": "tif",
        ".tiff": "tif", ".gif": "gif"}


# --------------------------------------------------------------------------------------------- writing
def _labelled_files(src: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """``(files, labels, classes)`` from one scan: class folders (every image inside a first-level folder) give
    labels, indexed like ``LabeledImageFolder``'s (sorted class folders, empty ones included)."""
    files = find_images(src)
    first = [p.relative_to(src).parts for p in files]
    if not all(len(parts) >= 2 for parts in first):
        return files, None, None
    classes = class_folders(src)
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[parts[0]] for parts in first], classes


def _count_shard(path: Path) -> int:
    import tarfile

    with tarfile.open(path) as tf:
        return len({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})


def write_shards(src: str | Path, out: str | Path, shard_size: int = 1 << 30, seed: int = 0, max_count: int = 100_000,
                 progress: bool = True) -> dict[str, Any]:
    """Write the images under ``src`` into tar shards in ``out`` (created; must hold no shards yet); returns the
    index to store as ``out/index.json`` (the caller writes it, atomically). Samples: ``__key__`` (8 digits), the
    image bytes under their extension (``jpg``, ``png``, ...), ``cls`` (the class index) for class folders."""
    import webdataset as wds
    from tqdm import tqdm

    src, out = Path(src).expanduser(), Path(out).expanduser()
    files, labels, classes = _labelled_files(src)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / INDEX_NAME).exists():
        raise DataError(f"{out} already holds shards; choose an empty folder")
    order = np.random.default_rng(seed).permutation(len(files))
    pattern = str(out / "shard-%06d.tar")
    done = [0]  # images written so far, for the plain lines
    # on a terminal a bar; in a log or a pipe no carriage returns: one plain line per shard written
    bar, post = progress and sys.stderr.isatty(), None
    if progress and not bar:
        def post(name: str) -> None:
            print(f"shards: {Path(name).name} written, {done[0]}/{len(files)} images", file=sys.stderr, flush=True)
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=shard_size, verbose=0, post=post) as sink:
        for n, i in enumerate(tqdm(order, desc="shards", unit="img", disable=not bar)):
            sample = {"__key__": f"{n:08d}", _EXT.get(files[i].suffix.lower(), "jpg"): files[i].read_bytes()}
            if labels is not None:
                sample["cls"] = labels[i]
            sink.write(sample)
            done[0] = n + 1
    shards = sorted(out.glob("shard-*.tar"))
    return {"format": "fcmae-shards/1", "samples": len(files), "seed": seed, "source": str(src), "classes": classes,
            "shards": [{"name": p.name, "count": _count_shard(p)} for p in shards]}


# --------------------------------------------------------------------------------------------- reading
@dataclass
class ShardSet:
    """The shards of a dataset spec: urls (or paths), their sample counts, the class names (labelled sets)."""

    urls: list[str]
    counts: list[int]
    classes: list[str] | None

    @property
    def total(self) -> int:
        return sum(self.counts)


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(spec))


def open_shards(spec: str, index: str = "") -> ShardSet:
    """Resolve ``spec`` (a folder of .tar files, a brace pattern, a URL or ``pipe:`` spec) with its ``index.json``
    (``index`` if given, else ``index.json`` in the folder / beside a local pattern)."""
    local = not spec.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))
    folder = Path(spec).expanduser() if local else None
    if folder is not None and folder.is_dir():
        urls = [str(p) for p in sorted(folder.glob("*.tar"))]
        index = index or str(folder / INDEX_NAME)
    else:
        urls = _expand(spec)
        if local:
            urls = [str(Path(u).expanduser()) for u in urls]
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise DataError(f"data.path {spec}: {len(missing)} of {len(urls)} shard file(s) not found "
                                f"(first: {missing[0]}); give a folder of .tar files, a brace pattern or a pipe: spec")
            index = index or str(Path(urls[0]).parent / INDEX_NAME)
    if not urls:
        raise DataError(f"no .tar shards in {spec}")
    if not index or not Path(index).is_file():
        raise DataError(f"cannot size the shards of {spec}: no {INDEX_NAME} (written by `fcmae shard`) at "
                        f"{index or '?'}; give its path with data.shard_index=PATH")
    meta = json.loads(Path(index).read_text())
    counts_by_name = {s["name"]: int(s["count"]) for s in meta.get("shards", [])}
    missing = [u for u in urls if _shard_name(u) not in counts_by_name]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {spec} are not in {index} (first: {missing[0]})")
    return ShardSet(urls, [counts_by_name[_shard_name(u)] for u in urls], meta.get("classes"))


def _shard_name(url: str) -> str:
    """The file name of a shard in a path, URL or ``pipe:`` command (its last token ending in .tar)."""
    tokens = [t for t in url.replace("/", " ").split() if t.endswith(".tar")]
    return tokens[-1] if tokens else url


def decode_sample_image(sample: dict[str, Any], in_chans: int) -> torch.Tensor:
    """The image of a raw webdataset sample -> ``(in_chans, H, W)`` uint8 (``decode_bytes``: libjpeg-turbo, else
    PIL, as for image files)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None) or next(
        (k for k in sample if not k.startswith("__") and k != "cls"), None)
    if key is None:
        raise DataError(f"sample {sample.get('__key__')} holds no image (keys {sorted(sample)})")
    return decode_bytes(sample[key], in_chans, name=f"{sample.get('__url__', '')}/{sample.get('__key__')}.{key}")


class ShardStream(IterableDataset):
    """Samples streamed from shards as ``Sample(image uint8 (C, S, S), mask or label, skipped)``.

    ``configure(rank, world, batch_size)`` before iterating (the trainer does); ``use_epoch(e)`` and
    ``skip_batches(k)`` (resume) before each epoch. ``shuffle=False`` (validation): the rank's shards in order,
    every sample once, streams of uneven length (``len`` is then the rank's sample count).
    """

    def __init__(self, shards: ShardSet, transform: Callable[[torch.Tensor], torch.Tensor], *, in_chans: int,
                 seed: int = 0, labelled: bool = False, mask_grid: tuple[int, int] | None = None,
                 mask_ratio: float = MASK_RATIO, shuffle: bool = True, buffer: int = 1000, seed_globals: bool = False
                 ) -> None:
        self.shards, self.transform, self.in_chans = shards, transform, in_chans
        self.seed, self.labelled, self.shuffle, self.buffer = seed, labelled, shuffle, buffer
        self.mask_grid, self.mask_ratio, self.seed_globals = mask_grid, mask_ratio, seed_globals
        self.rank, self.world, self.batch_size, self.num_workers = 0, 1, 1, 1
        self.epoch, self.skip = 0, 0

    def configure(self, rank: int, world: int, batch_size: int, num_workers: int) -> str | None:
        """Returns a note when fewer shards than streams cap the workers per process (``self.num_workers``: what
        the DataLoader must use); a stream per process is the least, else a ``DataError``."""
        self.rank, self.world, self.batch_size, self.num_workers = rank, world, batch_size, max(1, num_workers)
        n, note = len(self.shards.urls), None
        if self.shuffle and world <= n < world * self.num_workers:  # (validation streams may be empty)
            note = (f"{n} shards feed at most {n // world} data worker(s) per process: data.num_workers "
                    f"{num_workers} -> {n // world}")
            self.num_workers = n // world
        if self.shuffle and n < world * self.num_workers:
            raise DataError(f"{n} shards cannot feed {world} process(es); write smaller shards (fcmae shard "
                            "--shard-size)")
        streams = world * self.num_workers
        if self.shuffle and self._batches_per_stream(0) == 0:
            raise DataError(f"the smallest of {streams} shard streams holds fewer than one batch "
                            f"({self.batch_size}); lower run.batch_size or write fewer, larger shards")
        return note

    def use_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def skip_batches(self, k: int) -> None:
        """Resume inside the epoch: the first ``k`` batches of this rank are skipped before decoding."""
        self.skip = k

    def _deal(self, epoch: int) -> list[list[int]]:
        """Shard indices of every stream for ``epoch`` (a seeded shuffle, dealt round-robin)."""
        n, streams = len(self.shards.urls), self.world * self.num_workers
        order = np.random.default_rng(sample_seed(self.seed, epoch, -2)).permutation(n) if self.shuffle else range(n)
        return [list(order[s::streams]) for s in range(streams)]

    def _batches_per_stream(self, epoch: int) -> int:
        counts = self.shards.counts
        return min(sum(counts[i] for i in shards) for shards in self._deal(epoch)) // self.batch_size

    def __len__(self) -> int:
        """Samples this rank yields per epoch (a multiple of the batch size when shuffling)."""
        if self.shuffle:
            return self._batches_per_stream(self.epoch) * self.batch_size * self.num_workers
        deal = self._deal(self.epoch)[self.rank * self.num_workers:(self.rank + 1) * self.num_workers]
        return sum(self.shards.counts[i] for shards in deal for i in shards)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        # the DataLoader takes batches from workers 0, 1, ... in turn; after skipping k batches the next one is
        # logical stream k % W's, so physical worker p plays logical stream (p + k) % W
        worker = ((info.id if info is not None else 0) + self.skip) % self.num_workers
        shards = self._deal(self.epoch)[self.rank * self.num_workers + worker]
        raw = self._raw(shards, self.rank * self.num_workers + worker)
        if not self.shuffle:
            yield from (self._sample(s) for s in raw)
            return
        per_stream = self._batches_per_stream(self.epoch) * self.batch_size
        # logical stream w holds this rank's batches w, w + W, w + 2W, ...: it skips those below k
        skip = math.ceil(max(0, self.skip - worker) / self.num_workers) * self.batch_size
        for n, s in enumerate(raw):
            if n >= per_stream:
                return
            if n >= skip:
                yield self._sample(s)

    def _raw(self, shards: Sequence[int], stream: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        src = wds.tarfile_to_samples()(iter([{"url": self.shards.urls[i]} for i in shards]))
        if self.shuffle:
            rng = random.Random(sample_seed(self.seed, self.epoch, -3 - stream))
            src = wds.shuffle(bufsize=self.buffer, initial=min(self.buffer, 100), rng=rng)(src)
        return src

    def _sample(self, s: dict[str, Any]) -> Sample:
        """Decode and augment one raw sample (seeded by its shard and key); an undecodable image is replaced by the
        last good sample with ``skipped = 1`` (so every stream keeps its length)."""
        s_seed = sample_seed(self.seed, self.epoch, zlib.crc32(f"{_shard_name(s.get('__url__', ''))}/"
                                                               f"{s['__key__']}".encode()))
        try:
            with seeded(s_seed, self.seed_globals):
                image = self.transform(decode_sample_image(s, self.in_chans))
        except Exception as exc:
            if getattr(self, "_last", None) is None:
                raise DataError(f"cannot decode sample {s.get('__key__')} of {s.get('__url__')}: {exc}") from exc
            return self._last._replace(skipped=1)
        if self.labelled:
            target: Any = int(s["cls"])
        elif self.mask_grid is None:
            target = -1
        else:
            target = sample_mask(s_seed, self.mask_grid, self.mask_ratio)
        self._last = Sample(image, target, 0)
        return self._last
