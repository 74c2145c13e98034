#!/usr/bin/env bash
# The study on the cpu preset: every stage-3 run starts from one stage-2 checkpoint; each run is a single-thread
# process, JOBS at a time (on 2 CPU cores two single-thread runs finish sooner than two 2-thread runs in a row).
# A run whose checkpoint exists is skipped; each finished run (but the toy-reward ones) is evaluated into
# $OUT/<run>.json.
#   python train.py --preset cpu --stages contrastive --out runs/cpu   # the stage-2 checkpoint (and its evaluation)
#   bash study.sh runs/cpu/contrastive runs/study                      # everything below, 2 at a time
#   ONLY='^(elva|control)-' bash study.sh runs/cpu/contrastive runs/study   # only runs whose name matches a regex
#   python eval.py --from_json runs/cpu/eval.json runs/study/*.json     # the tables
#   python eval.py --ladder runs/study                                  # the learnability ladder's table
set -uo pipefail
INIT=${1:-runs/cpu/contrastive}
OUT=${2:-runs/study}
JOBS=${JOBS:-2}
ONLY=${ONLY:-.}
DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-cpu}
mkdir -p "$OUT"
# name seed [flags...] -- the run's checkpoint lands in $OUT/<name>-s<seed>
RUNS=$(cat <<'LIST'
elva 0                                                         # ELVA as the paper describes it
control 0 --rl_objective contrastive                           # equal compute: stage 2 continued on the same sets
toy_lr1e-3_b0 0 --reward toy --rl_lr 1e-3 --beta 0             # the learnability ladder (seed 0): three rewards
length_lr1e-3_b0 0 --reward length --rl_lr 1e-3 --beta 0       # through the same GRPO code at growing budgets
paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0                        # (the paper's reward at lr 1e-5, beta 0.2 is elva-s0)
toy 0 --reward toy
length 0 --reward length
toy_lr1e-4_b0 0 --reward toy --rl_lr 1e-4 --beta 0
length_lr1e-4_b0 0 --reward length --rl_lr 1e-4 --beta 0
paper_lr1e-4_b0 0 --rl_lr 1e-4 --beta 0
toy_lr1e-4 0 --reward toy --rl_lr 1e-4
elva 1
elva 2
control 1 --rl_objective contrastive
control 2 --rl_objective contrastive
anchor_length_lr1e-3_b0 0 --reward length --rl_lr 1e-3 --beta 0 --anchor 10   # ours: the embedding anchor
anchor_length_lr1e-3_b0 1 --reward length --rl_lr 1e-3 --beta 0 --anchor 10
anchor_length_lr1e-3_b0 2 --reward length --rl_lr 1e-3 --beta 0 --anchor 10
anchor_paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0 --anchor 10
anchor1_paper_lr1e-3_b0 0 --rl_lr 1e-3 --beta 0 --anchor 1
anchor_paper_lr1e-4_b0 0 --rl_lr 1e-4 --beta 0 --anchor 10
anchor_credit_lr1e-4_b0 0 --credit sequence --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-4_b0 0 --sample query --rl_lr 1e-4 --beta 0 --anchor 10        # ours: only queries sampled
anchor_query_lr1e-4_b0 1 --sample query --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-4_b0 2 --sample query --rl_lr 1e-4 --beta 0 --anchor 10
anchor_query_lr1e-3_b0 0 --sample query --rl_lr 1e-3 --beta 0 --anchor 10
big_anchor_query_lr1e-4_b0 0 --sample query --rl_lr 1e-4 --beta 0 --anchor 10 --rl_batch 8 --rl_steps 600   # 16x the groups
big_control 0 --rl_objective contrastive --rl_batch 8 --rl_steps 600
big_elva 0 --rl_batch 8 --rl_steps 600                                          # the paper's GRPO, 16x the groups
LIST
)
run() {  # name seed [flags...]
  local name=$1 seed=$2; shift 2
  local tag="$name-s$seed"
  if [ ! -f "$OUT/$tag/config.json" ]; then
    OMP_NUM_THREADS=1 python train.py --preset "$PRESET" --device "$DEVICE" --init "$INIT" --out "$OUT" --stages elva \
      --no_eval --threads 1 --seed "$seed" --elva_name "$tag" "$@" > "$OUT/$tag.log" 2>&1 || { echo "FAILED $tag"; return; }
  fi
  case "$name" in toy*) ;; *)
    [ -f "$OUT/$tag.json" ] || OMP_NUM_THREADS=1 python eval.py --device "$DEVICE" --threads 1 --ckpt "$OUT/$tag" \
      --out "$OUT/$tag.json" > "$OUT/$tag.eval.log" 2>&1 ;;
  esac
  echo "$(date +%T) done $tag: $(grep 'total time' "$OUT/$tag.log")"
}
export -f run
export INIT OUT DEVICE PRESET
echo "$RUNS" | sed 's/#.*//' | awk 'NF' | while read -r name seed flags; do
  echo "$name-s$seed" | grep -Eq "$ONLY" && echo "$name $seed $flags" | sed "s/[[:space:]]*$//"  # xargs -L joins a line ending in a blank to the next
done | xargs -r -P "$JOBS" -L 1 bash -c 'run "$@"' _
