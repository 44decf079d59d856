# Sourced by the one-call GPU scripts (gpu_check.sh, cuda_check.sh) after `set -uo pipefail`, with
# the script's OUTDIR argument in $1: makes OUTDIR absolute in $out, moves to the repository root,
# sets up the environment ($py, $rep = REP_MS, default 10), writes $out/env.txt (GPU, driver, torch,
# triton, nvcc) and JIT-builds the cuda backend once, before anything runs in parallel.
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CLORA_CACHE_DIR=${CLORA_CACHE_DIR:-$out/cache}
py=${PYTHON:-python}
rep=${REP_MS:-10}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -1
  start=$SECONDS
  timeout 300 $py -c "import clora_kernels as ck; print('cuda backend:', ck.available_backends()['cuda'])" 2>&1 | tail -1
  echo "cuda backend build/load: $((SECONDS - start)) s"
} | tee "$out/env.txt"
