"""One flag vocabulary for every subcommand, and the ``CONFIG [key=value ...]`` arguments of the training commands.

A flag in :data:`FLAGS` has one spelling and one meaning wherever it appears; a command states its own default in
``--help``. The training commands (``pretrain``, ``finetune``) take a config and ``key=value`` overrides, and offer
the shared flags as shorthands for config keys (``--batch-size 16`` = ``run.batch_size=16``; a flag wins over a
``key=value`` of the same key). Nothing here imports torch: ``--help`` and config errors stay fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fcmae.config import MIXED_PRECISION

T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the spelling first, then aliases
    meaning: str  # the same text in every command's --help
    metavar: str | None = None
    type: Any = str
    choices: tuple[str, ...] | None = None
    switch: bool = False  # takes no value


FLAGS: dict[str, Flag] = {
    "out": Flag(("--out", "-o"), "where the command writes its outputs", "PATH"),
    "batch_size": Flag(("--batch-size",), "images per batch, per device", "N", int),
    "seed": Flag(("--seed",), "seed of everything random in the command", "S", int),
    "mixed_precision": Flag(("--mixed-precision",), "autocast: no, bf16, fp16 or auto (bf16 on a CUDA device that "
                            "supports it, else no)", "MODE", str, MIXED_PRECISION),
    "limit": Flag(("--limit",), "use at most N images of each dataset (0 = all)", "N", int),
    "num_workers": Flag(("--num-workers",), "data-loading worker processes (0 = in the main process)", "N", int),
    "input_size": Flag(("--input-size",), "image side in pixels, a multiple of 32", "PX", int),
    "no_progress": Flag(("--no-progress",), "no progress bar or progress lines", switch=True),
    "overwrite": Flag(("--overwrite",), "replace outputs that already exist", switch=True),
    "random_init": Flag(("--random-init",), "a random init of VARIANT (seeded by --seed)", "VARIANT"),
    "random_init_no_grn": Flag(("--random-init-no-grn",), "a random init of VARIANT without GRN (seeded by --seed)",
                               "VARIANT"),
    "resume": Flag(("--resume",), "continue a run: auto (the newest complete checkpoint in the output folder, or "
                   "start fresh) or a checkpoint folder", "auto|DIR"),
    "max_steps": Flag(("--max-steps",), "stop after N optimizer steps without changing the schedule (0 = run it all)",
                      "N", int),
    "init": Flag(("--init",), "weights to start from (any layout fcmae convert reads)", "PATH"),
}


def add_flag(p: argparse.ArgumentParser, name: str, default: Any = None, default_text: str | None = None,
             aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
    """Add the shared flag ``name`` with this command's default (stated in the help)."""
    f = FLAGS[name]
    if f.switch:
        p.add_argument(*f.names, *aliases, dest=name, action="store_true", help=f.meaning)
        return
    shown = default_text if default_text is not None else default
    p.add_argument(*f.names, *aliases, dest=name, type=f.type, choices=f.choices, metavar=f.metavar, default=default,
                   help=f"{f.meaning} (default: {shown})", **kwargs)


# ------------------------------------------------------------------------------------------- training commands
# shared flag -> the overrides it stands for ("{}" = its value)
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    "out": ("run.output_dir={}",),
    "batch_size": ("run.batch_size={}",),
    "seed": ("run.seed={}",),
    "mixed_precision": ("run.mixed_precision={}",),
    "limit": ("data.limit={}",),
    "num_workers": ("data.num_workers={}",),
    "input_size": ("data.input_size={}",),
    "no_progress": ("run.progress=false",),
    "max_steps": ("run.max_steps={}",),
    "resume": ("run.resume={}",),
    "overwrite": ("run.overwrite=true",),
}


