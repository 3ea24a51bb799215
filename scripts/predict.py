#!/usr/bin/env python
"""Predict with several adapters on one base:
`python scripts/predict.py --adapter rte=DIR1 --adapter sst2=DIR2 --input FILE.jsonl`. See `--help`."""
import sys

from lora_jax.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
