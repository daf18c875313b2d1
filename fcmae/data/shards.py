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
from fcmae.data.policy import BAD_IMAGE, NO_IMAGE, NO_LABEL, TRUNCATED, UNREADABLE, bad_data, skip_vector
from fcmae.data.protocol import FinetuneData
from fcmae.data.sampling import Sample, sample_mask, sample_seed, seeded
from fcmae.data.shard_index import IMAGE_KEYS, classes_of, label_member, read_label, shard_info, shard_name
from fcmae.data.transforms import ResizeCenterCropU8, ViaPIL, build_finetune_transform, build_pretrain_transform
from fcmae.models.masking import MASK_RATIO

INDEX_NAME = "index.json"
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


def is_remote(spec: str) -> bool:
    return spec.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))


def shard_urls(spec: str) -> list[str]:
    """The shards ``spec`` names: a folder's ``.tar`` files (sorted), or a brace pattern / list expanded; local
    ones must exist."""
    folder = None if is_remote(spec) else Path(spec).expanduser()
    if folder is not None and folder.is_dir():
        urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    else:
        urls = _expand(spec)
        if folder is not None:
            urls = [str(Path(u).expanduser()) for u in urls]
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise DataError(f"data.path {spec}: {len(missing)} of {len(urls)} shard file(s) not found "
                                f"(first: {missing[0]}); give a folder of .tar files, a brace pattern or a pipe: spec")
    if not urls:
        raise DataError(f"no .tar shards in {spec}")
    return urls


def open_shards(spec: str, index: str = "", labelled: bool = False, label_field: str = "") -> ShardSet:
    """Resolve ``spec`` (a folder of .tar files, a brace pattern, a URL or ``pipe:`` spec) and size its shards:
    from ``index.json`` (``index`` if given, else ``index.json`` in the folder / beside a local pattern) when there
    is one, else (local shards) from their tar headers (``fcmae.data.shard_index``: cached, img2dataset stats)."""
    urls = shard_urls(spec)
    if not index and not is_remote(spec):
        index = str(Path(urls[0]).parent / INDEX_NAME)
    if index and Path(index).expanduser().is_file():
        meta = json.loads(Path(index).expanduser().read_text())
        counts_by_name = {s["name"]: int(s["count"]) for s in meta.get("shards", [])}
        missing = [u for u in urls if shard_name(u) not in counts_by_name]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of {spec} are not in {index} (first: {missing[0]})")
        return ShardSet(urls, [counts_by_name[shard_name(u)] for u in urls], meta.get("classes"))
    if is_remote(spec):
        raise DataError(f"cannot size the remote shards of {spec} without an index: write one once with `fcmae shard "
                        f"--index '{spec}' -o index.json` and give data.shard_index=index.json")
    infos = [shard_info(u, labelled, label_field) for u in urls]
    if sum(i["count"] for i in infos) == 0:
        raise DataError(f"the shards of {spec} hold no image samples (members {', '.join(IMAGE_KEYS)})")
    labels = {v for i in infos for v in i["labels"]}
    return ShardSet(urls, [i["count"] for i in infos], classes_of(labels) if labelled else None)


def decode_sample_image(sample: dict[str, Any], in_chans: int) -> torch.Tensor:
    """The image of a raw webdataset sample -> ``(in_chans, H, W)`` uint8 (``decode_bytes``: libjpeg-turbo, else
    PIL, as for image files)."""
    key = image_key(sample)
    if key is None:
        raise DataError(f"sample {sample.get('__key__')} holds no image (keys {sorted(sample)})")
    return decode_bytes(sample[key], in_chans, name=f"{sample.get('__url__', '')}/{sample.get('__key__')}.{key}")


def image_key(sample: dict[str, Any]) -> str | None:
    """The member of a raw sample that holds its image (``jpg``, ``jpeg``, ``png`` or ``webp``), if any."""
    return next((k for k in IMAGE_KEYS if k in sample), None)


