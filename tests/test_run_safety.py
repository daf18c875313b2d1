"""Nothing a user does by accident loses a run: complete-only resume, no silent overwrites, clean disk errors."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fcmae.cli import main
from fcmae.config import PretrainConfig, load_config
from fcmae.train.pretraining import run_pretraining
from fcmae.weights.checkpoints import MANIFEST, cleanup_partial, find_latest_checkpoint, scan_checkpoints

TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "model.drop_path_rate=0.2", "run.batch_size=4", "run.progress=false",
        "run.log_every=1", "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no",
        "run.threads=1", "run.save_every_steps=2", "run.keep_last=10"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(out: Path, *extra: str) -> dict:
    return run_pretraining(load_config(PretrainConfig, None, [*TINY, f"run.output_dir={out}", *extra]))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _run(out)["steps"] == 8
    return out


def _break(ckpt: Path, how: str) -> None:
    if how == "empty":
        shutil.rmtree(ckpt)
        ckpt.mkdir()
    elif how == "missing_file":
        (ckpt / "optimizer.bin").unlink()
    elif how == "truncated":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("how", ["empty", "missing_file", "truncated"])
def test_resume_auto_skips_partial_checkpoints(tmp_path, reference, how, capsys):
    out = tmp_path / "run"
    _run(out, "run.max_steps=6")
    _break(out / "checkpoints" / "step_00000006", how)
    summary = _run(out, "run.resume=auto")
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000006" in err
    assert "resumed from" in err and "step_00000004" in err
    assert summary["steps"] == 8
    _assert_same_weights(reference, out)


def test_interrupted_resave_leaves_a_usable_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    _run(out, "run.max_steps=6")
    ckpts = out / "checkpoints"
    # the state a kill leaves between "rename the old step_6 aside" and "rename the new one in"
    os.replace(ckpts / "step_00000006", ckpts / ".old_step_00000006")
    shutil.copytree(ckpts / ".old_step_00000006", ckpts / ".tmp_step_00000006")
    (ckpts / ".tmp_step_00000006" / MANIFEST).unlink()
    assert find_latest_checkpoint(ckpts).name == "step_00000004"  # never the partial one
    assert sorted(cleanup_partial(ckpts)) == ["removed the partial checkpoint .tmp_step_00000006",
                                              "restored step_00000006 (its replacement was interrupted)"]
    assert find_latest_checkpoint(ckpts).name == "step_00000006"
    _run(out, "run.resume=auto")
    _assert_same_weights(reference, out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_used_output_folder_is_not_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out)
    before = _snapshot(out)
    argv = ["pretrain", *TINY, f"run.output_dir={out}", "optim.epochs=1"]
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds another run" in lines[0] and "run.overwrite=true" in lines[0]
    assert _snapshot(out) == before  # byte-identical, config.yaml included
    assert main([*argv, "run.overwrite=true"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert "optim:\n  blr" in (out / "config.yaml").read_text() and "epochs: 1\n" in (out / "config.yaml").read_text()


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = []

    def failing(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: a partial file, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", failing)
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, f"run.output_dir={out}"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the run's progress lines come first; the error is one line
    assert "Traceback" not in err and last.startswith("fcmae pretrain: error: cannot write")
    assert "no space left on the disk" in last and "step_00000004" in last, last
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    good, bad = scan_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == ["step_00000002"] and not bad
    assert load_file(str(good[0] / "model.safetensors"))


def test_data_folders_read_regular_files_only(tmp_path):
    from fcmae.data import find_images

    Image.new("L", (40, 40)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.png")  # a reader would block on it forever
    assert [p.name for p in find_images(tmp_path)] == ["a.png"]


def test_visualize_skips_unreadable_images(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "optim.epochs=1", "run.save_every_steps=0")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("L", (70, 70), color=90).save(imgs / "a.png")
    (imgs / "b.png").write_bytes(b"\x89PNG broken")
    assert main(["visualize", str(out), str(imgs), "--out", str(tmp_path / "fig.png")]) == 0
    text = capsys.readouterr().out
    assert "skipped: cannot read image" in text and "b.png" in text and "(1 images" in text


def _disk_bytes(folder: Path) -> int:
    """Bytes a tmpfs needs for ``folder``: whole 4 KiB pages per file."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_real_full_disk_on_a_small_tmpfs(tmp_path, capsys):
    probe = tmp_path / "probe"
    _run(probe, "run.max_steps=2")  # how much one run with one checkpoint needs
    need, ckpt = _disk_bytes(probe), _disk_bytes(probe / "checkpoints")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    size = need + ckpt // 2 + 64 * 1024
    if os.system(f"mount -t tmpfs -o size={size} tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the code path")
    try:
        capsys.readouterr()
        assert main(["pretrain", *TINY, f"run.output_dir={mnt / 'run'}"]) == 1
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and "no space left on the disk" in last and str(mnt) in last, err[-2000:]
        left = sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir())
        assert left == ["step_00000002"], left  # no partial temp checkpoint fills the disk
        assert load_file(str(mnt / "run" / "checkpoints" / "step_00000002" / "model.safetensors"))
    finally:
        os.system(f"umount {mnt}")


def test_resume_from_another_models_checkpoint_and_bad_image_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _run(out, "optim.epochs=1", "run.save_every_steps=0")
    ckpt = find_latest_checkpoint(out / "checkpoints")
    capsys.readouterr()
    code = main(["pretrain", *TINY, "model.name=convnextv2_atto", f"run.output_dir={tmp_path / 'other'}",
                 f"run.resume={ckpt}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fcmae pretrain: error: run.resume: cannot load checkpoint {ckpt}")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.new("L", (64, 64), color=20 * i).save(imgs / f"{i}.png")
    (imgs / "2.png").write_bytes(b"broken")
    for workers in (0, 1):  # a worker process re-raises it wrapped in its own traceback text
        code = main(["pretrain", *TINY, "data.source=folder", f"data.path={imgs}", "data.on_bad_image=error",
                     f"data.num_workers={workers}", f"run.output_dir={tmp_path / f'bad{workers}'}"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert "cannot read image" in err.strip().splitlines()[-1] and "2.png" in err.strip().splitlines()[-1], err
