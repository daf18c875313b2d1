"""FCMAE on Fashion-MNIST: pretrain -> convert -> fine-tune vs scratch at several label budgets, then a report.

Every stage runs ``python -m fcmae ...`` as a subprocess with ``key=value`` overrides taken from the study YAML, so
what is exercised is the CLI a user would type. Stages whose outputs exist are skipped (``--force`` reruns them);
an interrupted pretraining or fine-tuning run continues from its last checkpoint (``run.resume=auto``).

    python examples/fashion_mnist/study.py --config examples/fashion_mnist/study.yaml [--out docs/fashion_mnist]
        [--work /tmp/fmnist_study] [--smoke] [--force]

Stages: (1) ``fcmae pretrain`` on the 60k training images without labels; (2) ``fcmae convert`` of the encoder;
(3) ``fcmae visualize`` on test images; (4) ``fcmae finetune`` from the converted encoder and from scratch, one run
per label budget and arm, each with the same recipe and the same number of optimizer steps; (5) ``fcmae evaluate``
on one run's exported weights as a cross-check of the in-run test accuracy; then ``results.md``, ``results.json``
and the plots in ``--out``. ``--smoke`` merges the YAML's ``smoke:`` section over the rest: a plumbing check.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ARMS = ("scratch", "fcmae")  # fine-tuning arms: random init, FCMAE-pretrained init
ARM_TITLE = {"scratch": "scratch", "fcmae": "FCMAE-pretrained"}


# ------------------------------------------------------------------------------------------- config helpers
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` merged in (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_value(value: Any) -> str:
    """A YAML scalar/flow list as ``fcmae``'s ``key=value`` parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def as_overrides(mapping: dict[str, Any]) -> list[str]:
    """``{"optim.blr": 1e-3}`` -> ``["optim.blr=0.001"]``."""
    return [f"{key}={format_value(value)}" for key, value in mapping.items()]


def budget_tag(fraction: float) -> str:
    """0.01 -> ``1pct`` (names of run directories and of rows in the report)."""
    return f"{fraction * 100:g}pct"


