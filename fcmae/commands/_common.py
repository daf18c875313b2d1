"""What every subcommand shares: the malloc re-exec point, the user-error boundary, JSON results (the flags and the
config + overrides parsing are in ``fcmae.commands._flags``).

User errors (a bad config key or value, a missing path, an empty dataset, an unreadable or unfitting checkpoint,
a full disk) end a command with one line on stderr naming the problem and a non-zero status: 2 for usage and
config errors, 1 for everything else. A run that cannot go on (``fcmae.train.stopping.FatalRunError``) ends with
one line and its own status: 3 a non-finite loss, 5 a lost peer or a collective timed out (4, a hang, is reported
by the watchdog itself). A run stopped by a signal (``fcmae.train.stopping.RunInterrupted``) ends with one line
naming its checkpoint and status 143 (SIGTERM, SIGUSR1) or 130 (SIGINT). ``FCMAE_DEBUG=1`` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def tune_malloc(args: argparse.Namespace) -> None:
    """For a command that trains or evaluates, once its arguments and config are parsed and validated: re-execute
    the process with the tuned malloc settings (``fcmae.runtime``), when started from a shell (``fcmae.cli.main``
    sets ``args._reexec``). The re-executed process parses again (fast: nothing heavy is imported before this)."""
    if getattr(args, "_reexec", False):
        from fcmae.runtime import reexec_with_malloc_tuning

        reexec_with_malloc_tuning()


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (they print nothing; rank 0 reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def one_line(exc: BaseException) -> str:
    """The first line of the message; for an error re-raised from a DataLoader worker (``Caught X in DataLoader
    worker ... Original Traceback ...``) the worker's own message, which names the file."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def run_guarded(command: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; a user error becomes one line on stderr and its exit status (see the module docstring)."""
    from fcmae.config import ConfigError
    from fcmae.train.stopping import FatalRunError, RunInterrupted  # no torch: a config error stays fast

    try:
        return int(fn() or 0)
    except RunInterrupted as exc:  # stopped on a signal: where the checkpoint is, how to continue; 143 or 130
        if is_main_process():
            print(f"fcmae {command}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_status
    except FatalRunError as exc:  # a non-finite loss, a lost peer: one line (from every rank where it says so)
        if os.environ.get("FCMAE_DEBUG"):
            raise
        if is_main_process() or getattr(exc, "every_rank", False):
            print(f"fcmae {command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return exc.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside a trainer's fit (its handlers turn it into RunInterrupted)
        if is_main_process():
            print(f"fcmae {command}: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        if os.environ.get("FCMAE_DEBUG"):
            raise
        if isinstance(exc, ConfigError):
            code, kind = 2, "config error"
        elif isinstance(exc, (ValueError, OSError, KeyError, ImportError)):  # data, weights, disk, optional deps
            code, kind = 1, "error"
        else:
            raise
        print(f"fcmae {command}: {kind}: {one_line(exc)}", file=sys.stderr)
        return code


def run_reporting(command: str, compute: Callable[[], dict[str, Any]], report: Callable[[dict[str, Any]], None],
                  json_path: str | None) -> int:
    """Compute a command's results, print them, write them as JSON (``--json PATH``), behind ``run_guarded``."""

    def go() -> int:
        result = compute()
        report(result)
        write_json(json_path, result)
        return 0

    return run_guarded(command, go)


def print_run_tail(s: Mapping[str, Any]) -> None:
    """The lines every training command ends with (the same facts are in ``summary.json``)."""
    print(f"checkpoint: {s['checkpoint']}")
    print(f"metrics: {s['output_dir']}/metrics.jsonl")
    print(f"summary: {s['summary']}")
    loss = "n/a" if s.get("final_loss") is None else f"{s['final_loss']:.4f}"
    took = f"{s['wall_s']:.0f} s"  # a resumed run: the whole run's training time and this segment's
    if s.get("resumed_from"):
        took = f"{s['time_s']:.0f} s of training in all, {s['wall_s']:.0f} s in this segment"
    print(f"final loss {loss} after {s['steps']} steps, {took}, {s['img_per_s']:.1f} img/s")
    if s.get("status") == "stopped":  # run.max_steps ended it before the schedule's last step
        print(f"stopped at step {s['steps']} of {s['total_steps']} (run.max_steps): to continue, run the same "
              "command with --resume auto and a larger --max-steps (0 = to the end)")


def write_json(path: str | Path | None, result: Mapping[str, Any]) -> None:
    """``--json PATH``: the command's results as JSON (atomically)."""
    if path:
        from fcmae.weights.files import write_json_atomic

        write_json_atomic(path, dict(result))


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