class ShardStream(IterableDataset):
    """Samples streamed from shards as ``Sample(image uint8 (C, S, S), mask or label, skipped (R,))``.

    ``configure(rank, world, batch_size)`` before iterating (the trainer does); ``use_epoch(e)`` and
    ``skip_batches(k)`` (resume) before each epoch. ``shuffle=False`` (validation): the rank's shards in order,
    every sample once, streams of uneven length (``len`` is then the rank's sample count).

    Damaged data (``fcmae.data.policy``): a sample without an image (or, labelled, without a label) is dropped
    before the shuffle; a shard that ends early or cannot be read gives the samples it holds; each is one line
    naming the shard (and key) and is counted in ``skipped``. An image that does not decode is replaced in place
    by the sample read before it (decoded again with this position's seed; a gray image if that fails too), and a
    stream that runs dry is padded the same way, so every stream keeps its planned length (equal steps on every
    rank) and a resumed stream, which reads but does not decode the samples it skips, makes the same samples.
    """

    def __init__(self, shards: ShardSet, transform: Callable[[torch.Tensor], torch.Tensor], *, in_chans: int,
                 seed: int = 0, labelled: bool = False, mask_grid: tuple[int, int] | None = None,
                 mask_ratio: float = MASK_RATIO, shuffle: bool = True, buffer: int = 1000, seed_globals: bool = False,
                 on_bad_image: str = "skip", label_field: str = "") -> None:
        self.shards, self.transform, self.in_chans = shards, transform, in_chans
        self.seed, self.labelled, self.shuffle, self.buffer = seed, labelled, shuffle, buffer
        self.mask_grid, self.mask_ratio, self.seed_globals = mask_grid, mask_ratio, seed_globals
        self.on_bad_image, self.label_field = on_bad_image, label_field
        self.rank, self.world, self.batch_size, self.num_workers = 0, 1, 1, 1
        self.epoch, self.skip = 0, 0
        self._lost = skip_vector()  # damage found while reading, not yet attached to a sample
        self._logged: set[str] = set()

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
        stream = self.rank * self.num_workers + worker
        self._lost = skip_vector()
        raw = self._raw(self._deal(self.epoch)[stream], stream)
        if not self.shuffle:
            yield from self._positions(raw, None, 0)
            return
        per_stream = self._batches_per_stream(self.epoch) * self.batch_size
        # logical stream w holds this rank's batches w, w + W, w + 2W, ...: it skips those below k
        skip = math.ceil(max(0, self.skip - worker) / self.num_workers) * self.batch_size
        yield from self._positions(raw, per_stream, skip)

    def _positions(self, raw: Iterator[dict[str, Any]], limit: int | None, skip: int) -> Iterator[Sample]:
        """Samples at positions ``skip <= n < limit`` of the stream (``limit`` None: all the stream holds); a
        stream that runs dry before ``limit`` is padded (see the class docstring)."""
        n, prev = 0, None
        for s in raw:
            if limit is not None and n >= limit:
                return
            if n >= skip:
                yield self._sample(s, prev, n)
            else:
                self._lost.zero_()  # counted when the samples were trained on, before the checkpoint
            prev, n = s, n + 1
        while limit is not None and n < limit:
            if n >= skip:
                yield self._sample(None, prev, n)
            n += 1

    def _raw(self, shards: Sequence[int], stream: int) -> Iterator[dict[str, Any]]:
        src: Iterator[dict[str, Any]] = (s for i in shards for s in self._shard_samples(i))
        if self.shuffle:
            import webdataset as wds

            rng = random.Random(sample_seed(self.seed, self.epoch, -3 - stream))
            src = wds.shuffle(bufsize=self.buffer, initial=min(self.buffer, 100), rng=rng)(src)
        return src

    def _shard_samples(self, i: int) -> Iterator[dict[str, Any]]:
        """The samples of shard ``i`` that hold an image (and a label, labelled); what it lacks against its count
        (a tar cut short or unreadable) is reported once, at its end, and counted."""
        import webdataset as wds

        url, expected, got, errors = self.shards.urls[i], self.shards.counts[i], 0, []
        imageless = None  # the last sample without an image: the one a cut tar ends in, if the shard is short

        def handler(exc: Exception) -> bool:
            if isinstance(exc, FileNotFoundError):  # a shard that vanished is not damaged data: stop (one line)
                raise DataError(f"shard {url} is gone: {exc}") from None
            errors.append(exc)
            return True

        for s in wds.tarfile_to_samples(handler=handler)(iter([{"url": url}])):
            if imageless is not None:
                self._damaged(NO_IMAGE, imageless)
                imageless = None
            if image_key(s) is None:
                members = sorted(k for k in s if not k.startswith("__"))
                imageless = f"shard {url}: sample {s.get('__key__')} holds no image (members {members})"
                continue
            got += 1
            if self.labelled and self._label(s) is None:
                self._damaged(NO_LABEL, f"shard {url}: sample {s.get('__key__')} holds no label "
                                        f"({label_member(self.label_field)} {self.label_field})".rstrip())
                continue
            yield s
        if errors or got < expected:
            what = f"{type(errors[0]).__name__}: {errors[0].args[0]}" if errors else "it ends early"
            reason = UNREADABLE if errors and got == 0 else TRUNCATED
            self._damaged(reason, f"shard {url}: {what}; read {got} of its {expected} samples", max(0, expected - got))
        elif imageless is not None:
            self._damaged(NO_IMAGE, imageless)

    def _damaged(self, reason: int, message: str, count: int = 1) -> None:
        bad_data(self.on_bad_image, message, self._logged)
        self._lost[reason] += count

    def _label(self, s: dict[str, Any]) -> int | None:
        ext = label_member(self.label_field)
        value = read_label(s[ext], ext, self.label_field) if ext in s else None
        if isinstance(value, str):  # a class name: its index among the classes
            classes = self.shards.classes or []
            return classes.index(value) if value in classes else None
        return value

    def _sample(self, s: dict[str, Any] | None, prev: dict[str, Any] | None, n: int) -> Sample:
        """Decode and augment one raw sample ``s`` at position ``n`` (seeded by its shard and key); one that does
        not decode, or a padding position (``s`` None), is made from ``prev`` (a gray image if that fails too)."""
        name = f"{shard_name(s.get('__url__', ''))}/{s['__key__']}" if s is not None else f"pad/{n}"
        s_seed = sample_seed(self.seed, self.epoch, zlib.crc32(name.encode()))
        skipped, self._lost = self._lost, skip_vector()
        image = None
        for i, cand in enumerate((s, prev)):
            if cand is None:
                continue
            try:
                with seeded(s_seed, self.seed_globals):
                    image = self.transform(decode_sample_image(cand, self.in_chans))
                source = cand
                break
            except Exception as exc:  # decoders raise many kinds; the line names the shard and key
                if i == 0:
                    self._damaged(BAD_IMAGE, f"cannot decode sample {cand.get('__key__')} of {cand.get('__url__')}: "
                                             f"{exc}")
                    skipped, self._lost = skipped + self._lost, skip_vector()
        if image is None:
            source = s or prev or {}
            with seeded(s_seed, self.seed_globals):
                image = self.transform(torch.full((self.in_chans, 32, 32), 128, dtype=torch.uint8))
        if self.labelled:
            target: Any = self._label(source) if source else 0
        elif self.mask_grid is None:
            target = -1
        else:
            target = sample_mask(s_seed, self.mask_grid, self.mask_ratio)
        return Sample(image, target if target is not None else 0, skipped)


