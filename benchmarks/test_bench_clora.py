"""pytest-benchmark suite over the clora-bench shapes (same variants and builders as the CLI).

    pytest benchmarks/ --benchmark-only [--benchmark-compare] [--benchmark-json out.json]
Env: CLORA_BENCH_SUITE (quick), CLORA_BENCH_DTYPE (bf16 on GPU, fp32 on CPU), CLORA_BENCH_SIZE_DIV
(1 on GPU, 8 on CPU). On GPU each round is synchronised; the CLI's CUDA-event timings are the
reported numbers, this suite is for regression comparisons between commits."""
import os

import pytest
import torch

from clora_kernels import available_backends
from clora_kernels.bench.core import DTYPES, build_variant, make_case
from clora_kernels.bench.shapes import suite_shapes

pytest.importorskip("pytest_benchmark")
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = DTYPES[os.environ.get("CLORA_BENCH_DTYPE", "bf16" if GPU else "fp32")]
SHAPES = suite_shapes(os.environ.get("CLORA_BENCH_SUITE", "quick"), (16,),
                      int(os.environ.get("CLORA_BENCH_SIZE_DIV", "1" if GPU else "8")))
VARIANTS = ["merged", "torch", "compile"] + (["triton", "auto"] if GPU and available_backends()["triton"][0] else [])


@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.layer}-M{s.m}-K{s.k}-N{s.n}-r{s.r}")
def test_clora_linear(benchmark, shape, variant, training):
    case = make_case(shape, DTYPE, DEVICE, training)
    step, reset = build_variant(variant, case, training, {})

    def run():
        for t in reset or []:
            t.grad = None
        with torch.set_grad_enabled(training):
            step()
        if GPU:
            torch.cuda.synchronize()
    run()
    benchmark.extra_info.update(layer=shape.layer, M=shape.m, K=shape.k, N=shape.n, r=shape.r,
                                dtype=str(DTYPE), device=torch.cuda.get_device_name() if GPU else "cpu")
    benchmark(run)
