"""WebDataset shards: ``fcmae shard`` writes them; the stream deals them to processes and workers (every sample once
per epoch, equal batches per rank, seeded order); 2-process DDP pretraining, fine-tuning and an exact mid-epoch
resume from shards."""

from __future__ import annotations

import hashlib
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
from fcmae.data.shards import ShardStream, open_shards

ROOT = Path(__file__).resolve().parent.parent


def _class_folders(root: Path, classes: int = 4, per_class: int = 16, size: int = 40, seed: int = 0) -> list[bytes]:
    """Random RGB images in class folders (JPEG and PNG); returns the hash of every image's pixels."""
    rng = np.random.default_rng(seed)
    hashes = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            a[..., c % 3] //= 2  # a little class signal
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")  # PNG: lossless, pixels hash exactly
            hashes.append(hashlib.sha1(torch.from_numpy(a).permute(2, 0, 1).contiguous().numpy()).digest())
    return hashes


class _Identity:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _seen(shards: Path, epoch: int, world: int, workers: int, skip: int = 0) -> list[list[bytes]]:
    """Hashes of the decoded images each rank's loader yields in ``epoch`` (batch 4), after skipping ``skip``
    batches (a resume)."""
    out = []
    for rank in range(world):
        ds = ShardStream(open_shards(str(shards)), _Identity(), in_chans=3, seed=0, labelled=True)
        ds.configure(rank, world, 4, workers)
        ds.use_epoch(epoch)
        ds.skip_batches(skip)
        loader = DataLoader(ds, batch_size=4, num_workers=workers)
        out.append([hashlib.sha1(x.contiguous().numpy()).digest() for b in loader for x in b.image])
        assert len(out[-1]) == len(ds) - 4 * skip
    return out


def test_shard_command_and_the_deal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hashes = _class_folders(tmp_path / "src")
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "shards"), "--max-count", "8", "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "wrote 64 images into 8 shards, 4 classes" in capsys.readouterr().out
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [8] * 8 and index["classes"] == [f"class{c}" for c in range(4)]
    for world, workers in [(1, 0), (2, 0), (2, 2)]:
        by_rank = _seen(tmp_path / "shards", 0, world, workers)
        assert len({len(r) for r in by_rank}) == 1  # equal steps on every rank
        flat = [h for r in by_rank for h in r]
        assert sorted(flat) == sorted(hashes)  # every sample exactly once per epoch, across ranks
    assert _seen(tmp_path / "shards", 0, 2, 2) == by_rank  # seeded: the same order again
    assert _seen(tmp_path / "shards", 1, 2, 2) != by_rank  # another epoch, another order
    for skip in (1, 3, 4):  # a resumed epoch continues exactly where it stopped
        assert _seen(tmp_path / "shards", 0, 2, 2, skip) == [r[4 * skip:] for r in by_rank]
    # a used folder is refused in one line
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "shards"), "--no-progress"]) == 1
    assert "already holds shards" in capsys.readouterr().err


def test_bad_specs_are_one_line_errors(tmp_path: Path) -> None:
    from fcmae.data.images import DataError

    with pytest.raises(DataError, match="no .tar shards"):
        open_shards(str(tmp_path))
    with pytest.raises(DataError, match="2 of 2 shard file"):
        open_shards(str(tmp_path / "s-{0..1}.tar"))
    (tmp_path / "a.tar").write_bytes(b"")  # no index.json: sized from its headers, which hold nothing
    with pytest.raises(DataError, match="hold no image samples"):
        open_shards(str(tmp_path))
    with pytest.raises(DataError, match="fcmae shard --index"):  # remote shards are sized by an index written once
        open_shards("pipe:cat /nowhere/s-{0..1}.tar")
    _class_folders(tmp_path / "src", classes=1, per_class=4)
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "s"), "--max-count", "2", "--no-progress"]) == 0
    ds = ShardStream(open_shards(str(tmp_path / "s")), _Identity(), in_chans=3)
    with pytest.raises(DataError, match="2 shards cannot feed 3 process"):
        ds.configure(0, 3, 1, 2)
    # fewer shards than processes x workers: the workers are capped to what the shards feed, with a note
    assert ds.configure(0, 2, 1, 2) == "2 shards feed at most 1 data worker(s) per process: data.num_workers 2 -> 1"
    assert ds.num_workers == 1 and ds.configure(0, 1, 1, 2) is None and ds.num_workers == 2


# ------------------------------------------------------------------------------------------- training from shards
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=3", "data.source=webdataset",
        "data.input_size=64", "optim.lr=1e-3", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false",
        "run.log_every=1", "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no",
        "run.threads=1", "run.batch_size=4"]


