"""The cuda backend (csrc/). CI compiles the sources whenever nvcc and a CUDA build of torch are
present (the extension even loads on a CPU-only machine, so its schemas, Meta kernels and the ops'
own validation are checked too); the correctness tests against the float64 oracle need a GPU (marker `gpu`)."""
import os
import re
import shutil

import pytest
import torch

import clora_kernels as ck
from clora_kernels.backends import BackendUnavailableError
from clora_kernels.backends import cuda as cuda_backend
from helpers import call, cast_inputs, check_backend, check_cuda_graph_capture, make_inputs, rel_err

HAVE_TOOLCHAIN = shutil.which("nvcc") is not None and torch.version.cuda is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="needs nvcc and a CUDA build of torch to compile csrc/")
def test_csrc_compiles_and_registers():
    # the cached build (keyed on sources, flags and torch): compiled once per machine, not per run
    if not cuda_backend.registered():       # (a second build in one process is refused: see the next test)
        cuda_backend.build()                               # raises with the compiler's first error line
    assert hasattr(torch.ops.clora, "cuda_linear_fwd") and hasattr(torch.ops.clora, "cuda_linear_dx")
    assert str(torch.ops.clora.cuda_runs_here.default._schema) == "clora::cuda_runs_here(int device) -> str"

    def m(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)
    y, t = torch.ops.clora.cuda_linear_fwd(m(7, 24), m(40, 24), m(40), m(5, 24), m(40, 5), m(5, 5), m(5, 5), None, 0.5,
                                           1024)
    dx, v = torch.ops.clora.cuda_linear_dx(m(7, 40), m(40, 24), m(5, 24), m(40, 5), m(5, 5), m(5, 5), m(5, 5), 0.5,
                                           0)
    assert (y.shape, t.shape, dx.shape, v.shape) == ((7, 40), (7, 5), (7, 24), (7, 5))
    check_op_errors()


