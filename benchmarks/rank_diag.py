"""GPU diagnosis: every tuner candidate at large rank, forward and dx, against fp32 torch.
Prints one line per (shape, kind, plan) with the relative errors of y and t."""
import torch

from clora_kernels.backends.triton import launch, tune

torch.manual_seed(0)
dt = torch.bfloat16


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


for (m, k, n, r) in [(16384, 4096, 4096, 128), (2048, 1024, 1024, 128), (2048, 1024, 1024, 96),
                     (16384, 4096, 4096, 64)]:
    x = torch.randn(m, k, device="cuda", dtype=dt)
    g = torch.randn(m, n, device="cuda", dtype=dt)
    wt = torch.randn(n, k, device="cuda", dtype=dt) / 64
    la = torch.randn(r, k, device="cuda", dtype=dt) / 64
    lb = torch.randn(n, r, device="cuda", dtype=dt) / 8
    ro = torch.randn(r, r, device="cuda", dtype=dt) / 8
    rd = torch.randn(r, r, device="cuda", dtype=dt) / 8
    reff = ro.float() + rd.float()
    for kind in ("fwd", "dx"):
        if kind == "fwd":
            args = (x, wt, la.t(), lb.t(), ro, rd, None, None, 0.5, False)
            t_ref = x.float() @ la.float().t()
            y_ref = x.float() @ wt.float().t() + 0.5 * (t_ref @ reff) @ lb.float().t()
        else:
            args = (g, wt.t(), lb, la, ro, rd, None, None, 0.5, True)
            t_ref = g.float() @ lb.float()
            y_ref = g.float() @ wt.float() + 0.5 * (t_ref @ reff.t()) @ la.float()
        tma = launch.tma_eligible(args[0], args[1])
        for plan in tune.candidates(m, args[1].shape[0], args[0].shape[1], r, tune.target(args[0].device), True,
                                    tma, elt=args[0].element_size()):
            try:
                y, t = launch.run(plan, *args)
                torch.cuda.synchronize()
                ey, et = rel(y, y_ref), rel(t, t_ref)
                flag = "WRONG" if max(ey, et) > 0.04 else "ok"
            except Exception as exc:
                ey = et = float("nan")
                flag = f"error {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            g_ = plan.gemm
            cfg = f"{g_.block_m}x{g_.block_n}x{g_.block_k} w{g_.num_warps} s{g_.num_stages}" if g_ else "-"
            print(f"M{m} K{k} N{n} r{r} {kind:3s} {plan.strategy:9s} {cfg:22s} y {ey:8.2e} t {et:8.2e} {flag}",
                  flush=True)
