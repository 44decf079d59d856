"""What a per-call merged weight can reach on the CPU: the forward at the vit suite's M >= 512 rows
(`clora-bench --suite vit --device cpu`: every dimension / 8, fp32, rank 16), as time ratios to
merged (F.linear with a weight merged once, the bench's floor), interleaved, best of --rounds:

    add+gemm   F.linear(x, W + W2, b): a fresh weight made by one elementwise op, then the GEMM;
               no per-call plan that materialises a weight can be cheaper than this
    weff+gemm  W_eff = W + s·lora_B·C by one addmm (C = (lora_Aᵀ R_eff)ᵀ made once, outside the
               timing), then the GEMM: the merge plan's GEMMs alone
    +C         the same with R_eff and C made in the call (two small ops)
    plan       reference.merged_gemm, the plan as the torch backend runs it (R_eff made first)
    backend    the torch backend's forward under auto (its plan choice, torch_plan)
    op         backends.ops.linear (grad mode and tracing checks, the backend's resolution)
    auto       clora_linear(..., backend="auto") without grad: the merge plan with R_eff, C, the
               validation and the dispatch
Each row adds one layer of the call to the one before it, so the columns' differences say what each
costs.

Performance issue 17 asks auto for a geomean <= 1.05 here; this prints how much of that a fresh
weight alone takes on this machine. Usage: python benchmarks/merge_floor.py [--rounds N] [--min-time S]
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from clora_kernels import clora_linear
from clora_kernels.backends import get, ops
from clora_kernels.bench.shapes import suite_shapes
from clora_kernels.reference import merged_gemm, routing_eff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per variant and round")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shapes = [s for s in suite_shapes("vit", [16], 8) if s.m >= 512]
    names = ("merged", "add+gemm", "weff+gemm", "+C", "plan", "backend", "op", "auto")
    torch_backend = get("torch")
    ratios = {n: [] for n in names[1:]}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; time / merged, best of "
          f"{args.rounds} interleaved rounds")
    print(f"{'layer':20s} {'M':>5s} {'K':>4s} {'N':>4s} {'merged us':>10s} " + " ".join(f"{n:>9s}" for n in names[1:]))
    for sh in shapes:
        m, k, n, r = sh.m, sh.k, sh.n, sh.r
        xs = [torch.randn(m, k) for _ in range(2)]
        w, w2, b = torch.randn(n, k) / k ** 0.5, torch.randn(n, k) / k ** 0.5, torch.randn(n)
        la, lb = torch.randn(r, k) / k ** 0.5, torch.randn(n, r) / r ** 0.5
        ro, rd = torch.randn(r, r) / r ** 0.5, torch.randn(r, r) / r ** 0.5
        wm = w + 2.0 * lb @ (ro + rd).t() @ la
        c = (la.t() @ (ro + rd)).t().contiguous()
        state = {"i": 0}

        def x():
            state["i"] ^= 1
            return xs[state["i"]]
        fns = {"merged": lambda: F.linear(x(), wm, b),
               "add+gemm": lambda: F.linear(x(), w + w2, b),
               "weff+gemm": lambda: F.linear(x(), torch.addmm(w, lb, c, alpha=2.0), b),
               "+C": lambda: F.linear(x(), torch.addmm(w, lb, torch.mm((ro + rd).t(), la), alpha=2.0), b),
               "plan": lambda: merged_gemm(x(), w, la.t(), lb.t(), routing_eff(ro, rd, None), b, 2.0, False)[0],
               "backend": lambda: torch_backend.forward(x(), w, b, la, lb, ro, rd, None, 2.0, False, True)[0],
               "op": lambda: ops.linear(x(), w, b, la, lb, ro, rd, None, 2.0, False, "auto"),
               "auto": lambda: clora_linear(x(), w, b, la, lb, ro, rd, None, 2.0, backend="auto")}
        best = {name: math.inf for name in names}
        with torch.no_grad():
            for rnd in range(args.rounds):
                for name in (names if rnd % 2 == 0 else names[::-1]):
                    t = benchmark.Timer("f()", globals={"f": fns[name]}, num_threads=torch.get_num_threads()) \
                        .blocked_autorange(min_run_time=args.min_time)
                    best[name] = min(best[name], t.median * 1e6)
        for name in names[1:]:
            ratios[name].append(best[name] / best["merged"])
        print(f"{sh.layer:20s} {m:5d} {k:4d} {n:4d} {best['merged']:10.1f} "
              + " ".join(f"{best[name] / best['merged']:9.3f}" for name in names[1:]))
    print("geomean" + " " * 39 + " ".join(f"{math.exp(sum(map(math.log, v)) / len(v)):9.3f}"
                                          for v in ratios.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
