"""Runs that survive a cluster: a signal stops a run with a checkpoint (one line, exit 143/130) and the resumed run
equals an uninterrupted one; one run per folder (an OS lock); resume refuses a config that changes what is trained;
checkpoints are content-verified (``fcmae verify``); a finished run stays finished; strict JSON; mask checks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster_tools import child_env
from safetensors.torch import load_file
from test_run_safety import TINY, _restore_threads  # noqa: F401  (the same tiny run; its autouse fixture)

from fcmae.cli import main
from fcmae.commands._common import run_guarded
from fcmae.config import FinetuneConfig, PretrainConfig, load_config
from fcmae.train.finetuning import run_finetuning
from fcmae.train.pretraining import run_pretraining
from fcmae.train.rundir import HISTORY, LOCK_NAME, RunLock
from fcmae.weights.checkpoints import MANIFEST, checkpoint_status, find_latest_checkpoint, scan_checkpoints
from fcmae.weights.files import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent


def _pre(out: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY, f"run.output_dir={out}", *extra])


def _kill_at(step: int, sig: int):
    """A step hook that signals this process right after optimizer step ``step`` (as a scheduler would)."""
    return lambda ctx: os.kill(os.getpid(), sig) if ctx.state.step == step else None


def _guarded(kind: str, cfg, *hooks) -> int:
    run = run_pretraining if kind == "pretrain" else run_finetuning
    return run_guarded(kind, lambda: run(cfg, hooks=list(hooks)) and 0)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _ckpt_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _strict(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def pre_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "ref"
    assert run_pretraining(_pre(out))["steps"] == 8
    return out


# ------------------------------------------------------------------------------------------- signals
def test_sigterm_then_sigint_stop_pretraining_and_resume_equals_uninterrupted(tmp_path, pre_ref, capsys):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert _guarded("pretrain", _pre(out), _kill_at(3, signal.SIGTERM)) == 143
    err = capsys.readouterr().err
    line = _last_line(err)
    assert line.startswith("fcmae pretrain: stopped by SIGTERM after step 3: checkpoint ") and "Traceback" not in err
    assert str(out / "checkpoints" / "step_00000003") in line and "run.resume=auto" in line
    assert err.count("stopped by") == 1
    assert checkpoint_status(out / "checkpoints" / "step_00000003") == ("ok", None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stop = next(r for r in reversed(records) if r["type"] == "interrupted")
    assert records[-1]["type"] == "summary" and records[-1]["summary"]["status"] == "interrupted"
    assert stop["signal"] == "SIGTERM" and stop["step"] == 3 and stop["stop_s"] < 30, stop
    print(f"SIGTERM stop: {stop['stop_s']:.3f} s from the signal to the checkpoint; {time.perf_counter() - t0:.1f} s")
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]

    assert _guarded("pretrain", _pre(out, "run.resume=auto"), _kill_at(5, signal.SIGINT)) == 130
    err = capsys.readouterr().err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert _last_line(err).startswith("fcmae pretrain: stopped by SIGINT after step 5: checkpoint ")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == handlers  # restored

    assert run_pretraining(_pre(out, "run.resume=auto"))["steps"] == 8
    assert "resumed from" in capsys.readouterr().err
    assert _max_diff(_ckpt_weights(pre_ref), _ckpt_weights(out)) <= 1e-6
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9))  # every step logged once over the three segments
    history = [json.loads(x) for x in (out / HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 5] and all(h["changed"] == {} for h in history)


@pytest.mark.parametrize("first,second,late", [("SIGTERM", "SIGTERM", True), ("SIGINT", "SIGINT", False),
                                               ("SIGINT", "SIGINT", True), ("SIGTERM", "SIGINT", True)])
def test_a_repeated_stop_signal_never_aborts_the_save_but_a_second_ctrl_c_does(tmp_path, pre_ref, capsys,
                                                                                 monkeypatch, first, second, late):
    """A launcher forwards the scheduler's SIGTERM (and a terminal's Ctrl-C) to the ranks once more, milliseconds
    later: that repeat must not cost the stop's checkpoint. Only a user's second Ctrl-C (a SIGINT later than
    ``ECHO_S`` after the first) aborts, and then nothing half-written is ever resumed from."""
    from accelerate import Accelerator

    from fcmae.train import stopping

    real = Accelerator.save_state
    if late:  # every repeat counts as late: what a user pressing Ctrl-C again after a second does
        monkeypatch.setattr(stopping, "ECHO_S", -1.0)

    def interrupted_save(self, output_dir=None, **kw):
        if "step_00000003" in str(output_dir):  # the stop's save: half-written when the second signal comes
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), getattr(signal, second))
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", interrupted_save)
    out = tmp_path / "run"
    aborts = second == "SIGINT" and late
    status = 130 if first == "SIGINT" or aborts else 143  # an abort is the user's Ctrl-C
    assert _guarded("pretrain", _pre(out), _kill_at(3, getattr(signal, first))) == status
    line = _last_line(capsys.readouterr().err)
    good, bad = scan_checkpoints(out / "checkpoints", content=True)
    assert not bad  # a partial save is invisible
    monkeypatch.setattr(Accelerator, "save_state", real)
    if not aborts:
        assert line.startswith(f"fcmae pretrain: stopped by {first} after step 3: checkpoint "), line
        assert [p.name for p in good] == ["step_00000002", "step_00000003"]
    else:
        assert line.startswith(f"fcmae pretrain: aborted by a second {second}") and "step_00000002" in line, line
        assert [p.name for p in good] == ["step_00000002"]
    run_pretraining(_pre(out, "run.resume=auto"))
    err = capsys.readouterr().err
    assert f"resumed from {out / 'checkpoints' / ('step_00000002' if aborts else 'step_00000003')}" in err, err
    assert ("removed the partial checkpoint .tmp_step_00000003" in err) == aborts
    assert _max_diff(_ckpt_weights(pre_ref), _ckpt_weights(out)) <= 1e-6


def _ft(data: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, _ft_args(data, out, *extra))


def _ft_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.name=convnextv2_test", "model.in_chans=1", "data.source=folder", f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'val'}", "data.input_size=32", "data.num_workers=0", "optim.lr=1e-3",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.layer_decay=0.8", "optim.layer_decay_type=single",
        "mixup.mixup=0.8", "mixup.cutmix=1.0", "model.drop_path_rate=0.2", "ema.decay=0.9", "run.batch_size=4",
        "run.progress=false", "run.log_every=1", "run.mixed_precision=no", "run.threads=1",
        "run.save_every_steps=1", f"run.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def ft_ref(tmp_path_factory) -> tuple[Path, Path]:
    from test_finetune import _image_folder

    root = tmp_path_factory.mktemp("ft")
    _image_folder(root / "data" / "train", 4)  # 12 images: 3 steps per epoch, 6 in all
    _image_folder(root / "data" / "val", 2, seed=1)
    assert run_finetuning(_ft(root / "data", root / "ref"))["steps"] == 6
    return root / "data", root / "ref"


def test_finetune_stops_resume_equal_uninterrupted_and_evaluate_once_per_step(tmp_path, ft_ref, capsys):
    data, ref = ft_ref
    out = tmp_path / "run"
    # a step checkpoint at the step that ends epoch 0: taken after its evaluation, so a resume does not repeat it
    assert run_finetuning(_ft(data, out, "run.max_steps=3"))["steps"] == 3
    assert _guarded("finetune", _ft(data, out, "run.resume=auto"), _kill_at(4, signal.SIGTERM)) == 143
    assert _last_line(capsys.readouterr().err).startswith("fcmae finetune: stopped by SIGTERM after step 4")
    assert _guarded("finetune", _ft(data, out, "run.resume=auto"), _kill_at(5, signal.SIGUSR1)) == 143
    assert _last_line(capsys.readouterr().err).startswith("fcmae finetune: stopped by SIGUSR1 after step 5")
    assert _guarded("finetune", _ft(data, out, "run.resume=auto"), _kill_at(6, signal.SIGTERM)) == 0  # last step
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        assert _max_diff(load_file(str(ref / name)), load_file(str(out / name))) <= 1e-6, name
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in recs if "val_top1" in r]
    assert evals == [3, 6], evals  # the final evaluation of each epoch logged once
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    sa, sb = _strict(ref / "summary.json"), _strict(out / "summary.json")
    assert sa["best_top1"] == sb["best_top1"] and sb["steps"] == 6


# ------------------------------------------------------------------------------------------- finished runs
def test_finished_runs_stay_finished(pre_ref, ft_ref, capsys):
    data, ft_out = ft_ref
    for argv, out in ((["pretrain", *TINY, f"run.output_dir={pre_ref}"], pre_ref),
                      (["finetune", *_ft_args(data, ft_out)], ft_out)):
        before = _hashes(out)
        capsys.readouterr()
        assert main([*argv, "run.resume=auto", "data.num_workers=1", "run.log_every=3"]) == 0
        cap = capsys.readouterr()
        lines = [x for x in cap.err.splitlines() if x.strip()]
        assert len(lines) == 1 and "holds a finished run" in lines[0] and cap.out == "", (lines, cap.out)
        assert _hashes(out) == before  # every file byte-identical, metrics.jsonl and summary.json included
        _strict(out / "summary.json")


# ------------------------------------------------------------------------------------------- config changes
def test_resume_refuses_a_changed_training_config(tmp_path, capsys):
    out = tmp_path / "run"
    run_pretraining(_pre(out, "run.max_steps=4"))
    (out / ".metrics.jsonl.x1y2z3.tmp").write_text("left by a killed writer")
    (out / "notes.tmp").write_text("not ours")
    before = _hashes(out)
    cases = [("optim.lr=2e-3", "optim.lr: 0.001 -> 0.002"), ("data.input_size=96", "data.input_size: 64 -> 96"),
             ("model.name=convnextv2_atto", "model.name: 'convnextv2_test' -> 'convnextv2_atto'")]
    for override, listed in cases:
        capsys.readouterr()
        assert main(["pretrain", *TINY, f"run.output_dir={out}", "run.resume=auto", override]) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("fcmae pretrain: config error: run.resume=auto") and \
            listed in lines[0] and "run.allow_config_change=true" in lines[0], lines
        assert _hashes(out) == before
    summary = run_pretraining(_pre(out, "run.resume=auto", "optim.lr=2e-3", "run.allow_config_change=true",
                                   "data.num_workers=1", "run.log_every=2", "run.keep_last=3"))
    assert summary["steps"] == 8
    assert "removed .metrics.jsonl.x1y2z3.tmp" in capsys.readouterr().err
    assert not (out / ".metrics.jsonl.x1y2z3.tmp").exists() and (out / "notes.tmp").exists()
    (entry,) = [json.loads(x) for x in (out / HISTORY).read_text().splitlines()]
    assert entry["changed"] == {"optim.lr": {"old": 0.001, "new": 0.002}} and entry["step"] == 4
    assert entry["previous_config"]["optim"]["lr"] == 0.001 and entry["config"]["optim"]["lr"] == 0.002
    assert "lr: 0.001" in (out / "config.yaml").read_text()  # the first segment's config stays as it was
    from fcmae.train.pretraining import load_pretraining_model

    assert load_pretraining_model(out)[1].optim.lr == 0.002  # the weights' config: the last segment's


# ------------------------------------------------------------------------------------------- checksums
def test_corrupt_checkpoint_is_skipped_and_verify_reports_it(tmp_path, pre_ref, capsys):
    out = tmp_path / "run"
    run_pretraining(_pre(out, "run.max_steps=6"))
    f = out / "checkpoints" / "step_00000006" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:-32] = bytes(32)  # same size, other bytes: a bit rot or a bad copy
    f.write_bytes(bytes(data))
    old = out / "checkpoints" / "step_00000002" / MANIFEST  # a manifest from before checksums: sizes only
    manifest = json.loads(old.read_text())
    del manifest["crc32"]
    old.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(out), "--json", str(tmp_path / "verify.json")]) == 1
    text = capsys.readouterr().out
    assert "step_00000006: corrupt (model.safetensors does not match its checksum" in text, text
    assert "step_00000004: ok" in text and "step_00000002: ok" in text
    result = json.loads((tmp_path / "verify.json").read_text())
    assert [c["state"] for c in result["checkpoints"]] == ["ok", "ok", "corrupt"] and not result["newest_ok"]
    run_pretraining(_pre(out, "run.resume=auto"))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000006: model.safetensors does not match its checksum" in err
    assert "resumed from" in err and "step_00000004" in err
    assert _max_diff(_ckpt_weights(pre_ref), _ckpt_weights(out)) <= 1e-6
    assert main(["verify", str(out)]) == 0


# ------------------------------------------------------------------------------------------- one run per folder
def test_a_held_lock_stops_a_second_run_naming_the_holder(tmp_path, pre_ref, capsys):
    for out, extra in ((tmp_path / "fresh", []), (pre_ref, ["run.resume=auto"])):
        lock = RunLock(out)  # another run holds the folder (flock: another open file, even in this process)
        assert lock.acquire() is None
        try:
            capsys.readouterr()
            assert main(["pretrain", *TINY, f"run.output_dir={out}", *extra]) == 1
            lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        finally:
            lock.release()
        assert len(lines) == 1 and "is in use by another run (pid " in lines[-1], lines
        assert f"pid {os.getpid()} on host " in lines[-1] and ", started " in lines[-1]
    assert (pre_ref / LOCK_NAME).read_text() == ""  # emptied on release: the folder's bytes do not change
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [LOCK_NAME]


def test_a_refused_start_names_the_new_holder_not_the_dead_one_it_replaced(tmp_path):
    """Between a new holder's flock and its write the file still names the SIGKILLed run before it; the refused
    start reads again until a live name appears (a race the two-resumes test below met once, in a full-suite run)."""
    import fcntl
    import socket
    import threading

    from fcmae.train.rundir import RunDirError

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}) + "\n")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the new holder, which has not written its name yet
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}) + "\n"
    late = threading.Timer(0.2, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, me.encode(), 0)))
    late.start()
    try:
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()} on host "):
            RunLock(tmp_path).acquire()
    finally:
        late.join()
        os.close(fd)


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / name), *args]


@pytest.mark.slow
def test_sigkilled_lock_holder_does_not_block_and_simultaneous_resumes_run_once(tmp_path):
    out = tmp_path / "run"
    crashed = subprocess.run(_script("crash_run.py", "pretrain", "3", *TINY, f"run.output_dir={out}"), env=child_env(),
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] > 0  # the dead holder's name stays; its flock is gone
    starts = [subprocess.Popen(_script("signal_run.py", "pretrain", "sleep0.4", *TINY, f"run.output_dir={out}",
                                       "run.resume=auto"), env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    done = [(p.pid, p.wait(timeout=300), p.stderr.read()) for p in starts]
    codes = sorted(code for _, code, _ in done)
    assert codes == [0, 1], [(c, e[-1500:]) for _, c, e in done]
    (winner,) = [pid for pid, code, _ in done if code == 0]
    (err,) = [e for _, code, e in done if code == 1]
    assert "is in use by another run" in _last_line(err) and f"pid {winner} on host" in _last_line(err), err
    assert "resumed from" in [e for _, code, e in done if code == 0][0]
    assert find_latest_checkpoint(out / "checkpoints").name == "step_00000008"


@pytest.mark.slow
def test_real_signals_through_the_cli_with_dataloader_workers(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does: the workers get it too) and SIGTERM to
    the main process, each while `python -m fcmae pretrain` trains with 2 DataLoader workers."""
    for sig, group, status in ((signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)):
        out = tmp_path / signal.Signals(sig).name
        cmd = [sys.executable, "-m", "fcmae", "pretrain", *TINY, "data.num_workers=2", "optim.epochs=50",
               "run.save_every_steps=0", f"run.output_dir={out}"]
        p = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        t0 = time.monotonic()
        os.killpg(p.pid, sig) if group else os.kill(p.pid, sig)
        _, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == status, err[-3000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err and "exited unexpectedly" not in err, err
        line = _last_line(err)
        assert line.startswith(f"fcmae pretrain: stopped by {signal.Signals(sig).name} after step "), line
        step = int(line.split("after step ")[1].split(":")[0])
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        assert str(ckpt) in line and checkpoint_status(ckpt) == ("ok", None)
        print(f"{signal.Signals(sig).name}: exit {p.returncode} {took:.2f} s after the signal (step {step})")


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step(tmp_path):
    import shutil

    accel = Path(sys.executable).parent / "accelerate"
    if not accel.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    launcher = [str(accel if accel.exists() else shutil.which("accelerate")), "launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29531"]
    out = tmp_path / "ddp"
    # rank 0 is signalled after step 2, rank 1 only after step 5: they agree at the next host read (the log line of
    # step 3) and both stop there
    cmd = [*launcher, str(ROOT / "tests" / "signal_run.py"), "pretrain", "SIGTERM@2,5", *TINY, "run.log_every=3",
           "run.save_every_steps=0", "data.limit=32", f"run.output_dir={out}"]
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "stopped by SIGTERM after step 3" in res.stderr, res.stderr[-3000:]
    assert res.stderr.count("stopped by SIGTERM") == 1  # one line, from the main process
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003"]
    assert checkpoint_status(out / "checkpoints" / "step_00000003") == ("ok", None)
    state = torch.load(out / "checkpoints" / "step_00000003" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["step"] == 3


# ------------------------------------------------------------------------------------------- strict JSON
def test_json_outputs_are_strict(tmp_path):
    p = write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": (float("-inf"),)})
    assert _strict(p) == {"a": None, "b": [None, 1.5], "c": [None]}