def add_config_arguments(p: argparse.ArgumentParser, command: str, examples: tuple[str, ...],
                         flags: Mapping[str, tuple[str, ...]], sections: str) -> None:
    """``CONFIG [key=value ...]``, the shared flags as shorthands for config keys, ``--print-config``."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (f"config sections: {sections} (every key with its value: --print-config)\n"
                f"examples:\n  fcmae {command} {examples[0]} --print-config\n"
                f"  fcmae {command} {examples[0]} run.max_steps=20 --batch-size 16\n"
                + "".join(f"  fcmae {command} {e}\n" for e in examples[1:]))
    p.set_defaults(_parser=p, _examples=examples)
    p.add_argument("config", nargs="?", default=None,
                   help=f"YAML config: a path or the name of a packaged config (e.g. {examples[0]})")
    # REMAINDER (not "*"): argparse cannot take positionals after an option, so `CONFIG --init X k=v` would fail;
    # the flags met among the overrides are picked out by `config_overrides`
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides, e.g. optim.blr=1e-4")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged, validated config as YAML and exit (nothing is trained)")
    for name, templates in flags.items():
        f = FLAGS[name]
        same = ", ".join(t.replace("{}", f.metavar or "X") for t in templates)
        kind = {"action": "store_true", "default": False} if f.switch else {"metavar": f.metavar, "default": None}
        p.add_argument(*f.names, dest=name, help=f"{f.meaning}; same as {same}"
                       + ("" if f.switch else " (default: the config's)"), **kind)


def _take_flags(args: argparse.Namespace, items: list[str], flags: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Set the flags met among the overrides on ``args``; returns the plain ``key=value`` items."""
    from fcmae.config import ConfigError

    names = {n: key for key in flags for n in FLAGS[key].names}
    it, rest = iter(items), []
    for item in it:
        name, eq, value = item.partition("=")
        if name in ("-h", "--help"):
            args._parser.print_help()
            raise SystemExit(0)
        if name == "--print-config":
            args.print_config = True
        elif name in names:
            f = FLAGS[names[name]]
            if f.switch and eq:
                raise ConfigError(f"{name} takes no value")
            value = True if f.switch else (value if eq else next(it, ""))
            if value == "":
                raise ConfigError(f"{name} needs a value")
            setattr(args, names[name], value)
        elif item.startswith("-"):
            known = sorted(n for n in names if n.startswith("--"))
            raise ConfigError(f"unknown option {item} (options: {', '.join(['--print-config', *known])})")
        else:
            rest.append(item)
    return rest


def config_overrides(args: argparse.Namespace, flags: Mapping[str, tuple[str, ...]]) -> tuple[str | None, list[str]]:
    """``(config path or None, overrides)``: ``key=value`` items, then the flags' overrides (so a flag wins)."""
    config, rest = args.config, []
    if config is not None and ("=" in config or config.startswith("-")):  # no config file, only overrides
        rest, config = [config], None
    rest = _take_flags(args, [*rest, *args.overrides], flags)
    for name, templates in flags.items():
        value = getattr(args, name, None)
        if value is not None and value is not False:
            rest.extend(t.format(value) for t in templates)
    return config, rest


def load_command_config(cls: type[T], args: argparse.Namespace, flags: Mapping[str, tuple[str, ...]]) -> T:
    """The merged, validated config of a training command; without CONFIG nor overrides, an error naming one."""
    from fcmae.config import ConfigError, load_config

    config, overrides = config_overrides(args, flags)
    if config is None and not overrides:
        examples = " or ".join(f"`fcmae {args.command} {e}`" for e in args._examples)
        raise ConfigError(f"no config given: name one, e.g. {examples}")
    return load_config(cls, config, overrides)


def run_training_command(cls: type[T], args: argparse.Namespace, flags: Sequence[str], train: str,
                         report: Callable[[dict[str, Any]], None]) -> int:
    """What ``fcmae pretrain`` and ``fcmae finetune`` do: load and check the config (``--print-config`` prints it and
    stops), tune malloc, run ``train`` (``"module:function"``, imported only now: torch comes last) and ``report``
    the summary on the main process (a finished run already said so in one line)."""
    import importlib

    from fcmae.commands._common import is_main_process, print_run_tail, tune_malloc
    from fcmae.config import config_yaml

    cfg = load_command_config(cls, args, flags)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from fcmae.train.preflight import preflight

    preflight(cfg)  # a used folder, a missing path: answered before torch is imported
    tune_malloc(args)
    module, name = train.split(":")
    s = getattr(importlib.import_module(module), name)(cfg)
    if not is_main_process() or s.get("already_finished"):
        return 0
    report(s)
    print_run_tail(s)
    return 0
