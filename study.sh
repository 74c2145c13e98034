#!/usr/bin/env bash
# The reproduction study (issue 5) on the cpu preset: every run from one stage-2 checkpoint, each a single-thread
# process, JOBS at a time (on 2 CPU cores two single-thread runs finish sooner than two 2-thread runs in a row).
# A run whose checkpoint exists is skipped; each finished run is evaluated into $OUT/<run>.json.
#   bash study.sh runs/cpu/contrastive runs/study                 # everything, 2 at a time
#   JOBS=14 ONLY='^credit' bash study.sh runs/cpu/contrastive out  # only the runs whose name matches a regex
#   python eval.py --from_json docs/study_eval.json                 # the tables of the stored results
set -uo pipefail
INIT=${1:-runs/cpu/contrastive}
OUT=${2:-runs/study}
JOBS=${JOBS:-2}
ONLY=${ONLY:-.}
DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-cpu}
mkdir -p "$OUT"
# name seed flags -- (a) is the init checkpoint itself
RUNS=$(cat <<'LIST'
elva 0                                                   # (c) ELVA as the paper describes it
elva 1
elva 2
control 0 --rl_objective contrastive                     # (b1) same steps, same candidate sets
control 1 --rl_objective contrastive
control 2 --rl_objective contrastive
control_wide 0 --rl_objective contrastive --rl_batch 16  # (b2) as many sequences per step as GRPO
control_wide 1 --rl_objective contrastive --rl_batch 16
control_wide 2 --rl_objective contrastive --rl_batch 16
no_margin 0 --alpha 0                                    # Table 8 ablations
no_margin 1 --alpha 0
no_margin 2 --alpha 0
no_rank 0 --epsilon 0
no_rank 1 --epsilon 0
no_rank 2 --epsilon 0
no_negrank 0 --gamma 0
no_negrank 1 --gamma 0
no_negrank 2 --gamma 0
no_random 0 --n_hard 8 --n_rand 0
no_random 1 --n_hard 8 --n_rand 0
no_random 2 --n_hard 8 --n_rand 0
pathwise 0 --pathwise 1.0                                # ours, beyond the paper, from here on
pathwise 1 --pathwise 1.0
pathwise 2 --pathwise 1.0
lr1e-4 0 --rl_lr 1e-4
lr1e-4 1 --rl_lr 1e-4
lr1e-4 2 --rl_lr 1e-4
temp0.5 0 --temperature 0.5
temp0.5 1 --temperature 0.5
temp0.5 2 --temperature 0.5
credit 0 --credit sequence
credit 1 --credit sequence
credit 2 --credit sequence
credit_lr1e-4 0 --credit sequence --rl_lr 1e-4
credit_lr1e-4 1 --credit sequence --rl_lr 1e-4
credit_lr1e-4 2 --credit sequence --rl_lr 1e-4
ppo2 0 --num_iterations 2
ppo2 1 --num_iterations 2
ppo2 2 --num_iterations 2
g16 0 --group_size 16 --rl_steps 75
g16 1 --group_size 16 --rl_steps 75
g16 2 --group_size 16 --rl_steps 75
LIST
)
run() {  # name seed [flags...]
  local name=$1 seed=$2; shift 2
  local tag="$name-s$seed"
  if [ ! -f "$OUT/$tag/model.safetensors" ]; then
    OMP_NUM_THREADS=1 python train.py --preset "$PRESET" --device "$DEVICE" --init "$INIT" --out "$OUT" --stages elva \
      --no_eval --seed "$seed" --elva_name "$tag" "$@" > "$OUT/$tag.log" 2>&1 || { echo "FAILED $tag"; return; }
  fi
  [ -f "$OUT/$tag.json" ] || OMP_NUM_THREADS=1 python eval.py --device "$DEVICE" --ckpt "$OUT/$tag" \
    --out "$OUT/$tag.json" > "$OUT/$tag.eval.log" 2>&1
  echo "$(date +%T) done $tag: $(grep 'total time' "$OUT/$tag.log")"
}
export -f run
export INIT OUT DEVICE PRESET
echo "$RUNS" | sed 's/#.*//' | awk 'NF' | while read -r name seed flags; do
  echo "$name-s$seed" | grep -Eq "$ONLY" && echo "$name $seed $flags" | sed "s/[[:space:]]*$//"  # xargs -L joins a line ending in a blank to the next
done | xargs -r -P "$JOBS" -L 1 bash -c 'run "$@"' _
