"""The Fashion-MNIST study's write-up, regenerated from whatever stages are complete (their JSON files only).

``write_report(cfg, work, out, doc, config_path)`` writes ``doc`` (markdown), ``out/results.json`` and, when
matplotlib is installed, ``out/knn_monitor.png``, ``out/pretrain_loss.png``, ``out/accuracy_vs_budget.png`` and a
copy of the diagnose plots and of the reconstruction figure. Missing stages show as "pending".
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

PENDING = "pending"


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _ms(values: list[float]) -> str:
    if not values:
        return PENDING
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f} (n={len(values)})"


# ------------------------------------------------------------------------------------------- collecting
def collect(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Everything the write-up shows, from the stage outputs under ``work``."""
    probes = {}
    for arm in ["raw_pixels", "random_init", *cfg["pretrain"]["arms"]]:
        r = _json(work / "probe" / f"{arm}.json")
        probes[arm] = r and {"summary": r["summary"], "runs": r["runs"], "input_size": r["input_size"],
                             "feature_seconds": r["feature_seconds"], "probe_seconds": r["probe_seconds"]}
    pretrain = {}
    for arm in cfg["pretrain"]["arms"]:  # metrics.jsonl: records of type train / eval / monitor / summary
        d = work / "pretrain" / arm
        s = _json(d / "summary.json")
        m = _metrics(d / "metrics.jsonl")
        pretrain[arm] = {"complete": s is not None, "summary": s,
                         "knn": [(r["step"], r["knn_top1"]) for r in m if "knn_top1" in r],
                         "loss": [(r["step"], r["loss"]) for r in m if r.get("type", "train") == "train" and "loss" in r
                                  and "summary" not in r],
                         "monitor": monitor_overhead(m, cfg["pretrain"]["overrides"]["run.batch_size"],
                                                     cfg["pretrain"]["overrides"]["monitor.every_steps"])}
    finetune: dict[str, dict[str, list[dict[str, Any]]]] = {}
    f = cfg["finetune"]
    for arm, a in f["arms"].items():
        for budget in a.get("budgets") or list(f["budgets"]):
            for seed in a.get("seeds") or f["budgets"][budget]["seeds"]:
                s = _json(work / "finetune" / f"{arm}_{budget}_s{seed}" / "summary.json")
                if s is not None:
                    finetune.setdefault(arm, {}).setdefault(budget, []).append(
                        {"seed": seed, "top1": s["val_top1"], "ema_top1": s.get("ema_top1"), "wall_s": s["wall_s"],
                         "steps": s["steps"], "train_images": s["train_images"]})
    diag = sorted((work / "diagnose").glob("*/diagnose.json"), key=lambda p: p.stat().st_mtime)
    return {"probe": probes, "pretrain": pretrain, "finetune": finetune, "devices": stage_devices(work),
            "diagnose": _json(diag[-1]) if diag else None, "diagnose_dir": str(diag[-1].parent) if diag else None,
            "evaluate_check": _json(work / "evaluate" / f"{cfg['evaluate_check']['run']}.json")}


def merge_recorded(res: dict[str, Any], recorded: dict[str, Any] | None) -> dict[str, Any]:
    """``res`` with every stage it lacks taken from ``recorded`` (an earlier results.json of the same recipe); the
    names of the stages taken are listed in ``res["recorded"]`` (diagnosed models get ``"recorded": True``)."""
    res["recorded"] = taken = []
    if not recorded:
        return res
    for arm, r in recorded.get("probe", {}).items():
        if r and not res["probe"].get(arm) and arm in res["probe"]:
            res["probe"][arm] = r
            taken.append(f"probe_{arm}")
    for arm, r in recorded.get("pretrain", {}).items():
        if arm in res["pretrain"] and not res["pretrain"][arm]["complete"] and r.get("complete"):
            res["pretrain"][arm] = r
            taken.append(f"pretrain_{arm}")
    for arm, budgets in recorded.get("finetune", {}).items():
        for budget, runs in budgets.items():
            if budget not in res["finetune"].get(arm, {}):
                res["finetune"].setdefault(arm, {})[budget] = runs
                taken.append(f"finetune_{arm}_{budget}")
    res["devices"] = {**recorded.get("devices", {}), **res["devices"]}
    old = recorded.get("diagnose")
    if old:
        new = res["diagnose"] or {**old, "models": []}
        names = {m["name"] for m in new["models"]}
        extra = [{**m, "recorded": True} for m in old["models"] if m["name"] not in names]
        res["diagnose"] = {**new, "models": new["models"] + extra}
        taken += [f"diagnose {m['name']}" for m in extra]
    if not res["evaluate_check"] and recorded.get("evaluate_check"):
        res["evaluate_check"] = recorded["evaluate_check"]
        taken.append("evaluate_check")
    return res


