"""The checks a training command makes before it imports torch: they need only the file system, so a used output
folder, a missing data path or a missing checkpoint answers as fast as a config error (a tenth of a second instead of
the seconds torch, timm and accelerate take to import).

Nothing here imports torch (``tests/test_newcomer.py`` checks it). The trainer checks the same things again later,
with the lock held (a folder may change in between); the messages are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the run folder's own names beside the trainer's files: trackers' local files, their run ids, the figures kept per
# export (``fcmae.train.tracking``), the report (``fcmae.train.report``)
TRACKERS_DIR, TRACKING_FILE, FIGURES_DIR, REPORT_FILE, REPORT_DIR = (
    "trackers", "tracking.json", "figures", "report.html", "report")
# files and folders that mean an output folder holds a run (the guard in ``fcmae.train.rundir``)
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "encoder.safetensors",
               "best.safetensors", "last.safetensors", "last_ema.safetensors", "reconstruction.png", "tensorboard",
               TRACKERS_DIR, TRACKING_FILE, FIGURES_DIR, REPORT_FILE, REPORT_DIR)
# run.log_with name -> the module it needs (accelerate drops a tracker whose package is missing without a word)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
                   "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "trackio": "trackio"}


class PreflightError(ValueError):
    """A start that cannot work, found before anything heavy is imported (exit status 1, one line)."""


def output_dir_problem(out_dir: Path, resume: str, overwrite: bool) -> str | None:
    """Why a new run cannot start in ``out_dir`` (a file in its place, another run's outputs without
    ``run.resume`` / ``run.overwrite``), or None."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"run.output_dir {out_dir} is a file, not a folder"
    used = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if used and not resume and not overwrite:
        return (f"run.output_dir {out_dir} holds another run ({', '.join(used[:3])}); continue it with "
                "run.resume=auto, start over with run.overwrite=true, or choose another run.output_dir")
    return None


def _local(spec: str) -> Path | None:
    """A data spec that names one local path (not a URL, a ``pipe:`` command, a brace pattern or a glob), else
    None."""
    if not spec or "://" in spec or spec.startswith("pipe:") or any(c in spec for c in "{*?["):
        return None
    return Path(spec).expanduser()


def _paths(cfg: Any) -> list[tuple[str, str]]:
    """``(key, value)`` of the config's paths that must exist before the run starts."""
    from fcmae.data.sources import get_source

    d, out = cfg.data, []
    if getattr(d, "train_path", "") or getattr(d, "val_path", ""):  # fine-tuning's two paths
        out += [("data.train_path", d.train_path), ("data.val_path", d.val_path)]
    elif get_source(d.source).path != "none":
        out.append(("data.path", d.path))
    out.append(("model.init", getattr(cfg.model, "init", "")))
    if cfg.run.resume not in ("", "auto"):
        out.append(("run.resume", cfg.run.resume))
    return [(k, v) for k, v in out if v]


def preflight(cfg: Any) -> None:
    """Raise ``PreflightError`` for a start that cannot work: a used or unusable output folder, a missing data path,
    init checkpoint or resume checkpoint."""
    problem = output_dir_problem(Path(cfg.run.output_dir).absolute(), cfg.run.resume, cfg.run.overwrite)
    if problem:
        raise PreflightError(problem)
    import importlib.util

    for name in cfg.run.log_with:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise PreflightError(f"run.log_with: {name} is not installed (pip install {name}, or "
                                 f"pip install 'fcmae[trackers]')")
    for key, value in _paths(cfg):
        p = _local(value)
        if p is not None and not p.exists():
            raise PreflightError(f"{key}: {p} does not exist")
