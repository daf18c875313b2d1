"""Does FCMAE pretraining learn something useful? The Fashion-MNIST study, resumable, every stage through the CLI.

    python examples/fashion_mnist/study.py --config examples/fashion_mnist/study.yaml [--smoke] [--report-only]
        [--arms ARM ...]

Stages (each a ``python -m fcmae ...`` subprocess under ``nice``; settings in ``study.yaml``):

1. ``probe --raw-pixels`` and ``probe --random-init``: the baselines (logistic regression and k-NN on pixels, and
   on a random encoder's features), on the same labelled subsets as every other probe;
2. ``pretrain`` of every arm (FCMAE with GRN, without GRN), with the k-NN monitor on;
3. ``probe`` of every pretrained encoder: k-NN and linear probe on frozen features;
4. ``finetune`` of every arm (and from scratch) at 1 %, 10 %, 100 % of the labels, schedules sized in steps
   (``optim.steps``) so every run completes its cosine; 3 seeds (label subset + init) for 1 % and 10 %;
5. ``diagnose``: the paper's feature-collapse plot of every arm (+ the supervised scratch model);
6. ``evaluate``: one run's exported weights must repeat its in-run top-1.

``--arms ARM ...``: only these pretraining arms (pretrain, probe, their fine-tuning arms) and the diagnose of every
finished arm; the other arms' numbers come from ``recorded`` (a published ``results.json`` of the same recipe).

Resumable: a training stage whose ``summary.json`` exists is skipped, an interrupted one continues with
``run.resume=auto``; a probe/diagnose/evaluate stage is done when its JSON exists. After every stage the write-up
(markdown, ``results.json``, plots) is regenerated from whatever is complete, marking what is missing, into
``<work>/report/`` (outside git); at the end of the study and with ``--report-only`` into ``docs/fashion_mnist.md``
and ``docs/fashion_mnist/``. Results are read from the JSON files, never from stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def _show(p: Path) -> str:
    """A path relative to the repository when it lies inside (the work folder may be anywhere)."""
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402


# ------------------------------------------------------------------------------------------- config helpers
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` merged in (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def format_value(value: Any) -> str:
    """A YAML scalar/flow list as ``fcmae``'s ``key=value`` parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value) if value != "" else "''"  # a bare `key=` would read back as null


def as_overrides(mapping: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in mapping.items()]


