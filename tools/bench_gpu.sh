#!/usr/bin/env bash
# GPU benchmark matrix for a machine without internet (see issue 9 / docs/benchmarks.md).
# Usage (repo root, on the GPU machine): bash tools/bench_gpu.sh OUT_DIR [WHEEL_DIR] [REF_SCRIPT]
#   WHEEL_DIR: wheels brought along (megatron-core, omegaconf, antlr4, webdataset, ...), installed with --no-deps
#   REF_SCRIPT: the plain-PyTorch baseline (default ../shared/bench/ref_mdm_train.py)
set -uo pipefail
OUT=${1:?OUT_DIR}; WHL=${2:-.whl}; REF=${3:-../shared/bench/ref_mdm_train.py}
mkdir -p "$OUT"
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHL"/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu.txt"
for shape in "125m 1024 8" "350m 2048 8" "1.3b 2048 8"; do
  set -- $shape
  python3 tools/bench_train.py --preset "$1" --seq "$2" --micro-batch "$3" --steps 10 --warmup 3 --ref "$REF" \
    --out "$OUT/bench.jsonl" 2>&1 | tail -3
  python3 tools/bench_train.py --preset "$1" --seq "$2" --micro-batch "$3" --steps 10 --warmup 3 --ref "$REF" \
    --ref-compile --out "$OUT/bench.jsonl" 2>&1 | tail -3
done
