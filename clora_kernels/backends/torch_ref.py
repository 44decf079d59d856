"""The `torch` backend: the reference, plain PyTorch ops in the input's dtype, any device.

Also the baseline the benchmarks call "torch" (eager) and "compile". Four launches in the
forward (base GEMM, t = x Aᵀ, u = t R_eff, expand) — the cost the fused kernels remove.
"""
from __future__ import annotations

import torch.nn.functional as F

from . import register


def routing_eff(routing_old, routing_delta, projection):
    """R_eff = R_old + P R_delta (P = I when projection is None)."""
    return routing_old + (routing_delta if projection is None else projection @ routing_delta)


def reference_formula(x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling,
                      grad_through_old_route=False):
    """The plain formula of DESIGN.md section 2 with autograd doing the backward: the old route
    is written with detached lora_A / lora_B so it carries no gradient to them (unless
    grad_through_old_route). The tests' float64 oracle and the benchmarks' `compile` baseline."""
    new = routing_delta if projection is None else projection @ routing_delta
    t = x @ lora_A.t()
    if grad_through_old_route:
        lora = t @ (routing_old + new) @ lora_B.t()
    else:
        lora = t @ new @ lora_B.t() + (x @ lora_A.detach().t()) @ routing_old @ lora_B.detach().t()
    return F.linear(x, weight, bias) + scaling * lora


def lora_gemm(x, w, a, b, r, bias, scale):
    """One C-LoRA GEMM in operand views, the reference of the Triton kernel: returns
    y = x·wᵀ + bias + scale·(x·a)·r·b and t = x·a.
    Forward: (x, W, lora_Aᵀ, lora_Bᵀ, R_eff); dx: (g, Wᵀ, lora_B, lora_A, R_effᵀ) with t = v."""
    t = x @ a
    y = F.linear(x, w, bias)
    y.addmm_(t @ r, b, alpha=scale)
    return y, t


class TorchBackend:
    name = "torch"

    def availability(self):
        return True, "plain PyTorch ops; runs on every device"

    def not_supported_reasons(self, x, weight, rank, auto=False):
        return []

    def forward(self, x, weight, bias, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t=True, auto=False):
        return lora_gemm(x, weight, lora_a.t(), lora_b.t(), routing_eff(r_old, r_delta, proj), bias, scaling)

    def dx(self, g, weight, lora_a, lora_b, r_old, r_delta, proj, scaling, auto=False):
        return lora_gemm(g, weight.t(), lora_b, lora_a, routing_eff(r_old, r_delta, proj).t(), None, scaling)


register(TorchBackend())
