#!/usr/bin/env bash
# The GPU measurements, in one command, for a machine with one CUDA GPU; each step has its own time limit, so the
# whole script stays under ten minutes (one device call) even when a step does not finish:
#   bash gpu_bench.sh [OUT]          # default OUT=gpu_bench; every step's output lands in OUT/*.txt
# In order of importance:
#   1. 300 steps of the gpu preset's stage 2 with --profile (its phase table, ms/step: the stage with the targets),
#      then the gpu preset end to end (stages 0-2 -> ELVA -> evaluation) with --profile: each stage prints
#      its phase table after ten steps and its ms/step on every log line, so even a run cut by its limit says where
#      the time goes and how long the whole would take;
#   2. python kernels.py --sweep (each kernel against its reference; corpus_ranks tile shapes);
#   3. the test suite on CUDA (the Triton kernels compiled, bf16 included);
#   4. the same 300 stage-2 steps with --compile, profiled (compare with step 1's table);
#   5. --resume on CUDA (fused AdamW's state), then a 2-process torchrun smoke run (NCCL on two GPUs).
# Calls python3 directly (a `python` symlink may not see the environment's packages).
set -uo pipefail
OUT=${1:-gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" >> "$OUT/gpu.txt"
step() {  # limit_s name command...
  local limit=$1 name=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "[$name] exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$OUT/$name.txt"
}
step 75 train_contrastive python3 train.py --preset gpu --stages contrastive --steps 300 --profile --no_eval \
  --out "$OUT/contrastive"
step 220 train_gpu python3 train.py --preset gpu --out "$OUT/run" --profile
step 90 kernels python3 kernels.py --sweep
step 100 pytest python3 -m pytest -q -x
step 75 train_compile python3 train.py --preset gpu --stages contrastive --steps 300 --compile --profile --no_eval \
  --out "$OUT/compiled"
# --resume on CUDA: fused AdamW's state restored where it wants it (a kill after the first checkpoint, then resume)
step 60 resume bash -c "timeout 25 python3 train.py --preset smoke --stages contrastive --ckpt_every 10 --no_eval \
  --out $OUT/resume; python3 train.py --preset smoke --stages contrastive --no_eval --resume --out $OUT/resume"
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step 60 torchrun torchrun --nproc_per_node=2 train.py --preset smoke --out "$OUT/ddp"   # NCCL: logs, verdicts
else
  step 40 torchrun torchrun --nproc_per_node=2 train.py --preset smoke --device cpu --threads 4 --out "$OUT/ddp"
fi
grep -h "profile\|^|\|ms/step\|exit\|passed\|failed" "$OUT"/*.txt | tail -n 80
