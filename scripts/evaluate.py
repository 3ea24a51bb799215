#!/usr/bin/env python
"""Dev metrics of a saved adapter: `python scripts/evaluate.py --adapter runs/rte-lora/adapter`. See `--help`."""
import sys

from lora_jax.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
