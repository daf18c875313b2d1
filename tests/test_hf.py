"""``data.source=hf`` and ``hf_stream``: a Hugging Face parquet dataset made here with ``datasets`` (JPEG bytes in
the ``Image`` feature, ``ClassLabel`` labels: the layout of the Hub's ImageNet-1k), map-style and streamed, trains,
resumes exactly after SIGKILL mid-epoch, fine-tunes to the accuracy of the same images from folders, and an
unreadable parquet file is left out with one line (or stops the run with one line); streamed rows are dealt like
shards (every row once per epoch, equal steps per rank, exact skips)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from cluster_tools import child_env  # noqa: E402
from crash_run import kill_and_resume, max_weight_diff  # noqa: E402
from test_bad_data import MAX_WORKERS, _one_line_error, _run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def hf_parquet(root: Path, images: list[bytes], labels: list[int], classes: list[str], split: str = "train",
               files: int = 2) -> Path:
    """``root/{split}-0000k-of-0000n.parquet`` written by ``datasets`` (``Image`` and ``ClassLabel`` features)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                                     "label": labels}, features=features)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        ds.shard(files, k, contiguous=True).to_parquet(str(root / f"{split}-{k:05d}-of-{files:05d}.parquet"))
    return root


def _random_set(root: Path, n: int = 48, files: int = 4) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(0)
    images = [_jpeg(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return hf_parquet(root, images, [i % 4 for i in range(n)], ["a", "b", "c", "d"], files=files), images


def test_rows_every_one_once_per_epoch_with_labels_and_an_unreadable_file(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from fcmae.config import FinetuneConfig
    from fcmae.data import build_finetune_data
    from fcmae.data.images import BadImageError
    from fcmae.data.sampling import EpochSampler

    root, images = _random_set(tmp_path / "hf")
    cfg = OmegaConf.structured(FinetuneConfig).data
    cfg.source, cfg.path, cfg.input_size, cfg.auto_augment = "hf", str(root), 32, ""
    data = build_finetune_data(cfg, 3, seed=0)
    assert data.classes == ["a", "b", "c", "d"] and len(data.train) == 48 and len(data.val) == 48  # (no split names)
    order = list(EpochSampler(48, seed=0))
    assert sorted(order) == list(range(48))
    labels = [int(data.train[i].target) for i in order]
    assert labels == [i % 4 for i in order]  # every row once, with its own label
    # a damaged parquet file: left out with one line, counted (unreadable) on row 0, once per epoch
    (root / "train-00001-of-00004.parquet").write_bytes(b"PAR1 not a parquet file at all PAR1")
    data = build_finetune_data(cfg, 3, seed=0)
    assert len(data.train) == 36
    assert data.train[0].skipped.tolist() == [0, 0, 0, 0, 1] and data.train[1].skipped.sum() == 0
    cfg.on_bad_image = "error"
    with pytest.raises(BadImageError, match="parquet file .*train-00001-of-00004.parquet is unreadable"):
        build_finetune_data(cfg, 3, seed=0)


class _Identity:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _streamed_epoch(root: Path, world: int, workers: int, skip: int = 0, on_bad: str = "skip"
                    ) -> list[list[tuple[bytes, int, int]]]:
    """Per rank: (pixel hash, label, skipped) of what ``data.source=hf_stream``'s loader yields in epoch 0
    (batch 4) after ``skip`` batches."""
    from torch.utils.data import DataLoader

    from fcmae.data.hf_stream import ParquetSet, RowStream

    out = []
    for rank in range(world):
        ds = RowStream(ParquetSet(str(root), "train", "image", "label", on_bad), _Identity(), in_chans=3, seed=0,
                       labelled=True, on_bad_image=on_bad)
        ds.configure(rank, world, 4, workers)
        ds.use_epoch(0)
        ds.skip_batches(skip)
        out.append([(hashlib.sha1(x.contiguous().numpy()).digest(), int(y), int(k.sum())) for b in
                    DataLoader(ds, batch_size=4, num_workers=workers) for x, y, k in zip(b.image, b.target, b.skipped)])
    return out


def test_streamed_rows_every_one_once_equal_steps_exact_resume_and_a_left_out_file(tmp_path: Path) -> None:
    from fcmae.data.decode import decode_bytes
    from fcmae.data.images import BadImageError

    root, images = _random_set(tmp_path / "hf")  # 48 rows in 4 files of 12
    expected = sorted((hashlib.sha1(decode_bytes(b, 3).contiguous().numpy()).digest(), i % 4, 0)
                      for i, b in enumerate(images))
    for world, workers in [(1, 0), (1, 2), (2, 0), (2, 2)]:
        by_rank = _streamed_epoch(root, world, workers)
        assert len({len(r) for r in by_rank}) == 1  # equal steps on every rank
        assert sorted(s for r in by_rank for s in r) == expected  # every row once, with its own label
        for skip in (1, 3):
            assert _streamed_epoch(root, world, workers, skip) == [r[4 * skip:] for r in by_rank]
    # a file whose footer does not read: left out with one line, counted once per epoch (stream 0's first sample)
    (root / "train-00001-of-00004.parquet").write_bytes(b"PAR1 not a parquet file at all PAR1")
    (run,) = _streamed_epoch(root, 1, 2)  # 3 files of 12 dealt to 2 streams: the smaller (12) sets 3 batches each
    assert len(run) == 24 and [s[2] for s in run].count(1) == 1 and sum(s[2] for s in run) == 1
    with pytest.raises(BadImageError, match="parquet file .*train-00001-of-00004.parquet is unreadable"):
        _streamed_epoch(root, 1, 0, on_bad="error")


# ------------------------------------------------------------------------------------------- end to end
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=3", "data.source=hf",
        "data.input_size=64", "optim.lr=1e-3", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false",
        "run.log_every=1", "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no",
        "run.threads=1", "run.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "hf_stream"])
def test_pretrain_resumes_exactly_after_sigkill_mid_epoch(tmp_path: Path, source: str) -> None:
    root, _ = _random_set(tmp_path / "hf", n=32)  # streamed: 4 files of 8 dealt to 2 workers, 8 steps an epoch too
    common = [*TINY, f"data.source={source}", f"data.path={root}", "data.num_workers=2", "run.save_every_steps=3",
              "run.keep_last=5"]
    ref = subprocess.run([sys.executable, "-m", "fcmae", "pretrain", *common, f"run.output_dir={tmp_path / 'ref'}"],
                         env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed = kill_and_resume(tmp_path / "run", "pretrain", 5, common, child_env(), ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000003" in resumed.stderr  # mid-epoch 0 (8 steps per epoch)
    assert max_weight_diff(tmp_path / "ref", tmp_path / "run") <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("source, steps", [("hf", 9), ("hf_stream", 6)])
def test_an_unreadable_parquet_file_is_one_line_and_bounded(tmp_path: Path, source: str, steps: int) -> None:
    """48 rows in 4 files, one unreadable: map-style 36 rows = 9 batches; streamed, 3 files dealt to 2 workers,
    the smaller stream (12 rows) sets 3 batches each, 6 steps."""
    root, _ = _random_set(tmp_path / "hf")
    (root / "train-00002-of-00004.parquet").write_bytes(b"garbage")
    rc, err, workers, _ = _run(tmp_path, root, f"data.source={source}", "data.max_skipped_fraction=0.1")
    assert rc == 0 and workers <= MAX_WORKERS, err[-3000:]
    summary = json.loads(sorted(tmp_path.glob("run*/summary.json"))[-1].read_text())
    assert summary["skipped"]["unreadable"] == 2 and summary["steps"] == 2 * steps, summary
    assert "train-00002-of-00004.parquet is unreadable" in err
    rc, err, workers, _ = _run(tmp_path, root, f"data.source={source}", "data.on_bad_image=error")
    assert rc == 1 and workers <= MAX_WORKERS
    _one_line_error(err, "train-00002-of-00004.parquet is unreadable", "data.on_bad_image=error")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_finetune_from_hf_parquet_matches_folders(tmp_path: Path) -> None:
    """The same Fashion-MNIST JPEGs from class folders and from HF parquet, map-style and streamed: the same
    accuracy band."""
    from fcmae.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays

    for split, hf_split, n in (("train", "train", 40), ("test", "validation", 20)):
        x, y = load_fashion_mnist_arrays(split=split)
        images, labels = [], []
        for c in range(10):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in np.flatnonzero(y == c)[:n]:
                data = _jpeg(x[i])
                (tmp_path / split / f"c{c}" / f"{i}.jpg").write_bytes(data)
                images.append(data)
                labels.append(c)
        hf_parquet(tmp_path / "hf", images, labels, list(FASHION_MNIST_CLASSES), split=hf_split)
    common = ["model.name=convnextv2_test", "model.in_chans=1", "data.input_size=32", "data.num_workers=0",
              "optim.lr=2e-3", "optim.epochs=5", "optim.warmup_epochs=1", "mixup.mixup=0", "mixup.cutmix=0",
              "data.auto_augment=''", "data.reprob=0", "ema.enabled=false", "run.batch_size=20", "run.progress=false",
              "run.mixed_precision=no", "run.threads=2"]
    tops = {}
    for source, paths in (("folder", [f"data.train_path={tmp_path / 'train'}", f"data.val_path={tmp_path / 'test'}"]),
                          ("hf", [f"data.path={tmp_path / 'hf'}"]),
                          ("hf_stream", [f"data.path={tmp_path / 'hf'}"])):
        out = tmp_path / source
        r = subprocess.run([sys.executable, "-m", "fcmae", "finetune", *common, f"data.source={source}", *paths,
                            f"run.output_dir={out}"], env=child_env(), capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        tops[source] = json.loads((out / "summary.json").read_text())["val_top1"]
    assert all(t > 35 for t in tops.values()), tops  # learnt something (chance: 10 %)
    assert abs(tops["folder"] - tops["hf"]) <= 10 and abs(tops["folder"] - tops["hf_stream"]) <= 10, tops


def test_torch_is_not_needed_to_validate_an_hf_config() -> None:
    code = ("import sys; from fcmae.config import PretrainConfig; c = PretrainConfig(); c.data.source = 'hf'; "
            "c.data.path = 'x'; c.validate(); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr[-2000:]
    assert torch.__version__  # (this process imported it; the child did not)
