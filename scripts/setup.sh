#!/usr/bin/env bash
# Create .venv with everything lora-jax and its tests need, on CPU.
# torch comes first and pinned: any other spec pulls a multi-GB CUDA build (see README).
# For GPUs add the jax CUDA wheels afterwards: .venv/bin/pip install -e ".[cuda12]"
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import jax, flax, optax, torch, transformers, peft; print('lora-jax env ready: jax', jax.__version__, '| torch', torch.__version__)"
