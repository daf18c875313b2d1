"""The newcomer's smaller traps: checks that need no torch answer before torch is imported, the ETA comes from the
recent steps, a run cut short by run.max_steps says how to continue, and a resumed run's closing line gives the
whole run's training time and this segment's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_tools import child_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "run.batch_size=4", "run.log_every=2", "run.export_every_epochs=0",
        "run.num_vis_images=2", "run.mixed_precision=no", "run.threads=1"]
# runs the CLI in-process (no malloc re-exec), then says whether torch was imported
PROBE = ("import sys; from fcmae.cli import main; code = main(sys.argv[1:], reexec=False); "
         "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")


def _used(f: Path) -> Path:
    (f / "used").mkdir()
    (f / "used" / "metrics.jsonl").write_text("")
    return f / "used"


CASES = [
    ("used-folder", lambda f: ["pretrain", "demo", f"run.output_dir={_used(f)}"], 1, "holds another run"),
    ("missing-data", lambda f: ["pretrain", "pretrain/convnextv2_atto", "data.source=folder",
                                f"data.path={f / 'nope'}", f"run.output_dir={f / 'o'}"], 1, "data.path: "),
    ("missing-config", lambda f: ["pretrain", str(f / "nope.yaml")], 2, "config file not found"),
    ("missing-init", lambda f: ["finetune", "finetune/fashion_mnist", "--init", str(f / "nope.pt"),
                                f"run.output_dir={f / 'o'}"], 1, "model.init: "),
    ("missing-resume", lambda f: ["pretrain", "demo", f"run.resume={f / 'nope'}", f"run.output_dir={f / 'o'}"], 1,
     "run.resume: "),
]


@pytest.mark.parametrize("name,argv,code,text", CASES, ids=[c[0] for c in CASES])
def test_checks_that_need_no_torch_answer_before_torch_is_imported(tmp_path, name, argv, code, text):
    r = subprocess.run([sys.executable, "-c", PROBE, *argv(tmp_path)], capture_output=True, text=True, timeout=120,
                       env=child_env(), cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert len(r.stderr.splitlines()) == 1 and text in r.stderr, r.stderr
    assert r.stdout.strip() == "no torch"
    assert not (tmp_path / "o").exists()  # nothing written


def test_eta_comes_from_the_recent_steps(monkeypatch):
    """A slow start (worker start-up, first batches) does not inflate the ETA: 100 s for the first step, then 1 s a
    step; at step 60 of 100 the ETA is 40 s, not the 159 s the average since the start would give."""
    from fcmae.train import trainer

    now = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: now[0])
    p = trainer.Progress(False, 0, 100)
    assert p.eta(0) is None
    now[0] = 100.0
    p.step(1)
    for s in range(2, 61):
        now[0] += 1.0
        p.step(s)
    assert p.eta(60) == pytest.approx(40.0)


@pytest.mark.slow
def test_max_steps_says_how_to_continue_and_a_resume_gives_both_times(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fcmae", "pretrain", *TINY, f"run.output_dir={out}"]
    first = subprocess.run([*cmd, "--max-steps", "3"], capture_output=True, text=True, timeout=600, env=child_env())
    assert first.returncode == 0, first.stderr[-3000:]
    hint = [x for x in first.stdout.splitlines() if x.startswith("stopped at step 3 of 8")]
    assert hint and "--resume auto" in hint[0] and "--max-steps" in hint[0], first.stdout
    second = subprocess.run([*cmd, "--resume", "auto"], capture_output=True, text=True, timeout=600, env=child_env())
    assert second.returncode == 0, second.stderr[-3000:]
    closing = re.search(r"after 8 steps, (\d+) s of training in all, (\d+) s in this segment", second.stdout)
    assert closing, second.stdout
    assert "stopped at step" not in second.stdout
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["resumed_from"] and s["time_s"] > 0
    assert int(closing[1]) == round(s["time_s"]) and int(closing[2]) == round(s["wall_s"])
