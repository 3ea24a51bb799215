#!/usr/bin/env python
"""Several adapters of one base and task as one:
`python scripts/combine.py --adapter a=DIR --adapter b=DIR --weights 0.5,0.5 --how cat --out DIR`. See `--help`."""
import sys

from lora_jax.cli_adapters import combine_main

if __name__ == "__main__":
    sys.exit(combine_main())