def monitor_overhead(rows: list[dict[str, Any]], batch_size: int, every: int) -> dict[str, Any] | None:
    """The k-NN monitor's share of a pretraining run's time, from its metrics.jsonl, two ways.

    ``measured``: the evaluations' seconds (each step once) over the run's wall time, summed over its segments
    (``time_s`` continues across a resume, so that is the last one; in older runs, where a resume restarted it, the
    steps redone after a resume count twice, a small overstatement of the wall time). Anything that stalled the
    process (a pause, another job) is in it. ``steady``: the median evaluation against the median training time of
    ``every`` steps (from the log intervals' images/s), robust to such stalls and to the one-off loading of the
    monitor's images in each segment's first evaluation.
    """
    knn = {r["step"]: r["knn_seconds"] for r in rows if "knn_seconds" in r}
    speed = [r["img_per_s"] for r in rows if "img_per_s" in r]
    times = [r["time_s"] for r in rows if "time_s" in r]
    if not knn or not speed or not times:
        return None
    wall = sum(t for t, nxt in zip(times, [*times[1:], -1.0]) if nxt < t)  # the last time of every segment
    eval_s, train_s = statistics.median(knn.values()), every * batch_size / statistics.median(speed)
    return {"evaluations": len(knn), "monitor_s": sum(knn.values()), "wall_s": wall,
            "percent": 100 * sum(knn.values()) / wall, "eval_s": eval_s, "train_s_per_interval": train_s,
            "steady_percent": 100 * eval_s / (eval_s + train_s)}


# ------------------------------------------------------------------------------------------- tables
def _budget_names(cfg: dict[str, Any]) -> list[tuple[str, int]]:
    """``[(budget tag, labels per class)]``, e.g. ``("1pct", 60)``."""
    return [(b, v["labels_per_class"]) for b, v in cfg["finetune"]["budgets"].items()]


def probe_table(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    budgets = _budget_names(cfg)
    head = "| features | " + " | ".join(f"k-NN {b}" for b, _ in budgets) + " | " + \
        " | ".join(f"linear {b}" for b, _ in budgets) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(budgets))]
    titles = {"raw_pixels": "raw pixels (trivial baseline)", "random_init": "random init (no pretraining)",
              "fcmae_grn": "FCMAE, GRN", "fcmae_nogrn": "FCMAE, no GRN",
              "fcmae_v1": "FCMAE, ConvNeXt V1 (LayerScale)"}
    for arm, r in res["probe"].items():
        cells = []
        for metric in ("knn_top1", "linear_top1"):
            for _, k in budgets:
                row = next((x for x in (r or {}).get("summary", []) if x["labels_per_class"] == k), None)
                cells.append(_ms([x[metric] for x in r["runs"] if x["labels_per_class"] == k]) if row else PENDING)
        lines.append(f"| {titles.get(arm, arm)} | " + " | ".join(cells) + " |")
    return lines


