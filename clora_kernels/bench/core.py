"""Benchmark core: the variants of one shape, timed in one process run (docs/design.md section 7).

Variants: merged (cuBLAS F.linear with the merged weight: the floor), torch (eager reference
backend), compile (torch.compile of the reference formula), peft (a PEFT LoRA layer on the same
base weight with lora_B' = lora_B·R_effᵀ: the same math), hand (the eager LoRA a user would write,
F.linear(x, W, b) + s·((x·Aᵀ)·(R_old + R_delta))·Bᵀ with autograd's plain gradients: the same
forward, the gradient through the old route included), and each usable engine backend (triton,
cuda) plus auto. GPU timing: triton.testing.do_bench (CUDA events, median; it flushes
L2 before every run) over several rotating input buffers. CPU timing: torch.utils.benchmark.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reference import delta_weight, folded_lora_B, reference_formula, routing_eff
from ..functional import clora_linear

BASELINES = ("merged", "torch", "compile", "peft", "hand")
ENGINE = ("triton", "cuda", "auto")
from .._cli import DTYPES  # noqa: F401  (bench's import path)


@dataclass
class Case:
    xs: list
    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    routing_old: torch.Tensor
    routing_delta: torch.Tensor
    scaling: float
    grad: torch.Tensor


def usable_for_timing(name: str, device, usable: dict) -> tuple:
    """(ok, why) of an engine backend for the timing tools on `device`: as available_backends()
    says, except that the Triton interpreter (usable on CPU for tests) is never timed."""
    ok, why = usable.get(name, (False, "unknown backend"))
    if name == "triton" and device.type != "cuda":
        return False, "no CUDA device (the Triton interpreter is for tests, not timing)"
    return ok, why


def make_case(shape, dtype, device, training: bool, l2_bytes: int = 0) -> Case:
    """Random (never zero) tensors; enough x buffers to exceed 2x L2 when rotated."""
    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    per = max(1, m * k * torch.finfo(dtype).bits // 8)
    nbuf = max(2, min(8, math.ceil(2 * l2_bytes / per))) if l2_bytes else 2
    kw = dict(device=device, dtype=dtype)
    xs = [torch.randn(m, k, **kw).requires_grad_(training) for _ in range(nbuf)]
    w = torch.randn(n, k, **kw) / math.sqrt(k)
    p = dict(lora_A=torch.randn(r, k, **kw) / math.sqrt(k), lora_B=torch.randn(n, r, **kw) / math.sqrt(r),
             routing_delta=torch.randn(r, r, **kw) / math.sqrt(r))
    for t in p.values():
        t.requires_grad_(training)
    return Case(xs, w, torch.randn(n, **kw), routing_old=torch.randn(r, r, **kw) / math.sqrt(r), scaling=2.0,
                grad=torch.randn(m, n, **kw), **p)


def _rotating(case, fwd, training, params=None):
    """A step over the rotating x buffers, and what to reset between timed runs: the xs and the
    trained parameters (`params`, default the case's adapter), so that no variant pays for a growing
    .grad accumulation that the others do not."""
    state = {"i": 0}
    params = [case.lora_A, case.lora_B, case.routing_delta] if params is None else params

    def step():
        i = state["i"] = (state["i"] + 1) % len(case.xs)
        y = fwd(case.xs[i])
        if training:
            y.backward(case.grad)
        return y
    return step, (case.xs + params if training else None)


def build_variant(name: str, case: Case, training: bool, compiled_cache: dict):
    """A no-argument callable running one forward (and backward when training) of `name`, and
    the tensors whose .grad must be reset between runs."""
    c = case
    if name == "merged":
        with torch.no_grad():
            wm = c.weight + delta_weight(c.lora_A, c.lora_B, routing_eff(c.routing_old, c.routing_delta, None),
                                         c.scaling)
        return _rotating(c, lambda x: F.linear(x, wm, c.bias), training)
    if name == "compile":
        fn = compiled_cache.get("fn")
        if fn is None:      # static shapes: one graph per shape (after its first shape change Dynamo's
            # automatic dynamic made the later shapes' graphs dynamic, 3-7 % slower)
            fn = compiled_cache["fn"] = torch.compile(reference_formula, dynamic=False)
        # the forward alone as one route (the same value; the two routes of the stop-gradient form are
        # two chains of products that the compiler keeps, double the adapter's work)
        return _rotating(c, lambda x: fn(x, c.weight, c.bias, c.lora_A, c.lora_B, c.routing_old, c.routing_delta,
                                         None, c.scaling, not training), training)
    if name == "peft":
        layer = _peft_layer(c)
        return _rotating(c, layer, training, [p for p in layer.parameters() if p.requires_grad])
    if name == "hand":
        return _rotating(c, lambda x: reference_formula(x, c.weight, c.bias, c.lora_A, c.lora_B, c.routing_old,
                                                        c.routing_delta, None, c.scaling, True), training)
    backend = name
    return _rotating(c, lambda x: clora_linear(x, c.weight, c.bias, c.lora_A, c.lora_B, c.routing_old,
                                               c.routing_delta, None, c.scaling, backend=backend), training)


def raise_compile_limits() -> None:
    """Dynamo's recompile limits raised for a timing run, which compiles many graphs of one code: past them
    torch falls back to eager silently, and an eager row is labelled "compile" (clora-bench compiles each
    shape static; clora-profile compiles one timm forward per variant and batch size, 10 on a GPU against
    torch's default 8)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)


def peft_dtype_kwargs() -> dict:
    """get_peft_model's autocast_adapter_dtype=False: the adapter in the base's dtype, as every other
    variant computes (PEFT's default keeps a bf16 model's adapter in fp32, with casts around it; peft
    < 0.12 has no such option and kept the base's dtype). For clora-bench and clora-profile."""
    import inspect

    from peft import get_peft_model
    return {"autocast_adapter_dtype": False} if "autocast_adapter_dtype" in inspect.signature(
        get_peft_model).parameters else {}


def _peft_layer(c: Case):
    from peft import LoraConfig, get_peft_model
    n, k = c.weight.shape
    r = c.lora_A.shape[0]
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(k, n, device=c.weight.device, dtype=c.weight.dtype))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=c.scaling * r, target_modules=["lin"], lora_dropout=0.0),
                           **peft_dtype_kwargs())
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.base_layer.weight.copy_(c.weight)
        lin.base_layer.bias.copy_(c.bias)
        lin.lora_A["default"].weight.copy_(c.lora_A)
        lin.lora_B["default"].weight.copy_(folded_lora_B(c.lora_B, routing_eff(c.routing_old, c.routing_delta, None)))
    # the LoRA layer itself, as every other variant is one layer's call: through the PeftModel and its tuner
    # each call paid two more modules (13-20 µs on the CPU machine at M=24, K=N=96: about +1 on the peft row's
    # ratio to merged there; a helper's audit), which a model's many layers share
    return lin


