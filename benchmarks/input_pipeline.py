"""Input-pipeline throughput per core: the pretraining dataset before and after, fine-tuning, decoders.

Makes ImageNet-like JPEGs from the natural photos scikit-image ships (cropped and rescaled to 500x375 and 400x500,
quality 90), then measures images/s with one thread and ``num_workers=0``: each dataset is iterated through a
``DataLoader`` in batches of 32, so a path's time is what one DataLoader worker spends on it (reading, decoding,
augmenting and collating the batch). Every path runs in the same process, interleaved on the same pieces of 32
images over several rounds (each piece's fastest round kept; see ``measure``):

- ``before``: the pretraining dataset as the previous release built it (kept here as the baseline): PIL decode,
  torchvision's RandomResizedCrop on the PIL image, ToTensor + Normalize to float32, every sample seeded through the
  global ``random`` / ``numpy`` / ``torch.manual_seed`` generators;
- ``after``: today's pretraining training set as a run builds it (``fcmae.data.build_pretrain_train_set``): the
  batch's files read first, crops drawn from the JPEG headers with a per-sample NumPy generator, then each image
  decoded by libjpeg-turbo (simplejpeg) to uint8 and its crop resized on uint8; uint8 out (normalised on the
  device);
- ``finetune``: the fine-tuning training set (timm RandAugment + random erasing) as ``build_finetune_data`` builds it;
- ``pil_decode``: PIL decode alone (the reference the new path is held against);
- ``shards``: the same images from WebDataset shards (``data.source=webdataset``), as a run streams them;
- ``third_party_shards``: the same images in shards written by webdataset's own ``ShardWriter`` (no index.json: the
  reader sizes them from their tar headers), streamed the same way;
- ``hf_parquet``: the same images in a Hugging Face parquet dataset written by ``datasets`` (``data.source=hf``,
  the ``Image`` feature's ``{bytes, path}`` rows), as a run builds it (needs ``fcmae[hf]``);
- ``hf_stream``: the same parquet files streamed (``data.source=hf_stream``), as a run reads them;
- ``gpu_decode_cpu_form``: the ``data.decode=gpu`` path (bytes and crop parameters in the worker, then the batched
  decode and the crops of ``DeviceDecoder``) with the device = this CPU.

    python benchmarks/input_pipeline.py [--images 300] [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcmae.config import PretrainDataConfig  # noqa: E402
from fcmae.data import ImageFiles, SeededSamples, build_finetune_transform, build_pretrain_train_set  # noqa: E402
from fcmae.data.decode import collate_samples  # noqa: E402
from fcmae.data.images import load_image  # noqa: E402
from fcmae.data.shards import INDEX_NAME, write_shards  # noqa: E402
from fcmae.data.transforms import DeviceDecoder  # noqa: E402
from fcmae.models.registry import MASK_RATIO, mean_std  # noqa: E402

SIZES = ((500, 375), (400, 500))  # ImageNet's typical landscape and portrait shapes
# the colour photos that ship inside scikit-image (others need a download)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "cat")


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90) cut from scikit-image's colour sample photos at random, rescaled to ImageNet sizes."""
    import skimage.data as sd

    photos = []
    for name in PHOTOS:
        try:
            a = getattr(sd, name)()
        except (AttributeError, ImportError, OSError):  # missing in this version, or only downloadable
            continue
        if a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 256:
            photos.append(Image.fromarray(a))
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img, (w, h) = photos[i % len(photos)], SIZES[i % 2]
        cw = int(min(img.width, img.height * w / h) * rng.uniform(0.6, 1.0))
        ch = int(cw * h / w)
        x0, y0 = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        out = folder / f"img_{i:05d}.jpg"
        img.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch)).save(out, quality=90)
        paths.append(out)
    return paths


# --------------------------------------------------------------------------------------------- the old pipeline
class _BaselineSeeded(SeededSamples):
    """The previous release's per-sample seeding: the global generators, ``torch.manual_seed`` included; items
    fetched one by one (it had no batched fetch)."""

    __getitems__ = None  # the DataLoader (and Subset) then fetch item by item

    def _seeded_item(self, index: int, s: int) -> tuple:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return self.base.sample(self.indices[index])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _baseline_transform(size: int):
    from torchvision import transforms as T

    mean, std = mean_std(3)
    return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(mean, std)])