# ------------------------------------------------------------------------------------------- running stages
class Study:
    """The stages of the study; ``self.work`` holds one folder per stage."""

    def __init__(self, cfg: dict[str, Any], config_path: Path) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.work = REPO / cfg["work"]
        self.out = REPO / cfg["out"]
        nice = int(cfg.get("nice", 0))
        self.prefix = ["nice", "-n", str(nice)] if nice > 0 and shutil.which("nice") else []
        rec = REPO / cfg["recorded"] if cfg.get("recorded") else None
        # read once, before any publishing could overwrite it (it may be the published results.json itself)
        self.recorded = json.loads(rec.read_text()) if rec and rec.is_file() else None

    def fcmae(self, name: str, args: list[str], done: Path) -> bool:
        """Run ``python -m fcmae <args>`` unless ``done`` exists; logs to ``<work>/logs/<name>.log``. Returns
        whether ``done`` exists afterwards (a failed stage is reported and the study goes on with the others)."""
        if done.is_file():
            print(f"[{name}] complete ({_show(done)}), skipped", flush=True)
            return True
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, sys.executable, "-m", "fcmae", *args]
        print(f"[{name}] $ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"[{name}] exit {rc} after {time.perf_counter() - t0:.0f} s; log {_show(log)}", flush=True)
        self.report()
        return done.is_file()

    def report(self, publish: bool = False) -> None:
        """Regenerate the write-up: into ``<work>/report/`` while the study runs (outside git), into ``out`` and
        ``doc`` (docs/) with ``publish`` (at the end of the study, and with ``--report-only``)."""
        out, doc = (self.out, REPO / self.cfg["doc"]) if publish else (self.work / "report",
                                                                       self.work / "report" / "fashion_mnist.md")
        try:
            write_report(self.cfg, self.work, out, doc, self.config_path, recorded=self.recorded)
        except Exception as exc:  # a report problem must not stop the runs
            print(f"[report] failed: {type(exc).__name__}: {exc}", flush=True)

    # -- stages ----------------------------------------------------------------------------------------------
    def probe_args(self, extra: list[str], input_size: int) -> list[str]:
        p = self.cfg["probe"]
        args = ["probe", *extra, "--train", "fashion_mnist:train", "--val", "fashion_mnist:test",
                "--data-root", self.cfg["data_path"], "--in-chans", "1", "--input-size", str(input_size),
                "--crop-pct", "1.0", "--labels-per-class", *map(str, p["labels_per_class"]),
                "--label-seeds", *map(str, p["label_seeds"]), "--knn-k", str(p["knn_k"]), "--knn-t", str(p["knn_t"]),
                "--num-workers", "1", "--batch-size", "256", "--no-progress", "--mixed-precision", "no"]
        return args + (["--limit", str(p["limit"])] if p.get("limit") else [])

    def probe(self, arm: str, extra: list[str], input_size: int) -> None:
        done = self.work / "probe" / f"{arm}.json"
        self.fcmae(f"probe_{arm}", [*self.probe_args(extra, input_size), "--json", str(done)], done)

    def pretrain(self, arm: str) -> bool:
        p = self.cfg["pretrain"]
        run_dir = self.work / "pretrain" / arm
        over = {**p["overrides"], **p["arms"][arm], "run.output_dir": str(run_dir), "run.resume": "auto"}
        return self.fcmae(f"pretrain_{arm}", ["pretrain", *as_overrides(over)], run_dir / "summary.json")

    def finetune(self, arm: str, budget: str, seed: int) -> bool:
        f = self.cfg["finetune"]
        a, b = f["arms"][arm], f["budgets"][budget]
        run_dir = self.work / "finetune" / f"{arm}_{budget}_s{seed}"
        over = {**f["overrides"], **a.get("overrides", {}), "data.labels_per_class": b["labels_per_class"],
                "data.label_seed": seed, "run.seed": seed, "optim.steps": b["steps"],
                "optim.warmup_steps": b["warmup_steps"], "run.output_dir": str(run_dir), "run.resume": "auto"}
        if a.get("init"):
            enc = self.work / "pretrain" / a["init"] / "encoder.safetensors"
            if not (self.work / "pretrain" / a["init"] / "summary.json").is_file():
                print(f"[finetune_{arm}] waits for pretrain_{a['init']}", flush=True)
                return False
            over["model.init"] = str(enc)
        return self.fcmae(f"finetune_{run_dir.name}", ["finetune", f["config"], *as_overrides(over)],
                          run_dir / "summary.json")

    def finetune_arm(self, arm: str, budgets: list[str] | None = None, first_seed_only: bool = False) -> None:
        f = self.cfg["finetune"]
        a = f["arms"][arm]
        for budget in budgets or a.get("budgets") or list(f["budgets"]):
            seeds = a.get("seeds") or f["budgets"][budget]["seeds"]
            for seed in seeds[:1] if first_seed_only else seeds:
                self.finetune(arm, budget, seed)

    def diagnose(self) -> None:
        d, work = self.cfg["diagnose"], self.work
        weights, names = [], []
        for arm in self.cfg["pretrain"]["arms"]:
            if (work / "pretrain" / arm / "summary.json").is_file():
                weights.append(str(work / "pretrain" / arm / "encoder.safetensors"))
                names.append(arm)
        sup = work / "finetune" / "scratch_100pct_s0"
        if (sup / "summary.json").is_file():
            weights.append(str(sup / "last.safetensors"))
            names.append("supervised (scratch, 100%)")
        tag = "_".join(n.split()[0] for n in names) or "none"
        done = work / "diagnose" / tag / "diagnose.json"
        self.fcmae(f"diagnose_{tag}", ["diagnose", *weights, "--random-init", self.cfg["probe"]["random_init"],
                                       "--names", *names, "random init", "--data", "fashion_mnist:test",
                                       "--data-root", self.cfg["data_path"], "--in-chans", "1", "--crop-pct", "1.0",
                                       "--input-size", str(d["input_size"]), "--limit", str(d["num_images"]),
                                       "--channels", str(d["channels"]), "--out", str(done.parent)], done)

    def evaluate_check(self) -> None:
        e = self.cfg["evaluate_check"]
        run_dir = self.work / "finetune" / e["run"]
        if not (run_dir / "summary.json").is_file():
            return
        done = self.work / "evaluate" / f"{e['run']}.json"
        extra = ["--limit", str(e["limit"])] if e.get("limit") else []
        self.fcmae("evaluate_check", ["evaluate", str(run_dir / e["weights"]), "--data", "fashion_mnist:test",
                                      "--data-root", self.cfg["data_path"], "--num-workers", "1", "--no-progress",
                                      "--mixed-precision", "no", *extra, "--json", str(done)], done)

    def gate(self) -> bool:
        """The from-scratch run on all labels first: below ``gate.min_top1`` the fine-tuning recipe is broken."""
        g = self.cfg["gate"]
        arm, budget, seed = g["run"]
        if not self.finetune(arm, budget, seed):
            return False
        summary = json.loads((self.work / "finetune" / f"{arm}_{budget}_s{seed}" / "summary.json").read_text())
        top1 = summary["val_top1"]  # the number the tables report (the raw weights, not the EMA)
        ok = top1 >= g["min_top1"]
        print(f"[gate] {arm} {budget} seed {seed}: top-1 {top1:.2f} % (needs {g['min_top1']}): "
              f"{'passed' if ok else 'FAILED, fix the fine-tuning recipe before comparing arms'}", flush=True)
        return ok

    def run(self) -> None:
        """The order puts the most informative results first, so a partial study already says something."""
        p = self.cfg["probe"]
        self.probe("raw_pixels", ["--raw-pixels"], p["raw_pixels_input_size"])
        self.probe("random_init", ["--random-init", p["random_init"]], p["input_size"])
        if not self.gate():
            self.report()
            sys.exit(1)
        arms = list(self.cfg["pretrain"]["arms"])
        if self.pretrain(arms[0]):
            self.probe(arms[0], [str(self.work / "pretrain" / arms[0] / "encoder.safetensors")], p["input_size"])
        main_arms = [a for a in self.cfg["finetune"]["arms"] if not self.cfg["finetune"]["arms"][a].get("budgets")]
        for arm in main_arms:  # first seed of every budget, then the other seeds, then the ablation arms
            self.finetune_arm(arm, first_seed_only=True)
        for arm in main_arms:
            self.finetune_arm(arm)
        for arm in arms[1:]:
            if self.pretrain(arm):
                self.probe(arm, [str(self.work / "pretrain" / arm / "encoder.safetensors")], p["input_size"])
        for arm in self.cfg["finetune"]["arms"]:
            self.finetune_arm(arm)
        self.diagnose()
        self.evaluate_check()
        self.report(publish=True)

    def run_arms(self, arms: list[str]) -> None:
        """Only the named pretraining arms: pretrain them all, diagnose (cheap, and the collapse question), probe,
        then the fine-tuning arms initialised from them (first seeds first), and the write-up (other stages from
        ``recorded``)."""
        unknown = [a for a in arms if a not in self.cfg["pretrain"]["arms"]]
        if unknown:
            sys.exit(f"study.py: unknown arm(s) {', '.join(unknown)}; known: {', '.join(self.cfg['pretrain']['arms'])}")
        done = [arm for arm in arms if self.pretrain(arm)]
        self.diagnose()
        for arm in done:
            enc = self.work / "pretrain" / arm / "encoder.safetensors"
            self.probe(arm, [str(enc)], self.cfg["probe"]["input_size"])
        fts = [ft for ft, a in self.cfg["finetune"]["arms"].items() if a.get("init") in done]
        for first in (True, False):
            for ft in fts:
                self.finetune_arm(ft, first_seed_only=first)
        self.report(publish=True)


def load_study_config(path: Path, smoke: bool, reduced: bool = False) -> dict[str, Any]:
    """The YAML with its ``reduced:`` and/or ``smoke:`` section merged in when asked (both removed otherwise)."""
    cfg = yaml.safe_load(path.read_text())
    smoke_cfg, reduced_cfg = cfg.pop("smoke", {}), cfg.pop("reduced", {})
    cfg = deep_merge(cfg, reduced_cfg) if reduced else cfg
    return deep_merge(cfg, smoke_cfg) if smoke else cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path(__file__).with_name("study.yaml"))
    ap.add_argument("--smoke", action="store_true", help="merge the YAML's smoke: section (a plumbing check)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the write-up from finished stages")
    ap.add_argument("--reduced", action="store_true", help="merge the YAML's reduced: section (a smaller budget)")
    ap.add_argument("--arms", nargs="+", metavar="ARM", help="run only these pretraining arms (see the docstring)")
    args = ap.parse_args()
    study = Study(load_study_config(args.config, args.smoke, args.reduced), args.config)
    if args.report_only:
        study.report(publish=True)
    elif args.arms:
        study.run_arms(args.arms)
    else:
        study.run()


if __name__ == "__main__":
    main()
