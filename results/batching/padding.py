"""Padding share of one training epoch (seed 0, epoch 0) by batch layout, RTE, MRPC and SST-2.

Computed, not timed: the token slots lora-jax computes, under each layout, for MiniLM's tokenizer
at --max-seq-len 128 and the default --num-buckets 8. Run from the repository root:
    python results/batching/padding.py > results/batching/padding.md
"""
import numpy as np

from lora_jax import data as D
from lora_jax import packing, profiling

tok = D.load_tokenizer("../shared/models/all-MiniLM-L6-v2")
print(f"# Padding share of one training epoch by batch layout ({profiling.now()})\n")
print("Computed by `python results/batching/padding.py` (this file's neighbour; code at the commit that adds it): "
      "seed 0, epoch 0, MiniLM's tokenizer, --max-seq-len 128, --num-buckets 8. "
      "`windows of k`: shuffle, then sort by length within windows of k batches (k = 64 is `--batching by-length`); "
      "`random`: one example per row, padded to the smallest of the 8 fitted length buckets; "
      "`packed`: the same random batches packed into rows, the row count rounded up to one of "
      "8 fitted counts (`--batching packed`, the default), with the candidate row length (the longest example "
      "rounded up to 8, or --max-seq-len) that pads epoch 0 least; the last column gives both candidates.\n")
print("| task | batch | random | windows of 2 | windows of 4 | by-length (windows of 64) | packed | packed rows: length, counts | packed, each candidate row length |")
print("|---|---:|---:|---:|---:|---:|---:|---|---|")
for name in ("rte", "mrpc", "sst2"):
    enc = D.encode(tok, D.load_split(D.get_task(name), "train", "../shared/data/glue"), 128)
    L = enc.lengths
    buckets = D.bucket_lengths(128, 8, L)
    for b in (16, 32):
        order = lambda batching, group=64: D.train_order(L, b, seed=0, epoch=0, batching=batching, group=group)
        share = lambda batches: D.padding_share(L, batches, buckets)
        p = packing.Batcher.for_training("packed", L, buckets, batch_size=b, max_seq_len=128, num_buckets=8, seed=0)
        each = []
        for n in packing.row_lengths(L, 128):
            counts = packing.row_buckets(L, order("random"), n, 8, b)
            each.append(f"{n}: {packing.padding_share(L, order('random'), n, counts):.3f}")
        print(f"| {name} | {b} | {share(order('random')):.3f} | {share(order('by-length', 2)):.3f} | "
              f"{share(order('by-length', 4)):.3f} | {share(order('by-length')):.3f} | "
              f"{p.padding_share(L, order('random')):.3f} | {p.row_len}, {list(p.row_counts)} | {'; '.join(each)} |")
