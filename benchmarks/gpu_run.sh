#!/usr/bin/env bash
# One call on a lent GPU: GPU tests, then the forward benchmark. Usage: benchmarks/gpu_run.sh OUTDIR [bench args]
set -uo pipefail
out=${1:?OUTDIR}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CLORA_CACHE_DIR="$out/cache"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 330 python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25
timeout 400 python -m clora_kernels.bench --no-progress --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log" | tail -80
