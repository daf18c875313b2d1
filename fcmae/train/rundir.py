"""The run folder: the output-folder guard (one run's outputs are never overwritten by accident)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fcmae.weights.files import WriteError, describe_os_error

# files that mean an output folder holds a run
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "encoder.safetensors",
               "best.safetensors", "last.safetensors", "last_ema.safetensors", "reconstruction.png", "tensorboard")


class RunDirError(WriteError):
    """The output folder cannot be used (another run's outputs, a file in its place) or written."""


def prepare_output_dir(out_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse to start a new run over another run's outputs unless told to (``run.resume`` / ``run.overwrite``);
    with ``overwrite`` the old run's outputs are removed first. Checks the folder can be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"run.output_dir {out_dir} is a file, not a folder")
    used = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if used and not resume and not overwrite:
        raise RunDirError(f"run.output_dir {out_dir} holds another run ({', '.join(used[:3])}); continue it with "
                          "run.resume=auto, start over with run.overwrite=true, or choose another run.output_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if used and overwrite:
            for m in used:
                target = out_dir / m
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        probe = out_dir / ".fcmae_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(describe_os_error(exc, out_dir)) from None