# ------------------------------------------------------------------------------------------- running stages
class StageRunner:
    """Runs ``python -m fcmae`` subprocesses (niced), logs them, times them and skips finished stages."""

    def __init__(self, nice: int, force: bool) -> None:
        self.force = force
        self.prefix = ["nice", "-n", str(nice)] if nice > 0 and shutil.which("nice") else []
        self.records: dict[str, dict[str, Any]] = {}

    def run(self, name: str, stage_dir: Path, args: list[str]) -> dict[str, Any]:
        """Run ``fcmae <args>`` for stage ``name`` unless ``stage_dir/stage.json`` says it finished.

        The marker is written only after a zero exit status, so a crashed stage runs again (and pretraining or
        fine-tuning resume from their checkpoints). Returns the marker: command, wall time, captured output.
        """
        marker = stage_dir / "stage.json"
        if marker.is_file() and not self.force:
            rec = json.loads(marker.read_text())
            print(f"[{name}] done before ({rec['wall_s']:.0f} s), skipped; --force reruns it", flush=True)
            rec["skipped"] = True
            self.records[name] = rec
            return rec
        if self.force and stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, sys.executable, "-m", "fcmae", *args]
        print(f"[{name}] $ {' '.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        lines: list[str] = []
        t0 = time.perf_counter()
        with open(stage_dir / "log.txt", "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                print(f"[{name}] {line}", end="", flush=True)
            rc = proc.wait()
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"stage {name} failed with exit status {rc}; its log: {stage_dir / 'log.txt'}")
        rec = {"stage": name, "cmd": cmd, "wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "output": lines[-40:]}
        marker.write_text(json.dumps(rec, indent=1))
        print(f"[{name}] finished in {wall:.0f} s", flush=True)
        rec["skipped"] = False
        self.records[name] = rec
        return rec


# ------------------------------------------------------------------------------------------- reading results
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_curve(records: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """``(steps, losses, lrs)`` of the training-loss records (the last run's when a resumed run logged twice)."""
    by_step: dict[int, tuple[float, float]] = {}
    for r in records:
        if "loss" in r and "step" in r and "val_top1" not in r:
            by_step[int(r["step"])] = (float(r["loss"]), float(r["lr"]))
    steps = sorted(by_step)
    return steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps]


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's closing ``{"summary": ...}`` record."""
    for r in reversed(records):
        if "summary" in r:
            return r["summary"]
    raise ValueError("no summary record: the run did not finish")


def label_counts(data_path: str, fractions: list[float], limit: int, label_seed: int) -> dict[float, int]:
    """Training images per budget, computed with the library's own stratified rule (what ``fcmae finetune`` uses)."""
    from fcmae.data import load_fashion_mnist_arrays
    from fcmae.finetuning import stratified_subset

    _, labels = load_fashion_mnist_arrays(data_path, "train")
    labels = labels[:limit] if limit else labels
    return {f: len(stratified_subset(labels.tolist(), f, 0, label_seed)) for f in fractions}


def write_test_images(data_path: str, out_dir: Path, per_class: int) -> list[Path]:
    """The first ``per_class`` test images of every class as 28x28 PNGs (inputs of ``fcmae visualize``)."""
    from PIL import Image

    from fcmae.data import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays

    images, labels = load_fashion_mnist_arrays(data_path, "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, cname in enumerate(FASHION_MNIST_CLASSES):
        for k, i in enumerate([i for i in range(len(labels)) if labels[i] == c][:per_class]):
            p = out_dir / f"{c:02d}_{k}_{re.sub(r'[^a-z0-9]+', '_', cname.lower())}.png"
            Image.fromarray(images[i], mode="L").save(p)
            paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------- plots
def plot_all(out: Path, pretrain_records: list[dict[str, Any]], ft: dict[str, dict[str, Any]],
             budgets: list[float], counts: dict[float, int], val_images: int) -> list[Path]:
    """pretrain_loss.png, finetune_loss.png, accuracy_vs_budget.png in ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on the training machine
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('the plots need matplotlib: pip install -e ".[examples]"') from None

    written = []
    steps, losses, lrs = train_curve(pretrain_records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", lw=1.2, label="loss (mean of 10 steps)")
    ax.set_xlabel("optimizer step (batch 64)")
    ax.set_ylabel("FCMAE loss (norm-pix MSE, removed cells)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, lrs, color="tab:gray", lw=0.8, ls=":", label="lr")
    ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_title("FCMAE pretraining, ConvNeXt V2-Atto, Fashion-MNIST train (60k, no labels)")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.85))
    fig.tight_layout()
    written.append(out / "pretrain_loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), sharey=True)
    for ax, b in zip(list(axes) if len(budgets) > 1 else [axes], budgets):
        for arm, color in zip(ARMS, ("tab:orange", "tab:blue")):
            run = ft.get(f"{arm}_{budget_tag(b)}")
            if run is None:
                continue
            s, ls, _ = train_curve(run["records"])
            ax.plot(s, ls, color=color, lw=1.2, label=ARM_TITLE[arm])
        ax.set_title(f"{budget_tag(b).replace('pct', '%')} of the labels ({counts[b]} images)")
        ax.set_xlabel("optimizer step (batch 64)")
        ax.grid(alpha=0.3)
        ax.legend()
    (axes[0] if len(budgets) > 1 else axes).set_ylabel("training loss (label smoothing 0.1)")
    fig.suptitle("Fine-tuning loss: same recipe, same number of steps")
    fig.tight_layout()
    written.append(out / "finetune_loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [counts[b] for b in budgets]
    for arm, color in zip(ARMS, ("tab:orange", "tab:blue")):
        for key, style, what in (("val_top1", "-o", "top-1"), ("ema_top1", "--s", "EMA top-1")):
            ys = [ft[f"{arm}_{budget_tag(b)}"]["summary"].get(key) for b in budgets]
            if any(y is None for y in ys):
                continue
            ax.plot(xs, ys, style, color=color, lw=1.4, ms=5, label=f"{ARM_TITLE[arm]}, {what}",
                    alpha=1.0 if key == "val_top1" else 0.6)
            if key == "val_top1":
                for x, y in zip(xs, ys):
                    dy = 6 if arm == "fcmae" else -13  # labels above the pretrained line, below scratch
                    ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                                fontsize=8, color=color)
    ax.margins(y=0.12)  # room for the value labels
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x}\n({budget_tag(b).replace('pct', '%')})" for x, b in zip(xs, budgets)])
    ax.set_xlabel("labelled training images")
    ax.set_ylabel(f"test top-1 (%), {val_images} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Fashion-MNIST test accuracy vs label budget")
    fig.tight_layout()
    written.append(out / "accuracy_vs_budget.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


# ------------------------------------------------------------------------------------------- report
def median_throughput(records: list[dict[str, Any]]) -> float | None:
    """Median img/s over the logging intervals: the speed of the quiet intervals when other processes competed
    for the cores during part of the run (the run's mean img/s includes those slow intervals)."""
    ips = sorted(float(r["img_per_s"]) for r in records if "img_per_s" in r)
    return ips[len(ips) // 2] if ips else None


def fmt(v: float | None, digits: int = 2) -> str:
    """A number for the tables, or n/a."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def write_results(out: Path, cfg: dict[str, Any], args: argparse.Namespace, runner: StageRunner,
                  pretrain_records: list[dict[str, Any]], ft: dict[str, dict[str, Any]], budgets: list[float],
                  counts: dict[float, int], plans: dict[str, dict[str, Any]], check: dict[str, Any],
                  val_images: int) -> Path:
    """results.md (tables) and results.json (every number) in ``out``."""
    rows = []
    for b in budgets:
        s = ft[f"scratch_{budget_tag(b)}"]["summary"]
        p = ft[f"fcmae_{budget_tag(b)}"]["summary"]
        d = None if p["val_top1"] is None or s["val_top1"] is None else p["val_top1"] - s["val_top1"]
        de = None if p.get("ema_top1") is None or s.get("ema_top1") is None else p["ema_top1"] - s["ema_top1"]
        plan = plans[budget_tag(b)]
        ws = runner.records[f"ft_scratch_{budget_tag(b)}"]["wall_s"]
        wp = runner.records[f"ft_fcmae_{budget_tag(b)}"]["wall_s"]
        rows.append(f"| {budget_tag(b).replace('pct', '%')} ({counts[b]}) | {plan['epochs']} x {plan['spe']} "
                    f"= {plan['schedule_steps']}, lr at stop {fmt(plan.get('lr_at_stop'), 3)} x peak "
                    f"| {fmt(s['val_top1'])} / {fmt(s.get('ema_top1'))} "
                    f"| {fmt(p['val_top1'])} / {fmt(p.get('ema_top1'))} | {fmt(d)} / {fmt(de)} | {ws:.0f} | {wp:.0f} |")
    steps = cfg["finetune"]["steps"]
    stage_rows = []
    total = 0.0
    for name, rec in runner.records.items():
        total += rec["wall_s"]
        stage_rows.append(f"| {name} | {rec['wall_s']:.0f} | {rec['finished']} |")
    cmd = "python examples/fashion_mnist/study.py --config " + args.config + (" --smoke" if args.smoke else "")
    pt = summary_of(pretrain_records)
    pt_median = median_throughput(pretrain_records)
    pt_images = cfg["pretrain"]["overrides"].get("data.limit") or 60000  # the Fashion-MNIST training split
    lines = [
        "# Fashion-MNIST: FCMAE-pretrained vs scratch (generated by examples/fashion_mnist/study.py)",
        "",
        f"Regenerate: `{cmd}`" + (" (SMOKE RUN: plumbing check, the numbers mean nothing)" if args.smoke else ""),
        "",
        f"Test top-1 (%) on {val_images} Fashion-MNIST test images "
        f"after {steps} fine-tuning steps of batch {cfg['finetune']['overrides']['run.batch_size']} for every run, "
        "as `model / EMA`. Δ = pretrained minus scratch. Budget: labelled training images (stratified, label seed "
        f"{cfg['finetune']['label_seed']}); schedule: the cosine spans whole epochs (epochs x steps per epoch), "
        f"every run stops after {steps} steps. Wall: seconds per run (training + evaluation, process start included).",
        "",
        "| budget (images) | schedule | scratch | FCMAE-pretrained | Δ | wall scratch (s) | wall FCMAE (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Pretraining: {pt['steps']} steps ({pt['epochs']} epochs of {pt_images} images), final loss "
        f"{pt['final_loss']:.4f}, {pt['wall_s']:.0f} s in the training loop: {pt['img_per_s']:.1f} img/s on average, "
        f"median {fmt(pt_median, 1)} img/s over its {cfg['pretrain']['overrides'].get('run.log_every', 10)}-step "
        "logging intervals (slow intervals: other processes on the same cores).",
        "",
        f"Cross-check: `fcmae evaluate {check['weights']}` gives top-1 {fmt(check['top1'])} "
        f"(in-run EMA top-1 {fmt(check['expected'])}).",
        "",
        "## Wall time per stage (s, process start to exit)",
        "",
        "| stage | wall (s) | finished |",
        "| --- | --- | --- |",
        *stage_rows,
        f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | |",
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "![fine-tuning loss](finetune_loss.png)",
        "",
        "![accuracy vs label budget](accuracy_vs_budget.png)",
        "",
        "![reconstructions on test images](reconstruction_test.png)",
        "",
    ]
    md = out / "results.md"
    md.write_text("\n".join(lines))
    blob = {
        "smoke": args.smoke, "study": cfg, "label_counts": {budget_tag(b): counts[b] for b in budgets},
        "schedules": plans, "pretrain": {**pt, "median_img_per_s": pt_median},
        "finetune": {k: {**v["summary"], "median_img_per_s": median_throughput(v["records"])} for k, v in ft.items()},
        "evaluate_check": check,
        "stages": {k: {"wall_s": v["wall_s"], "finished": v["finished"], "cmd": v["cmd"]}
                   for k, v in runner.records.items()},
        "total_wall_s": total,
    }
    (out / "results.json").write_text(json.dumps(blob, indent=1, default=str))
    return md


# ------------------------------------------------------------------------------------------- the study
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/fashion_mnist/study.yaml", help="the study's YAML")
    ap.add_argument("--out", default=None,
                    help="report folder (default: docs/fashion_mnist; <work>/report with --smoke)")
    ap.add_argument("--work", default="/tmp/fmnist_study", help="run outputs (checkpoints, logs); 'full'/'smoke' "
                    "subfolders")
    ap.add_argument("--smoke", action="store_true", help="tiny version (few steps, data.limit) to check the plumbing")
    ap.add_argument("--force", action="store_true", help="rerun every stage, also those that finished before")
    args = ap.parse_args(argv)

    cfg = yaml.safe_load(Path(args.config).read_text())
    smoke_cfg = cfg.pop("smoke", {}) or {}
    if args.smoke:
        cfg = deep_merge(cfg, smoke_cfg)
    work = Path(args.work).resolve() / ("smoke" if args.smoke else "full")
    out = Path(args.out) if args.out else (work / "report" if args.smoke else REPO / "docs" / "fashion_mnist")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(int(cfg.get("nice", 0)), args.force)
    data_path = cfg["data_path"]
    t_study = time.perf_counter()

    # (1) pretraining, no labels
    pcfg = cfg["pretrain"]
    pdir = work / "pretrain"
    p_over = {**pcfg["overrides"], "data.path": data_path, "run.output_dir": str(pdir), "run.resume": "auto"}
    runner.run("pretrain", pdir, ["pretrain", *([pcfg["config"]] if pcfg.get("config") else []),
                                  *as_overrides(p_over)])
    pretrain_records = read_jsonl(pdir / "metrics.jsonl")
    summary_of(pretrain_records)  # fails early, naming the problem, if the run did not finish

    # (2) encoder -> dense layout
    cdir = work / "convert"
    dense = cdir / "encoder_dense.safetensors"
    runner.run("convert", cdir, ["convert", str(pdir / "encoder.safetensors"), str(dense)])

    # (3) reconstructions of held-out test images
    vcfg = cfg.get("visualize", {})
    vdir = work / "visualize"
    imgs = write_test_images(data_path, work / "test_images", int(vcfg.get("images_per_class", 1)))
    runner.run("visualize", vdir, ["visualize", str(pdir), *map(str, imgs), "--out", str(vdir / "reconstruction.png"),
                                   "--seed", str(vcfg.get("seed", 0)), "--max-images", str(len(imgs))])
    shutil.copyfile(vdir / "reconstruction.png", out / "reconstruction_test.png")

    # (4) fine-tuning: both arms, every budget, a fixed number of optimizer steps
    fcfg = cfg["finetune"]
    f_over = dict(fcfg["overrides"])
    batch = int(f_over["run.batch_size"])
    steps, warmup = int(fcfg["steps"]), int(fcfg["warmup_steps"])
    budgets = [float(b) for b in fcfg["budgets"]]
    counts = label_counts(data_path, budgets, int(f_over.get("data.limit", 0)), int(fcfg["label_seed"]))
    plans: dict[str, dict[str, Any]] = {}
    ft: dict[str, dict[str, Any]] = {}
    for b in budgets:
        # the library's schedule spans optim.epochs whole epochs: take the fewest that hold `steps` optimizer steps
        # and stop at `steps` with run.max_steps; warmup is given in epochs, so convert the fixed number of steps
        spe = counts[b] // batch  # drop_last=True, accum_iter 1
        if spe < 1:
            raise SystemExit(f"budget {b}: {counts[b]} images are fewer than one batch of {batch}")
        epochs = math.ceil(steps / spe)
        plans[budget_tag(b)] = {"images": counts[b], "spe": spe, "epochs": epochs, "schedule_steps": epochs * spe,
                                "warmup_epochs": warmup / spe}
        for arm in ARMS:
            name = f"{arm}_{budget_tag(b)}"
            rdir = work / "finetune" / name
            over = {**f_over, "data.train_fraction": b, "data.label_seed": fcfg["label_seed"],
                    "optim.epochs": epochs, "optim.warmup_epochs": warmup / spe, "run.max_steps": steps,
                    "run.output_dir": str(rdir), "run.resume": "auto"}
            if arm == "fcmae":
                over["model.init"] = str(dense)
            runner.run(f"ft_{name}", rdir, ["finetune", fcfg["config"], *as_overrides(over)])
            records = read_jsonl(rdir / "metrics.jsonl")
            summary = summary_of(records)
            if summary["steps"] != steps:
                raise SystemExit(f"{name}: ran {summary['steps']} optimizer steps, expected {steps}")
            ft[name] = {"records": records, "summary": summary}
            # where the truncated cosine stood when the run stopped (the same for both arms of a budget)
            lrs = train_curve(records)[2]
            plans[budget_tag(b)]["lr_at_stop"] = lrs[-1] / summary["lr"] if lrs else None

    # (5) the exported weights reproduce the in-run number through `fcmae evaluate`
    ecfg = cfg.get("evaluate_check", {})
    check: dict[str, Any] = {"run": ecfg.get("run"), "weights": None, "top1": None, "expected": None}
    if ecfg.get("run") in ft:
        weights = work / "finetune" / ecfg["run"] / ecfg.get("weights", "last_ema.safetensors")
        eargs = ["evaluate", str(weights), "--data", "fashion_mnist:test", "--data-root", data_path,
                 "--num-workers", "1", "--batch-size", "256", "--no-progress", "--mixed-precision", "no"]
        if ecfg.get("limit"):
            eargs += ["--limit", str(ecfg["limit"])]
        rec = runner.run("evaluate_check", work / "evaluate_check", eargs)
        m = next((re.search(r"top-1 ([\d.]+)", ln) for ln in rec["output"] if ln.startswith("top-1")), None)
        key = "ema_top1" if "ema" in weights.name else "val_top1"
        check.update(weights=str(weights.relative_to(work)), top1=float(m[1]) if m else None,
                     expected=ft[ecfg["run"]]["summary"].get(key))

    val_images = int(f_over.get("data.val_limit") or 10000)  # the Fashion-MNIST test split has 10k images
    plots = plot_all(out, pretrain_records, ft, budgets, counts, val_images)
    md = write_results(out, cfg, args, runner, pretrain_records, ft, budgets, counts, plans, check, val_images)
    print(f"study done in {time.perf_counter() - t_study:.0f} s (this invocation); report: {md}")
    for p in plots:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
