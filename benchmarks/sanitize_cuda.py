"""Short driver for compute-sanitizer over the cuda backend (csrc/):

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py

Forward and backward at odd shapes (K not a multiple of the vector width, several K-splits),
every dtype, ranks 1..128, soft and hard mode, non-contiguous input, empty batch, and both forms
of the shrink (fused split-K kernel and cuBLAS t), each forced through CLORA_CUDA_FUSED_MAX_MR."""
import os

import torch

import clora_kernels as ck

torch.manual_seed(0)
for fused_max_mr in ("0", "1000000000"):
    os.environ["CLORA_CUDA_FUSED_MAX_MR"] = fused_max_mr
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, k, n, r in [(1, 24, 200, 1), (37, 200, 72, 5), (7, 37, 24, 16), (3, 1100, 40, 8),
                           (65, 136, 264, 128), (0, 24, 40, 4)]:
            r = min(r, k, n)
            x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2].requires_grad_(True)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)
            la = torch.randn(r, k, device="cuda", dtype=dtype, requires_grad=True)
            lb = torch.randn(n, r, device="cuda", dtype=dtype, requires_grad=True)
            ro = torch.randn(r, r, device="cuda", dtype=dtype)
            rd = torch.randn(r, r, device="cuda", dtype=dtype, requires_grad=True)
            p = torch.eye(r, device="cuda", dtype=dtype) if m % 2 else None
            y = ck.clora_linear(x, w, b, la, lb, ro, rd, p, 0.5, backend="cuda")
            y.float().sum().backward()
torch.cuda.synchronize()
print("sanitize_cuda: done")
