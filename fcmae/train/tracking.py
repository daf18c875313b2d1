"""Where a run's records go: ``metrics.jsonl`` (always), the experiment trackers of ``run.log_with`` through
accelerate's tracker API (TensorBoard, Weights & Biases, MLflow, Aim, ...), and a small copy of every figure.

- Every record of metrics.jsonl (``train``, ``eval``, ``monitor``, ``interrupted``, ``summary``) goes to the trackers
  with the same step, its numeric fields named ``<type>/<field>`` (``train/loss``, ``eval/val_top1``); the summary at
  the run's last step. The merged config is logged once as hyperparameters (flat ``section.key`` names).
- Figures (``ctx.image``: a PNG path, tracker-neutral) go to every tracker that takes images, and a copy at most
  ``FIGURE_WIDTH`` pixels wide is kept per step in ``<output_dir>/figures/`` (``fcmae report`` shows them over time).
- A resume continues the same tracker run where the tracker allows it: the ids are kept in
  ``<output_dir>/tracking.json`` (W&B: the run id, resumed with ``resume="allow"``; MLflow: the run id; TensorBoard:
  the same folder, with ``purge_step`` so the steps after the checkpoint are replaced, not doubled). Local trackers
  write under ``<output_dir>/trackers/`` (TensorBoard, W&B's files, MLflow's file store unless ``MLFLOW_TRACKING_URI``
  names another).
- ``close()`` ends every tracker; the trainer calls it however the run ends (finished, stopped, interrupted, failed).

Main process only: the other processes log nothing.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from fcmae.train.preflight import FIGURES_DIR, TRACKERS_DIR, TRACKING_FILE
from fcmae.weights.files import strict_json, write_json_atomic, write_text_atomic

FIGURE_WIDTH = 640  # the kept copy of a figure: small enough to keep one per export


class TrackerError(ValueError):
    """A tracker of ``run.log_with`` could not start (exit status 1, one line)."""


def hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config -> flat ``{"section.key": value}`` of the scalar types every tracker takes (others as JSON)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(hyperparameters(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def scalars(record: dict[str, Any]) -> tuple[int | None, dict[str, float]]:
    """A metrics.jsonl record -> (step, ``{"<type>/<field>": number}``); a summary's fields at its ``steps``."""
    kind = record.get("type", "train")
    fields = record.get("summary", {}) if kind == "summary" else record
    step = fields.get("steps") if kind == "summary" else record.get("step")
    values = {f"{kind}/{k}": float(v) for k, v in fields.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "timestamp")
              and math.isfinite(v)}
    return (int(step) if step is not None else None), values


class Tracking:
    """metrics.jsonl, the trackers of ``run.log_with`` (started on ``accelerator``) and the kept figures.

    ``step``: where this segment starts (0, or the resumed checkpoint's step); records after it are dropped from
    metrics.jsonl and the kept figures first (a resumed run logs them again).
    """

    def __init__(self, accelerator: Any, out_dir: Path, cfg: Any, step: int) -> None:
        self.accelerator, self.out_dir, self.cfg = accelerator, out_dir, cfg
        self.enabled = bool(accelerator.is_main_process)
        self.path = out_dir / "metrics.jsonl"
        self.names: list[str] = list(cfg.run.log_with) if self.enabled else []
        self.open = False
        if self.enabled:
            self._truncate_after(step)
            if self.names:
                self._start(step)

    # -- start ------------------------------------------------------------------------------------------------
    def _start(self, step: int) -> None:
        from fcmae.config import to_dict

        run, ids = self.cfg.run, self._saved_ids()
        local = self.out_dir / TRACKERS_DIR
        local.mkdir(parents=True, exist_ok=True)
        name = run.run_name or self.out_dir.name
        ids.setdefault("wandb", {"id": uuid.uuid4().hex[:12]})
        kwargs: dict[str, dict[str, Any]] = {
            "wandb": {"name": name, "id": ids["wandb"]["id"], "resume": "allow", "dir": str(local)},
            "mlflow": {"run_name": name, "run_id": ids.get("mlflow", {}).get("run_id"),
                       "logging_dir": str(local / "mlflow-artifacts")},
            "tensorboard": {"purge_step": step + 1} if step > 0 else {},
        }
        if "mlflow" in self.names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # a local file store in the run folder (MLflow 3 keeps that store in maintenance mode and asks for
            # this opt-in; a database or a server: set MLFLOW_TRACKING_URI)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((local / "mlruns").as_uri())
        config = hyperparameters(to_dict(self.cfg))
        try:
            self.accelerator.init_trackers(run.project, config=None, init_kwargs=kwargs)
        except Exception as exc:  # a tracker's own error (a bad URI, no login): one line, no traceback
            self.open = True
            self.close()
            raise TrackerError(f"run.log_with={','.join(self.names)}: a tracker could not start: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.open = True
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow":  # params are immutable in MLflow: a resume adds only the new keys
                ids["mlflow"] = {"run_id": tracker.tracker.info.run_id}
                known = set(_mlflow_params(ids["mlflow"]["run_id"]))
                tracker.store_init_configuration({k: v for k, v in config.items() if k not in known})
            else:
                tracker.store_init_configuration(config)
        write_json_atomic(self.out_dir / TRACKING_FILE, ids)

    def _saved_ids(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.out_dir / TRACKING_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (and summaries) and the figures kept after it."""
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if rec.get("type") != "summary" and "summary" not in rec and rec.get("step", 0) <= step:
                    keep.append(line)
            write_text_atomic(self.path, "".join(x + "\n" for x in keep))
        for fig in sorted((self.out_dir / FIGURES_DIR).glob("*_step*.png")):
            if int(fig.stem.rsplit("_step", 1)[1]) > step:
                fig.unlink()

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """One record: a line of strict JSON in metrics.jsonl (NaN is null), and its numbers to the trackers."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(strict_json(record) + "\n")
        if self.open:
            step, values = scalars(record)
            if values:
                self.accelerator.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A figure (PNG) at ``step``: to every tracker that takes images, and a small copy in ``figures/``."""
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            rgb = im.convert("RGB")
        small = rgb if rgb.width <= FIGURE_WIDTH else rgb.resize(
            (FIGURE_WIDTH, round(rgb.height * FIGURE_WIDTH / rgb.width)), Image.Resampling.LANCZOS)
        figures = self.out_dir / FIGURES_DIR
        figures.mkdir(exist_ok=True)
        small.save(figures / f"{tag}_step{step:08d}.png", optimize=True)
        if self.open:
            for tracker in self.accelerator.trackers:
                _log_image(tracker, tag, np.asarray(rgb), step)

    def close(self) -> None:
        """End every tracker (idempotent; the process group stays: ``accelerator.end_training`` ends that)."""
        if not self.open:
            return
        self.open = False
        trackers, self.accelerator.trackers = self.accelerator.trackers, []
        for tracker in trackers:
            tracker.finish()


def _log_image(tracker: Any, tag: str, rgb: Any, step: int) -> None:
    """``rgb``: ``(H, W, 3)`` uint8. Each tracker takes images its own way; one that takes none is skipped."""
    if tracker.name == "tensorboard":
        tracker.log_images({tag: rgb[None]}, step=step, dataformats="NHWC")
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_image(rgb, key=tag, step=step)
    else:
        try:
            tracker.log_images({tag: [rgb]}, step=step)
        except (NotImplementedError, AttributeError):
            pass


def _mlflow_params(run_id: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.get_run(run_id).data.params)

