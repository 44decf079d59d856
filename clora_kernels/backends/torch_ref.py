"""The `torch` backend: plain PyTorch ops in the input's dtype, any device; the CPU path.

Two plans, both written in `clora_kernels.reference`:
  eager   the unmerged formula, four ops (base GEMM, t = x·A, u = t·R_eff, expand): what an
          explicit backend="torch" always runs, and the benchmarks' "torch" row;
  merge   a per-call merged weight W_eff = W + s·lora_B·R_effᵀ·lora_A (one addmm), then one GEMM;
          dx is g·W_eff, the merged weight recomputed there (never kept between the two).
Under backend="auto" `auto.torch_plan` picks one per call by its cost model (on CPU).
"""
from __future__ import annotations

from ..reference import lora_gemm, merged_gemm, routing_eff
from ..reference import reference_formula  # noqa: F401  (its former import path, kept for users)
from . import register
from .auto import torch_plan


PLANS = {"eager": lora_gemm, "merge": merged_gemm}


def run_plan(strategy: str, x, w, a, b, r, bias, scale, need_t=True, dx=False):
    """Run the eager or merge plan on operand views (see `reference`); returns (y, t), t None only
    for merge without need_t."""
    return PLANS[strategy](x, w, a, b, r, bias, scale, need_t, dx)


class TorchBackend:
    name = "torch"

    def availability(self):
        return True, "plain PyTorch ops; runs on every device"

    def not_supported_reasons(self, x, weight, rank, auto=False):
        return []

    # r_eff: R_eff where the caller computed it already (the eager autograd path, once per step for
    # the forward and dx), else None: computed here (the kernel backends take it and ignore it)
    def forward(self, x, weight, bias, lora_a, lora_b, r_old, r_delta, proj, scaling, need_t=True, auto=False,
                r_eff=None):
        gemm = PLANS[torch_plan(x, weight.shape[0], lora_a.shape[0], need_t)] if auto else lora_gemm
        return gemm(x, weight, lora_a.t(), lora_b.t(), routing_eff(r_old, r_delta, proj) if r_eff is None else r_eff,
                    bias, scaling, need_t)

    def dx(self, g, weight, lora_a, lora_b, r_old, r_delta, proj, scaling, auto=False, r_eff=None):
        gemm = PLANS[torch_plan(g, weight.shape[1], lora_a.shape[0], True)] if auto else lora_gemm
        return gemm(g, weight, lora_b, lora_a, (routing_eff(r_old, r_delta, proj) if r_eff is None else r_eff).t(),
                    None, scaling, True, True)

register(TorchBackend())
