"""Fine-tuning: ``python finetune.py configs/finetune/fashion_mnist.yaml [key=value ...]`` (= ``fcmae finetune``).

Multi-GPU / multi-node: ``accelerate launch [--num_processes N ...] finetune.py CONFIG ...``.
"""

import sys

from fcmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]], reexec=True))