def finetune_table(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    budgets = _budget_names(cfg)
    f = cfg["finetune"]
    lines = ["| init | " + " | ".join(f"{b} ({f['budgets'][b]['steps']} steps)" for b, _ in budgets) + " |",
             "|" + "---|" * (1 + len(budgets))]
    for arm, a in f["arms"].items():
        runs = res["finetune"].get(arm, {})
        cells = []
        for b, _ in budgets:
            if a.get("budgets") and b not in a["budgets"]:
                cells.append("not run")
            else:
                cells.append(_ms([r["top1"] for r in runs.get(b, [])]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def stage_devices(work: Path) -> dict[str, str]:
    """``{stage: "cpu" | "cuda"}`` for the training stages, read from their logs' first report line."""
    found = {}
    for log in sorted((work / "logs").glob("*.log")):
        m = re.search(r"process\(es\) on (\w+)", log.read_text(errors="replace"))
        if m:
            found[log.stem] = m.group(1)
    return found


def status_lines(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    f = cfg["finetune"]
    expected = sum(len(a.get("seeds") or f["budgets"][b]["seeds"]) for a in f["arms"].values()
                   for b in (a.get("budgets") or f["budgets"]))
    done = sum(len(v) for arm in res["finetune"].values() for v in arm.values())
    pre = [f"{a}: {'done' if v['complete'] else ('running/interrupted' if v['loss'] else PENDING)}"
           for a, v in res["pretrain"].items()]
    probes = [a for a, v in res["probe"].items() if v]
    diag = res["diagnose"]
    diag_txt = f"done ({', '.join(m['name'] for m in diag['models'])})" if diag else PENDING
    gpu = sorted(k for k, v in res.get("devices", {}).items() if v == "cuda")
    where = (f"- where: every stage on 2 CPU cores except {', '.join(gpu)}, which ran on one CUDA GPU (fp32, same "
             "recipe and seeds)" if gpu else "- where: every stage on 2 CPU cores")
    rec = (["- taken from the recorded results of earlier runs of the same recipe (`recorded` in the YAML): "
            + ", ".join(res["recorded"])] if res.get("recorded") else [])
    return [where, *rec, f"- pretraining: {'; '.join(pre)}",
            f"- frozen-feature probes done: {', '.join(probes) or 'none'} (of {', '.join(res['probe'])})",
            f"- fine-tuning runs done: {done} of {expected}",
            f"- diagnose: {diag_txt}",
            f"- evaluate cross-check: {'done' if res['evaluate_check'] else PENDING}"]


# ------------------------------------------------------------------------------------------- findings
def _probe_mean(res: dict[str, Any], arm: str, metric: str, k: int) -> float | None:
    runs = [x[metric] for x in ((res["probe"].get(arm) or {}).get("runs") or []) if x["labels_per_class"] == k]
    return statistics.mean(runs) if runs else None


def _versus(cfg: dict[str, Any], res: dict[str, Any], arm: str, base: str) -> list[str]:
    """Fine-tuning of ``arm`` against ``base`` at every budget both have: difference of the means, with stds."""
    parts = []
    for b, _ in _budget_names(cfg):
        a = [r["top1"] for r in res["finetune"].get(arm, {}).get(b, [])]
        c = [r["top1"] for r in res["finetune"].get(base, {}).get(b, [])]
        if a and c:
            parts.append(f"{b}: {statistics.mean(a) - statistics.mean(c):+.2f} ({_ms(a)} vs {_ms(c)})")
    return parts


def findings(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers (no judgement beyond comparing them)."""
    lines = []
    g = cfg["gate"]
    arm, budget, seed = g["run"]
    gate = next((r for r in res["finetune"].get(arm, {}).get(budget, []) if r["seed"] == seed), None)
    if gate:
        ok = "passed" if gate["top1"] >= g["min_top1"] else "FAILED"
        lines.append(f"- Gate: `{arm}` on {budget} of the labels reaches {gate['top1']:.2f} % top-1 "
                     f"(needs {g['min_top1']}): {ok}.")
    arms = list(cfg["pretrain"]["arms"])
    base = next((a for a, v in cfg["finetune"]["arms"].items() if not v.get("init")), None)
    for a in arms:
        if base and (parts := _versus(cfg, res, a, base)):
            lines.append(f"- Fine-tuning, `{a}` minus `{base}` (mean ± std over seeds): " + "; ".join(parts) + ".")
    for a in arms:
        parts = []
        for b, k in _budget_names(cfg):
            cells = []
            for metric, short in (("knn_top1", "k-NN"), ("linear_top1", "linear")):
                own = _probe_mean(res, a, metric, k)
                if own is None:
                    continue
                refs = [f"{own - v:+.2f} vs {name}" for name, v in
                        (("raw pixels", _probe_mean(res, "raw_pixels", metric, k)),
                         ("random init", _probe_mean(res, "random_init", metric, k))) if v is not None]
                cells.append(f"{short} {own:.2f}" + (f" ({', '.join(refs)})" if refs else ""))
            if cells:
                parts.append(f"{b}: " + ", ".join(cells))
        if parts:
            lines.append(f"- Frozen features of `{a}`: " + "; ".join(parts) + ".")
    lines += _diagnose_findings(cfg, res)
    for a in arms:
        mon, knn = res["pretrain"][a].get("monitor"), res["pretrain"][a]["knn"]
        if mon and knn:
            best = max(v for _, v in knn)
            every = cfg["pretrain"]["overrides"]["monitor.every_steps"]
            lines.append(f"- k-NN monitor of `{a}`: {knn[0][1]:.1f} at step {knn[0][0]}, best {best:.1f}, "
                         f"{knn[-1][1]:.1f} at step {knn[-1][0]}. Overhead: {mon['evaluations']} evaluations took "
                         f"{mon['monitor_s']:.1f} s of the run's {mon['wall_s']:.0f} s wall time "
                         f"({mon['percent']:.1f} %); steady state {mon['eval_s']:.1f} s per evaluation against "
                         f"{mon['train_s_per_interval']:.0f} s of training per {every} steps "
                         f"({mon['steady_percent']:.1f} %).")
    return lines


def _diagnose_findings(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """The paper (Fig. 4): without GRN, FCMAE features collapse (low channel cosine distance); GRN restores it."""
    diag = res["diagnose"]
    if not diag:
        return []
    dist = {m["name"]: m["mean_distance"] for m in diag["models"]}
    text = ", ".join(f"{n} {d:.4f}" for n, d in dist.items())
    lines = [f"- Feature diversity (mean channel cosine distance of the expansion layers over all blocks): {text}."]
    v1 = [a for a, o in cfg["pretrain"]["arms"].items() if a in dist and _is_v1(cfg, o)]
    arms = {a: o.get("model.use_grn", True) for a, o in cfg["pretrain"]["arms"].items() if a in dist and a not in v1}
    grn = [a for a, uses in arms.items() if uses]
    nogrn = [a for a, uses in arms.items() if not uses]
    if grn and v1:
        a, b = dist[grn[0]], dist[v1[0]]
        # a margin against calling per-image noise a collapse (per-block stds over images are ~0.01-0.03)
        verdict = ("V1 lower by more than 0.05: the collapse the paper reports for FCMAE on ConvNeXt V1, removed by "
                   "GRN" if b < a - 0.05 else
                   "within 0.05 of each other: no collapse of V1 relative to V2 at this scale" if b <= a else
                   "V1 not lower: no collapse of V1 relative to V2 at this scale")
        verdict += "" if b < a - 0.05 else "; the paper's finding (measured on ImageNet-1K) does not reproduce here"
        lines.append(f"- ConvNeXt V1 (LayerScale) vs V2 (GRN), the paper's comparison: `{v1[0]}` {b:.4f} vs "
                     f"`{grn[0]}` {a:.4f}: {verdict}.")
    if grn and nogrn:
        a, b = dist[grn[0]], dist[nogrn[0]]
        verdict = ("higher with GRN, the direction the paper reports" if a > b else
                   "not higher with GRN: the paper's finding does not reproduce here (the paper measured ImageNet-1K "
                   "FCMAE models, its no-GRN one a ConvNeXt V1 with LayerScale; this study pretrains Atto for "
                   "6 epochs on 28 px images shown at 96 px, so stage 2 maps are 6 x 6 and stage 3 maps 3 x 3)")
        lines.append(f"- GRN vs no GRN: {a:.4f} vs {b:.4f}, {verdict}.")
    return lines


def _is_v1(cfg: dict[str, Any], overrides: dict[str, Any]) -> bool:
    """A pretraining arm of a ConvNeXt V1 variant (``convnext_*``: LayerScale blocks, no GRN)."""
    default = cfg["pretrain"].get("overrides", {}).get("model.name", "")
    return str(overrides.get("model.name", default)).startswith("convnext_")


# ------------------------------------------------------------------------------------------- plots
def cosine_figure(res: dict[str, Any], out: Path) -> list[str]:
    """The paper's Fig. 4 style from every diagnosed model (new and recorded): the channel cosine distance of each
    block's expansion layer against its relative depth, mean over images with a band of one std."""
    diag = res.get("diagnose")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not diag:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for m in diag["models"]:
        mean, std = m["distance"], m.get("distance_std") or [0.0] * len(m["distance"])
        line, = ax.plot(m["depth"], mean, marker="o", ms=3, label=m["name"] + (" (recorded)" if m.get("recorded")
                                                                                else ""))
        ax.fill_between(m["depth"], [a - s for a, s in zip(mean, std)], [a + s for a, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    _save(fig, ax, "relative depth of the block (0 = first, 1 = last)", "channel cosine distance",
          out / "cosine_distance_all.png", 7)
    return ["cosine_distance_all.png"]


def _save(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path, legend_size: int) -> None:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plots(cfg: dict[str, Any], res: dict[str, Any], out: Path) -> list[str]:
    """PNG files written to ``out`` (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, ylabel, name in (("knn", "k-NN top-1 (%)", "knn_monitor.png"), ("loss", "loss", "pretrain_loss.png")):
        series = {a: v[key] for a, v in res["pretrain"].items() if v[key]}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for arm, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key == "knn" else None, label=arm)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)
    budgets = _budget_names(cfg)
    if res["finetune"]:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for arm, runs in res["finetune"].items():
            xs = [i for i, (b, _) in enumerate(budgets) if b in runs]
            ys = [statistics.mean(r["top1"] for r in runs[budgets[i][0]]) for i in xs]
            es = [statistics.pstdev([r["top1"] for r in runs[budgets[i][0]]]) for i in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"fine-tune: {arm}")
        for arm in ("raw_pixels",):
            r = res["probe"].get(arm)
            if r:
                ys = [next((x["linear_top1_mean"] for x in r["summary"] if x["labels_per_class"] == k), math.nan)
                      for _, k in budgets]
                ax.plot(range(len(budgets)), ys, ls="--", color="grey", label="logistic regression on pixels")
        ax.set_xticks(range(len(budgets)), [b for b, _ in budgets])
        _save(fig, ax, "labels", "test top-1 (%)", out / "accuracy_vs_budget.png", 8)
        written.append("accuracy_vs_budget.png")
    return written


def _copy_figures(cfg: dict[str, Any], res: dict[str, Any], work: Path, out: Path) -> list[str]:
    copied = []
    if res["diagnose_dir"]:
        for name in ("cosine_distance.png", "activations.png"):
            src = Path(res["diagnose_dir"]) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
                copied.append(name)
    for arm in cfg["pretrain"]["arms"]:
        src = work / "pretrain" / arm / "reconstruction.png"
        if src.is_file() and res["pretrain"][arm]["complete"]:
            shutil.copyfile(src, out / f"reconstruction_{arm}.png")
            copied.append(f"reconstruction_{arm}.png")
        elif (out / f"reconstruction_{arm}.png").is_file():  # a recorded arm's figure, published before
            copied.append(f"reconstruction_{arm}.png")
    return copied


# ------------------------------------------------------------------------------------------- the write-up
def _recipes(cfg: dict[str, Any]) -> list[str]:
    p, f = cfg["pretrain"], cfg["finetune"]
    po = p["overrides"]
    lines = [f"- **Pretraining** (`fcmae pretrain`, arms {', '.join(f'`{a}`: {v}' for a, v in p['arms'].items())}):"
             f" {po['model.name']}, {po['data.input_size']} px (28 px upsampled), mask ratio {po['model.mask_ratio']},"
             f" decoder {po['model.decoder_depth']} x {po['model.decoder_embed_dim']}, batch {po['run.batch_size']},"
             f" blr {po['optim.blr']}, {po['optim.steps']} steps ({po['optim.warmup_steps']} warmup, cosine to 0),"
             f" k-NN monitor every {po['monitor.every_steps']} steps ({po['monitor.train_size']} labelled training"
             f" images as memory, {po['monitor.val_size']} test images).",
             f"- **Frozen features** (`fcmae probe`): global average pool of the last stage, standardised; k-NN with "
             f"k={cfg['probe']['knn_k']}, T={cfg['probe']['knn_t']} (cosine, DINO's weighted vote); linear probe = "
             "multinomial logistic regression (L-BFGS, L2 penalty picked on a held-out fifth of the labelled set). "
             f"Encoders at {cfg['probe']['input_size']} px, raw pixels at {cfg['probe']['raw_pixels_input_size']} px.",
             f"- **Fine-tuning** (`fcmae finetune {f['config']}`) at {f['overrides']['data.input_size']} px "
             "(lower than pretraining, to fit the budget), batch 64, evaluated once at the end of the schedule "
             "(no best-epoch selection on the test set); the top-1 reported is the final model's "
             "(the EMA's is in results.json):"]
    for arm, a in f["arms"].items():
        init = f"init from `{a['init']}`" if a.get("init") else "random init"
        lines.append(f"  - `{arm}`: {init}; overrides {a.get('overrides') or 'none (the recipe file)'}")
    for b, v in f["budgets"].items():
        lines.append(f"  - {b}: {v['labels_per_class'] or 'all 6000'} labels per class, {v['steps']} steps "
                     f"({v['warmup_steps']} warmup), seeds {v['seeds']} (seed = label subset and init)")
    return lines


def write_report(cfg: dict[str, Any], work: Path, out: Path, doc: Path, config_path: Path,
                 recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Regenerate ``doc``, ``out/results.json`` and the plots from the finished stages under ``work`` (stages
    missing there from ``recorded``, an earlier ``results.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    res = merge_recorded(collect(cfg, work), recorded)
    figs = plots(cfg, res, out) + _copy_figures(cfg, res, work, out) + cosine_figure(res, out)
    rel = Path(os.path.relpath(out, doc.parent))  # links relative to the page
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = ["# Does FCMAE pretraining learn something useful? Fashion-MNIST, ConvNeXt V2-Atto", "",
            *([f"**{cfg['label']}**", ""] if cfg.get("label") else []),
            "Generated by `python examples/fashion_mnist/study.py --config examples/fashion_mnist/study.yaml` "
            "(resumable; `--report-only` regenerates this page from the finished stages). Every number below is "
            "read from the runs' JSON files (`summary.json`, `fcmae probe/evaluate --json`); stages not finished "
            f"yet show as *{PENDING}*.", "", "## State", "", *status_lines(cfg, res), "",
            "## Frozen features: k-NN and linear probe (test top-1 %, mean ± std over label subsets)", "",
            "A representation that cannot beat the raw-pixel baselines learned nothing useful.", "",
            *probe_table(cfg, res), "", "## Fine-tuning (test top-1 %, mean ± std over seeds)", "",
            *finetune_table(cfg, res), "", "## Findings (read off the numbers above)", "", *findings(cfg, res), ""]
    for name, title in (("knn_monitor.png", "k-NN monitor during pretraining"),
                        ("pretrain_loss.png", "Pretraining loss"), ("accuracy_vs_budget.png", "Accuracy vs labels"),
                        ("cosine_distance_all.png", "Feature collapse: channel cosine distance per block, every "
                         "diagnosed model (paper Fig. 4 style; mean and one std over images)"),
                        ("cosine_distance.png", "Feature collapse: channel cosine distance per block (paper Fig. 4), "
                         "the models of the latest `fcmae diagnose` run"),
                        ("activations.png", "Expansion-layer activations (paper Fig. 3)")):
        if name in figs:
            text += [f"### {title}", "", f"![{title}]({rel / name})", ""]
    for arm in cfg["pretrain"]["arms"]:
        if f"reconstruction_{arm}.png" in figs:
            text += [f"### Reconstructions, {arm} (original | masked | prediction at removed patches | pasted)", "",
                     f"![reconstruction {arm}]({rel / f'reconstruction_{arm}.png'})", ""]
    if res["diagnose"]:
        text += ["| model | mean channel cosine distance | first block | last block | lowest block (index: value) |",
                 "|---|---|---|---|---|"]
        for m in res["diagnose"]["models"]:
            low = min(range(len(m["distance"])), key=m["distance"].__getitem__)
            name = m["name"] + (" (recorded)" if m.get("recorded") else "")
            text.append(f"| {name} | {m['mean_distance']:.4f} | {m['distance'][0]:.4f} | "
                        f"{m['distance'][-1]:.4f} | {low}: {m['distance'][low]:.4f} |")
        text.append("")
    ev = res["evaluate_check"]
    if ev:
        run = cfg["evaluate_check"]["run"]
        arm, budget, seed = run.rsplit("_", 2)
        in_run = next((r["top1"] for r in res["finetune"].get(arm, {}).get(budget, []) if f"s{r['seed']}" == seed),
                      None)
        in_run_txt = f" (in-run: {in_run:.2f} on the full test set)" if in_run is not None else ""
        text += [f"Cross-check: `fcmae evaluate` of `{run}/{cfg['evaluate_check']['weights']}` gives top-1 "
                 f"{ev['top1']:.2f} on {ev['images']} test images{in_run_txt}.", ""]
    text += ["## Setup", "", *_recipes(cfg), "", f"Every setting: [`{config_path.name}`]"
             "(../examples/fashion_mnist/study.yaml). Cost of each stage: `wall_s` in results.json and the run "
             "folders."]
    doc.write_text("\n".join(text) + "\n")
    return res
