"""Experiment trackers through accelerate (``run.log_with``): what TensorBoard, Weights & Biases (offline) and MLflow
(local file store) received, read back with each tool's own reader, against metrics.jsonl: the same train records at
the same steps, the summary, the config as hyperparameters and the reconstruction figure at each export, also across
a resume after a SIGKILL (the same tracker run continues; the replayed steps replace the lost ones)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_tools import child_env

from fcmae.train.tracking import hyperparameters, scalars

ROOT = Path(__file__).resolve().parent.parent
TRACKERS = [n for n, mod in [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")]
            if importlib.util.find_spec(mod) is not None]
# 16 images, batch 4: 4 steps an epoch, 8 in all; a checkpoint and an export at every epoch end (steps 4 and 8)
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "run.batch_size=4", "run.progress=false", "run.log_every=1",
        "run.export_every_epochs=1", "run.num_vis_images=2", "run.mixed_precision=no", "run.threads=1",
        "run.project=fcmae-test", "run.run_name=tiny"]


def _env() -> dict[str, str]:
    return child_env(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI="")


def test_records_become_step_scalars_and_the_config_flat_hyperparameters():
    assert scalars({"type": "train", "step": 3, "loss": 0.5, "lr": 1e-3, "timestamp": 1.0, "note": "x"}) == (
        3, {"train/loss": 0.5, "train/lr": 1e-3})
    assert scalars({"type": "interrupted", "step": 7, "signal": "SIGTERM", "stop_s": None, "time_s": 2.0}) == (
        7, {"interrupted/time_s": 2.0})
    assert scalars({"type": "summary", "summary": {"steps": 8, "final_loss": 0.25, "status": "finished"}}) == (
        8, {"summary/steps": 8.0, "summary/final_loss": 0.25})
    assert hyperparameters({"model": {"name": "atto", "drop": 0.1}, "optim": {"betas": [0.9, 0.95], "lr": None}}) == {
        "model.name": "atto", "model.drop": 0.1, "optim.betas": "[0.9, 0.95]", "optim.lr": "null"}


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_torch(tmp_path, monkeypatch):
    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.preflight import PreflightError, preflight

    cfg = load_config(PretrainConfig, "demo", ["run.log_with=wandb,tensorboard", f"run.output_dir={tmp_path / 'o'}"])
    assert cfg.run.log_with == ["wandb", "tensorboard"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PreflightError, match="run.log_with: wandb is not installed"):
        preflight(cfg)
    from fcmae.config import ConfigError

    with pytest.raises(ConfigError, match="run.log_with"):
        load_config(PretrainConfig, "demo", ["run.log_with=[tensorbored]"])
    assert load_config(PretrainConfig, "demo", ["run.log_with=none"]).run.log_with == []


# ---------------------------------------------------------------------------------------------- readers
def _wandb_records(path: Path):
    """The records of a W&B offline run file (``run-ID.wandb``: a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb(out: Path) -> tuple[dict[str, dict[int, float]], dict[str, object], list[str]]:
    """Scalars by key and step (a later segment's value replaces an earlier one), config, run ids of every file."""
    series: dict[str, dict[int, float]] = {}
    config: dict[str, object] = {}
    ids = []
    for f in sorted((out / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")):
        ids.append(f.stem[len("run-"):])
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in items.items():
                    if not k.startswith("_"):
                        series.setdefault(k, {})[int(items["_step"])] = v
    return series, config, ids


def _tensorboard(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "trackers" / "fcmae-test"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=(out / "trackers" / "mlruns").as_uri())


# ---------------------------------------------------------------------------------------------- end to end
def _run(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not TRACKERS, reason="no tracker installed (pip install 'fcmae[trackers]')")
def test_trackers_receive_the_records_and_figures_across_a_resume(tmp_path):
    """Three segments: stopped by SIGTERM after step 3 (trackers closed), resumed and SIGKILLed after step 7 (the
    checkpoint is at step 4: steps 5-7 are lost), resumed to the end."""
    out = tmp_path / "run"
    common = [*TINY, f"run.log_with=[{','.join(TRACKERS)}]", f"run.output_dir={out}"]
    first = _run(tmp_path, [str(ROOT / "tests" / "signal_run.py"), "pretrain", "SIGTERM@3", *common])
    assert first.returncode == 143, first.stderr[-3000:]
    ids = json.loads((out / "tracking.json").read_text())
    if "mlflow" in TRACKERS:  # closed on the interruption, not left running
        assert _mlflow(out).get_run(ids["mlflow"]["run_id"]).info.status == "FINISHED"
    crash = _run(tmp_path, [str(ROOT / "tests" / "crash_run.py"), "pretrain", "7", *common, "run.resume=auto"])
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    last = _run(tmp_path, ["-m", "fcmae", "pretrain", *common, "run.resume=auto"])
    assert last.returncode == 0, last.stderr[-3000:]
    assert json.loads((out / "tracking.json").read_text()) == ids  # the same tracker runs continued

    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in recs if r["type"] == "train"}
    assert sorted(train) == list(range(1, 9))  # steps 5-7 were lost with the kill and trained again
    summary = json.loads((out / "summary.json").read_text())
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["reconstruction_step00000004.png", "reconstruction_step00000008.png"]
    if "tensorboard" in TRACKERS:
        _check_tensorboard(out, train, summary)
    if "wandb" in TRACKERS:
        _check_wandb(out, ids, train, summary)
    if "mlflow" in TRACKERS:
        _check_mlflow(out, ids, train)


def _check_tensorboard(out: Path, train: dict[int, float], summary: dict) -> None:
    acc = _tensorboard(out)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))  # each step once: purge_step dropped the lost 5-7
    assert [e.value for e in loss] == pytest.approx([train[s] for s in range(1, 9)], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/lr")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("interrupted/time_s")] == [3]
    assert acc.Scalars("summary/final_loss")[-1].value == pytest.approx(summary["final_loss"], rel=1e-6)
    assert [e.step for e in acc.Images("reconstruction")] == [4, 8]
    assert all(e.width > 100 and e.height > 100 for e in acc.Images("reconstruction"))
    assert list((out / "trackers" / "fcmae-test").glob("*/hparams.yml"))  # the config, as hyperparameters


def _check_wandb(out: Path, ids: dict, train: dict[int, float], summary: dict) -> None:
    series, config, run_ids = _wandb(out)
    assert run_ids == [ids["wandb"]["id"]] * 3  # one W&B run in three segments (`wandb sync` joins them)
    got = series["train/loss"]
    # W&B's writer (wandb-core) dies with a SIGKILLed process before writing what it was sent: of the killed
    # segment it may keep nothing (step 4 was trained only there); the closed segments are all there
    assert {1, 2, 3, 5, 6, 7, 8} <= set(got) <= set(range(1, 9))
    assert [got[s] for s in sorted(got)] == pytest.approx([train[s] for s in sorted(got)], rel=1e-9)
    assert 3 in series["interrupted/time_s"]
    assert series["summary/final_loss"][8] == pytest.approx(summary["final_loss"], rel=1e-9)
    assert 8 in series["reconstruction/_type"] and set(series["reconstruction/_type"]) <= {4, 8}
    assert config["model.name"] == "convnextv2_test" and config["run.batch_size"] == 4


def _check_mlflow(out: Path, ids: dict, train: dict[int, float]) -> None:
    client = _mlflow(out)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.run_name == "tiny" and run.data.params["model.name"] == "convnextv2_test"
    assert run.info.status == "FINISHED"
    last = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp):
        last[m.step] = m.value  # MLflow keeps the lost steps' values too; the replayed ones come last
    assert sorted(last) == list(range(1, 9))
    assert [last[s] for s in range(1, 9)] == pytest.approx([train[s] for s in range(1, 9)], rel=1e-9)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert steps == [4, 8], images