def test_an_extension_without_code_for_this_gpu_is_unusable(monkeypatch):
    """A build for other architectures loads, then every launch fails ("no kernel image is
    available"): the backend asks the extension first and says why it cannot run."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.ops.clora, "cuda_runs_here",
                        lambda device: "no kernel image is available for execution on the device", raising=False)
    ok, why = cuda_backend._runs_here("CUDA extension loaded")
    assert not ok and "no code for this GPU (sm_75): no kernel image" in why and "CLORA_CUDA_ARCH=75" in why
    monkeypatch.setattr(torch.ops.clora, "cuda_runs_here", lambda device: "", raising=False)
    assert cuda_backend._runs_here("CUDA extension loaded") == (True, "CUDA extension loaded")

    def fails(device):
        raise RuntimeError("CUDA error: initialization error\nmore")
    monkeypatch.setattr(torch.ops.clora, "cuda_runs_here", fails, raising=False)
    assert cuda_backend._runs_here("x") == (False, "x, but CUDA failed asking it: CUDA error: initialization error")


def test_build_refuses_a_second_library(monkeypatch):
    """A second build in a process whose ops are registered (clora_kernels._C imported, or a JIT build
    of other sources) would abort the process when its library registers them again: refused first."""
    monkeypatch.setattr(cuda_backend, "registered", lambda: True)
    monkeypatch.setattr(cuda_backend, "sources", lambda: pytest.fail("build went on"))
    with pytest.raises(RuntimeError, match="registered in this process already"):
        cuda_backend.build()


@pytest.mark.parametrize("spec, archs, gencode, torch_list", [
    ("80;90+PTX", ["80", "90+PTX"], ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                                     "-gencode=arch=compute_90,code=compute_90"], "8.0;9.0+PTX"),
    ("8.6, 90a", ["86", "90a"], ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90a,code=sm_90a"],
     "8.6;9.0a"),
    ("100a;12.0", ["100a", "120"], ["-gencode=arch=compute_100a,code=sm_100a", "-gencode=arch=compute_120,code=sm_120"],
     "10.0a;12.0"),
    ("8.9+PTX", ["89+PTX"], ["-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_89,code=compute_89"],
     "8.9+PTX"),
])
def test_cuda_arch_names(spec, archs, gencode, torch_list):
    """CLORA_CUDA_ARCH in nvcc's and torch's spellings gives the same targets to both builds (90a,
    100a, 8.6 and +PTX were mangled into 90.a, 10.0.a, 8..6 and 8.9+PT.X)."""
    from clora_kernels._cuda_build import cuda_archs, gencode_flags, torch_arch_list
    got = cuda_archs(spec)
    assert got == archs and gencode_flags(got) == gencode and torch_arch_list(got) == torch_list


@pytest.mark.parametrize("spec", ["sm_80", "9", "1000", "8.6.1", "90+ptx"])
def test_cuda_arch_names_refused(spec, monkeypatch):
    from clora_kernels._cuda_build import cuda_archs
    monkeypatch.setenv("CLORA_CUDA_ARCH", spec)
    with pytest.raises(ValueError, match=re.escape(f"CLORA_CUDA_ARCH entry '{spec}' is not a compute capability")):
        cuda_archs()


def test_jit_build_targets_the_visible_gpus(monkeypatch):
    """Without CLORA_CUDA_ARCH the JIT build targets the GPUs it runs on (it built sm_80 and sm_90 only,
    so on any other GPU every launch failed after the backend said it was usable); with it, what it says."""
    monkeypatch.delenv("CLORA_CUDA_ARCH", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(7, 5), (12, 0)][i])
    assert cuda_backend.jit_archs() == ["75", "120"]
    monkeypatch.setenv("CLORA_CUDA_ARCH", "86")
    assert cuda_backend.jit_archs() == ["86"]


def test_jit_build_arch_precedence(monkeypatch, tmp_path):
    """CLORA_CUDA_ARCH first (an invalid one is an error even where TORCH_CUDA_ARCH_LIST is set), then
    TORCH_CUDA_ARCH_LIST, then the visible GPUs; the build leaves the environment as it found it."""
    import torch.utils.cpp_extension as ce
    seen = []
    monkeypatch.setattr(cuda_backend, "registered", lambda: False)
    monkeypatch.setattr(cuda_backend, "sources", lambda: [str(tmp_path / "a.cu")])
    monkeypatch.setattr(cuda_backend, "cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(cuda_backend, "extra_include_dirs", lambda root: [])
    monkeypatch.setattr(ce, "load", lambda **kw: seen.append(os.environ["TORCH_CUDA_ARCH_LIST"]))
    (tmp_path / "a.cu").write_text("")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    monkeypatch.setenv("CLORA_CUDA_ARCH", "90a")
    cuda_backend.build(str(tmp_path / "b"))
    monkeypatch.delenv("CLORA_CUDA_ARCH")
    cuda_backend.build(str(tmp_path / "b"))
    assert seen == ["9.0a", "7.5"] and os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"
    monkeypatch.setenv("CLORA_CUDA_ARCH", "sm_90")
    with pytest.raises(RuntimeError, match="CLORA_CUDA_ARCH entry 'sm_90'"):
        cuda_backend.build(str(tmp_path / "b"))


def check_op_errors():
    """The ops' own validation (for callers of torch.ops.clora.cuda_* themselves), run on CPU
    tensors: every message names the argument and its sizes and ends with the op's name."""
    def c(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype)
    fwd, dx = torch.ops.clora.cuda_linear_fwd, torch.ops.clora.cuda_linear_dx
    good_fwd = dict(x=c(7, 24), weight=c(40, 24), bias=c(40), lora_a=c(5, 24), lora_b=c(40, 5), routing_old=c(5, 5),
                    routing_delta=c(5, 5), projection=None)
    cases = [
        (fwd, {}, r"tensors must be on a CUDA device, got cpu \(in clora::cuda_linear_fwd\)"),
        (fwd, dict(x=c(7, 23)), r"x must be \(M, 24\), got \[7, 23\] \(in clora::cuda_linear_fwd\)"),
        (fwd, dict(bias=c(41)), r"bias must be \[40\], got \[41\]"),
        (fwd, dict(lora_b=c(40, 4)), r"lora_b must be \[40, 5\], got \[40, 4\]"),
        (fwd, dict(projection=c(4, 5)), r"projection must be \[5, 5\], got \[4, 5\]"),
        (fwd, dict(routing_old=c(5, 5, dtype=torch.float16)), "dtype mismatch: x is Float but routing_old is Half"),
        (fwd, dict(lora_a=c(129, 24), lora_b=c(40, 129)), "rank must be in \\[1, 128\\], got 129"),
        (fwd, {k: (v.double() if v is not None else None) for k, v in good_fwd.items()},
         "dtype must be float16, bfloat16 or float32, got Double"),
    ]
    for op, change, message in cases:
        args = {**good_fwd, **change}
        with pytest.raises(RuntimeError, match=message):
            op(*args.values(), 0.5, 1024)
    good_dx = dict(g=c(7, 40), weight=c(40, 24), lora_a=c(5, 24), lora_b=c(40, 5), routing_old=c(5, 5),
                   routing_delta=c(5, 5), projection=c(5, 5))
    with pytest.raises(RuntimeError, match=r"tensors must be on a CUDA device, got cpu \(in clora::cuda_linear_dx\)"):
        dx(*good_dx.values(), 0.5, 0)
    with pytest.raises(RuntimeError, match=r"g must be \(M, 40\), got \[7, 24\] \(in clora::cuda_linear_dx\)"):
        dx(*{**good_dx, "g": c(7, 24)}.values(), 0.5, 0)


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
@pytest.mark.parametrize("fused_max_mr", ["0", "1000000000"])   # every call via cuBLAS t, every call fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,r", [(1, 4100, 24, 64), (33, 769, 200, 5), (300, 256, 520, 128)])
def test_gpu_both_shrink_forms(seed, monkeypatch, fused_max_mr, dtype, m, k, n, r):
    """The two forms of the shrink (fused split-K kernel, cuBLAS t), each forced at shapes the
    default threshold would send the other way; K = 4100 takes several K-splits."""
    monkeypatch.setenv("CLORA_CUDA_FUSED_MAX_MR", fused_max_mr)
    check_backend("cuda", dtype, m=m, k=k, n=n, r=r, bias=True, hard=(m == 33), device="cuda")


