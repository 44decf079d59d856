"""`CLoRALinear` (a drop-in `nn.Linear`) and the model helpers (DESIGN.md section 2,
"Storage layout and public names").

PEFT layout: lora_A is (r, K), lora_B is (N, r); routing_old / projection are buffers and
routing_delta the trainable r×r routing. The layer computes
    y = x Wᵀ + b + scaling · x lora_Aᵀ (routing_old + projection · routing_delta) lora_Bᵀ
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import BACKEND_NAMES
from .backends.torch_ref import routing_eff
from .functional import clora_linear

_MODES = ("soft", "hard")


def _check_config(in_features: int, out_features: int, rank, alpha, mode, protect_energy, backend) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank > min(in_features, out_features):
        raise ValueError(f"rank must be an int in [1, min(in_features, out_features)] = [1, "
                         f"{min(in_features, out_features)}] for a {in_features}->{out_features} layer, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number or None (None means alpha = rank), got {alpha!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
    if isinstance(protect_energy, bool) or not isinstance(protect_energy, (int, float)) \
            or not (0.0 < protect_energy <= 1.0):
        raise ValueError(f"protect_energy must be in (0, 1], got {protect_energy!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {backend!r}")


class CLoRALinear(nn.Linear):
    """Drop-in `nn.Linear` with one C-LoRA adapter. `weight` and `bias` are the frozen base."""

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: Optional[float] = None,
                 bias: bool = True, *, mode: str = "soft", protect_energy: float = 0.9,
                 grad_through_old_route: bool = False, backend: str = "auto", device=None, dtype=None):
        _check_config(in_features, out_features, rank, alpha, mode, protect_energy, backend)
        self.rank = rank
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.mode = mode
        self.protect_energy = float(protect_energy)
        self.grad_through_old_route = bool(grad_through_old_route)
        self.backend = backend
        self.task_index = 0
        self.merged = False
        fk = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **fk))
        self.routing_delta = nn.Parameter(torch.eye(rank, **fk))
        self.register_buffer("routing_old", torch.zeros(rank, rank, **fk))
        self.register_buffer("projection", torch.eye(rank, **fk))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """First-task state: routing_delta = I, routing_old = 0, P = I, lora_B = 0,
        lora_A Kaiming-uniform (PEFT's init)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            self.routing_delta.copy_(torch.eye(self.rank))
            self.routing_old.zero_()
            self.projection.copy_(torch.eye(self.rank))
        self.task_index = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 16, alpha: Optional[float] = None, **kwargs) -> "CLoRALinear":
        """Wrap an existing nn.Linear (its weight and bias are shared, not copied): at init the
        output equals the Linear's exactly (lora_B = 0)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype, **kwargs)
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        for name in ("lora_A", "lora_B", "routing_delta"):
            setattr(layer, name, nn.Parameter(torch.empty_like(getattr(layer, name), device=w.device)))
        for name in ("routing_old", "projection"):
            setattr(layer, name, torch.empty_like(getattr(layer, name), device=w.device))
        layer.reset_adapter()
        return layer

    # ---- the math -------------------------------------------------------------------------
    def _projection_arg(self) -> Optional[Tensor]:
        return self.projection if self.mode == "hard" else None

    def routing(self) -> Tensor:
        """R_eff = routing_old + projection · routing_delta."""
        return routing_eff(self.routing_old, self.routing_delta, self._projection_arg())

    def delta_weight(self) -> Tensor:
        """scaling · lora_B R_effᵀ lora_A, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B @ self.routing().t() @ self.lora_A)

    def orthogonality_loss(self) -> Tensor:
        """|| Oᵀ (P R_delta) ||_F² with O = routing_old (soft) or Q (hard; I - P = Q Qᵀ)."""
        new = self.routing_delta if self.mode == "soft" else self.projection @ self.routing_delta
        if self.mode == "soft":
            return (self.routing_old.t() @ new).square().sum()
        # ||Qᵀ M||_F = ||Q Qᵀ M||_F = ||(I - P) M||_F  (Q has orthonormal columns)
        return (new - self.projection @ new).square().sum()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return clora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.routing_old,
                            self.routing_delta, self._projection_arg(), self.scaling,
                            grad_through_old_route=self.grad_through_old_route, backend=self.backend)

    # ---- task lifecycle -------------------------------------------------------------------
    @torch.no_grad()
    def end_task(self) -> None:
        """Fold the task's routing into the frozen route: R_old <- R_old + P R_delta; in hard
        mode recompute P from R_old's singular vectors; R_delta <- 0. The output is unchanged.
        Refuses (ValueError, nothing changed) when the routing holds NaN or Inf."""
        bad = self._nonfinite_routing()
        if bad:
            raise ValueError(f"end_task: {bad} holds non-finite values (NaN/Inf; did training diverge?); "
                             f"the routing was left unchanged")
        self.routing_old.copy_(self.routing())
        self.routing_delta.zero_()
        if self.mode == "hard":
            self.projection.copy_(_hard_projection(self.routing_old, self.protect_energy))
        self.task_index += 1

    def _nonfinite_routing(self) -> str:
        """Names of the routing tensors holding NaN or Inf ('' when all are finite)."""
        named = (("routing_old", self.routing_old), ("routing_delta", self.routing_delta),
                 ("projection", self.projection))
        return ", ".join(n for n, t in named if not bool(torch.isfinite(t).all()))

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta_weight(); the forward is then a plain F.linear."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    # ---- persistence ----------------------------------------------------------------------
    def get_extra_state(self):
        return {"task_index": int(self.task_index), "mode": self.mode, "merged": bool(self.merged)}

    def set_extra_state(self, state) -> None:
        self.task_index = int(state["task_index"])
        self.mode = state.get("mode", self.mode)
        self.merged = bool(state.get("merged", False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, mode={self.mode}, "
                f"task_index={self.task_index}, merged={self.merged}, backend={self.backend}")


def _hard_projection(routing_old: Tensor, protect_energy: float) -> Tensor:
    """P = I - Q Qᵀ, Q = the first k left singular vectors of R_old holding >= protect_energy
    of its squared singular values (P = I while R_old = 0)."""
    r = routing_old.shape[0]
    eye = torch.eye(r, dtype=torch.float64, device=routing_old.device)
    u, sv, _ = torch.linalg.svd(routing_old.double())
    energy = sv.square()
    total = energy.sum()
    if total <= 0:
        return eye.to(routing_old.dtype)
    frac = torch.cumsum(energy, 0) / total
    k = int((frac < protect_energy - 1e-12).sum().item()) + 1
    q = u[:, :min(k, r)]
    return (eye - q @ q.t()).to(routing_old.dtype)


# ---- model helpers ------------------------------------------------------------------------
def clora_layers(model: nn.Module) -> list:
    """(name, CLoRALinear) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CLoRALinear)]


def _require_layers(model: nn.Module, what: str) -> list:
    layers = clora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no CLoRALinear layers (call inject_clora first)")
    return layers


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_clora(model: nn.Module, target_modules=("qkv", "proj", "fc1", "fc2"), rank: int = 16,
                 alpha: Optional[float] = None, **kwargs) -> nn.Module:
    """Replace every nn.Linear whose name is, or ends with '.' + , a target with a CLoRALinear
    (PEFT's matching rule), freeze every other parameter, and return the model."""
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and _matches(n, targets)]
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"inject_clora: no nn.Linear matches target_modules={list(targets)}; "
                         f"some Linear layers of this model: {linears}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CLoRALinear.from_linear(linear, rank, alpha, **kwargs))
    return model


def end_task(model: nn.Module) -> None:
    """end_task() on every C-LoRA layer; checks every layer first, so a model whose routing
    went non-finite anywhere is left entirely unchanged (ValueError naming the layers)."""
    layers = _require_layers(model, "end_task")
    bad = [f"{name} ({why})" for name, m in layers for why in [m._nonfinite_routing()] if why]
    if bad:
        raise ValueError(f"end_task: non-finite routing (NaN/Inf; did training diverge?) in {'; '.join(bad)}; "
                         f"no layer was changed")
    for _, m in layers:
        m.end_task()


def orthogonality_loss(model: nn.Module) -> Tensor:
    """Σ over C-LoRA layers of || Oᵀ (P R_delta) ||_F² (paper Eq. 26)."""
    layers = _require_layers(model, "orthogonality_loss")
    return torch.stack([m.orthogonality_loss().float() for _, m in layers]).sum()


def merge(model: nn.Module) -> None:
    for _, m in _require_layers(model, "merge"):
        m.merge()


def unmerge(model: nn.Module) -> None:
    for _, m in _require_layers(model, "unmerge"):
        m.unmerge()


_ADAPTER_TENSORS = ("lora_A", "lora_B", "routing_old", "routing_delta", "projection")
_FORMAT = "clora_kernels.adapter/1"


def save_adapter(model: nn.Module, path) -> None:
    """Write only the adapter tensors and the task state of every CLoRALinear (safetensors)."""
    from safetensors.torch import save_file
    layers = _require_layers(model, "save_adapter")
    tensors, meta = {}, {}
    for name, m in layers:
        for t in _ADAPTER_TENSORS:
            tensors[f"{name}.{t}"] = getattr(m, t).detach().to("cpu").contiguous()
        meta[name] = {"rank": m.rank, "alpha": m.alpha, "mode": m.mode, "protect_energy": m.protect_energy,
                      "task_index": m.task_index, "in_features": m.in_features, "out_features": m.out_features}
    save_file(tensors, str(path), metadata={"format": _FORMAT, "layers": json.dumps(meta)})


def load_adapter(model: nn.Module, path) -> None:
    """Load an adapter written by save_adapter. Every CLoRALinear of the model must be in the
    file with the same shapes, and every layer of the file in the model; otherwise nothing is
    changed and a ValueError names the layer and the shapes."""
    from safetensors import safe_open
    layers = _require_layers(model, "load_adapter")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a clora_kernels adapter file (format {meta.get('format')!r})")
        info = json.loads(meta["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = {n for n, _ in layers}
    missing, extra = sorted(names - set(info)), sorted(set(info) - names)
    if missing:
        raise ValueError(f"{path}: the adapter has no entry for the model's C-LoRA layer(s) {missing}")
    if extra:
        raise ValueError(f"{path}: the adapter holds layer(s) {extra} that the model has no C-LoRA layer for")
    for name, m in layers:
        if m.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge the model before load_adapter")
        for t in _ADAPTER_TENSORS:
            have, want = tuple(tensors[f"{name}.{t}"].shape), tuple(getattr(m, t).shape)
            if have != want:
                raise ValueError(f"layer {name!r}: {t} in the adapter has shape {have}, the model has {want} "
                                 f"(adapter rank {info[name]['rank']}, model rank {m.rank})")
    with torch.no_grad():
        for name, m in layers:
            for t in _ADAPTER_TENSORS:
                getattr(m, t).copy_(tensors[f"{name}.{t}"])
            m.task_index = int(info[name]["task_index"])
            m.mode = info[name]["mode"]
