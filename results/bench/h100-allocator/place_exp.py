"""Device memory taken by placing roberta-base's LoRA split (r = 8 on q, v) on a GPU, by order.

    python place_exp.py {tree,place,bf16-tree,bf16-place} [CONFIG_DIR]

tree: one ``jax.device_put`` of the (trainable, frozen) tuple, as bench.py and training do;
place: one leaf at a time, largest first; bf16-*: the same with the base cast to bfloat16.
Prints one JSON line: the leaves' bytes and device 0's memory_stats after placing.
Run with XLA_PYTHON_CLIENT_PREALLOCATE=false (the pool grown on demand) or true.
"""
import json
import os
import sys
from pathlib import Path

import jax

from lora_jax import lora, weights
from lora_jax.model import init_params
from lora_jax.train import split_for_training

order = sys.argv[1]
config = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[4] / "shared/models/roberta-base-tokenizer"
cfg = weights.read_config(config, num_labels=2, dtype="float32", remat="cheap")
cpu = weights.host_device()
with jax.default_device(cpu):
    params = init_params(cfg, jax.device_put(jax.random.key(0), cpu))
    if order.startswith("bf16"):
        params = jax.tree.map(lambda x: x.astype("bfloat16"), params)
    lcfg = lora.LoraConfig(rank=8, alpha=16, targets=lora.TARGET_PRESETS["qv"])
    trainable, frozen, _, _ = split_for_training(params, lcfg, jax.device_put(jax.random.key(1), cpu))
tree = (trainable, frozen)
leaves, treedef = jax.tree.flatten(tree)
dev = jax.local_devices()[0]
if order.endswith("tree"):
    placed = jax.device_put(tree, dev)
else:
    placed = [None] * len(leaves)
    for i in sorted(range(len(leaves)), key=lambda i: -leaves[i].nbytes):
        placed[i] = jax.device_put(leaves[i], dev)
jax.block_until_ready(placed)
stats = dev.memory_stats() or {}
keys = ("bytes_in_use", "peak_bytes_in_use", "pool_bytes", "peak_pool_bytes", "bytes_reserved", "num_allocs")
print(json.dumps({"order": order, "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                  "leaf_bytes": sum(x.nbytes for x in leaves), **{k: stats.get(k) for k in keys}}))
