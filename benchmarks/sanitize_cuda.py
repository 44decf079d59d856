"""Short driver for compute-sanitizer over the cuda backend (csrc/):

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py

Forward and backward at odd shapes, every dtype, ranks 1..128, non-contiguous input, empty batch."""
import torch

import clora_kernels as ck

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for m, k, n, r in [(1, 24, 200, 1), (37, 200, 72, 5), (7, 136, 24, 16), (65, 136, 264, 128), (0, 24, 40, 4)]:
        r = min(r, k, n)
        x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2].requires_grad_(True)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        b = torch.randn(n, device="cuda", dtype=dtype)
        la = torch.randn(r, k, device="cuda", dtype=dtype, requires_grad=True)
        lb = torch.randn(n, r, device="cuda", dtype=dtype, requires_grad=True)
        ro = torch.randn(r, r, device="cuda", dtype=dtype)
        rd = torch.randn(r, r, device="cuda", dtype=dtype, requires_grad=True)
        p = torch.eye(r, device="cuda", dtype=dtype)
        y = ck.clora_linear(x, w, b, la, lb, ro, rd, p, 0.5, backend="cuda")
        y.float().sum().backward()
torch.cuda.synchronize()
print("sanitize_cuda: done")
