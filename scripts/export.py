#!/usr/bin/env python
"""A saved adapter as a merged Hugging Face checkpoint and/or a peft adapter:
`python scripts/export.py --adapter runs/rte-lora/adapter --merged runs/rte-merged`. See `--help`."""
import sys

from lora_jax.cli_adapters import export_main

if __name__ == "__main__":
    sys.exit(export_main())
