"""``fcmae verify RUN_DIR [--json PATH]``: the state of every checkpoint of a run, content checked.

Each ``checkpoints/step_N`` is ``ok``, ``incomplete`` (no manifest, a missing or short file: an interrupted save)
or ``corrupt`` (an unreadable manifest, a file whose bytes do not match the CRC-32 recorded when it was written),
with the reason. Exit status 0 when the newest checkpoint is ok (what ``run.resume=auto`` would continue from
without skipping anything), 1 otherwise (also with no checkpoint at all).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument

    p.add_argument("run_dir", help="a run's output folder (or its checkpoints/ folder)")
    add_json_argument(p)


def _checkpoints_root(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    return run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir


def verify_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"run_dir", "checkpoints": [{"name", "path", "state", "reason"}], "newest_ok", "latest_good"}``."""
    from fcmae.weights.checkpoints import OK, checkpoint_status, list_checkpoints

    root = _checkpoints_root(Path(run_dir))
    rows = []
    for p in list_checkpoints(root):
        state, why = checkpoint_status(p, content=True)
        rows.append({"name": p.name, "path": str(p), "state": state, "reason": why})
    good = [r for r in rows if r["state"] == OK]
    return {"run_dir": str(run_dir), "checkpoints": rows, "newest_ok": bool(rows) and rows[-1]["state"] == OK,
            "latest_good": good[-1]["path"] if good else None}


def _report(result: dict[str, Any]) -> None:
    for r in result["checkpoints"]:
        print(f"{r['name']}: {r['state']}" + (f" ({r['reason']})" if r["reason"] else ""))
    if not result["checkpoints"]:
        print(f"no checkpoint in {result['run_dir']}")
    elif result["newest_ok"]:
        print(f"newest checkpoint is ok: {result['latest_good']}")
    else:
        fallback = result["latest_good"] or "scratch"
        print(f"newest checkpoint is not usable; run.resume=auto would continue from {fallback}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_guarded, write_json

    def go() -> int:
        result = verify_run(args.run_dir)
        _report(result)
        write_json(args.json, result)
        return 0 if result["newest_ok"] else 1

    return run_guarded("verify", go)
