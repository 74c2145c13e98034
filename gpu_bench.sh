#!/usr/bin/env bash
# The GPU measurements, in one command, for a machine with one CUDA GPU (about 11 minutes on an H100):
#   bash gpu_bench.sh [OUT]          # default OUT=gpu_bench; every step's output lands in OUT/*.txt
# 1. the test suite on CUDA (the Triton kernels compiled), 2. python kernels.py --sweep, 3. the gpu preset end to
# end (stage 2 -> ELVA -> evaluation) with --profile, its wall time per stage, 4. 300 contrastive steps with --compile,
# 5. a 2-process torchrun smoke run.
# Calls python3 directly (a `python` symlink may not see the environment's packages) and waits on PIDs.
set -uo pipefail
OUT=${1:-gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" >> "$OUT/gpu.txt"
( python3 -m pytest -q > "$OUT/pytest.txt" 2>&1 ) &
TESTS=$!
wait $TESTS
python3 kernels.py --sweep > "$OUT/kernels.txt" 2>&1
START=$(date +%s)
python3 train.py --preset gpu --out "$OUT/run" --profile > "$OUT/train_gpu.txt" 2>&1
echo "gpu preset end to end: $(( $(date +%s) - START )) s" >> "$OUT/train_gpu.txt"
# torch.compile: 300 contrastive steps with --compile, profiled (compare with the run above's contrastive profile)
python3 train.py --preset gpu --stages contrastive --steps 300 --compile --profile --no_eval --out "$OUT/compiled" \
  > "$OUT/train_compile.txt" 2>&1
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  torchrun --nproc_per_node=2 train.py --preset smoke --out "$OUT/ddp" > "$OUT/torchrun.txt" 2>&1
else
  torchrun --nproc_per_node=2 train.py --preset smoke --device cpu --threads 4 --out "$OUT/ddp" > "$OUT/torchrun.txt" 2>&1
fi
tail -n 3 "$OUT"/*.txt
