"""``fcmae shard SRC OUT [--shard-size 1GB] [--max-count N] [--seed S]``: write WebDataset tar shards.

SRC: a folder of images (searched recursively); ImageNet-style class folders (every image inside a first-level
folder) also store each image's class index as ``cls``, for fine-tuning. The images go into ``OUT/shard-NNNNNN.tar``
in a seeded random order (so every shard is a random sample of the whole), their bytes unchanged, about
``--shard-size`` each, and ``OUT/index.json`` lists the shards with their sample counts and the class names (the
reader sizes epochs from it). Train from them with ``data.source=webdataset data.path=OUT`` (pretraining) or
``data.train_path=... data.val_path=...`` (fine-tuning).

``fcmae shard --index SPEC -o index.json [--labels [FIELD]]``: size shards written by anything else. Local shards
need no index (the reader sizes them from their tar headers); remote ones (``pipe:``, URLs) are streamed once here,
their samples with an image counted per shard (and labels collected: ``cls``, or the ``json`` member's FIELD), and
the reader is given the result with ``data.shard_index=index.json``.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> int:
    """``1GB``, ``500MB``, ``64KiB``, ``1e9`` -> bytes; a one-line error naming the value otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 64MiB)")
    try:
        n = int(float(m[1]) * _UNITS[m[2].lower()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB, 64MiB)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--shard-size must be positive, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument
    from fcmae.commands._flags import add_flag

    p.add_argument("src", metavar="SRC", nargs="?", help="folder of images (class folders give labels)")
    p.add_argument("shards_out", metavar="OUT", nargs="?", help="folder for the shards and index.json (empty or new)")
    p.add_argument("--index", metavar="SPEC", help="instead: stream the shards SPEC names once and write their index")
    add_flag(p, "out", "index.json", "index.json (with --index)")
    p.add_argument("--labels", metavar="FIELD", nargs="?", const="", default=None,
                   help="--index: also collect labels (cls, or this field of each json member)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="bytes per shard (default 1GB)")
    p.add_argument("--max-count", type=int, default=100_000, help="samples per shard at most (default 100000)")
    add_flag(p, "seed", 0)  # the order of the images across shards
    add_flag(p, "no_progress")
    add_json_argument(p)


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from fcmae.data.shards import INDEX_NAME, write_shards
    from fcmae.weights.files import write_json_atomic

    if args.index:
        return _index(args)
    if not args.src or not args.shards_out:
        raise ValueError("give SRC and OUT (a folder of images and a folder for the shards), or --index SPEC")
    if args.max_count < 1:
        raise ValueError(f"--max-count must be >= 1, got {args.max_count}")
    out = args.shards_out
    index = write_shards(args.src, out, args.shard_size, args.seed, args.max_count, not args.no_progress)
    write_json_atomic(Path(out) / INDEX_NAME, index)  # last: the shards are complete when it exists
    return {**index, "index": str(Path(out) / INDEX_NAME)}


def _index(args: argparse.Namespace) -> dict[str, Any]:
    from fcmae.data.shard_index import index_remote
    from fcmae.data.shards import shard_urls
    from fcmae.weights.files import write_json_atomic

    index = index_remote(args.index, shard_urls(args.index), args.labels is not None, args.labels or "")
    write_json_atomic(args.out, index)
    return {**index, "index": str(args.out)}


def _report(r: dict[str, Any]) -> None:
    labels = f", {len(r['classes'])} classes (cls)" if r["classes"] else ", no labels"
    if "seed" not in r:  # --index
        print(f"indexed {r['samples']} samples in {len(r['shards'])} shards{labels}: {r['index']}")
        return
    print(f"wrote {r['samples']} images into {len(r['shards'])} shards{labels}; index: {r['index']}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting

    return run_reporting("shard", lambda: _compute(args), _report, args.json)
