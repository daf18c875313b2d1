"""Subcommands of the ``fcmae`` console script; each module has ``add_arguments(parser)`` and ``run(args)``."""
