"""The bad-data policy on damaged shards: every case ends with exit 0 and per-reason counts, or with one line and
exit 1, within a bounded time and a bounded number of DataLoader worker processes (both measured here)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cluster_tools import child_env
from PIL import Image

from fcmae.cli import main

ROOT = Path(__file__).resolve().parent.parent
WORKERS, EPOCHS = 2, 2
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=3", "data.source=webdataset",
        "data.input_size=64", "optim.lr=1e-3", f"optim.epochs={EPOCHS}", "optim.warmup_epochs=0.5",
        "run.progress=false", "run.log_every=2", "run.export_every_epochs=0", "run.num_vis_images=2",
        "run.mixed_precision=no", "run.threads=1", "run.batch_size=4", f"data.num_workers={WORKERS}",
        "run.save_every_steps=0"]
TIME_LIMIT_S = 240


def _jpeg(rng: np.random.Generator, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _shards(root: Path, n: int = 48, per_shard: int = 4, garbage: int | None = None) -> Path:
    """``n`` JPEGs (file ``garbage``: not an image) in 4 class folders, written by ``fcmae shard`` into shards of
    ``per_shard`` with their index.json."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "src" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        data = b"this is not a JPEG" * 20 if i == garbage else _jpeg(rng)
        (root / "src" / f"c{i % 4}" / f"{i:03d}.jpg").write_bytes(data)
    assert main(["shard", str(root / "src"), str(root / "shards"), "--max-count", str(per_shard),
                 "--no-progress"]) == 0
    return root / "shards"


