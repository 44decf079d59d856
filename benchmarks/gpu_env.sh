# Sourced by the one-call GPU scripts (gpu_check.sh, cuda_check.sh) after `set -uo pipefail`, with
# the script's OUTDIR argument in $1: makes OUTDIR absolute in $out, moves to the repository root,
# sets up the environment ($py, $rep = REP_MS, default 10), writes $out/env.txt (GPU, driver, torch,
# triton, nvcc) and JIT-builds the cuda backend once, before anything runs in parallel.
# Every stage runs under `limit N command...`: N seconds, or what is left of BUDGET_S (default 540)
# if less, so that the whole script ends inside the device tool's 600 s per command with time left
# to pack OUTDIR. A stage left with no time ends at once and says so in its log. `limit` stops a
# stage with SIGINT (pytest and clora-bench then print what they have; SIGTERM left nothing), and
# kills it 20 s later if it is still there. The build cache is outside OUTDIR (CLORA_CACHE_DIR,
# default /tmp/clora_cache), so that the scripts share one build and OUTDIR holds results only.
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CLORA_CACHE_DIR=${CLORA_CACHE_DIR:-/tmp/clora_cache}
py=${PYTHON:-$(command -v python3 || command -v python)}
rep=${REP_MS:-10}
deadline=$((SECONDS + ${BUDGET_S:-540}))
cap() { local left=$((deadline - SECONDS)); [ "$left" -lt "$1" ] || left=$1; [ "$left" -gt 1 ] || left=1; echo "$left"; }
limit() { local n=$1; shift; timeout -s INT -k 20 "$(cap "$n")" "$@"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -1
  start=$SECONDS
  limit 300 $py -c "import clora_kernels as ck; print('cuda backend:', ck.available_backends()['cuda'])" 2>&1 | tail -1
  echo "cuda backend build/load: $((SECONDS - start)) s"
} | tee "$out/env.txt"
