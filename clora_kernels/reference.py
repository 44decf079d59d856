"""The C-LoRA math in plain PyTorch ops, in one place (the contract: docs/design.md, "The math").

    R_eff = R_old + P R_delta
    y     = x Wᵀ + b + s · (x lora_Aᵀ) R_eff lora_Bᵀ
    W_eff = W + s · lora_B R_effᵀ lora_A                (the merged weight)
    lora_B' = lora_B R_effᵀ                              (the same layer as an ordinary LoRA)

Every other module computes these through the functions here: the torch backend and its plans,
the Triton launcher's library plans, the layer's `delta_weight`, the double backward, torch.func,
the benchmarks' baselines and the tests' float64 oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_eff(routing_old, routing_delta, projection):
    """R_eff = R_old + P R_delta (P = I when projection is None)."""
    return routing_old + (routing_delta if projection is None else torch.mm(projection, routing_delta))


def delta_weight(lora_A, lora_B, r_eff, scaling):
    """s · lora_B R_effᵀ lora_A, (N, K): what merging adds to the base weight."""
    return scaling * (lora_B @ r_eff.t() @ lora_A)


def folded_lora_B(lora_B, r_eff):
    """lora_B R_effᵀ: the up-projection of the ordinary LoRA that computes the same layer
    (lora_A unchanged), as PEFT / vLLM / TGI read it."""
    return lora_B @ r_eff.t()


def reference_formula(x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling,
                      grad_through_old_route=False):
    """The plain formula with autograd doing the backward: the old route is written with detached
    lora_A / lora_B so it carries no gradient to them (unless grad_through_old_route). The tests'
    float64 oracle, the double backward, torch.func, and the benchmarks' `compile` baseline."""
    new = routing_delta if projection is None else projection @ routing_delta
    t = x @ lora_A.t()
    if grad_through_old_route:
        lora = t @ (routing_old + new) @ lora_B.t()
    else:
        lora = t @ new @ lora_B.t() + (x @ lora_A.detach().t()) @ routing_old @ lora_B.detach().t()
    return F.linear(x, weight, bias) + scaling * lora


# ---- one GEMM in operand views -------------------------------------------------------------------
# forward  x (M,K),  w = weight (N,K),  a = lora_Aᵀ (K,r), b = lora_Bᵀ (r,N), r = R_eff             y = x·wᵀ
# dx       g (M,N),  w = weight (N,K),  a = lora_B (N,r),  b = lora_A (r,K),  r = R_effᵀ, dx=True   y = g·w
#          (t is then v). The Triton kernels' views (and their library plans) pass dx's w as weightᵀ
#          with dx=False: the same product, one Python transpose and F.linear's own dearer.

def scaled_addmm(input, m1, m2, scale, beta=1):
    """torch.addmm(input, m1, m2, beta=beta, alpha=scale), save at a scale of 0 (a Python float): BLAS
    skips the product there, so NaN and Inf in m1 or m2 vanished, where IEEE arithmetic (the float64
    oracle, the Triton kernels, PEFT) keeps them; there the product is computed and times 0."""
    if type(scale) is float and scale == 0:     # (out of place: the export decomposition runs this, where
        product = torch.mm(m1, m2) * scale      # torch refuses in-place ops; a scaling of 0 failed to export)
        return product if beta == 0 else torch.add(product, input, alpha=beta)
    return torch.addmm(input, m1, m2, beta=beta, alpha=scale)


_dispatch_stack = torch._C._len_torch_dispatch_stack      # how many TorchDispatchModes are active


def expand_(y, u, b, scale):
    """y += scale·u·b, in place (y.addmm_), the product kept at a scale of 0 (see scaled_addmm); out of
    place under a dispatch mode (selective activation checkpointing keeps y): use the result."""
    if _dispatch_stack():
        return scaled_addmm(y, u, b, scale)
    if type(scale) is not float or scale != 0:
        return y.addmm_(u, b, alpha=scale)
    return y.add_(torch.mm(u, b).mul_(scale))


def lora_gemm(x, w, a, b, r, bias, scale, need_t=True, dx=False):
    """The unmerged plan ("eager"): y = x·wᵀ (x·w with dx) + bias + scale·(x·a)·r·b and t = x·a,
    four ops (t is computed either way; need_t only mirrors merged_gemm's signature). The reference
    of the Triton GEMM kernel. The skinny products call torch.mm (not matmul's dispatch layer). The
    forward's base GEMM is F.linear, whose transpose happens in C++ (0.3 µs less per call than addmm
    on a Python .t()); dx's is torch.mm on the weight as stored, 1.3 µs less than F.linear on a
    Python .t() (CPU machine, M=1, K=N=64)."""
    t = torch.mm(x, a)
    y = F.linear(x, w, bias) if not dx else torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    if _dispatch_stack():   # a dispatch mode may keep y: selective activation checkpointing caches the GEMM's
        return scaled_addmm(y, torch.mm(t, r), b, scale), t     # output and refused it written in place
    if type(scale) is not float or scale != 0:      # (expand_ inline: its frame cost 0.1-0.3 µs a call)
        return y.addmm_(torch.mm(t, r), b, alpha=scale), t
    return expand_(y, torch.mm(t, r), b, scale), t


def merged_weight(w, a, b, r, scale, dx=False):
    """The merged weight by one addmm, in w's own layout: w + scale·(a·r·b)ᵀ for the forward,
    w + scale·a·r·b for dx (both W_eff, (N,K)); where w is the transposed view of a contiguous
    tensor (a Conv1D weight, or the kernels' dx view weightᵀ), the transposed view of a contiguous
    result. The GEMM after it then reads the merged weight as it would read w; measured on the CPU
    machine (fp32, M=1576, (K, N) in {(96, 96), (96, 288), (128, 384), (512, 128)}, r=16,
    interleaved), merged_gemm took 2-16 % longer in the forward and 10-12 % in dx with the other
    layout."""
    # w + scale·left·right, both factors contiguous: the forward's right is (a·r)ᵀ = rᵀ·aᵀ, made as such
    # (as the transpose of a·r it cost 1.4-1.9 µs more per call, K, N in {96, 288, 384}, fp32, the CPU machine)
    left, right = (torch.mm(a, r), b) if dx else (b.t(), torch.mm(r.t(), a.t()))
    if not w.is_contiguous():
        wt = w.t()
        if wt.is_contiguous():
            return scaled_addmm(wt, right.t(), left.t(), scale).t()
    return scaled_addmm(w, left, right, scale)


def merged_gemm(x, w, a, b, r, bias, scale, need_t=True, dx=False):
    """The per-call merged plan ("merge"): y = x·W_effᵀ + bias (x·W_eff with dx) with W_eff =
    merged_weight(...), and t = x·a where a gradient reads it (None otherwise). Equals lora_gemm's y
    up to rounding (W_eff is rounded to x's dtype, as a merged checkpoint is)."""
    w_eff = merged_weight(w, a, b, r, scale, dx)
    y = F.linear(x, w_eff, bias) if not dx else torch.mm(x, w_eff) if bias is None else torch.addmm(bias, x, w_eff)
    return y, (torch.mm(x, a) if need_t else None)
