#!/usr/bin/env python
"""Fine-tune on a GLUE task: `python scripts/train.py --task rte --lora-rank 8`. See `--help`."""
import sys

from lora_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
