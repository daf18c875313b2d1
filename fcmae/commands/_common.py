"""What every subcommand shares: config + overrides parsing, the user-error boundary, JSON results.

User errors (a bad config key or value, a missing path, an empty dataset, an unreadable or unfitting checkpoint,
a full disk) end a command with one line on stderr naming the problem and a non-zero status: 2 for usage and
config errors, 3 for a non-finite loss, 1 for everything else. A run stopped by a signal
(``fcmae.train.stopping.RunInterrupted``) ends with one line naming its checkpoint and status 143 (SIGTERM,
SIGUSR1) or 130 (SIGINT). ``FCMAE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def add_config_arguments(p: argparse.ArgumentParser, example: str, options: Mapping[str, str]) -> None:
    """``CONFIG [key=value ...]`` plus ``--option VALUE`` flags, each a shorthand for one override key."""
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML config: a path or the name of a packaged config (e.g. {example}); defaults otherwise")
    # REMAINDER (not "*"): argparse cannot take positionals after an option, so `CONFIG --init X k=v` would fail;
    # the options met among the overrides are picked out by `config_overrides`
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides, e.g. optim.blr=1e-4")
    for flag, key in options.items():
        p.add_argument(flag, default=None, help=f"same as {key}=...")


def config_overrides(args: argparse.Namespace, options: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """``(config path or None, overrides)`` with ``--flag X`` / ``--flag=X`` turned into ``key=X``."""
    from fcmae.config import ConfigError

    config, rest, picked = args.config, [], []
    if config is not None and ("=" in config or config.startswith("-")):  # no config file, only overrides
        rest, config = [config], None
    items = iter([*rest, *args.overrides])
    rest = []
    for item in items:
        name, eq, value = item.partition("=")
        if name in options:
            value = value if eq else next(items, "")
            if not value:
                raise ConfigError(f"{name} needs a value")
            picked.append(f"{options[name]}={value}")
        elif item.startswith("-"):
            raise ConfigError(f"unknown option {item} (options: {', '.join(options) or 'none'})")
        else:
            rest.append(item)
    for flag, key in options.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value:
            picked.append(f"{key}={value}")
    return config, rest + picked


def load_command_config(cls: type[T], args: argparse.Namespace, options: Mapping[str, str]) -> T:
    from fcmae.config import load_config

    config, overrides = config_overrides(args, options)
    return load_config(cls, config, overrides)


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
    from fcmae.train.stopping import RunInterrupted
    from fcmae.train.trainer import NonFiniteLossError

    try:
        return int(fn() or 0)
    except RunInterrupted as exc:  # stopped on a signal: where the checkpoint is, how to continue; 143 or 130
        if is_main_process():
            print(f"fcmae {command}: {exc}", file=sys.stderr, flush=True)
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
        elif isinstance(exc, NonFiniteLossError):
            code, kind = 3, "error"
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
    print(f"final loss {s['final_loss']:.4f} after {s['steps']} steps, {s['wall_s']:.0f} s, "
          f"{s['img_per_s']:.1f} img/s")


def write_json(path: str | Path | None, result: Mapping[str, Any]) -> None:
    """``--json PATH``: the command's results as JSON (atomically)."""
    if path:
        from fcmae.weights.files import write_json_atomic

        write_json_atomic(path, dict(result))


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
