"""Sizing tar shards that ``fcmae shard`` did not write: sample counts (and labels) from the tar headers alone.

An epoch is planned from every shard's sample count before any data is read. Shards written by ``fcmae shard``
carry an ``index.json``; any other local shards (webdataset's ``ShardWriter``, img2dataset, tarp ...) are sized here:

- img2dataset writes ``NNNNN_stats.json`` beside ``NNNNN.tar``; its ``successes`` is the shard's sample count.
- otherwise the tar's headers are read, seeking over the member data (a 1 GB shard of 10 k images costs ~20 k small
  reads), and samples are grouped as webdataset groups them (the file name up to its first dot is the key).
  A sample counts when it holds an image member (``IMAGE_KEYS``) whose data is complete. Labelled sets also read
  each sample's ``cls`` member (or the ``json`` member's ``label_field``): a few bytes.

The counts are cached per shard (keyed by its real path, size and modification time) under
``$FCMAE_CACHE`` (default ``~/.cache/fcmae``)``/shard-counts``, so a restart (or the other processes of a run, which
build their data after the main process) does not scan again. Remote shards (``pipe:``, URLs) cannot be scanned
without streaming them: ``fcmae shard --index SPEC -o index.json`` streams them once (``index_remote``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("fcmae.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SCAN_VERSION = 1


def split_member(name: str) -> tuple[str, str]:
    """A tar member name -> ``(sample key, extension)``, as webdataset splits it (key: the path up to the first
    dot of the file name; extension lower-cased)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def read_label(raw: bytes, ext: str, label_field: str) -> int | str | None:
    """The label stored in a member's bytes: ``cls`` (an integer as text) or a json member's ``label_field``
    (dotted for nested fields); None when absent or unreadable."""
    try:
        if ext == "json":
            value: Any = json.loads(raw)
            for part in label_field.split("."):
                value = value[part]
            return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        return int(raw.decode().strip())
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return None


def label_member(label_field: str) -> str:
    """The member extension that holds labels: ``cls``, or ``json`` with a ``label_field``."""
    return "json" if label_field else "cls"


def scan_shard(path: str | Path, labelled: bool = False, label_field: str = "") -> dict[str, Any]:
    """One local tar shard's ``{"count", "no_image", "complete", "labels"}`` from its headers (see the module
    docstring). ``complete`` is False when the tar ends mid-member or without tar's end-of-archive blocks (a copy
    cut short); the samples before the cut are counted."""
    size = os.path.getsize(path)
    want = label_member(label_field) if labelled else None
    samples: dict[str, dict[str, Any]] = {}
    complete, end = True, 0
    with open(path, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
            for m in tf:  # TarFile.next seeks over each member's data: headers only
                if not m.isfile():
                    continue
                key, ext = split_member(m.name)
                s = samples.setdefault(key, {"image": False})
                end = m.offset_data + m.size
                if end > size:
                    complete = False
                    break
                if ext in IMAGE_KEYS and m.size > 0:
                    s["image"] = True
                elif ext == want:
                    f.seek(m.offset_data)
                    s["label"] = read_label(f.read(m.size), ext, label_field)
        except tarfile.TarError:  # the headers end mid-way: the file was cut short
            complete = False
    # a complete tar ends with two zero blocks after the last member's padded data
    complete = complete and size >= (end + 511) // 512 * 512 + 1024
    with_image = [s for s in samples.values() if s["image"]]
    labels = sorted({s["label"] for s in with_image if s.get("label") is not None}, key=str) if labelled else []
    return {"count": len(with_image), "no_image": len(samples) - len(with_image), "complete": complete,
            "labels": labels, "unlabelled": sum(1 for s in with_image if labelled and s.get("label") is None)}


def _cache_dir() -> Path:
    return Path(os.environ.get("FCMAE_CACHE") or Path.home() / ".cache" / "fcmae").expanduser() / "shard-counts"


def _cache_file(path: str, labelled: bool, label_field: str) -> Path:
    key = f"{_SCAN_VERSION}|{os.path.realpath(path)}|{labelled}|{label_field}"
    return _cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()}.json"


def _stats_count(path: str) -> int | None:
    """img2dataset's ``successes`` for ``NNNNN.tar`` (from ``NNNNN_stats.json``), when that file is there."""
    stats = Path(path).with_name(Path(path).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_info(path: str, labelled: bool = False, label_field: str = "") -> dict[str, Any]:
    """``scan_shard`` of a local shard, from the cache when the shard is unchanged (img2dataset's stats count for
    unlabelled use, without a scan); the scan's warnings (a cut-short tar) are logged when it runs."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _cache_file(path, labelled, label_field)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["info"]
    except (OSError, ValueError, KeyError):
        pass
    successes = None if labelled else _stats_count(path)
    if successes is not None:
        info = {"count": successes, "no_image": 0, "complete": True, "labels": [], "unlabelled": 0}
    else:
        info = scan_shard(path, labelled, label_field)
        if not info["complete"]:
            logger.warning("shard %s is cut short (it ends mid-member or without tar's end-of-archive blocks): "
                           "using the %d complete samples it holds", path, info["count"])
    try:  # a cache that cannot be written (read-only home) only costs a scan next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": os.path.realpath(path), "stamp": stamp, "info": info}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return info


def index_remote(spec: str, urls: list[str], labelled: bool = False, label_field: str = "") -> dict[str, Any]:
    """Stream every shard of ``spec`` once (webdataset opens ``pipe:`` and URLs) and count its samples: the
    ``index.json`` content the reader needs (``fcmae shard --index``). A shard that fails to stream is an error
    naming it (an index must be right)."""
    import webdataset as wds

    from fcmae.data.images import DataError

    shards, all_labels = [], set()
    for url in urls:
        count, labels = 0, set()
        try:
            for s in wds.tarfile_to_samples()(iter([{"url": url}])):
                if not any(k in s for k in IMAGE_KEYS):
                    continue
                count += 1
                raw = s.get(label_member(label_field)) if labelled else None
                if raw is not None and (v := read_label(raw, label_member(label_field), label_field)) is not None:
                    labels.add(v)
        except Exception as exc:  # webdataset and tarfile raise many kinds; the line names the shard
            raise DataError(f"cannot stream shard {url} of {spec}: {type(exc).__name__}: {exc}") from None
        shards.append({"name": shard_name(url), "count": count})
        all_labels |= labels
    return {"format": "fcmae-shards/1", "samples": sum(s["count"] for s in shards), "source": spec,
            "classes": classes_of(all_labels) if labelled else None, "shards": shards}


def classes_of(labels: set) -> list[str] | None:
    """Class names from the labels found: integers 0..max name themselves; strings are sorted."""
    if not labels:
        return None
    if all(isinstance(v, int) for v in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(v) for v in labels)


def shard_name(url: str) -> str:
    """The file name of a shard in a path, URL or ``pipe:`` command (its last token ending in .tar)."""
    tokens = [t for t in url.replace("/", " ").split() if t.endswith(".tar")]
    return tokens[-1] if tokens else url
