#!/usr/bin/env bash
# One command for a lent GPU, inside 9 minutes on an H100 (every stage has a timeout, all inside
# BUDGET_S): the gpu-marked tests (8 parallel shards: they are bound by Triton compile time on the
# host; GPU_TEST_ARGS adds pytest arguments, e.g. --ignore=tests/test_cuda.py where cuda_check.sh runs them), clora-bench --suite full --pass both (CUDA events; r=16, then r=8/64 forward), the forward
# again by CUDA-graph replay (r=16), clora-profile at batch 1/8/64 in eager and cuda-graphs modes,
# and, time allowing, the host-overhead probe. Logs, JSON and PNGs go to OUTDIR; the summaries print last.
# Usage: benchmarks/gpu_check.sh OUTDIR        (REP_MS=ms per variant and shape, default 10)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "${1:-}"
for i in 0 1 2 3 4 5 6 7; do
  CLORA_TEST_SHARD=$i/8 limit 130 $py -m pytest tests -q -m gpu -p no:cacheprovider ${GPU_TEST_ARGS:-} \
      > "$out/gpu_tests_$i.log" 2>&1 &
done
wait
cat "$out"/gpu_tests_?.log > "$out/gpu_tests.log"; rm -f "$out"/gpu_tests_?.log
echo "gpu tests:"; grep -hE "^(FAILED|ERROR)|passed|failed" "$out/gpu_tests.log" | head -40
# measured on a fresh H100 (2026-11-23): the forward of the full suite at r = 8/16/64 alone took
# ~240 s (mostly Triton compiles and tuning), so fwd+bwd at every shape comes first at r = 16,
# then the other ranks' forward as far as the time allows (JSON is written after every shape).
limit 170 $py -m clora_kernels.bench --suite full --pass both --rank 16 --rep-ms "$rep" --no-progress \
    --json "$out/bench.json" --plot "$out/bench.png" > "$out/bench.log" 2>&1
limit 60 $py -m clora_kernels.bench --suite full --pass fwd --rank 8 64 --rep-ms "$rep" --no-progress \
    --json "$out/bench_r8_r64.json" > "$out/bench_r8_r64.log" 2>&1
limit 50 $py -m clora_kernels.bench --suite full --rank 16 --pass fwd --cuda-graphs --rep-ms "$rep" \
    --backends merged torch compile triton auto --no-progress --json "$out/bench_graphs.json" > "$out/bench_graphs.log" 2>&1
limit 50 $py -m clora_kernels.profile --batch 1 8 64 --mode eager cuda-graphs --iters 20 --top 12 \
    --json "$out/profile.json" > "$out/profile.log" 2>&1
limit 40 $py benchmarks/overhead_probe.py > "$out/overhead.log" 2>&1
echo; echo "== clora-bench r=16 fwd and fwd+bwd (CUDA events) =="
grep -A 12 "^geomean" "$out/bench.log" || $py benchmarks/report.py "$out/bench.json" 2>&1 | tail -20
echo; echo "== clora-bench r=8/64 fwd (CUDA events) =="
grep -A 6 "^geomean" "$out/bench_r8_r64.log" || $py benchmarks/report.py "$out/bench_r8_r64.json" 2>&1 | tail -12
echo; echo "== clora-bench fwd (CUDA-graph replay) =="; grep -A 6 "^geomean" "$out/bench_graphs.log" || echo "(did not finish)"
echo; echo "== clora-profile =="; sed -n '/^variant/,/^$/p' "$out/profile.log"
echo; echo "== host overhead (benchmarks/overhead_probe.py) =="; sed -n '/^host cost/,/CLoRA\/hand/p' "$out/overhead.log"