def _member_offsets(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return tf.getmembers()


def _cut(tar: Path, at_boundary: bool) -> int:
    """Truncate ``tar`` after its first sample (at the next member's header) or in the middle of its second
    sample's image data; returns the samples it still holds complete."""
    members = _member_offsets(tar)
    second = [m for m in members if m.name.endswith(".jpg")][1]
    size = second.offset if at_boundary else second.offset_data + second.size // 2
    with open(tar, "r+b") as f:
        f.truncate(size)
    return 1


def _env(tmp: Path) -> dict[str, str]:
    return child_env(FCMAE_CACHE=str(tmp / "cache"))


def _run(tmp: Path, shards: Path, *extra: str) -> tuple[int, str, int, float]:
    """``fcmae pretrain`` on ``shards`` -> (exit status, stderr, DataLoader worker processes it started, seconds).
    Killed (and the test failed) past ``TIME_LIMIT_S``."""
    out = tmp / f"run{len(list(tmp.glob('run*')))}"
    cmd = [sys.executable, "-m", "fcmae", "pretrain", *TINY, f"data.path={shards}", f"run.output_dir={out}", *extra]
    t0 = time.monotonic()
    with open(tmp / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        parent, seen = psutil.Process(proc.pid), set()
        while proc.poll() is None:
            if time.monotonic() - t0 > TIME_LIMIT_S:
                proc.kill()
                proc.wait()
                pytest.fail(f"no end within {TIME_LIMIT_S} s; {len(seen)} worker processes")
            try:
                children = parent.children(recursive=True)
                seen |= {(c.pid, " ".join(c.cmdline()[:3])) for c in children}
            except psutil.Error:
                pass
            time.sleep(0.02)
        err.seek(0)
        return proc.returncode, err.read(), len({pid for pid, _ in seen}), time.monotonic() - t0


def _summary(tmp: Path) -> dict:
    out = sorted(tmp.glob("run*"), key=lambda p: p.stat().st_mtime)[-1]
    return json.loads((out / "summary.json").read_text())


def _one_line_error(stderr: str, *words: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("fcmae pretrain: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert all(w in errors[0] for w in words), errors[0]


# every case: one set of workers per epoch, and room for one helper process (a respawn loop starts hundreds)
MAX_WORKERS = WORKERS * EPOCHS + 1


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["mid-file", "boundary", "two at a boundary"])
def test_truncated_shards_give_what_they_hold_count_it_and_stop_past_the_bound(tmp_path: Path, cut: str) -> None:
    shards = _shards(tmp_path)
    tars = sorted(shards.glob("*.tar"))
    damaged = tars[:2] if cut == "two at a boundary" else tars[3:4]
    kept = sum(_cut(t, cut != "mid-file") for t in damaged)
    lost = 4 * len(damaged) - kept
    rc, err, workers, wall = _run(tmp_path, shards, "data.max_skipped_fraction=0.5")
    assert rc == 0, err[-3000:]
    assert workers <= MAX_WORKERS, workers
    s = _summary(tmp_path)
    assert s["steps"] == EPOCHS * 12 and s["status"] == "finished"  # the planned steps: the streams were padded
    assert s["skipped"]["truncated"] + s["skipped"]["unreadable"] == EPOCHS * lost, s["skipped"]
    assert s["skipped_files"] == EPOCHS * lost, s["skipped"]
    for t in damaged:  # one line per damaged shard (per worker process that read it: once an epoch at most)
        lines = [line for line in err.splitlines() if f"shard {t}" in line]
        assert 1 <= len(lines) <= EPOCHS and f"read {kept // len(damaged)} of its 4 samples" in lines[0], err[-3000:]
    # the default bound (1 %) stops the run in one line, as does data.on_bad_image=error
    rc, err, workers, _ = _run(tmp_path, shards)
    assert rc == 1 and workers <= MAX_WORKERS
    _one_line_error(err, "data.max_skipped_fraction=0.01")
    rc, err, workers, _ = _run(tmp_path, shards, "data.on_bad_image=error")
    assert rc == 1 and workers <= MAX_WORKERS
    _one_line_error(err, f"shard {damaged[0]}" if len(damaged) == 1 else "shard ", "data.on_bad_image=error")


@pytest.mark.slow
def test_a_garbage_image_is_named_counted_and_error_stops(tmp_path: Path) -> None:
    shards = _shards(tmp_path, garbage=7)
    rc, err, workers, _ = _run(tmp_path, shards, "data.max_skipped_fraction=0.1")
    assert rc == 0 and workers <= MAX_WORKERS, err[-3000:]
    s = _summary(tmp_path)
    assert s["skipped"]["bad_image"] == EPOCHS and s["skipped_files"] == EPOCHS and s["steps"] == EPOCHS * 12
    assert "skipping: cannot decode sample" in err and ".tar" in err  # the line names the shard and the key
    rc, err, workers, _ = _run(tmp_path, shards, "data.on_bad_image=error")
    assert rc == 1 and workers <= MAX_WORKERS
    _one_line_error(err, "cannot decode sample", ".tar", "data.on_bad_image=error")


@pytest.mark.slow
def test_samples_without_an_image_are_dropped_and_counted(tmp_path: Path) -> None:
    """Shards written by webdataset's ShardWriter (no index.json: sized from their headers), one sample of which has
    no image member."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%03d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(48):
            sample = {"__key__": f"s{i:04d}", "cls": i % 4}
            if i != 5:
                sample["jpg"] = _jpeg(rng)
            sink.write(sample)
    rc, err, workers, _ = _run(tmp_path, tmp_path / "wds", "data.max_skipped_fraction=0.1")
    assert rc == 0 and workers <= MAX_WORKERS, err[-3000:]
    s = _summary(tmp_path)
    # 47 samples with an image (the headers say so): streams of 24 and 23 samples, 5 batches each; the sample without
    # an image is dropped and counted once per epoch
    assert s["skipped"]["no_image"] == EPOCHS and s["steps"] == EPOCHS * 10, s["skipped"]
    assert "sample s0005 holds no image" in err


class _Identity:
    def __call__(self, x):  # noqa: ANN001, ANN204
        return x


def _epoch(shards: Path, world: int, workers: int, skip: int = 0) -> list[tuple[list[bytes], list[list[int]]]]:
    """Per rank: the hashes of the images its loader yields in epoch 0 after skipping ``skip`` batches, and the
    per-reason skip counts of each batch."""
    import hashlib

    from torch.utils.data import DataLoader

    from fcmae.data.shards import ShardStream, open_shards

    out = []
    for rank in range(world):
        ds = ShardStream(open_shards(str(shards)), _Identity(), in_chans=3, seed=0, labelled=True)
        ds.configure(rank, world, 4, workers)
        ds.use_epoch(0)
        ds.skip_batches(skip)
        batches = list(DataLoader(ds, batch_size=4, num_workers=workers))
        out.append(([hashlib.sha1(x.contiguous().numpy()).digest() for b in batches for x in b.image],
                    [b.skipped.sum(0).tolist() for b in batches]))
    return out


def test_damaged_streams_keep_their_length_and_resume_exactly(tmp_path: Path) -> None:
    shards = _shards(tmp_path, garbage=5)
    tars = sorted(shards.glob("*.tar"))
    _cut(tars[0], at_boundary=True)
    _cut(tars[7], at_boundary=False)
    for world, workers in [(1, 0), (2, 2)]:
        full = _epoch(shards, world, workers)
        assert len({len(images) for images, _ in full}) == 1  # every rank as long as planned
        assert sum(len(images) for images, _ in full) == 48 // (4 * world * max(1, workers)) * 4 * world * max(
            1, workers)
        totals = np.sum([c for _, counts in full for c in counts], axis=0)
        assert totals.tolist() == [1, 0, 0, 6, 0]  # the garbage image; 3 + 3 samples lost to the two cuts
        for skip in (1, 2):  # a resumed epoch makes the same samples (the same replacements) from there on
            assert [images for images, _ in _epoch(shards, world, workers, skip)] == [
                images[4 * skip:] for images, _ in full]


def test_a_vanished_shard_is_one_error_and_a_dry_loader_never_restarts(tmp_path: Path) -> None:
    from fcmae.data.images import DataError
    from fcmae.data.policy import StreamEndedError, check_epoch_complete

    shards = _shards(tmp_path, n=16)
    from fcmae.data.shards import ShardStream, open_shards

    ds = ShardStream(open_shards(str(shards)), _Identity(), in_chans=3)
    ds.configure(0, 1, 4, 0)
    sorted(shards.glob("*.tar"))[2].unlink()  # after the epoch was planned, as mid-run
    with pytest.raises(DataError, match="shard .*shard-000002.tar is gone"):
        list(ds)
    with pytest.raises(StreamEndedError, match="ended after 3 of the 4 batches of epoch 2"):
        check_epoch_complete(3, 4, 1)
    check_epoch_complete(4, 4, 1)
