"""Host cost per call of a C-LoRA layer against the layers users would write instead.

Part 1, every machine (`layers`): wall time per call, best of several interleaved rounds in one
process, of nn.Linear, PEFT's LoRA Linear, a hand-written eager LoRA
(F.linear(x, W, b) + ((x @ A.T) @ (R_old + R_delta)) @ B.T, an nn.Module) and CLoRALinear (backend
auto), in inference, forward with grad, and forward+backward. Default: the CPU, M=1, K=N=64, r=4,
fp32, one thread (where the host dominates); on a GPU, ViT-B qkv batch 1 in bf16.
Part 2, GPU only: time per call by CUDA events (host included) against CUDA-graph replay (GPU
time only) at small M, per backend; then cProfile's top functions of an eager call.
With --what-if (CPU), two rows that say what the with-grad path could cost done another way:
    CLoRA autograd  CLoRALinear whose op records autograd over plain torch ops with the layer's
                    gradient semantics (`autograd_ops`) instead of running its autograd.Function
    compiled op     the hand-written layer's math as one C++ autograd op (torch::autograd::Function,
                    built here by torch.utils.cpp_extension.load_inline with the system's C++
                    compiler, about 35 s): the floor of a compiled implementation, without the
                    layer's validation, plan choice, protection or any of C-LoRA's other semantics
Usage: python benchmarks/overhead_probe.py [--top N] [--rounds N] [--what-if]
"""
import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import clora_kernels as ck
from clora_kernels import _cli
from clora_kernels.backends import ops

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
    """name -> module, all on the same frozen base weight (PEFT's on a copy of it), each adapter in the
    base's dtype (PEFT's default kept a bf16 base's adapter in fp32, with casts: `peft_dtype_kwargs`)."""
    base = torch.nn.Linear(k, n, device=dev, dtype=dt).requires_grad_(False)
    out = {"nn.Linear": base, "hand LoRA": HandLoRA(base, r)}
    try:
        from peft import LoraConfig, get_peft_model

        from clora_kernels.bench.core import peft_dtype_kwargs
        holder = torch.nn.Sequential()
        holder.add_module("lin", copy.deepcopy(base))
        out["PEFT LoRA"] = get_peft_model(holder, LoraConfig(r=r, target_modules=["lin"]),
                                          **peft_dtype_kwargs()).base_model.model.lin
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


def autograd_ops(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, through_old,
                 backend):
    """ops.linear's with-grad call on a 2-D x as autograd over torch ops, the gradients of its
    `_backward` (none for weight, routing_old, projection; lora_A and lora_B see only the new route
    unless through_old): the eager plan's ops, and the old route again over detached factors. Without
    grad, ops.linear itself."""
    if not torch.is_grad_enabled() or x.dim() != 2:
        return ops.linear(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                          through_old, backend)
    new = routing_delta if projection is None else torch.mm(projection, routing_delta)
    base = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    t = torch.mm(x, lora_a.t())
    if through_old:
        return torch.addmm(base, torch.mm(t, routing_old + new), lora_b.t(), alpha=scaling)
    y = torch.addmm(base, torch.mm(t, new), lora_b.t(), alpha=scaling)
    old = torch.mm(torch.mm(x, lora_a.detach().t()), routing_old)
    return torch.addmm(y, old, lora_b.detach().t(), alpha=scaling)


class _AutogradOps:
    """Stands for backends.ops in clora_kernels.functional while the "CLoRA autograd" row runs."""
    linear = staticmethod(autograd_ops)


