#!/usr/bin/env bash
# The LoRA paper's GLUE runs on roberta-base (Hu et al., 2021, Table 2 / Table 9 hyperparameters:
# r = 8, alpha = 8 on W_q and W_v, per-task batch size, learning rate and epochs, sequence 512),
# for a user with a GPU and the Hugging Face Hub. Resumable: run it again and finished tasks are
# skipped, a stopped one continues from its newest checkpoint. Summary: results/paper-roberta-base/.
#
#   bash benchmarks/reproduce_paper.sh                      # all eight tasks, seed 0, data from the Hub
#   GLUE_DIR=/data/glue SEEDS=0,1,2 bash benchmarks/reproduce_paper.sh
#   WARM_START=mnli bash benchmarks/reproduce_paper.sh      # MRPC, RTE, STS-B start from the MNLI adapter
#   TASKS=rte,mrpc bash benchmarks/reproduce_paper.sh       # a subset
#   EXTRA="--max-steps 20" RUNS=/tmp/r RESULTS=/tmp/s ... # more train.py flags; other directories
#
# Expected time per task and seed (lower bounds: the examples the paper's epochs go through at the
# 1,762 examples/s our LoRA step measured on an H100 at sequence 128, results/bench/; sequences up to
# 512 cost more, and every epoch ends with an evaluation):
#   mnli 1.9 h, qqp 1.4 h, sst2 0.6 h, qnli 0.4 h, cola 7 min, stsb 2 min, rte 2 min, mrpc 1 min.
# Not run here: this machine has no Hub access and no pretrained roberta-base weights.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
TASKS=${TASKS:-mnli,sst2,mrpc,cola,qnli,qqp,rte,stsb}
SEEDS=${SEEDS:-0}
MODEL=${MODEL:-roberta-base}
DATA=${GLUE_DIR:-hub}

args=(--name paper-roberta-base --model "$MODEL" --data-dir "$DATA" --tasks "$TASKS" --methods lora-paper
      --seeds "$SEEDS")
if [[ -n "${WARM_START:-}" ]]; then
  [[ "$TASKS" == "$WARM_START",* ]] || { echo "error: WARM_START=$WARM_START must come first in TASKS" >&2; exit 2; }
  args+=(--warm-start-from "$WARM_START")
fi
[[ -n "${RUNS:-}" ]] && args+=(--runs "$RUNS")
[[ -n "${RESULTS:-}" ]] && args+=(--results "$RESULTS")
# shellcheck disable=SC2086  # EXTRA is a list of flags
exec "$PY" benchmarks/grid.py "${args[@]}" -- ${EXTRA:-}
