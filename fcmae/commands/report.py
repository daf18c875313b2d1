"""``fcmae report RUN_DIR``: a self-contained HTML report of a run (``RUN_DIR/report.html``) and its plots as PNGs
(``RUN_DIR/report/``); see ``fcmae.train.report``. Works while the run is going on."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fcmae.commands._common import add_json_argument

    p.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining or fine-tuning run folder (run.output_dir)")
    add_json_argument(p)


def _report(r: dict[str, Any]) -> None:
    print(f"report: {r['report']}")
    print(f"plots: {', '.join(r['plots'])}")


def run(args: argparse.Namespace) -> int:
    from fcmae.commands._common import run_reporting
    from fcmae.train.report import write_report

    return run_reporting("report", lambda: write_report(args.run_dir), _report, args.json)