def swapped(name):
    """The context a row runs in: for "CLoRA autograd", `autograd_ops` in place of ops.linear (swapped
    around the row's whole timed block, not per call, so that the row pays no frame of its own)."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        ck.functional._ops = _AutogradOps
        try:
            yield
        finally:
            ck.functional._ops = ops
    return swap() if name == "CLoRA autograd" else contextlib.nullcontext()


_CPP = r"""
#include <torch/extension.h>
using torch::Tensor;
struct Lora : public torch::autograd::Function<Lora> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, Tensor x, Tensor w, Tensor b, Tensor a, Tensor lb,
                        Tensor ro, Tensor rd) {
    Tensor r = ro + rd, t = at::mm(x, a.t());
    ctx->save_for_backward({x, t, w, a, lb, r});
    return at::addmm(at::addmm(b, x, w.t()), at::mm(t, r), lb.t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = ctx->get_saved_variables();
    Tensor x = s[0], t = s[1], w = s[2], a = s[3], lb = s[4], r = s[5], g = grads[0];
    Tensor v = at::mm(g, lb), vr = at::mm(v, r.t());
    return {at::addmm(at::mm(g, w), vr, a), Tensor(), Tensor(), at::mm(vr.t(), x), at::mm(g.t(), at::mm(t, r)),
            Tensor(), at::mm(t.t(), v)};
  }
};
Tensor lora(Tensor x, Tensor w, Tensor b, Tensor a, Tensor lb, Tensor ro, Tensor rd) {
  return Lora::apply(x, w, b, a, lb, ro, rd);
}
TORCH_LIBRARY(clora_probe, m) { m.def("lora(Tensor x, Tensor w, Tensor b, Tensor a, Tensor lb, Tensor ro, Tensor rd) -> Tensor"); }
TORCH_LIBRARY_IMPL(clora_probe, CompositeImplicitAutograd, m) { m.impl("lora", &lora); }
"""


class CompiledOp(torch.nn.Module):
    """The hand-written layer (its tensors) computed by one compiled autograd op."""

    def __init__(self, hand):
        super().__init__()
        self.hand = hand

    def forward(self, x):
        h = self.hand
        return torch.ops.clora_probe.lora(x, h.base.weight, h.base.bias, h.lora_A, h.lora_B, h.routing_old,
                                          h.routing_delta)


def what_if(mods):
    """The --what-if rows, added to `mods` (each checked against the layer it stands for)."""
    import copy
    import torch.utils.cpp_extension as ce
    clora, hand = mods["CLoRALinear"], mods["hand LoRA"]
    mods["CLoRA autograd"] = copy.deepcopy(clora)
    start = time.perf_counter()
    try:
        ce.load_inline("clora_probe", cpp_sources=[_CPP], is_python_module=False, extra_cflags=["-O2"])
    except Exception as exc:        # (no C++ compiler, or no torch headers)
        print(f"compiled op: not built ({type(exc).__name__}: {str(exc).strip().splitlines()[-1]})")
    else:
        print(f"compiled op: built in {time.perf_counter() - start:.0f} s")
        mods["compiled op"] = CompiledOp(hand)
    x = torch.randn(3, clora.in_features, device=dev, dtype=dt, requires_grad=True)
    for name, ref in (("CLoRA autograd", clora), ("compiled op", hand)):
        if name not in mods:
            continue
        got = []
        for f in (ref, mods[name]):
            with swapped(name if f is not ref else ""):
                f(x).square().sum().backward()
            got.append([t.grad for t in (x, *f.parameters()) if t.requires_grad])
            for t in (x, *f.parameters()):
                t.grad = None
        err = max(float((p - q).abs().max()) for p, q in zip(*got))
        print(f"{name}: gradients within {err:.1e} of {type(ref).__name__}'s")


def host_layers(rounds, what=False):
    m, k, n, r = (197, 768, 2304, 16) if GPU else (1, 64, 64, 4)
    mods = layers(m, k, n, r)
    if what:
        what_if(mods)
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
                with swapped(name):
                    if mode == "inference":
                        with torch.no_grad():
                            us = host_us(fn, 1000, 1)
                    else:
                        us = host_us(fn, 1000 if mode != "fwd+bwd" else 400, 1)
                best[name, mode] = min(best[name, mode], us)
    where = f"{'GPU ' + torch.cuda.get_device_name() if GPU else 'CPU'}, M={m} K={k} N={n} r={r} {str(dt)[6:]}, " \
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    print(f"host cost per call, {where} (us, best of {rounds} interleaved rounds):")
    print(f"  {'layer':21s}" + "".join(f"{mode:>15s}" for mode in modes))
    for name in mods:
        print(f"  {name:21s}" + "".join(f"{best[name, mode]:15.1f}" for mode in modes))
    hand = [best["hand LoRA", mode] for mode in modes]
    for name in [n for n in mods if n not in ("nn.Linear", "hand LoRA", "PEFT LoRA")]:
        label = "CLoRA/hand" if name == "CLoRALinear" else f"{name}/hand"
        print(f"  {label:21s}" + "".join(f"{best[name, mode] / h:15.2f}" for mode, h in zip(modes, hand)))
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
    ap.add_argument("--top", type=_cli.positive_int, default=10)
    ap.add_argument("--rounds", type=_cli.positive_int, default=5)
    ap.add_argument("--threads", type=_cli.positive_int, default=1, help="torch threads on CPU (default 1)")
    ap.add_argument("--what-if", action="store_true", help="CPU: the two rows above (builds a C++ op, ~35 s)")
    args = ap.parse_args()
    if not GPU:
        torch.set_num_threads(args.threads)
    host_layers(args.rounds, args.what_if and not GPU)
    if GPU:
        usable = ck.available_backends()
        backends = [b for b in ("torch", "triton", "cuda") if usable[b][0]] + ["auto"]
        events_vs_graphs(backends)
        profile_calls(backends, args.top)