# --------------------------------------------------------------------------------------------- the source
def pretrain_stream(cfg: Any, in_chans: int, seed: int, mask_grid: tuple[int, int], mask_ratio: float) -> ShardStream:
    """``data.source=webdataset`` pretraining (``fcmae.data.sources``): the shards of ``data.path``."""
    tf = build_pretrain_transform(cfg.input_size, tuple(cfg.crop_scale), cfg.hflip, in_chans)
    return ShardStream(open_shards(cfg.path, cfg.shard_index), tf, in_chans=in_chans, seed=seed, mask_grid=mask_grid,
                       mask_ratio=mask_ratio, buffer=cfg.shuffle_buffer, on_bad_image=cfg.on_bad_image)


def finetune_streams(cfg: Any, in_chans: int, seed: int) -> FinetuneData:
    """Labelled shards (``cls``) for training and validation; classes from the training shards' index."""
    train = open_shards(cfg.train_path, cfg.shard_index, labelled=True, label_field=cfg.label_field)
    val = open_shards(cfg.val_path, labelled=True, label_field=cfg.label_field)
    if not train.classes:
        raise DataError(f"the shards of {cfg.train_path} hold no labels (no `cls` members, or no data.label_field="
                        f"{cfg.label_field!r} in their `json` members; fcmae shard stores class folders' as `cls`)")
    if val.classes and val.classes != train.classes and len(val.classes) > len(train.classes):
        raise DataError(f"the validation shards of {cfg.val_path} hold labels the training shards do not "
                        f"({len(val.classes)} classes against {len(train.classes)})")
    val.classes = train.classes  # string labels index the training classes
    kw = {"in_chans": in_chans, "labelled": True, "on_bad_image": cfg.on_bad_image, "label_field": cfg.label_field}
    train_tf, val_tf = stream_transforms(cfg, in_chans)
    return FinetuneData(ShardStream(train, train_tf, seed=seed, buffer=cfg.shuffle_buffer, seed_globals=True, **kw),
                        ShardStream(val, val_tf, shuffle=False, **kw), list(train.classes), train.total, {})


def stream_transforms(cfg: Any, in_chans: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                          Callable[[torch.Tensor], torch.Tensor]]:
    """Fine-tuning transforms of a stream's uint8 ``(C, H, W)`` images: the recipe's augmentation (timm's, through
    PIL; seeded globals per sample) for training, resize and center crop for validation."""
    tf = build_finetune_transform(cfg.input_size, in_chans, auto_augment=cfg.auto_augment or None,
                                  color_jitter=cfg.color_jitter, scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                                  interpolation=cfg.interpolation)
    return ViaPIL(tf), ResizeCenterCropU8(cfg.input_size, cfg.crop_pct)
