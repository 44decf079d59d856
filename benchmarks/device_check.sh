#!/usr/bin/env bash
# THE one command for a lent GPU (the device tool's `run`, timeout_s=600): cuda_check.sh (the cuda
# backend: its GPU tests, compute-sanitizer, its timings; it never ran on a GPU, so first), then
# gpu_check.sh (the other gpu-marked tests, clora-bench, clora-profile, the host probe), sharing one
# extension build, inside 590 s in all (each script's stages may run 20 s past its budget before a kill); everything packed in OUTDIR/results.tgz (the device tool
# brings back few files and no folders deep), the summaries printed last.
# Usage: bash benchmarks/device_check.sh "$OUT"      (CUDA_BUDGET_S / GPU_BUDGET_S: 250 / 280 s)
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
BUDGET_S=${CUDA_BUDGET_S:-250} bash "$here/cuda_check.sh" "$work/cuda" > "$work/cuda_check.txt" 2>&1
BUDGET_S=${GPU_BUDGET_S:-280} GPU_TEST_ARGS="--ignore=tests/test_cuda.py" bash "$here/gpu_check.sh" "$work/gpu" \
    > "$work/gpu_check.txt" 2>&1
tar czf "$out/results.tgz" -C "$work" .
echo "== cuda_check.sh =="; cat "$work/cuda_check.txt"
echo; echo "== gpu_check.sh =="; cat "$work/gpu_check.txt"