def time_us(step, device, reset, rep_ms: int) -> float:
    if device.type == "cuda":
        import triton.testing
        return 1e3 * triton.testing.do_bench(step, warmup=max(5, rep_ms // 4), rep=rep_ms, grad_to_none=reset,
                                             return_mode="median")
    from torch.utils import benchmark

    def run():
        if reset:
            for t in reset:
                t.grad = None
        step()
    # at the process's thread count: Timer's default is one thread (until 2026-12-06 every CPU row was
    # timed on one, while the machine ran two)
    t = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=rep_ms / 1e3)
    return 1e6 * t.median


def time_graph_us(steps, rep_ms: int) -> float:
    """Median time per call of a CUDA graph that runs each step once. Each step owns a distinct
    tensor set, together over 2x L2, so replays read from memory as a model's layers would. This
    is GPU time without the host's launch overhead (what CUDA-graph inference pays)."""
    def all_steps():
        for st in steps:
            st()
    graph, _ = capture_graph(all_steps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    n = max(5, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(n):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * statistics.median(times) / len(steps)


def capture_graph(fn, warmup: int = 1):
    """(CUDA graph of fn(), fn's output in the graph's memory): fn runs `warmup` times first on a side
    stream (kernels compiled and tuned, memory allocated), as CUDA-graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_sets(shape, dtype, l2_bytes: int) -> int:
    per = (shape.m * shape.k + shape.n * shape.k + shape.m * shape.n) * (torch.finfo(dtype).bits // 8)
    return max(1, min(8, math.ceil(2 * l2_bytes / per)))


def peak_mem(step, device, reset) -> int:
    if device.type != "cuda":
        return 0
    for t in reset or []:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def flops_bytes(shape, elt: int, training: bool):
    """Useful work of one call: C-LoRA forward, plus dx and the adapter gradients for fwd+bwd."""
    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    fl = 2 * m * (n * k + k * r + r * r + r * n)
    by = elt * (m * k + n * k + m * n + (k + n) * r + n)
    if training:
        fl += 2 * m * (n * k + n * r + r * r + r * k) + 2 * m * r * (k + n + r)
        by += elt * (m * n + n * k + 2 * m * k + (k + n) * r)
    return fl, by


def floor_ratio(shape, training: bool) -> float:
    """The least time ratio to merged that the math allows, in FLOPs. fwd+bwd: 1 + r/N + r/K (the
    adapter's t, v and weight gradients, 4·M·r·(K + N), over merged's forward and dx, 4·M·N·K), the
    performance issue's definition. It leaves out the forward's up-projection and dx's low-rank term
    (2·M·r·(N + K) more, or a merged weight per step, 2·N·K·r), which every plan pays one way or the
    other: counted, the least ratio is 1 + r/N + r/K + min((r/N + r/K)/2, r/(2M)) plus r² terms
    (1.23-1.33 on the CPU ViT rows where this floor is 1.21).
    fwd: the cheaper of the unmerged ops (1 + r/N + r/K + r²/(N·K)) and a per-call merged weight
    (1 + r/M + r²/(M·N): building W_eff, then merged's own GEMM)."""
    m, k, n, r = shape.m, shape.k, shape.n, shape.r
    if training:
        return 1 + r / n + r / k
    return min(1 + r / n + r / k + r * r / (n * k), 1 + r / m + r * r / (m * n))


def measure_ceilings(device, dtype) -> dict:
    """The device's dense GEMM rate and copy bandwidth, measured once."""
    if device.type != "cuda":
        return {"gemm_tflops": None, "copy_gbps": None}
    import triton.testing
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    src = torch.randn(256 * 1024 * 1024, device=device, dtype=torch.float32)   # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=100, return_mode="median")
    return {"gemm_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / ms_copy / 1e6}


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")
