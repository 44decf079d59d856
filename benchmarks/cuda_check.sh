#!/usr/bin/env bash
# One command for a lent GPU: the cuda backend (csrc/) end to end, inside ~8 minutes on an H100.
# JIT-builds the extension, runs its gpu-marked oracle tests, compute-sanitizer memcheck and racecheck
# over benchmarks/sanitize_cuda.py, then clora-bench --suite full --pass both at r=16 for merged /
# torch / cuda in bf16 and fp16 (CUDA events, host cost included: the issue's targets are per call).
# Usage: benchmarks/cuda_check.sh OUTDIR        (REP_MS=ms per variant and shape, default 10)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "${1:-}"
echo "== gpu tests (tests/test_cuda.py) =="
limit 110 $py -m pytest tests/test_cuda.py -q -m gpu -p no:cacheprovider > "$out/cuda_tests.log" 2>&1
grep -hE "^(FAILED|ERROR)|passed|failed|Error" "$out/cuda_tests.log" | head -30
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool =="
  # no caching allocator: an access past a tensor's end then leaves its allocation, which memcheck sees
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 limit 150 compute-sanitizer --tool $tool --error-exitcode 3 $py \
      benchmarks/sanitize_cuda.py > "$out/sanitize_$tool.log" 2>&1
  echo "exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_cuda: done|Error|error" "$out/sanitize_$tool.log" | head -8
done
for dt in bf16 fp16; do
  limit 100 $py -m clora_kernels.bench --suite full --rank 16 --pass both --dtype $dt --backends merged torch cuda \
      --rep-ms "$rep" --no-progress --json "$out/bench_cuda_$dt.json" > "$out/bench_cuda_$dt.log" 2>&1
done
$py benchmarks/report.py --vs torch cuda "$out"/bench_cuda_bf16.json "$out"/bench_cuda_fp16.json
