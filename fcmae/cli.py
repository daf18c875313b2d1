"""The ``fcmae`` console script: ``fcmae pretrain | convert | finetune | evaluate | visualize | probe | diagnose |
shard | verify | report``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and ``run(args) -> int``; this
file only dispatches, importing the subcommand's module lazily so ``fcmae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("fcmae.commands.pretrain", "FCMAE self-supervised pretraining (config YAML + key=value overrides)"),
    "convert": ("fcmae.commands.convert", "convert checkpoints between layouts (ours, official, timm, Hugging Face)"),
    "finetune": ("fcmae.commands.finetune", "supervised fine-tuning of a dense ConvNeXt V2"),
    "evaluate": ("fcmae.commands.evaluate", "top-1/top-5 accuracy of a classifier checkpoint"),
    "visualize": ("fcmae.commands.visualize", "reconstruction figure of a pretraining checkpoint on images"),
    "probe": ("fcmae.commands.probe", "frozen-feature k-NN and linear-probe top-1 of any encoder weights"),
    "diagnose": ("fcmae.commands.diagnose", "feature-collapse analysis: channel cosine distance per block, plots"),
    "shard": ("fcmae.commands.shard", "write WebDataset tar shards (and their index) from a folder of images"),
    "verify": ("fcmae.commands.verify", "check every checkpoint of a run (sizes, checksums): ok, incomplete, corrupt"),
    "report": ("fcmae.commands.report", "a self-contained HTML report of a run: curves, figures, config, summary"),
}


def build_parser() -> argparse.ArgumentParser:
    from fcmae import __version__

    parser = argparse.ArgumentParser(prog="fcmae", description="FCMAE pretraining and fine-tuning for ConvNeXt V2",
                                     epilog="`fcmae COMMAND --help` tells more, e.g. `fcmae pretrain --help`")
    parser.add_argument("--version", action="version", version=f"fcmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # a subcommand not built yet must not break the others
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None, reexec: bool | None = None) -> int:
    """Run a subcommand. From a shell (``argv`` None) a command that trains or evaluates re-executes the process
    once with tuned malloc settings (see ``fcmae.runtime``), after its arguments and config are parsed and
    validated (``fcmae.commands._common.tune_malloc``); in-process calls with an explicit ``argv`` do not."""
    reexec = reexec if reexec is not None else argv is None
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args._reexec = reexec
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"fcmae {args.command}: not available in this version", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
