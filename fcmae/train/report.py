"""``fcmae report RUN_DIR``: one self-contained HTML page (``RUN_DIR/report.html``, images inline, nothing fetched)
that shows a whole run at a glance, and the same plots as PNGs in ``RUN_DIR/report/``.

It reads only what the run writes (``metrics.jsonl``, ``summary.json``, ``config.yaml``, ``config_history.jsonl``,
the figures kept per export in ``figures/``), so it works on a running run (a line being written is skipped), a
finished, stopped, interrupted or failed one, pretraining and fine-tuning. Plots (matplotlib, Agg): loss (raw and
smoothed) and lr against step, with images seen on the top axis; throughput; evaluation top-1 (fine-tuning) and the
k-NN monitor; interruptions (a stop on a signal) and resumed segments marked on every curve. No torch is imported.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fcmae.train.preflight import FIGURES_DIR, REPORT_DIR, REPORT_FILE

HISTORY = "config_history.jsonl"


class ReportError(ValueError):
    """The folder holds no run (exit status 1, one line)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a line cut by a crash or being written is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased at the start (TensorBoard's smoothing); NaN/None are carried over."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(math.nan)
            continue
        n += 1
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** n))
    return out


def _series(recs: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if r.get("type") == kind and r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _marks(ax: Any, run: dict[str, Any]) -> None:
    """Interruptions (red) and resumed segments (grey) as vertical lines, labelled once."""
    for i, r in enumerate(run["interrupted"]):
        ax.axvline(r["step"], color="tab:red", ls="--", lw=1, label=f"stopped ({r.get('signal')})" if not i else None)
    for i, seg in enumerate(run["history"]):
        ax.axvline(seg.get("step", 0), color="0.5", ls=":", lw=1, label="resumed" if not i else None)


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _save(fig: Any, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _plot_loss(plt: Any, run: dict[str, Any], out: Path) -> bytes | None:
    import numpy as np

    steps, loss = _series(run["records"], "train", "loss")
    if not steps:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss (per log window)")
    ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label="smoothed (EMA 0.9)")
    ax.set_ylabel("loss")
    ax.set_title("training loss and learning rate")
    s_img, images = _series(run["records"], "train", "images_seen")
    if len(s_img) >= 2 and images[-1] > images[0]:  # images seen on the top axis (monotone in step)
        top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, s_img, images),
                                                    lambda y: np.interp(y, images, s_img)))
        top.set_xlabel("images seen")
        top.xaxis.set_major_locator(plt.MaxNLocator(6))
        top.xaxis.set_major_formatter(matplotlib_ticker().EngFormatter(sep=""))  # 8k, 1.2M
    s_lr, lr = _series(run["records"], "train", "lr")
    ax_lr.plot(s_lr, lr, color="tab:orange", lw=1.5)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    for a in (ax, ax_lr):
        _marks(a, run)
        a.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    data = _save(fig, out / "loss_lr.png")
    plt.close(fig)
    return data


def _plot_lines(plt: Any, run: dict[str, Any], out: Path, name: str, title: str, ylabel: str,
                curves: list[tuple[str, str, str]]) -> bytes | None:
    """One plot of the ``(record type, key, label)`` curves against step (None when no record has them)."""
    got = [(label, *_series(run["records"], kind, key)) for kind, key, label in curves]
    got = [g for g in got if g[1]]
    if not got:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label, steps, values in got:
        marker = "o" if len(steps) < 30 else None
        ax.plot(steps, values, marker=marker, ms=4, lw=1.5, label=label)
    _marks(ax, run)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    data = _save(fig, out / f"{name}.png")
    plt.close(fig)
    return data


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, read from the run folder."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir} holds no run (no metrics.jsonl)")
    records = read_jsonl(run_dir / "metrics.jsonl")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    figures = sorted((run_dir / FIGURES_DIR).glob("*_step*.png"))
    return {"dir": run_dir, "records": records, "summary": summary, "config": config,
            "history": read_jsonl(run_dir / HISTORY), "figures": figures,
            "interrupted": [r for r in records if r.get("type") == "interrupted"]}


