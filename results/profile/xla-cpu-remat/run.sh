#!/usr/bin/env bash
# XLA's CPU memory analysis of the LoRA / full fine-tuning train step under each remat policy, MiniLM's
# shape from ../shared with dropout off (so that no random bits are in play), batch 16, sequence 128;
# then the toy stack. Run from the repository root: bash results/profile/xla-cpu-remat/run.sh
set -euo pipefail
cfg=$(mktemp -d)
python - "$cfg" <<'PY'
import json, sys
c = json.load(open("../shared/models/all-MiniLM-L6-v2/config.json"))
c["attention_probs_dropout_prob"] = c["hidden_dropout_prob"] = 0.0
json.dump(c, open(f"{sys.argv[1]}/config.json", "w"))
PY
for cell in lora:fp32 lora:remat-attention lora:remat-cheap lora:remat-qkv lora:remat full:fp32 full:remat; do
  IFS=: read -r method variant <<< "$cell"
  PYTHONPATH=$PWD python scripts/bench.py --cell "{\"framework\":\"jax\",\"method\":\"$method\",\"variant\":\"$variant\",\"config\":\"$cfg\",\"batch\":16,\"seq\":128,\"steps\":1,\"warmup\":0}" 2>/dev/null \
    | tail -1 | python -c "import json,sys; r=json.load(sys.stdin); print('$cell', 'XLA analysis %.2f MiB' % (r['xla_memory']['total_bytes']/2**20), 'saved for backward %.1f MiB' % (r['saved_for_backward_bytes']/2**20))"
done
# MiniLM as shipped (dropout 0.1), XLA:CPU's default scheduler against its memory-optimised one.
for cell in lora:remat-cheap lora:remat-cheap+memsched lora:remat-qkv lora:remat-qkv+memsched lora:remat lora:remat+memsched full:remat full:remat+memsched; do
  IFS=: read -r method variant <<< "$cell"
  PYTHONPATH=$PWD python scripts/bench.py --cell "{\"framework\":\"jax\",\"method\":\"$method\",\"variant\":\"$variant\",\"config\":\"../shared/models/all-MiniLM-L6-v2\",\"batch\":16,\"seq\":128,\"steps\":1,\"warmup\":0}" 2>/dev/null \
    | tail -1 | python -c "import json,sys; r=json.load(sys.stdin); print('dropout 0.1 $cell', 'XLA analysis %.2f MiB' % (r['xla_memory']['total_bytes']/2**20))"
done
python results/profile/xla-cpu-remat/toy_stack.py
