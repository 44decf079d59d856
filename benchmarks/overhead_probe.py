"""GPU probe: host overhead vs GPU time at small M, and triton vs auto measured alternately."""
import torch
import triton.testing

import clora_kernels as ck

dt = torch.bfloat16
for m, k, n in [(16, 4096, 4096), (4096, 4096, 4096), (512, 4096, 14336)]:
    x = torch.randn(m, k, device="cuda", dtype=dt)
    w = torch.randn(n, k, device="cuda", dtype=dt) / 64
    b = torch.randn(n, device="cuda", dtype=dt)
    la = torch.randn(16, k, device="cuda", dtype=dt) / 64
    lb = torch.randn(n, 16, device="cuda", dtype=dt)
    ro = torch.randn(16, 16, device="cuda", dtype=dt)
    rd = torch.randn(16, 16, device="cuda", dtype=dt)
    fns = {
        "merged": lambda: torch.nn.functional.linear(x, w, b),
        "torch": lambda: ck.clora_linear(x, w, b, la, lb, ro, rd, None, 1.0, backend="torch"),
        "triton": lambda: ck.clora_linear(x, w, b, la, lb, ro, rd, None, 1.0, backend="triton"),
        "auto": lambda: ck.clora_linear(x, w, b, la, lb, ro, rd, None, 1.0, backend="auto"),
    }
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