def _status(run: dict[str, Any]) -> str:
    s = run["summary"]
    last = max((r.get("timestamp", 0) for r in run["records"]), default=0)
    ago = f"last record {time.time() - last:.0f} s ago" if last else "no record yet"
    if s is None or (run["records"] and run["records"][-1].get("type") != "summary"):
        return f"no summary yet: running, or ended without one (killed); {ago}"
    return f"{s.get('status')}: {s.get('steps')} of {s.get('total_steps')} steps, {ago}"


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:60em;color:#222}h1{font-size:1.5em}
h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}th{background:#f4f4f4}
pre{background:#f7f7f7;padding:.8em;font-size:.8em;overflow-x:auto}img{max-width:100%}
figure{display:inline-block;margin:.4em}figure img{width:24em}figcaption{font-size:.8em;color:#555}"""


def _sections(run: dict[str, Any], plots: list[tuple[str, bytes]]) -> list[str]:
    parts = [f"<h2>Curves</h2>{''.join(_img(d, n) for n, d in plots) or '<p>no training records yet</p>'}"]
    if run["figures"]:
        figs = "".join(f"<figure>{_img(p.read_bytes(), p.stem)}<figcaption>step {int(p.stem.rsplit('_step', 1)[1])}"
                       "</figcaption></figure>" for p in run["figures"])
        parts.append(f"<h2>Reconstructions over time</h2><p>original | masked | reconstruction | reconstruction "
                     f"+ visible, at each export</p>{figs}")
    if run["interrupted"]:
        rows = [(f"step {r['step']}", f"{r.get('signal')}, checkpoint {r.get('checkpoint')}") for r in
                run["interrupted"]]
        parts.append(f"<h2>Interruptions</h2>{_table(rows)}")
    if run["summary"]:
        parts.append("<h2>Summary</h2>" + _table([(k, v) for k, v in run["summary"].items() if k != "config"]))
    parts.append(f"<h2>Config (first segment)</h2><pre>{html.escape(run['config'])}</pre>")
    if run["history"]:
        rows = [(f"segment {h.get('segment')}", f"resumed at step {h.get('step')} from {h.get('resumed_from')} "
                 f"({h.get('started')}); changed: {json.dumps(h.get('changed') or {})}") for h in run["history"]]
        parts.append(f"<h2>Config history (resumed segments)</h2>{_table(rows)}")
    return parts


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write ``RUN_DIR/report.html`` and the plots in ``RUN_DIR/report/``; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("the report's plots need matplotlib: pip install 'fcmae[report]'") from None
    run_dir = Path(run_dir).expanduser().absolute()
    run = load_run(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    plots = [(n, d) for n, d in [
        ("loss and lr", _plot_loss(plt, run, out)),
        ("throughput", _plot_lines(plt, run, out, "throughput", "throughput", "images / s",
                                   [("train", "img_per_s", "images/s (per log window)")])),
        ("evaluation", _plot_lines(plt, run, out, "evaluation", "evaluation top-1", "top-1 (%)",
                                   [("eval", "val_top1", "val top-1"), ("eval", "ema_top1", "EMA val top-1"),
                                    ("monitor", "knn_top1", "k-NN monitor top-1")])),
    ] if d is not None]
    title = f"fcmae run {run_dir.name}"
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(str(run_dir))}<br>"
            f"{html.escape(_status(run))}</p>{''.join(_sections(run, plots))}</body></html>\n")
    tmp = run_dir / f".{REPORT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(page)
    os.replace(tmp, run_dir / REPORT_FILE)  # a reader never sees half a page
    return {"report": str(run_dir / REPORT_FILE), "plots": [str(p) for p in sorted(out.glob("*.png"))]}
