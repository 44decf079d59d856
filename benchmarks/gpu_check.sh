#!/usr/bin/env bash
# One command for a lent GPU (fits in 9 minutes on an H100): GPU tests, clora-bench full suite
# (fwd and fwd+bwd, CUDA events), the forward again by CUDA-graph replay, clora-profile at batch
# 1/8/64 in eager and cuda-graphs modes. Logs, JSON and PNGs go to OUTDIR; summaries print last.
# Usage: benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CLORA_CACHE_DIR=${CLORA_CACHE_DIR:-$out/cache}
py=${PYTHON:-python}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$out/env.txt"
timeout 150 $py -m pytest tests -q -m gpu -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
echo "gpu tests: $(tail -n 1 "$out/gpu_tests.log")"
timeout 240 $py -m clora_kernels.bench --suite full --pass both --rep-ms ${REP_MS:-25} --no-progress \
    --json "$out/bench.json" --plot "$out/bench.png" > "$out/bench.log" 2>&1
timeout 90 $py -m clora_kernels.bench --suite full --rank 16 --pass fwd --cuda-graphs --rep-ms ${REP_MS:-25} \
    --backends merged torch compile triton auto --no-progress --json "$out/bench_graphs.json" \
    --plot "$out/bench_graphs.png" > "$out/bench_graphs.log" 2>&1
timeout 70 $py -m clora_kernels.profile --batch 1 8 64 --mode eager cuda-graphs --iters 20 --top 12 \
    --json "$out/profile.json" > "$out/profile.log" 2>&1
echo; echo "== clora-bench (CUDA events) =="; grep -A 12 "^geomean" "$out/bench.log"
echo; echo "== clora-bench fwd (CUDA-graph replay) =="; grep -A 6 "^geomean" "$out/bench_graphs.log"
echo; echo "== clora-profile =="; sed -n '/^clora-profile/,/^top/p' "$out/profile.log"
