"""FCMAE pretraining: ``python pretrain.py configs/demo.yaml [key=value ...]`` (same as ``fcmae pretrain``).

Multi-GPU / multi-node: ``accelerate launch [--num_processes N ...] pretrain.py CONFIG ...``.
"""

import sys

from fcmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]], reexec=True))
