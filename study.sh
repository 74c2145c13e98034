#!/usr/bin/env bash
# The reproduction study (issue 5) on the cpu preset, from one stage-2 checkpoint, as two queues of one thread each
# (on 2 CPU cores two single-thread runs finish sooner than two 2-thread runs one after the other).
#   bash study.sh runs/cpu/contrastive runs/study
set -uo pipefail
INIT=${1:-runs/cpu/contrastive}
OUT=${2:-runs/study}
mkdir -p "$OUT"
run() {  # name seed [flags...]
  local name=$1 seed=$2; shift 2
  [ -f "$OUT/$name-s$seed/model.safetensors" ] && return 0
  OMP_NUM_THREADS=1 python train.py --preset cpu --init "$INIT" --out "$OUT" --stages elva --no_eval --seed "$seed" \
    --elva_name "$name-s$seed" "$@" > "$OUT/$name-s$seed.log" 2>&1
  echo "$(date +%T) done $name-s$seed: $(tail -1 "$OUT/$name-s$seed.log")"
}
queue_a() {
  run elva 0                                                # (c) the paper's ELVA
  run control_wide 0 --rl_objective contrastive --rl_batch 16   # (b2) as many sequences per step as GRPO
  run elva 1; run elva 2
  run no_margin 0 --alpha 0                                 # Table 8 ablations
  run no_rank 0 --epsilon 0
}
queue_b() {
  run control 0 --rl_objective contrastive                  # (b1) same steps, same candidate sets
  run control 1 --rl_objective contrastive; run control 2 --rl_objective contrastive
  run pathwise 0 --pathwise 1.0                             # ours, beyond the paper
  run no_negrank 0 --gamma 0
  run no_random 0 --n_hard 8 --n_rand 0
  run control_wide 1 --rl_objective contrastive --rl_batch 16
  run control_wide 2 --rl_objective contrastive --rl_batch 16
}
queue_a & queue_b & wait
