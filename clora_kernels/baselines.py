"""Baselines that C-LoRA's claim is measured against (DESIGN.md section 10).

`per_task_lora`: this project's name for the separate-adapter design that InfLoRA and SD-LoRA build
on, without their extra machinery: each task gets a fresh LoRA branch (lora_A_t, lora_B_t, same
rank and scaling), the branches of earlier tasks are frozen, and the layer adds all of them:

    y = x Wᵀ + b + s · Σ_t (x lora_A_tᵀ) lora_B_tᵀ

k stacked branches are one rank-k·r adapter with a block-diagonal routing matrix: lora_A =
[A_1; …; A_k], lora_B = [B_1 … B_k], R_old = blockdiag(I, …, I, 0) over the frozen branches and
R_delta = blockdiag(0, …, 0, I) over the current one, which is how the tests check it against
the engine's op. Its parameters, adapter storage and compute grow with the number of tasks;
C-LoRA's do not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import _replace, select_targets


class PerTaskLoRALinear(nn.Module):
    """A frozen nn.Linear (shared, not copied) plus one LoRA branch per task seen so far; only the
    newest branch trains. `next_task()` freezes it and opens a fresh one (lora_B = 0: the output
    is unchanged)."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha=None):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"PerTaskLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(f"rank must be in [1, {min(base.in_features, base.out_features)}], got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scaling = float(rank if alpha is None else alpha) / rank
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.next_task()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def next_task(self) -> None:
        w = self.base.weight
        for p in list(self.lora_A) + list(self.lora_B):
            p.requires_grad_(False)
            p.grad = None
        a = torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype)))

    def stacked(self):
        """(lora_A (k·r, K), lora_B (N, k·r), R_old, R_delta): the branches as one adapter with a
        block-diagonal routing (frozen branches in R_old, the newest in R_delta)."""
        k, r = len(self.lora_A), self.rank
        a, b = torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B), 1)
        r_old = torch.zeros(k * r, k * r, device=a.device, dtype=a.dtype)
        r_old[:(k - 1) * r, :(k - 1) * r] = torch.eye((k - 1) * r)
        r_delta = torch.zeros_like(r_old)
        r_delta[(k - 1) * r:, (k - 1) * r:] = torch.eye(r)
        return a, b, r_old, r_delta

    def forward(self, input: Tensor) -> Tensor:
        y = self.base(input)
        for a, b in zip(self.lora_A, self.lora_B):
            y = y + self.scaling * F.linear(F.linear(input, a), b)
        return y

    def adapter_numel(self) -> int:
        return sum(p.numel() for p in list(self.lora_A) + list(self.lora_B))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"branches={len(self.lora_A)}"


def inject_per_task_lora(model: nn.Module, target_modules, rank: int = 16, alpha=None) -> nn.Module:
    """Wrap the targeted nn.Linear layers (inject_clora's forms) in PerTaskLoRALinear; freeze the rest."""
    names = [n for n in select_targets(model, target_modules) if type(model.get_submodule(n)) is nn.Linear]
    if not names:
        raise ValueError(f"inject_per_task_lora: no nn.Linear matches target_modules={target_modules!r}")
    new = [(n, PerTaskLoRALinear(model.get_submodule(n), rank, alpha)) for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in new:
        _replace(model, n, layer)
    return model


def per_task_layers(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PerTaskLoRALinear)]


def next_task(model: nn.Module) -> None:
    """Freeze every layer's current branch and open a fresh one (the task boundary)."""
    layers = per_task_layers(model)
    if not layers:
        raise ValueError("next_task: the model has no PerTaskLoRALinear layers (call inject_per_task_lora first)")
    for _, m in layers:
        m.next_task()
