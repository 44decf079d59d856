"""GPU probe of host overhead (one device call; prints two small tables).

1. Per shape and backend: time per call by CUDA events (host launch cost included) and by CUDA-graph
   replay (GPU time only), at small M where the host dominates, measured alternately.
2. Where the host time goes: wall time per eager call over 2000 calls with one synchronize at the end
   (when the GPU is the faster side this is the host's cost per call), no_grad and with grad, at ViT-B
   qkv batch 1 (M=197, K=768, N=2304, r=16), then cProfile's top functions per backend.
Without a GPU only part 2 runs, on CPU tensors at a tiny shape (M=1, K=N=16, r=4, fp32) with the torch
backend, beside the registered op called directly (`op`: torch's custom-op wrappers, which clora_linear
avoids in eager mode) and the triton backend with its kernel launch stubbed out and a plan cached
(`triton*`: this package's Python layer up to Triton's launcher, which itself needs a GPU): there the
kernels cost little, so the table is the Python host cost.
Usage: python benchmarks/overhead_probe.py [--top N]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch
import triton.testing

import clora_kernels as ck

GPU = torch.cuda.is_available()
dev, dt = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)


def sync():
    if GPU:
        torch.cuda.synchronize()


def tensors(m, k, n, r=16, grad=False):
    x = torch.randn(m, k, device=dev, dtype=dt).requires_grad_(grad)    # a layer inside a network: dx too
    w = torch.randn(n, k, device=dev, dtype=dt) / 64
    b = torch.randn(n, device=dev, dtype=dt)
    la = (torch.randn(r, k, device=dev, dtype=dt) / 64).requires_grad_(grad)
    lb = torch.randn(n, r, device=dev, dtype=dt).requires_grad_(grad)
    ro = torch.randn(r, r, device=dev, dtype=dt)
    rd = torch.randn(r, r, device=dev, dtype=dt).requires_grad_(grad)
    return x, w, b, la, lb, ro, rd


def stub_triton_launch():
    """CPU only: the triton backend's Python layer without the kernel. Its launch becomes a no-op
    and the plan cache answers with the fused plan, as it does after the first (tuning) call."""
    from clora_kernels.backends.triton import kernels, launch, tune

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    kernels._clora_gemm_kernel = NoLaunch()
    launch.interpreting = lambda: True      # CPU tensors pass device_reasons, as CUDA ones do
    tune.interpreting = lambda: False       # plan_for consults its cache
    from clora_kernels.backends import _registry
    _registry["triton"]._availability = (True, "kernel launch stubbed")
    plan = launch.Plan("fused", tune.SMALL_M[0])

    class Cached(dict):        # the hot path's one lookup, answered for every key
        def get(self, key, default=None):
            return plan
    tune._plans = Cached()


def call(backend, x, w, b, la, lb, ro, rd):
    if backend == "triton*":
        backend = "triton"
    if backend == "op":    # the registered op with its register_autograd, torch backend
        need_t = torch.is_grad_enabled() and (lb.requires_grad or rd.requires_grad)
        return torch.ops.clora.linear_fwd(x, w, b, la, lb, ro, rd, None, 1.0, False, need_t, "torch")[0]
    return ck.clora_linear(x, w, b, la, lb, ro, rd, None, 1.0, backend=backend)


def events_vs_graphs(backends):
    for m, k, n in [(16, 4096, 4096), (4096, 4096, 4096), (512, 4096, 14336)]:
        t = tensors(m, k, n)
        fns = {"merged": lambda: torch.nn.functional.linear(t[0], t[1], t[2]),
               **{name: (lambda name=name: call(name, *t)) for name in backends}}
        with torch.no_grad():
            for f in fns.values():
                f()
            for rnd in range(2):
                line = []
                for name, f in (fns.items() if rnd == 0 else reversed(fns.items())):
                    ev = triton.testing.do_bench(f, warmup=20, rep=100, return_mode="median") * 1e3
                    gr = triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3
                    line.append(f"{name} {ev:7.1f}/{gr:7.1f}")
                print(f"M={m:5d} K={k} N={n} round {rnd} (events/graph us): " + "  ".join(line))


def host_us(fn, calls=2000):
    for _ in range(50):
        fn()
    sync()
    best = float("inf")
    for _ in range(1 if GPU else 5):    # on CPU: best of 5, the machine is shared
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, 1e6 * (time.perf_counter() - start) / calls)
    return best


def host_cost(backends, top):
    m, k, n, r = (197, 768, 2304, 16) if GPU else (1, 16, 16, 4)
    nograd, grad = tensors(m, k, n, r), tensors(m, k, n, r, grad=True)
    gy = torch.randn(m, n, device=dev, dtype=dt)
    fns = {"F.linear": (lambda: torch.nn.functional.linear(nograd[0], nograd[1], nograd[2]), None)}
    for name in backends:
        fns[name] = (lambda name=name: call(name, *nograd),
                     lambda name=name: call(name, *grad).backward(gy))
    where = "ViT-B qkv batch 1" if GPU else f"CPU, M={m} K={k} N={n} r={r} fp32"
    print(f"\nhost cost per eager call, {where} (us; wall time of 2000 calls, one sync):")
    print(f"  {'variant':10s} {'fwd no_grad':>12s} {'fwd+bwd':>10s}")
    for name, (fwd, train) in fns.items():
        with torch.no_grad():
            a = host_us(fwd)
        b = host_us(train, 500) if train else float("nan")
        print(f"  {name:10s} {a:12.1f} {b:10.1f}")
    for name in backends:
        prof = cProfile.Profile()
        with torch.no_grad():
            fns[name][0]()
            prof.enable()
            for _ in range(500):
                fns[name][0]()
            prof.disable()
        sync()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
        body = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-top - 1:]
        print(f"\ncProfile, {name}, 500 no_grad calls (tottime s over 500 calls):")
        print("\n".join(body))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    usable = ck.available_backends()
    if GPU:
        backends = [b for b in ("torch", "triton", "cuda") if usable[b][0]] + ["auto"]
        events_vs_graphs(backends)
    else:
        stub_triton_launch()
        backends = ["torch", "op", "triton*"]
    host_cost(backends, args.top)
