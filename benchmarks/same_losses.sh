#!/usr/bin/env bash
# Train the same 11 short configurations with two checkouts of lora-jax and compare every step's loss and the
# saved adapter's bytes: a refactor must leave both bit-identical on CPU.
#   bash benchmarks/same_losses.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR
# Each checkout runs its own scripts/train.py (PYTHONPATH points at it); OUT_DIR gets one summary per
# checkout (configuration, the loss at steps 1-4, the adapter's sha256 prefix) and their diff.
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: bash benchmarks/same_losses.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR" >&2; exit 2; }
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); OUT=$3
PY=${PYTHON:-python}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
mkdir -p "$OUT"
base=(--task rte --model "$SHARED/models/all-MiniLM-L6-v2" --data-dir "$SHARED/data/glue" --max-train-examples 96
      --max-eval-examples 32 --max-steps 4 --batch-size 16 --log-every 1 --overwrite --no-progress)
configs=(
  "default|"
  "remat-none|--remat none"
  "remat-full|--remat full"
  "remat-qkv-all|--remat qkv --targets all"
  "remat-dots|--remat dots"
  "dropout|--lora-dropout 0.1"
  "bf16|--param-dtype bfloat16 --compute-dtype bfloat16"
  "full|--method full"
  "bylength|--batching by-length --remat attention"
  "adalora|--method adalora --targets all"
  "plus|--loraplus-lr-ratio 16 --head-only-steps 2"
)
for side in old new; do
  mkdir -p "$OUT/runs/$side"
  src=$OLD; [[ $side == new ]] && src=$NEW
  : > "$OUT/$side.txt"
  for c in "${configs[@]}"; do
    name=${c%%|*}; extra=${c#*|}
    run="$OUT/runs/$side/$name"
    # shellcheck disable=SC2086  # extra is a list of flags
    (cd "$src" && PYTHONPATH="$src" "$PY" scripts/train.py "${base[@]}" --output-dir "$run" $extra > "$run.log" 2>&1) \
      || { echo "error: $side $name failed, see $run.log" >&2; exit 1; }
    "$PY" - "$run" "$name" >> "$OUT/$side.txt" <<'PY'
import hashlib, json, pathlib, sys
run, name = pathlib.Path(sys.argv[1]), sys.argv[2]
losses = [repr(json.loads(l)["loss"]) for l in open(run / "metrics.jsonl") if '"loss"' in l]
digest = hashlib.sha256((run / "adapter" / "adapter.safetensors").read_bytes()).hexdigest()[:16]
print(name, *losses, digest)
PY
  done
done
if diff "$OUT/old.txt" "$OUT/new.txt" > "$OUT/diff.txt"; then echo "identical: ${#configs[@]} configurations"; else
  echo "DIFFERENT:"; cat "$OUT/diff.txt"; exit 1; fi