CHUNK = 32  # images per timed piece (one batch)


def _pretraining_set(paths: list[Path], size: int, decode: str) -> SeededSamples:
    """The pretraining training set exactly as a run builds it (``build_pretrain_train_set``) over ``paths``."""
    cfg = PretrainDataConfig(source="folder", path=str(paths[0].parent), input_size=size, decode=decode)
    return build_pretrain_train_set(cfg, 3, 0, (size // 32, size // 32), MASK_RATIO)


def build_paths(paths: list[Path], size: int) -> dict:
    """name -> a callable that processes the images at the given indices once."""
    grid = (size // 32, size // 32)
    before = _BaselineSeeded(ImageFiles(paths, _baseline_transform(size), 3), seed=0, labelled=False,
                             mask_grid=grid)
    after = _pretraining_set(paths, size, "cpu")
    finetune = SeededSamples(ImageFiles(paths, build_finetune_transform(size, 3), 3), seed=0, labelled=False)
    gpu = _pretraining_set(paths, size, "gpu")
    decoder = DeviceDecoder(size, 3)

    def batches(ds, idx: list[int]):  # what one worker does: fetch and collate each batch of 32
        return DataLoader(Subset(ds, idx), batch_size=32, num_workers=0, collate_fn=collate_samples)

    def gpu_form(idx: list[int]) -> None:  # data.decode=gpu with the device = this CPU: worker part + device part
        for batch in batches(gpu, idx):
            decoder(batch.image, "cpu")

    def each(ds):
        return lambda idx: list(batches(ds, idx))

    return {"before": each(before), "after": each(after), "finetune": each(finetune),
            "pil_decode": lambda idx: [load_image(paths[i], 3) for i in idx], "gpu_decode_cpu_form": gpu_form}


def shard_stream(paths: list[Path], size: int, out: Path) -> Any:
    """The same images written by ``fcmae shard``'s writer (32 per shard) and read as a pretraining run reads
    shards (``build_pretrain_train_set`` with ``data.source=webdataset``, shuffle buffer included)."""
    index = write_shards(paths[0].parent, out, max_count=CHUNK, progress=False)
    (out / INDEX_NAME).write_text(json.dumps(index))
    ds = build_pretrain_train_set(PretrainDataConfig(source="webdataset", path=str(out), input_size=size), 3, 0,
                                  (size // 32, size // 32), MASK_RATIO)
    ds.configure(0, 1, 32, 1)
    return ds


def third_party_stream(paths: list[Path], size: int, out: Path) -> Any:
    """The same images written by webdataset's ``ShardWriter`` (32 per shard, keys ``jpg``; no index.json) and read
    as a pretraining run reads them."""
    import webdataset as wds

    out.mkdir()
    with wds.ShardWriter(str(out / "part-%03d.tar"), maxcount=CHUNK, verbose=0) as sink:
        for i, p in enumerate(paths):
            sink.write({"__key__": f"s{i:06d}", "jpg": p.read_bytes()})
    ds = build_pretrain_train_set(PretrainDataConfig(source="webdataset", path=str(out), input_size=size), 3, 0,
                                  (size // 32, size // 32), MASK_RATIO)
    ds.configure(0, 1, 32, 1)
    return ds


def hf_parquet_set(paths: list[Path], size: int, out: Path) -> Any:
    """The same images in parquet files written by ``datasets`` (2 files), as ``data.source=hf`` builds the
    pretraining set; None without the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        return None
    os.environ.setdefault("HF_DATASETS_CACHE", str(out / "cache"))
    rows = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in paths]},
                                      features=datasets.Features({"image": datasets.Image()}))
    for k in range(2):
        rows.shard(2, k, contiguous=True).to_parquet(str(out / f"train-{k:05d}-of-00002.parquet"))
    cfg = PretrainDataConfig(source="hf", path=str(out), input_size=size)
    return build_pretrain_train_set(cfg, 3, 0, (size // 32, size // 32), MASK_RATIO)


def hf_stream_set(out: Path, size: int) -> Any:
    """``hf_parquet_set``'s files streamed (``data.source=hf_stream``: rows read with ``datasets``' streaming
    reader, shuffle buffer included), as a pretraining run reads them; None without the ``datasets`` library."""
    if not any(out.glob("*.parquet")):
        return None
    ds = build_pretrain_train_set(PretrainDataConfig(source="hf_stream", path=str(out), input_size=size), 3, 0,
                                  (size // 32, size // 32), MASK_RATIO)
    ds.configure(0, 1, 32, 1)
    return ds


def _in_batches(ds: Any) -> Any:
    """A callable that takes ``ds``'s items at the given indices through a DataLoader, in batches of 32."""
    return lambda idx: list(DataLoader(Subset(ds, idx), batch_size=32, num_workers=0, collate_fn=collate_samples))


def measure(paths: list[Path], size: int, rounds: int, streams: dict[str, Any], maps: dict[str, Any]
            ) -> dict[str, float]:
    """Images/s of each path: the images are timed in pieces of ``CHUNK``, every path in turn on the same piece,
    ``rounds`` times over; a piece's time is its fastest round (the one least disturbed by other work on the
    host, which stretches single runs by 10-30 % here), and a path's rate is the image count over the sum. A shard
    stream cannot be cut into pieces by index: it is timed in whole passes, one per round (fastest kept)."""
    fns = build_paths(paths, size)
    fns.update({name: _in_batches(ds) for name, ds in maps.items() if ds is not None})
    pieces = [list(range(i, min(i + CHUNK, len(paths)))) for i in range(0, len(paths), CHUNK)]
    for fn in fns.values():  # warm-up: page cache, lazy imports
        fn(list(range(len(paths))))
    best = {name: [float("inf")] * len(pieces) for name in fns}
    stream = {name: float("inf") for name in streams}
    for _ in range(rounds):
        for k, idx in enumerate(pieces):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(idx)
                best[name][k] = min(best[name][k], time.perf_counter() - t0)
        for name, ds in streams.items():
            t0 = time.perf_counter()
            list(DataLoader(ds, batch_size=32, num_workers=0))
            stream[name] = min(stream[name], time.perf_counter() - t0)
    return {**{name: len(paths) / sum(times) for name, times in best.items()},
            **{name: len(streams[name]) / t for name, t in stream.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        paths = make_images(Path(tmp) / "images", args.images)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        tmp_path = Path(tmp)
        (tmp_path / "hf").mkdir()
        streams = {"shards": shard_stream(paths, args.size, tmp_path / "shards"),
                   "third_party_shards": third_party_stream(paths, args.size, tmp_path / "wds")}
        maps = {"hf_parquet": hf_parquet_set(paths, args.size, tmp_path / "hf")}
        streams["hf_stream"] = hf_stream_set(tmp_path / "hf", args.size)
        streams = {name: ds for name, ds in streams.items() if ds is not None}
        res = measure(paths, args.size, args.rounds, streams, maps)
    load = os.getloadavg()[0]
    print(f"{args.images} JPEGs (mean {kb:.0f} KB), {args.size} px, 1 thread, num_workers=0, pieces of {CHUNK} "
          f"images timed {args.rounds}x (fastest kept), load average {load:.1f}")
    print("| path | images/s per core | x before |\n|---|---|---|")
    for name, ips in res.items():
        print(f"| {name} | {ips:.0f} | {ips / res['before']:.2f} |")
    print(f"after / before = {res['after'] / res['before']:.2f}x (target >= 2.5); "
          f"after / PIL decode alone = {res['after'] / res['pil_decode']:.2f} (target >= 0.6)")
    for name in ("third_party_shards", "hf_parquet", "hf_stream"):
        if name in res:
            print(f"{name} / folders (after) = {res[name] / res['after']:.2f}x (target >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps({"images_per_s": res, "mean_kb": kb, "load": load}, indent=2))


if __name__ == "__main__":
    main()
