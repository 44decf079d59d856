"""GPU diagnosis of a config-specific wrong result on the dx path (bf16, M=129, K=769, N=200, r=5,
GemmConfig(128, 128, 64, 8, 3)): which knob flips it? Prints one table."""
import itertools

import torch

from clora_kernels.backends.triton import launch
from clora_kernels.backends.triton.launch import GemmConfig

torch.manual_seed(0)
dt = torch.bfloat16
dev = "cuda"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def case(m, kin, nout, r, dx):
    g = torch.randn(m, kin, device=dev, dtype=dt)
    weight = torch.randn(kin, nout, device=dev, dtype=dt) / kin ** 0.5   # forward weight (N=kin, K=nout)
    lb = torch.randn(kin, r, device=dev, dtype=dt)
    la = torch.randn(r, nout, device=dev, dtype=dt)
    ro = torch.randn(r, r, device=dev, dtype=dt)
    rd = torch.randn(r, r, device=dev, dtype=dt)
    if dx:   # W = weightᵀ view (nout, kin), A = lora_B (kin, r), B = lora_A (r, nout), R_effᵀ
        w, a, b, trans = weight.t(), lb, la, True
    else:
        w, a, b, trans = weight.t().contiguous(), lb, la, False
    r_eff = (ro.float() + rd.float())
    r_use = r_eff.t() if trans else r_eff
    t_ref = g.float() @ a.float()
    y_ref = g.float() @ w.float().t() + 0.7 * (t_ref.to(dt).float() @ r_use).to(dt).float() @ b.float()
    return (g, w, a, b, ro, rd, trans), y_ref, t_ref


rows = []
for dx, (bm, bn, bk, wp, st), contig_a in itertools.product(
        (True, False), [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 1), (64, 128, 64, 8, 3),
                        (128, 256, 64, 8, 3), (128, 128, 32, 8, 3)], (False, True)):
    (g, w, a, b, ro, rd, trans), y_ref, t_ref = case(129, 769, 200, 5, dx)
    if contig_a:
        a = a.t().contiguous().t()   # same values, column-major
    y, t = launch.gemm(g, w, a, b, ro, rd, None, None, 0.7, trans, GemmConfig(bm, bn, bk, wp, st))
    torch.cuda.synchronize()
    rows.append((("dx" if dx else "fwd"), f"{bm}x{bn}x{bk} w{wp} s{st}", "colmajorA" if contig_a else "rowmajorA",
                 rel(t, t_ref), rel(y, y_ref)))
print(f"{'path':4s} {'config':22s} {'A layout':10s} {'err t':>10s} {'err y':>10s}")
for r in rows:
    print(f"{r[0]:4s} {r[1]:22s} {r[2]:10s} {r[3]:10.2e} {r[4]:10.2e}")
