"""`clora_linear`: validate once, dispatch once (docs/design.md sections 2 and 3).

    y = x Wᵀ + b + s · (x lora_Aᵀ) (R_old + P R_delta) lora_Bᵀ

Every backend is reached through `backends.ops.linear`: the registered op `torch.ops.clora.linear_fwd`
under torch.compile, a thin autograd.Function over the same implementation in eager mode; one
autograd formula (docs/design.md section 2) for all backends (`backends/ops.py`).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor

from .backends import BACKEND_NAMES, _autocasting, device_type, exact_math  # noqa: F401  (exact_math: imported from here)
from .backends import ops as _ops  # registers torch.ops.clora.*
from .backends.ops import in_functorch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the largest scaling per x dtype: the GEMMs take it as their alpha, in float64 for float64 x and in
# float32 for the others (a 16-bit GEMM's alpha is a float32: 1e5 with float16 x works). The error's
# text is made here: under torch.compile an f-string's float format spec fails.
_ALPHA = {dt: torch.float64 if dt == torch.float64 else torch.float32 for dt in _FLOAT_DTYPES}
_SCALING_MAX = {dt: torch.finfo(a).max for dt, a in _ALPHA.items()}
_SCALING_RANGE = {dt: f"|scaling| <= {_SCALING_MAX[dt]:g}, the {a} range of the GEMMs' alpha for {dt} x"
                  for dt, a in _ALPHA.items()}


def finite_number(value) -> bool:
    """math.isfinite that answers False, not OverflowError, for an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_flag(name: str, value) -> bool:
    """`value` where it is a bool (numpy's too), else a TypeError naming `name`: bool("False") is True."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def _shape(t: Tensor) -> str:
    try:
        return str(tuple(t.shape))
    except RuntimeError:    # a nested tensor of the strided layout has no shape
        return "nested: " + ", ".join(str(tuple(c.shape)) for c in t.unbind())


def check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 routing_old: Tensor, routing_delta: Tensor, projection: Optional[Tensor],
                 scaling: float, backend: str = "auto") -> None:
    """The one validation of a C-LoRA linear call. Raises ValueError/TypeError naming the
    argument and the sizes; returns None when every backend may be asked to run the call.
    The type, routing-shape and dtype / device rules are tested for all operands in one expression
    first and walked operand by operand only to name the one that fails: 2.2 µs per valid call
    against 4.0 for the walk alone (timeit, CPU machine, CPU tensors; on a GPU the device rule is
    still walked). The functional API validates every call."""
    T = Tensor
    if not (isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T) and isinstance(lora_B, T)
            and isinstance(routing_old, T) and isinstance(routing_delta, T)
            and (bias is None or isinstance(bias, T)) and (projection is None or isinstance(projection, T))):
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                        ("routing_old", routing_old), ("routing_delta", routing_delta), ("projection", projection)):
            optional = name in ("bias", "projection")
            if not isinstance(t, T) and not (optional and t is None):
                if isinstance(t, torch.fx.Proxy):      # torch.fx keeps only torch.nn's modules whole
                    raise TypeError(f"{name} is a torch.fx Proxy: torch.fx.symbolic_trace traced into a C-LoRA "
                                    f"layer; keep CLoRALinear whole (a leaf module: is_leaf_module of your "
                                    f"Tracer, or tracer_kwargs={{'leaf_modules': [CLoRALinear]}} for "
                                    f"create_feature_extractor), or trace after ck.merge_and_unload(model)")
                raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (*, in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    n, k = weight.shape
    try:
        width = x.shape[-1]
    except RuntimeError:    # a nested tensor of the strided layout has no shape (torch.jagged's has), a width
        width = x.size(-1)
    if width != k:
        raise ValueError(
            f"x has {width} features in its last dimension (shape {_shape(x)}) but weight "
            f"expects in_features={k} (weight shape {_shape(weight)})")
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape (rank, in_features={k}) with rank >= 1, got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.shape != (n, r):
        raise ValueError(f"lora_B must have shape (out_features, rank) = ({n}, {r}), got {_shape(lora_B)} "
                         f"(out_features from weight {_shape(weight)}, rank from lora_A {_shape(lora_A)})")
    rr = (r, r)
    if routing_old.shape != rr or routing_delta.shape != rr or (projection is not None and projection.shape != rr):
        for name, m in (("routing_old", routing_old), ("routing_delta", routing_delta), ("projection", projection)):
            if m is not None and m.shape != rr:
                raise ValueError(f"{name} must have shape (rank, rank) = ({r}, {r}), got {_shape(m)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {_shape(bias)}")
    # s - s == 0 is False for nan and ±inf, and traces on the symbolic float or int that
    # torch.compile(dynamic=True) makes of a scaling, where math.isfinite would break the graph
    if (type(scaling) is float or type(scaling) is int) and scaling - scaling == 0:
        value = scaling
    elif not isinstance(scaling, Tensor) and isinstance(scaling, numbers.Real) and finite_number(scaling) \
            and type(scaling) is not float:     # a bool or a NumPy scalar
        value = float(scaling)
    else:
        raise ValueError(f"scaling must be a finite real number (a Python or NumPy scalar), got {scaling!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_NAMES)}, got {backend!r}")
    dt = x.dtype
    if dt not in _FLOAT_DTYPES:
        # (torch.ao.quantization converts exact module types only: it leaves a C-LoRA layer in float, and a
        # quantized input reaches it)
        hint = (": a C-LoRA layer computes in floating point and torch.ao.quantization leaves it so; "
                "dequantize before it, or quantize after ck.merge_and_unload(model)") if x.is_quantized else ""
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32, float64), got {dt}{hint}")
    if abs(value) > _SCALING_MAX[dt]:
        raise ValueError(f"scaling must be a finite real number with {_SCALING_RANGE[dt]}, got {scaling!r}")
    cpu = x.is_cpu      # both on the CPU: no device objects built (t.device costs 0.4 µs, seven per call)
    if (cpu and weight.dtype is dt and lora_A.dtype is dt and lora_B.dtype is dt and routing_old.dtype is dt
            and routing_delta.dtype is dt and (bias is None or bias.dtype is dt)
            and (projection is None or projection.dtype is dt)
            and weight.is_cpu and lora_A.is_cpu and lora_B.is_cpu and routing_old.is_cpu
            and routing_delta.is_cpu and (bias is None or bias.is_cpu) and (projection is None or projection.is_cpu)):
        return      # (elsewhere x's device is compared with each operand's below, as before)
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("routing_old", routing_old), ("routing_delta", routing_delta), ("projection", projection)):
        if t is None:
            continue
        if t.dtype != dt:
            raise TypeError(f"dtype mismatch: x is {dt} but {name} is {t.dtype} "
                            f"(cast the module, or run under torch.autocast)")
        if not (cpu and t.is_cpu) and t.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {t.device}")


_compiling = torch.compiler.is_compiling
def _autocast_inputs(x: Tensor, *tensors: Optional[Tensor]):
    """Under torch.autocast, compute in the autocast dtype the way nn.Linear (F.linear) does: every
    floating-point tensor but float64 is cast (autocast leaves float64 alone). The casts are
    differentiable, so fp32 parameters receive fp32 gradients."""
    if not isinstance(x, Tensor) or not _autocasting(x):   # (a non-tensor x: check_inputs says so)
        return (x, *tensors)
    dev = device_type(x)
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, *tensors))


def clora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 routing_old: Tensor, routing_delta: Tensor, projection: Optional[Tensor], scaling: float,
                 *, grad_through_old_route: bool = False, backend: str = "auto") -> Tensor:
    """C-LoRA linear: ``x Wᵀ + b + scaling · x lora_Aᵀ (R_old + P R_delta) lora_Bᵀ``.

    Shapes (nn.Linear / PEFT conventions): x (*, K), weight (N, K), bias (N,) or None,
    lora_A (r, K), lora_B (N, r), routing_old / routing_delta / projection (r, r);
    ``projection=None`` means the identity. Gradients follow docs/design.md section 2: none for
    ``weight`` or ``routing_old``; ``lora_A``/``lora_B`` see only the new route ``P R_delta``
    unless ``grad_through_old_route=True``. ``backend``: "auto" (then env ``CLORA_BACKEND``,
    then the first usable of triton, cuda, torch, and that backend's cheapest plan), "torch",
    "triton" or "cuda".
    """
    x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection = _autocast_inputs(
        x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection)
    check_inputs(x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling, backend)
    if type(grad_through_old_route) is not bool:
        grad_through_old_route = check_flag("grad_through_old_route", grad_through_old_route)
    return _ops.linear(x, weight, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling,
                       grad_through_old_route, backend)


# 16-bit dtypes: a float32 adapter enters the op cast to them (`_adapter_in`); a merge of a 16-bit weight
# keeps the original (`nn.CLoRALinear.merge`)
_HALF = (torch.float16, torch.bfloat16)


def _adapter_in(x, *adapter):
    """A float32 adapter on a 16-bit layer (`CLoRALinear.from_linear`'s autocast_adapter_dtype, PEFT's
    default) enters the op in x's dtype, by differentiable casts: its parameters keep float32 values and
    take float32 gradients. Operands of other dtypes stay as they are (the checks name a mismatch)."""
    dt = x.dtype if isinstance(x, Tensor) else None
    if dt not in _HALF:
        return adapter
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype is torch.float32 else t for t in adapter)


def module_linear(owner, x, weight, fan_in_fan_out, bias, lora_A, lora_B, routing_old, routing_delta, projection,
                  scaling, grad_through_old_route, backend, mode, factors=None):
    """clora_linear for a module whose operands other than x change rarely. The full validation runs
    unless this call matches the last one that passed: x's dtype, device and width, the scaling (a
    float), backend and mode, every operand's dtype and shape (a `.data` swap keeps the tensor object;
    transformers' resize_token_embeddings does it to a tied weight. The factors' shapes were left out
    once, as meeting torch's own shape error, 0.25 µs a call: a helper found a lora_B swapped to
    (5, r) on a one-output layer broadcast by the merge plan into a (M, 5) output, silently, and the
    other swaps' errors named no argument), and the operands themselves (the same tensor objects: a swapped one, as
    torch.func.functional_call or a re-registered buffer gives, is checked again). `owner._checked`
    holds that memo; `owner` clears it when it is moved; owner None: no memo (operands computed anew
    each call, as a parametrization's). Under autocast every call
    validates (its casts make new operands). fan_in_fan_out: `weight` is stored (in, out) and enters
    the op transposed (transformers' Conv1D). factors: where lora_A and lora_B are fresh views each
    call (the freeze policy's detached factors: the same dtype, device and shape), the parameters
    they view, whose identity keys the memo instead (else every such call would validate)."""
    w = weight.t() if fan_in_fan_out and isinstance(weight, Tensor) else weight
    # (a traced width, a tensor under the TorchScript tracer, is no key: the memo would outlive the trace;
    # and no memo under torch.compile, which traces the validation once and guards it: the memo's write
    # is a mutation of the module inside the graph, which compiled activation checkpointing refuses and
    # which cost every compiled model a second compile)
    try:
        k = x.shape[-1] if isinstance(x, Tensor) and x.dim() else None
    except RuntimeError:    # a nested tensor of the strided layout has no shape: validated every call
        k = None
    if owner is not None and type(k) is int and type(scaling) is float and not _autocasting(x) and not _compiling():
        try:
            key = (x.dtype, x.device, k, scaling, backend, mode, fan_in_fan_out, weight.shape, weight.dtype,
                   lora_A.dtype, lora_B.dtype, routing_old.dtype, routing_delta.dtype,
                   None if bias is None else bias.dtype, None if projection is None else projection.dtype,
                   routing_old.shape, routing_delta.shape, None if bias is None else bias.shape, lora_A.shape,
                   lora_B.shape, None if projection is None else projection.shape)
        except AttributeError:      # an operand that is no tensor (`layer.lora_A = None`): the checks name it
            key = None
        if key is None:
            return clora_linear(x, w, bias, *_adapter_in(x, lora_A, lora_B, routing_old, routing_delta, projection),
                                scaling, grad_through_old_route=grad_through_old_route, backend=backend)
        operands = (weight, bias, *(factors or (lora_A, lora_B)), routing_old, routing_delta, projection)
        if key[0] in _HALF:     # (the memo keys the operands as they are)
            lora_A, lora_B, routing_old, routing_delta, projection = _adapter_in(
                x, lora_A, lora_B, routing_old, routing_delta, projection)
        memo = owner._checked
        if memo is not None and memo[0] == key and all(map(operator.is_, memo[1], operands)):
            return _ops.linear(x, w, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling,
                               grad_through_old_route, backend)
        y = clora_linear(x, w, bias, lora_A, lora_B, routing_old, routing_delta, projection, scaling,
                         grad_through_old_route=grad_through_old_route, backend=backend)
        # (operands computed in the call, as torch.func.functional_call's or a transform's: new each call,
        # so never a hit, and kept they would hold their graph, which deepcopy of the module refuses)
        if not in_functorch() and not any(t is not None and t.grad_fn is not None for t in operands):
            owner._checked = (key, operands)
        return y
    return clora_linear(x, w, bias, *_adapter_in(x, lora_A, lora_B, routing_old, routing_delta, projection), scaling,
                        grad_through_old_route=grad_through_old_route, backend=backend)