def _shards(tmp_path: Path, per_class: int = 16) -> Path:
    _class_folders(tmp_path / "src", per_class=per_class)
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "shards"), "--max-count", "8", "--no-progress"]) == 0
    return tmp_path / "shards"


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_resume_mid_epoch_from_shards_equals_uninterrupted(tmp_path: Path) -> None:
    shards = _shards(tmp_path)
    common = [*TINY, f"data.path={shards}", "data.num_workers=2", "run.save_every_steps=3", "run.keep_last=5"]
    ref = subprocess.run([sys.executable, "-m", "fcmae", "pretrain", *common, f"run.output_dir={tmp_path / 'ref'}"],
                         env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _steps(tmp_path / "ref") == list(range(1, 33))  # 64 samples / batch 4, 2 epochs
    resumed = kill_and_resume(tmp_path / "run", "pretrain", 11, common, child_env(), ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000009" in resumed.stderr  # mid-epoch 0 (16 steps per epoch)
    assert max_weight_diff(tmp_path / "ref", tmp_path / "run") <= 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sys.executable).parent / "accelerate").exists() and shutil.which("accelerate") is None,
                    reason="accelerate CLI not installed")
def test_two_process_ddp_pretraining_over_shards(tmp_path: Path) -> None:
    shards = _shards(tmp_path)
    accel = str(Path(sys.executable).parent / "accelerate")
    accel = accel if Path(accel).exists() else shutil.which("accelerate")
    launcher = [accel, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", "29519"]
    out = tmp_path / "ddp"
    ddp = subprocess.run([*launcher, "-m", "fcmae", "pretrain", *TINY, f"data.path={shards}", "data.num_workers=0",
                          f"run.output_dir={out}"], env=child_env(), capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr
    # 8 shards of 8 dealt to 2 ranks: 32 samples = 8 batches of 4 per rank and epoch, the same on both ranks
    assert _steps(out) == list(range(1, 17))
    assert json.loads((out / "summary.json").read_text())["steps"] == 16


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed")
def test_finetune_from_shards_matches_folders(tmp_path: Path) -> None:
    """The same small Fashion-MNIST subset from class folders and from shards: the same accuracy band."""
    from fcmae.data.fashion_mnist import load_fashion_mnist_arrays

    for split, n in (("train", 40), ("test", 20)):
        x, y = load_fashion_mnist_arrays(split=split)
        for c in range(10):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in np.flatnonzero(y == c)[:n]:
                Image.fromarray(x[i]).save(tmp_path / split / f"c{c}" / f"{i}.png")
        assert main(["shard", str(tmp_path / split), str(tmp_path / f"{split}_shards"), "--max-count", "150",
                     "--no-progress"]) == 0
    common = ["model.name=convnextv2_test", "model.in_chans=1", "data.input_size=32", "data.num_workers=0",
              "optim.lr=2e-3", "optim.epochs=5", "optim.warmup_epochs=1", "mixup.mixup=0", "mixup.cutmix=0",
              "data.auto_augment=''", "data.reprob=0", "ema.enabled=false", "run.batch_size=20", "run.progress=false",
              "run.mixed_precision=no", "run.threads=2"]
    tops = {}
    for source, train, val in (("folder", tmp_path / "train", tmp_path / "test"),
                               ("webdataset", tmp_path / "train_shards", tmp_path / "test_shards")):
        out = tmp_path / source
        r = subprocess.run([sys.executable, "-m", "fcmae", "finetune", *common, f"data.source={source}",
                            f"data.train_path={train}", f"data.val_path={val}", f"run.output_dir={out}"],
                           env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        tops[source] = summary["val_top1"]
    assert all(t > 35 for t in tops.values()), tops  # learnt something (chance: 10 %)
    assert abs(tops["folder"] - tops["webdataset"]) <= 15, tops


@pytest.mark.slow
def test_shard_example_runs_with_the_config_default_workers(tmp_path: Path) -> None:
    """The README's shard example with the atto config as shipped (data.num_workers 10) over 5 shards: the workers
    are capped to the 5 the shards feed, one line says so, and the run trains."""
    _class_folders(tmp_path / "src", classes=1, per_class=10)
    assert main(["shard", str(tmp_path / "src"), str(tmp_path / "shards"), "--max-count", "2", "--no-progress"]) == 0
    small = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "data.input_size=64", "run.batch_size=2",
             "run.accum_iter=1", "optim.steps=1", "optim.warmup_steps=0", "run.progress=false",
             "run.export_every_epochs=0", "run.num_vis_images=2", "run.threads=1"]
    r = subprocess.run([sys.executable, "-m", "fcmae", "pretrain", "pretrain/convnextv2_atto", "data.source=webdataset",
                        f"data.path={tmp_path / 'shards'}", *small, f"run.output_dir={tmp_path / 'run'}"],
                       env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 shards feed at most 5 data worker(s) per process: data.num_workers 10 -> 5" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


def test_shard_prints_plain_lines_when_not_on_a_terminal(tmp_path: Path) -> None:
    """Into a log or a pipe: one plain line per shard written, no progress bar and no carriage return."""
    _class_folders(tmp_path / "src", classes=2, per_class=8)
    r = subprocess.run([sys.executable, "-m", "fcmae", "shard", str(tmp_path / "src"), str(tmp_path / "s"),
                        "--max-count", "8"], env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\r" not in r.stdout
    assert r.stderr.splitlines() == ["shards: shard-000000.tar written, 8/16 images",
                                     "shards: shard-000001.tar written, 16/16 images"]
