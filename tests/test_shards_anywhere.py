"""Shards we did not write: webdataset's own ShardWriter (brace pattern, no index.json) and an img2dataset-shaped
folder (tars + ``_stats.json`` + parquet): sized from their headers or stats (cached), every sample once per epoch
with equal steps per rank, exact resume, labels from ``cls`` or a json field; remote specs indexed once by
``fcmae shard --index``; pretraining (2 processes) and fine-tuning end to end."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_tools import child_env
from crash_run import kill_and_resume, max_weight_diff
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.cli import main
from fcmae.data import shard_index
from fcmae.data.shards import ShardStream, open_shards

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
N, PER_SHARD, CLASSES = 48, 4, ("cat", "dog", "eel", "fox")


def _image(i: int, ext: str) -> tuple[bytes, bytes]:
    """An image with a class signal, encoded as ``ext``; and the hash of its decoded pixels."""
    rng = np.random.default_rng(i)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    a[..., i % 3] //= 2
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, FORMATS[ext], **({"lossless": True} if ext == "webp" else {}))
    pixels = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return buf.getvalue(), hashlib.sha1(torch.from_numpy(pixels).permute(2, 0, 1).contiguous().numpy()).digest()


def webdataset_shards(root: Path) -> tuple[str, dict[bytes, int]]:
    """``part-{000..011}.tar`` written by webdataset's ShardWriter: ``cls`` labels, the four image extensions;
    returns the brace pattern and {pixel hash: label}."""
    import webdataset as wds

    root.mkdir(parents=True)
    labels = {}
    with wds.ShardWriter(str(root / "part-%03d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(N):
            ext = list(FORMATS)[i % 4]
            data, h = _image(i, ext)
            sink.write({"__key__": f"sample{i:05d}", ext: data, "cls": i % 4})
            labels[h] = i % 4
    return str(root / "part-{000..011}.tar"), labels


def img2dataset_folder(root: Path) -> tuple[str, dict[bytes, int]]:
    """The layout img2dataset writes: ``00000.tar`` (``jpg``, ``txt``, ``json`` per sample; here the json holds a
    class name under ``label``) next to ``00000_stats.json`` and ``00000.parquet``; returns the folder and
    {pixel hash: class index}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    root.mkdir(parents=True)
    labels = {}
    for shard in range(N // PER_SHARD):
        rows = []
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for j in range(PER_SHARD):
                i = shard * PER_SHARD + j
                key = f"{shard:05d}{j:04d}"
                data, h = _image(i, "jpg")
                meta = {"key": key, "url": f"https://example.org/{i}.jpg", "caption": f"a {CLASSES[i % 4]}",
                        "status": "success", "label": CLASSES[i % 4]}
                sink.write({"__key__": key, "jpg": data, "txt": meta["caption"], "json": meta})
                labels[h] = i % 4
                rows.append(meta)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": PER_SHARD, "successes": PER_SHARD, "failed_to_download": 0, "failed_to_resize": 0}))
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
    return str(root), labels


class _Identity:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _epoch(spec: str, world: int, workers: int, skip: int = 0, **kw: object) -> list[list[tuple[bytes, int]]]:
    """Per rank: (pixel hash, label) of what its loader yields in epoch 0 (batch 4) after ``skip`` batches."""
    out = []
    for rank in range(world):
        ds = ShardStream(open_shards(spec, labelled=True, **kw), _Identity(), in_chans=3, seed=0, labelled=True,
                         **kw)
        ds.configure(rank, world, 4, workers)
        ds.use_epoch(0)
        ds.skip_batches(skip)
        out.append([(hashlib.sha1(x.contiguous().numpy()).digest(), int(y)) for b in
                    DataLoader(ds, batch_size=4, num_workers=workers) for x, y in zip(b.image, b.target)])
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCMAE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["webdataset", "img2dataset"])
def test_third_party_shards_every_sample_once_equal_steps_exact_resume(tmp_path: Path, kind: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow")
    spec, labels = (webdataset_shards if kind == "webdataset" else img2dataset_folder)(tmp_path / kind)
    kw = {"label_field": "label"} if kind == "img2dataset" else {}
    assert open_shards(spec, labelled=True, **kw).classes == (list(CLASSES) if kw else ["0", "1", "2", "3"])
    scans = []
    monkeypatch.setattr(shard_index, "scan_shard", lambda *a, **k: scans.append(a) or {})
    for world, workers in [(1, 0), (1, 2), (2, 0), (2, 2)]:
        by_rank = _epoch(spec, world, workers, **kw)
        assert len({len(r) for r in by_rank}) == 1  # equal steps on every rank
        seen = [s for r in by_rank for s in r]
        assert sorted(seen) == sorted(labels.items())  # every sample once, with its own label
        for skip in (1, 2):
            assert _epoch(spec, world, workers, skip, **kw) == [r[4 * skip:] for r in by_rank]
    assert scans == []  # the counts came from the cache (and img2dataset's stats): no second scan
    if kind == "img2dataset":  # unlabelled use takes the stats' successes without reading the tars
        shutil.rmtree(tmp_path / "cache")
        assert open_shards(spec).counts == [PER_SHARD] * (N // PER_SHARD) and scans == []


def test_header_scan_counts_and_remote_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, labels = webdataset_shards(tmp_path / "wds")
    info = shard_index.scan_shard(tmp_path / "wds" / "part-000.tar", labelled=True)
    assert info == {"count": 4, "no_image": 0, "complete": True, "labels": [0, 1, 2, 3], "unlabelled": 0}
    remote = f"pipe:cat {tmp_path / 'wds'}/part-{{000..011}}.tar"
    assert main(["shard", "--index", remote, "-o", str(tmp_path / "idx.json"), "--labels"]) == 0
    assert "indexed 48 samples in 12 shards, 4 classes" in capsys.readouterr().out
    piped = open_shards(remote, str(tmp_path / "idx.json"))
    assert piped.counts == open_shards(spec).counts == [4] * 12
    ds = ShardStream(piped, _Identity(), in_chans=3, labelled=True)
    ds.configure(0, 1, 4, 0)
    assert sorted(hashlib.sha1(x.contiguous().numpy()).digest() for b in DataLoader(ds, batch_size=4)
                  for x in b.image) == sorted(labels)


# ------------------------------------------------------------------------------------------- end to end
TINY = ["model.name=convnextv2_test", "model.in_chans=3", "data.source=webdataset", "data.input_size=64",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false", "run.log_every=1",
        "run.mixed_precision=no", "run.threads=1", "run.batch_size=4"]


def _env(tmp_path: Path) -> dict[str, str]:
    return child_env(FCMAE_CACHE=str(tmp_path / "cache"))


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _two_processes(port: int) -> list[str]:
    """``accelerate launch`` of 2 CPU processes (gloo) on ``port``."""
    accel = str(Path(sys.executable).parent / "accelerate")
    accel = accel if Path(accel).exists() else shutil.which("accelerate")
    return [accel, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)]


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "accelerate").exists() and shutil.which("accelerate") is None,
                    reason="accelerate CLI not installed")