def _poison_cuda_allocator():
    """Fill memory the caching allocator will hand out next with NaN: the ops allocate their outputs
    with at::empty, so an element a kernel leaves unwritten reads NaN (docs/design.md section 6)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    small = [torch.full((1024,), float("nan"), device="cuda") for _ in range(512)]      # small pool, 4 KB each
    large = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(16)]   # large pool, 4 MB each
    del small, large


@pytest.mark.gpu
@pytest.mark.parametrize("fused_max_mr", [0, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_poisoned_outputs_fully_written(seed, fused_max_mr, dtype):
    from clora_kernels.backends.torch_ref import lora_gemm, routing_eff
    m, k, n, r = 37, 769, 200, 5
    x, g = torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(m, n, device="cuda", dtype=dtype)
    w, b = torch.randn(n, k, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    la, lb = torch.randn(r, k, device="cuda", dtype=dtype), torch.randn(n, r, device="cuda", dtype=dtype)
    ro, rd, p = (torch.randn(r, r, device="cuda", dtype=dtype) for _ in range(3))
    reff = routing_eff(ro, rd, p)
    ok, why = ck.available_backends()["cuda"]     # loads the extension (this may be a shard's first test)
    assert ok, why
    _poison_cuda_allocator()
    y, t = torch.ops.clora.cuda_linear_fwd(x, w, b, la, lb, ro, rd, p, 0.5, fused_max_mr)
    _poison_cuda_allocator()
    dx, v = torch.ops.clora.cuda_linear_dx(g, w, la, lb, ro, rd, p, 0.5, fused_max_mr)
    want = (*lora_gemm(x, w, la.t(), lb.t(), reff, b, 0.5),           # y, t
            *lora_gemm(g, w.t(), lb, la, reff.t(), None, 0.5))        # dx, v
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, got, ref in zip(("y", "t", "dx", "v"), (y, t, dx, v), want):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert rel_err(got, ref) <= tol, (name, rel_err(got, ref))


def test_fused_threshold_env_is_checked(monkeypatch):
    monkeypatch.setenv("CLORA_CUDA_FUSED_MAX_MR", "lots")
    with pytest.raises(ValueError, match="CLORA_CUDA_FUSED_MAX_MR must be an integer >= 0, got 'lots'"):
        cuda_backend.fused_max_mr()
    monkeypatch.setenv("CLORA_CUDA_FUSED_MAX_MR", "64")
    assert cuda_backend.fused_max_mr() == 64


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
    monkeypatch.setattr(cuda_backend, "registered", lambda: False)     # it fails compiling, before any load
    with pytest.raises(RuntimeError, match=r"building the CUDA extension failed: .*broken\.cu.*error"):
        cuda_backend.build(str(tmp_path / "build"))


@pytest.mark.gpu
@pytest.mark.parametrize("m,r", [(4, 16), (300, 120)])       # fused shrink; cuBLAS t with > 48 KB shared memory
def test_gpu_cuda_graph_capture(seed, m, r):
    layer = ck.CLoRALinear(256, 384, rank=r, mode="hard", backend="cuda", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.routing_delta.normal_()
        layer.end_task()                   # hard mode: a non-identity projection from here on
        layer.routing_delta.normal_()
    check_cuda_graph_capture(layer, torch.randn(m, 256, device="cuda", dtype=torch.bfloat16))
