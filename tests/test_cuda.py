"""The cuda backend (csrc/). CI compiles the sources whenever nvcc and a CUDA build of torch are
present (the extension even loads on a CPU-only machine, so its schemas and Meta kernels are
checked too); the correctness tests against the float64 oracle need a GPU (marker `gpu`)."""
import shutil

import pytest
import torch

import clora_kernels as ck
from clora_kernels.backends import BackendUnavailableError
from clora_kernels.backends import cuda as cuda_backend
from helpers import call, cast_inputs, check_backend, make_inputs

HAVE_TOOLCHAIN = shutil.which("nvcc") is not None and torch.version.cuda is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="needs nvcc and a CUDA build of torch to compile csrc/")
def test_csrc_compiles_and_registers(tmp_path):
    cuda_backend.build(str(tmp_path / "build"))            # raises with the compiler's first error line
    assert hasattr(torch.ops.clora, "cuda_linear_fwd") and hasattr(torch.ops.clora, "cuda_linear_dx")

    def m(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)
    y, t = torch.ops.clora.cuda_linear_fwd(m(7, 24), m(40, 24), m(40), m(5, 24), m(40, 5), m(5, 5), m(5, 5), None, 0.5)
    dx, v = torch.ops.clora.cuda_linear_dx(m(7, 40), m(40, 24), m(5, 24), m(40, 5), m(5, 5), m(5, 5), m(5, 5), 0.5)
    assert (y.shape, t.shape, dx.shape, v.shape) == ((7, 40), (7, 5), (7, 24), (7, 5))


def test_build_failure_is_one_clear_line():
    text = "[1/2] nvcc -c clora_cuda.cu\nclora_cuda.cu(12): error: identifier \"bar\" is undefined\nmore output"
    assert cuda_backend._first_error_line(text) == 'clora_cuda.cu(12): error: identifier "bar" is undefined'


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_unusable_without_gpu_says_why():
    ok, why = ck.available_backends()["cuda"]
    assert ok is False and ("GPU" in why or "CPU-only" in why)


# ---- GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n,r", [(1, 24, 200, 1), (129, 200, 769, 5), (7, 769, 24, 16), (300, 256, 520, 64),
                                     (65, 136, 264, 128)])
def test_gpu_matches_oracle(seed, dtype, m, k, n, r):
    if r > min(k, n):
        pytest.skip("rank above min(K, N)")
    check_backend("cuda", dtype, m=m, k=k, n=n, r=r, bias=(m % 2 == 1), hard=(r % 2 == 0), device="cuda",
                  through_old=(m == 7))


@pytest.mark.gpu
def test_gpu_noncontiguous_3d_and_empty(seed):
    check_backend("cuda", torch.float32, lead=(2, 3, 5), k=24, n=40, r=4, device="cuda")
    check_backend("cuda", torch.bfloat16, m=9, k=40, n=48, r=4, noncontig=True, device="cuda")
    inp = cast_inputs(make_inputs(1, 24, 40, 4), torch.float32, "cuda")
    inp["x"] = torch.randn(0, 24, device="cuda", requires_grad=True)
    y = call(ck.clora_linear, inp, backend="cuda")
    assert y.shape == (0, 40)
    y.sum().backward()


@pytest.mark.gpu
def test_gpu_unsupported_dtype_says_why():
    inp = cast_inputs(make_inputs(3, 24, 40, 4), torch.float64, "cuda", requires_grad=False)
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run this call: .*float64"):
        call(ck.clora_linear, inp, backend="cuda")


@pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="needs nvcc and a CUDA build of torch")
def test_broken_source_fails_with_the_compiler_line(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cu"
    bad.write_text("int broken = undefined_symbol;\n")
    monkeypatch.setattr(cuda_backend, "sources", lambda: [str(bad)])
    with pytest.raises(RuntimeError, match=r"building the CUDA extension failed: .*broken\.cu.*error"):
        cuda_backend.build(str(tmp_path / "build"))