def test_two_process_pretraining_over_shardwriter_shards(tmp_path: Path) -> None:
    spec, _ = webdataset_shards(tmp_path / "wds")
    launcher = _two_processes(29543)
    out = tmp_path / "ddp"
    r = subprocess.run([*launcher, "-m", "fcmae", "pretrain", *TINY, "model.decoder_embed_dim=32", "optim.lr=1e-3",
                        "run.export_every_epochs=0", "run.num_vis_images=2", f"data.path={spec}",
                        "data.num_workers=2", f"run.output_dir={out}"], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    # 12 shards of 4 dealt to 2 ranks x 2 workers: 3 shards = 3 batches per stream, 6 steps per epoch
    assert _steps(out) == list(range(1, 13))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_files"] == 0


@pytest.mark.slow
def test_finetune_from_img2dataset_json_labels(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    spec, _ = img2dataset_folder(tmp_path / "i2d")
    out = tmp_path / "ft"
    r = subprocess.run([sys.executable, "-m", "fcmae", "finetune", *TINY, f"data.train_path={spec}",
                        f"data.val_path={spec}", "data.label_field=label", "data.num_workers=2", "optim.lr=1e-3",
                        "mixup.mixup=0", "mixup.cutmix=0", "data.auto_augment=''", "data.reprob=0",
                        "ema.enabled=false", f"run.output_dir={out}"], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["num_classes"] == 4, summary
    assert _steps(out)[-1] == 2 * 12  # 48 samples in batches of 4 from 2 streams of 24: 12 steps per epoch


@pytest.mark.slow
def test_img2dataset_pretraining_resumes_exactly_after_sigkill_mid_epoch(tmp_path: Path) -> None:
    """1 process, 0 workers (the in-process test above covers the deal for every world x workers): killed after
    step 5 of 12 (checkpoint at step 3, mid-epoch 0), resumed, the weights equal an uninterrupted run's."""
    pytest.importorskip("pyarrow")
    spec, _ = img2dataset_folder(tmp_path / "i2d")
    common = ["pretrain", *TINY, "model.decoder_embed_dim=32", "optim.lr=1e-3", "run.export_every_epochs=0",
              "run.num_vis_images=2", f"data.path={spec}", "data.num_workers=0", "run.save_every_steps=3",
              "run.keep_last=5"]
    ref = subprocess.run([sys.executable, "-m", "fcmae", *common, f"run.output_dir={tmp_path / 'ref'}"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed = kill_and_resume(tmp_path / "run", "pretrain", 5, common[1:], _env(tmp_path), ROOT)
    assert resumed.returncode == 0 and "step_00000003" in resumed.stderr, resumed.stderr[-3000:]
    assert _steps(tmp_path / "ref") == list(range(1, 25))  # 48 samples in batches of 4: 12 steps an epoch
    assert max_weight_diff(tmp_path / "ref", tmp_path / "run") <= 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "accelerate").exists() and shutil.which("accelerate") is None,
                    reason="accelerate CLI not installed")
def test_two_process_finetuning_over_shardwriter_shards_without_workers(tmp_path: Path) -> None:
    spec, _ = webdataset_shards(tmp_path / "wds")
    launcher = _two_processes(29547)
    out = tmp_path / "ft"
    r = subprocess.run([*launcher, "-m", "fcmae", "finetune", *TINY, f"data.train_path={spec}",
                        f"data.val_path={spec}", "data.num_workers=0", "optim.lr=1e-3", "mixup.mixup=0",
                        "mixup.cutmix=0", "data.auto_augment=''", "data.reprob=0", "ema.enabled=false",
                        f"run.output_dir={out}"], env=_env(tmp_path), capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["num_classes"] == 4, summary
    # 12 shards of 4 dealt to 2 ranks x 1 stream: 6 shards = 6 batches per rank and epoch, on both ranks
    assert _steps(out) == list(range(1, 13))
