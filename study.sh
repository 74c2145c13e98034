#!/usr/bin/env bash
# The reproduction study (issue 5) on the cpu preset, from one stage-2 checkpoint. Sequential: 2 CPU cores.
#   bash study.sh runs/cpu/contrastive runs/study
set -euo pipefail
INIT=${1:-runs/cpu/contrastive}
OUT=${2:-runs/study}
run() {  # name seed [flags...]
  local name=$1 seed=$2; shift 2
  [ -f "$OUT/$name-s$seed/model.safetensors" ] && return 0
  python train.py --preset cpu --init "$INIT" --out "$OUT" --stages elva --no_eval --seed "$seed" \
    --elva_name "$name-s$seed" "$@" > "$OUT/$name-s$seed.log" 2>&1
  echo "$(date +%T) done $name-s$seed: $(tail -1 "$OUT/$name-s$seed.log")"
}
mkdir -p "$OUT"
for seed in 0 1 2; do
  run elva "$seed"                                               # (c) the paper's ELVA
  run control "$seed" --rl_objective contrastive                 # (b1) same steps, same candidate sets
  run control_wide "$seed" --rl_objective contrastive --rl_batch 16   # (b2) as many sequences per step as GRPO
  if [ "$seed" = 0 ]; then
    run no_margin 0 --alpha 0
    run no_rank 0 --epsilon 0
    run no_negrank 0 --gamma 0
    run no_random 0 --n_hard 8 --n_rand 0
    run pathwise 0 --pathwise 1.0
  fi
done
