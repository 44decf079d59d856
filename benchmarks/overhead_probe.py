"""Host cost per call of a C-LoRA layer against the layers users would write instead.

Part 1, every machine (`layers`): wall time per call, best of several interleaved rounds in one
process, of nn.Linear, PEFT's LoRA Linear, a hand-written eager LoRA
(F.linear(x, W, b) + ((x @ A.T) @ (R_old + R_delta)) @ B.T, an nn.Module) and CLoRALinear (backend
auto), in inference, forward with grad, and forward+backward. Default: the CPU, M=1, K=N=64, r=4,
fp32, one thread (where the host dominates); on a GPU, ViT-B qkv batch 1 in bf16.
Part 2, GPU only: time per call by CUDA events (host included) against CUDA-graph replay (GPU
time only) at small M, per backend; then cProfile's top functions of an eager call.
Usage: python benchmarks/overhead_probe.py [--top N] [--rounds N]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

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


def call(backend, x, w, b, la, lb, ro, rd):
    return ck.clora_linear(x, w, b, la, lb, ro, rd, None, 1.0, backend=backend)


def events_vs_graphs(backends):
    import triton.testing       # (here, the GPU part's: the CPU part runs without triton, an optional extra)
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


def host_us(fn, calls=2000, repeats=5):
    """Wall time per call over `calls` calls with one synchronize at the end, best of `repeats`."""
    for _ in range(50):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, 1e6 * (time.perf_counter() - start) / calls)
    return best


class HandLoRA(torch.nn.Module):
    """The eager LoRA a user would write, with C-LoRA's routing between the factors."""

    def __init__(self, base, r):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, device=dev, dtype=dt) / 8)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, r, device=dev, dtype=dt) / 8)
        self.register_buffer("routing_old", torch.randn(r, r, device=dev, dtype=dt))
        self.routing_delta = torch.nn.Parameter(torch.randn(r, r, device=dev, dtype=dt))

    def forward(self, x):
        return self.base(x) + ((x @ self.lora_A.T) @ (self.routing_old + self.routing_delta)) @ self.lora_B.T


def layers(m, k, n, r):
    """name -> module, all on the same frozen base weight."""
    base = torch.nn.Linear(k, n, device=dev, dtype=dt).requires_grad_(False)
    out = {"nn.Linear": base, "hand LoRA": HandLoRA(base, r)}
    try:
        from peft import LoraConfig, get_peft_model
        holder = torch.nn.Sequential()
        holder.add_module("lin", torch.nn.Linear(k, n, device=dev, dtype=dt))
        out["PEFT LoRA"] = get_peft_model(holder, LoraConfig(r=r, target_modules=["lin"])).base_model.model.lin
    except ImportError:
        pass
    clora = ck.CLoRALinear.from_linear(base, rank=r)     # first task: lora_A, lora_B, routing_delta train,
    with torch.no_grad():                                 # as the hand-written layer's do
        clora.lora_B.normal_()
    out["CLoRALinear"] = clora
    return out


def train_step(layer, xg, g):
    """One forward+backward of `layer` on xg, then its gradients reset as a training loop's
    zero_grad(set_to_none=True) does (xg's and the layer's trained tensors'): no variant pays for a
    growing .grad accumulation."""
    trained = [xg] + [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(xg).backward(g)
        for p in trained:
            p.grad = None
    return step


def host_layers(rounds):
    m, k, n, r = (197, 768, 2304, 16) if GPU else (1, 64, 64, 4)
    mods = layers(m, k, n, r)
    x = torch.randn(m, k, device=dev, dtype=dt)
    xg = x.clone().requires_grad_(True)     # a layer inside a network: dx too
    g = torch.randn(m, n, device=dev, dtype=dt)
    modes = {"inference": lambda f: lambda: f(x), "fwd with grad": lambda f: lambda: f(xg),
             "fwd+bwd": lambda f: train_step(f, xg, g)}
    best = {(name, mode): float("inf") for name in mods for mode in modes}
    for rnd in range(rounds):              # interleaved: every variant once per round, order alternating
        order = list(mods.items()) if rnd % 2 == 0 else list(reversed(mods.items()))
        for name, f in order:
            for mode, make in modes.items():
                fn = make(f)
                if mode == "inference":
                    with torch.no_grad():
                        us = host_us(fn, 1000, 1)
                else:
                    us = host_us(fn, 1000 if mode != "fwd+bwd" else 400, 1)
                best[name, mode] = min(best[name, mode], us)
    where = f"{'GPU ' + torch.cuda.get_device_name() if GPU else 'CPU'}, M={m} K={k} N={n} r={r} {str(dt)[6:]}, " \
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"host cost per call, {where} (us, best of {rounds} interleaved rounds):")
    print(f"  {'layer':12s}" + "".join(f"{mode:>15s}" for mode in modes))
    for name in mods:
        print(f"  {name:12s}" + "".join(f"{best[name, mode]:15.1f}" for mode in modes))
    hand = [best["hand LoRA", mode] for mode in modes]
    print(f"  {'CLoRA/hand':12s}" + "".join(f"{best['CLoRALinear', mode] / h:15.2f}" for mode, h in zip(modes, hand)))
    return best


def profile_calls(backends, top):
    m, k, n, r = 197, 768, 2304, 16
    nograd = tensors(m, k, n, r)
    for name in backends:
        fn = lambda name=name: call(name, *nograd)   # noqa: E731
        prof = cProfile.Profile()
        with torch.no_grad():
            fn()
            prof.enable()
            for _ in range(500):
                fn()
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = ap.parse_args()
    if not GPU:
        torch.set_num_threads(args.threads)
    host_layers(args.rounds)
    if GPU:
        usable = ck.available_backends()
        backends = [b for b in ("torch", "triton", "cuda") if usable[b][0]] + ["auto"]
        events_vs_graphs(backends)
        profile_calls(backends, args.top)
