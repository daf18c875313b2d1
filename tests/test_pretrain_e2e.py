"""End-to-end runs in real subprocesses: SIGKILL + resume equals an uninterrupted run (pretraining and fine-tuning);
2-process DDP (gloo, CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster_tools import child_env
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY = [
    "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1",
    "data.source=demo", "data.input_size=64", "data.limit=32", "data.num_workers=0",
    "optim.lr=1e-3", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.progress=false", "run.log_every=1",
    "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no", "run.threads=1",
]


def _pretrain(out: Path, *overrides: str, env: dict[str, str] | None = None, launcher: list[str] | None = None
              ) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "fcmae", "pretrain", *TINY, f"run.output_dir={out}", *overrides]
    return subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts, f"no checkpoint in {out}"
    return load_file(str(ckpts[-1] / "model.safetensors"))


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["type"] == "train"}


def _jpeg_folder(root: Path, n: int = 32) -> Path:
    """``n`` small photo-like JPEGs of mixed sizes (and one PNG), for the folder input pipeline."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 72 + 8 * (i % 5), 96 - 8 * (i % 3)
        img = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
        img.save(root / (f"{i:03d}.png" if i == 5 else f"{i:03d}.jpg"), quality=90)
    return root


@pytest.mark.parametrize("source", ["demo", "folder"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, source):
    """Also over a folder of JPEGs through the full input pipeline (batched fetch, crops from the headers, decode
    in a DataLoader worker)."""
    common = ["run.batch_size=4", "run.save_every_steps=3", "model.drop_path_rate=0.2", "run.keep_last=3"]
    if source == "folder":
        common += ["data.source=folder", f"data.path={_jpeg_folder(tmp_path / 'photos')}", "data.num_workers=1"]
    ref = _pretrain(tmp_path / "ref", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]

    crash = [sys.executable, str(ROOT / "tests" / "crash_run.py"), "pretrain", "7", *TINY, *common,
             f"run.output_dir={tmp_path / 'run'}"]
    crashed = subprocess.run(crash, env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names[-1] == "step_00000006", names  # killed during step 7: the step-6 checkpoint is the newest
    resumed = _pretrain(tmp_path / "run", *common, "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a, b = _final_weights(tmp_path / "ref"), _final_weights(tmp_path / "run")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    la, lb = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert max(la) == max(lb) == 16
    for step in range(8, 17):  # steps after the resume point match too
        assert abs(la[step] - lb[step]) <= 1e-6 * abs(la[step]), step
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "reconstruction.png").is_file() and (tmp_path / "run" / "encoder.safetensors").is_file()

    # `fcmae visualize` on arbitrary image files with the finished run
    from PIL import Image

    from fcmae.cli import main

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("L", (80, 70), color=40 + 100 * i).save(tmp_path / "imgs" / f"{i}.png")
    fig = tmp_path / "fig.png"
    assert main(["visualize", str(tmp_path / "run"), str(tmp_path / "imgs"), "--out", str(fig)]) == 0
    with Image.open(fig) as im:
        assert im.width > im.height  # 4 columns, 2 rows


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_process_ddp_matches_single_process(tmp_path):
    accel = str(Path(sys.executable).parent / "accelerate")
    if not Path(accel).exists():
        accel = shutil.which("accelerate")
    single = _pretrain(tmp_path / "single", "run.batch_size=8", "run.max_steps=5")
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [accel, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    ddp = _pretrain(tmp_path / "ddp", "run.batch_size=4", "run.max_steps=5", launcher=launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stderr
    ls, ld = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert sorted(ls) == sorted(ld) == [1, 2, 3, 4, 5]
    for step in ls:
        assert abs(ls[step] - ld[step]) <= 1e-4 * abs(ls[step]), (step, ls[step], ld[step])


def test_finetune_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from test_finetune import _image_folder

    _image_folder(tmp_path / "data" / "train", 6)
    _image_folder(tmp_path / "data" / "val", 2, seed=1)
    common = [
        "model.name=convnextv2_test", "model.in_chans=1", "data.source=folder", "data.input_size=32",
        f"data.train_path={tmp_path / 'data' / 'train'}", f"data.val_path={tmp_path / 'data' / 'val'}",
        "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=3", "optim.warmup_epochs=0.5", "optim.layer_decay=0.8",
        "optim.layer_decay_type=single", "mixup.mixup=0.8", "mixup.cutmix=1.0", "model.drop_path_rate=0.2",
        "ema.decay=0.9", "run.batch_size=4", "run.progress=false", "run.log_every=1", "run.mixed_precision=no",
        "run.threads=1", "run.save_every_steps=2", "run.keep_last=3"]

    def run(out: str, *extra: str, kill: int | None = None) -> subprocess.CompletedProcess:
        if kill is None:
            cmd = [sys.executable, "-m", "fcmae", "finetune", *common, f"run.output_dir={tmp_path / out}", *extra]
        else:
            cmd = [sys.executable, str(ROOT / "tests" / "crash_run.py"), "finetune", str(kill), *common,
                   f"run.output_dir={tmp_path / out}", *extra]
        return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)

    ref = run("ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = run("run", kill=7)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    resumed = run("run", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000006" in resumed.stderr
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "run" / name))
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert worst <= 1e-6, (name, worst)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] == 12 and abs(sa["best_top1"] - sb["best_top1"]) < 1e-9
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r and "step" in r]
    assert steps == sorted(set(steps)) == list(range(1, 13))  # no step logged twice after the resume
