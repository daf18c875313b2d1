"""``fcmae report``: a self-contained HTML page and PNG plots of a run, on an interrupted, a killed (no summary, as a
running run looks), a resumed and finished pretraining run and on a fine-tuning run; the page rendered in a real
headless Chromium (Debian's, driven by playwright): plots present and not blank, no console error, nothing fetched."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cluster_tools import child_env
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "run.batch_size=4", "run.progress=false", "run.log_every=1",
        "run.export_every_epochs=1", "run.num_vis_images=2", "run.mixed_precision=no", "run.threads=1"]
pytest.importorskip("matplotlib")


def _run(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], env=child_env(), capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def _report(out: Path) -> str:
    r = _run(out.parent, ["-m", "fcmae", "report", str(out)])
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'report.html'}" in r.stdout
    return (out / "report.html").read_text()


def _not_blank(png: Path | bytes) -> None:
    """A plot has drawn pixels: many colours, and a good share of non-white pixels."""
    import io

    im = np.asarray(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB")).astype(int)
    assert im.shape[0] > 100 and im.shape[1] > 200
    assert (im.min(axis=2) < 200).mean() > 0.01 and len(np.unique(im.reshape(-1, 3), axis=0)) > 20


def _self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # every image inline, no link out
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.slow
def test_report_of_an_interrupted_killed_and_resumed_pretraining_run(tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"run.output_dir={out}"]
    assert _run(tmp_path, [str(ROOT / "tests" / "signal_run.py"), "pretrain", "SIGTERM@3", *common]).returncode == 143
    page = _report(out)
    assert "interrupted: 3 of 8 steps" in page and "SIGTERM" in page
    killed = _run(tmp_path, [str(ROOT / "tests" / "crash_run.py"), "pretrain", "6", *common, "run.resume=auto"])
    assert killed.returncode == -signal.SIGKILL
    page = _report(out)  # no summary of this segment: what a running run looks like
    assert "no summary yet: running, or ended without one" in page
    assert _run(tmp_path, ["-m", "fcmae", "pretrain", *common, "run.resume=auto"]).returncode == 0
    page = _report(out)
    _self_contained(page)
    assert "finished: 8 of 8 steps" in page
    assert "Config history (resumed segments)" in page and "segment 3" in page  # two resumes
    assert page.count("<figcaption>step ") == 2  # the reconstructions at steps 4 and 8
    plots = sorted(p.name for p in (out / "report").glob("*.png"))
    assert plots == ["loss_lr.png", "throughput.png"]  # no evaluation records in this run: no empty plot
    for p in plots:
        _not_blank(out / "report" / p)
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium): the page was not rendered")
    _render(out / "report.html", tmp_path / "shot.png", images=4)


@pytest.mark.slow
def test_report_of_a_finetuning_run(tmp_path):
    for split, n in (("train", 8), ("val", 4)):
        for c in range(2):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng(c * 100 + i)
                Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(
                    tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "ft"
    r = _run(tmp_path, ["-m", "fcmae", "finetune", "model.name=convnextv2_test", "model.in_chans=1",
                        "data.source=folder", f"data.train_path={tmp_path / 'data' / 'train'}",
                        f"data.val_path={tmp_path / 'data' / 'val'}", "data.input_size=32", "data.num_workers=0",
                        "optim.lr=1e-3", "optim.epochs=2", "optim.warmup_epochs=0.5", "run.batch_size=4",
                        "run.progress=false", "run.log_every=1", "run.mixed_precision=no", "run.threads=1",
                        f"run.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    page = _report(out)
    _self_contained(page)
    assert sorted(p.name for p in (out / "report").glob("*.png")) == ["evaluation.png", "loss_lr.png",
                                                                     "throughput.png"]
    _not_blank(out / "report" / "evaluation.png")
    assert "best_top1" in page and "Reconstructions" not in page


def test_report_of_a_folder_without_a_run_is_one_line(tmp_path):
    r = _run(tmp_path, ["-m", "fcmae", "report", str(tmp_path)])
    assert r.returncode == 1 and r.stderr.strip() == f"fcmae report: error: {tmp_path} holds no run (no metrics.jsonl)"


def _render(page: Path, shot: Path, images: int) -> None:
    """Open the page in headless Chromium: no console error, no request but the page itself, every image loaded
    and drawn, a screenshot that is not blank."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (fcmae[browser])")
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            tab = browser.new_page(viewport={"width": 1000, "height": 800})
            tab.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(page.as_uri(), wait_until="load")
            loaded = tab.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("data:", page.as_uri()))] == []
    assert len(loaded) == images and all(ok and w > 100 and h > 100 for ok, w, h in loaded), loaded
    _not_blank(shot)
