"""The registered ops and their one autograd formula (docs/design.md sections 2 and 3).

    clora::linear_fwd(x, w, b, lora_a, lora_b, r_old, r_delta, proj, s, grad_through_old_route, need_t, backend)
        -> (y, t)        y = x wᵀ + b + s·t·R_eff·lora_bᵀ,  t = x lora_aᵀ  (kept for backward;
                         (M, 0) when need_t is False: no gradient will read it, and a backend may
                         then skip computing it)
    clora::linear_dx(g, w, lora_a, lora_b, r_old, r_delta, proj, s, backend)
        -> (dx, v)       v = g lora_b,  dx = g w + s·v·R_effᵀ·lora_a

Both resolve their backend in `backends.auto` (`plain`, else `run` with its fallback), so every
backend shares the backward below: dx from the backend (its fused kernel, or a plan of torch ops),
the skinny weight gradients with torch's addmm.
Saved for backward: x, t and the small weights (eager on the torch backend, also the forward's R_eff);
never an M×N tensor.
The ops take x and g 2-D; `linear` flattens the leading dims.

`linear` is how callers reach the forward with its autograd. Under torch.compile / export it is
the registered op (opaque to the compiler, with its fake kernel and `register_autograd`). In eager
mode it is `_EagerLinear`, a plain autograd.Function over the same implementation, the same
`_setup_context` and the same `_backward` (which then runs the dx on the backend the forward
resolved to, without the custom op either), returning y alone (t is saved, not an output). Not the
op in eager mode because, measured on the 2-core CPU machine (torch 2.15, torch backend, M=1,
K=N=16, r=4), the custom op's autograd wrapper costs 27 µs per call with grad, most of it
`torch._library.utils.fill_defaults` rebuilding the 12-argument schema list per argument, and the
op's dispatch 7.6 µs without grad: more host time than the four cuBLAS launches of the eager
reference.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import routing_eff, scaled_addmm
from . import _any_autocast, exact_math
from .auto import plain, run, run_kernels


def _resolved_forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                      backend, ctx=None, pad_t=True):
    """The forward on the backend `backend` resolves to; with `ctx` (eager autograd) that backend is
    kept as ctx.impl / ctx.auto for the dx, unless auto chose a kernel backend (then the dx resolves
    again, so that a kernel failing there falls back). Without need_t, t is the op's (M, 0) tensor,
    or with pad_t=False whatever the backend returned (the no-grad path reads only y). The torch
    backend, where `auto.plain` names it, is called here directly; else `_run_forward`."""
    resolved = plain(backend, x)
    if resolved is None:
        y, t = _run_forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                            backend, ctx)
    else:
        impl, auto = resolved
        y, t = impl.forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                            auto, _keep(ctx, impl, auto, routing_old, routing_delta, projection))
    return y, (t if need_t or not pad_t else x.new_empty(x.shape[0], 0))


def _keep(ctx, impl, auto, routing_old, routing_delta, projection):
    """With ctx, keep the backend the forward runs on for the dx (unless auto chose a kernel backend),
    and on the torch backend R_eff, once per step (the dx and the weight gradients read it too; saved
    by _setup_context). Returns that R_eff, or None."""
    if ctx is None or (auto and impl.name != "torch"):
        return None
    ctx.impl, ctx.auto = impl, auto
    if impl.name != "torch":
        return None
    ctx.r_eff = r_eff = routing_eff(routing_old, routing_delta, projection)
    return r_eff


def _run_forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t, backend,
                 ctx):
    """The forward where `auto.plain` answered None: through `auto.run_kernels`, where a kernel
    backend may be tried (and fall back). Its own function: run's callback, this closure (a cell per
    captured name, made on every call) and run's loop cost a small layer's call 1-2 % on the CPU
    machine (benchmarks/host_ab.py, three runs), so the direct path above has none of them (the
    operands packed in one tuple for a helper shared by both paths measured 2-3 % slower)."""
    def fwd(impl, auto):
        return impl.forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                            auto, _keep(ctx, impl, auto, routing_old, routing_delta, projection))
    return run_kernels(backend, x, weight, lora_a.shape[0], fwd)


def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                routing_old: Tensor, routing_delta: Tensor, projection: Optional[Tensor], scaling: float,
                grad_through_old_route: bool, need_t: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _resolved_forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                             backend)


linear_fwd = torch.library.custom_op("clora::linear_fwd", _linear_fwd, mutates_args=())


@linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
      grad_through_old_route, need_t, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0] if need_t else 0)


def _linear_dx(g: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, routing_old: Tensor,
               routing_delta: Tensor, projection: Optional[Tensor], scaling: float,
               backend: str) -> tuple[Tensor, Tensor]:
    # without the caller's autocast, as `_backward`: a compiled graph calls this op in its backward, at run time
    # (a compiled forward outside autocast, then a backward inside it, failed with a dtype mismatch)
    with exact_math(g):
        return run(backend, g, weight, lora_a.shape[0], lambda impl, auto: impl.dx(
            g, weight, lora_a, lora_b, routing_old, routing_delta, projection, scaling, auto))


linear_dx = torch.library.custom_op("clora::linear_dx", _linear_dx, mutates_args=())


@linear_dx.register_fake
def _(g, weight, lora_a, lora_b, routing_old, routing_delta, projection, scaling, backend):
    return g.new_empty(g.shape[0], weight.shape[1]), g.new_empty(g.shape[0], lora_a.shape[0])


def _setup_context(ctx, inputs, output, t_is_output=True):
    x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, through_old, _, backend = inputs
    _, t = output
    if t_is_output:
        ctx.mark_non_differentiable(t)
    # R_eff where the eager torch forward computed it (else None): saved, not kept as an attribute, so
    # that activation checkpointing recomputes it with the other saved tensors
    r_eff = getattr(ctx, "r_eff", None)
    ctx.save_for_backward(x, t, weight, lora_a, lora_b, routing_old, routing_delta, projection, r_eff)
    ctx.r_eff = None
    ctx.scaling, ctx.through_old, ctx.backend = scaling, through_old, backend


def _double_backward(ctx, grad_y):
    """The backward when it is itself differentiated (create_graph=True, e.g. a gradient penalty):
    autograd through the reference formula of the same semantics, recomputed from the saved
    inputs, so second derivatives are right (the kernels' dx has no derivative of its own). The
    bias enters linearly, so the formula runs without it and its gradient is Σ_rows g. Each operand
    is taken through a fresh view (its gradient passes to the saved tensor unchanged), so that the
    formula's derivative in one is partial: where x was computed from lora_A (a layer applied to its
    own output, x and lora_A one tensor), autograd.grad in the saved tensors themselves also counted
    the paths through x's own graph, and the dx returned counted them again (40-100 % off)."""
    x, _, weight, lora_a, lora_b, r_old, r_delta, proj, _ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    x, lora_a, lora_b, r_delta = (v.view_as(v) if needs[i] else v
                                  for i, v in ((0, x), (3, lora_a), (4, lora_b), (6, r_delta)))
    wrt = [(i, v) for i, v in ((0, x), (3, lora_a), (4, lora_b), (6, r_delta)) if needs[i]]
    y = _frozen_formula(x, weight, None, lora_a, lora_b, r_old, r_delta, proj, ctx.scaling, ctx.through_old)
    got = torch.autograd.grad(y, [v for _, v in wrt], grad_y, create_graph=True, allow_unused=True) if wrt else ()
    out = [None] * 12
    for (i, v), d in zip(wrt, got):
        out[i] = torch.zeros_like(v) if d is None else d
    if needs[2]:
        out[2] = grad_y.sum(0)
    return tuple(out)


def _frozen_formula(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, through_old):
    """The formula in plain torch ops, with the operands the first-order backward gives no gradient
    (weight, routing_old, projection: `_backward` returns None for them) detached and the old route
    written with detached factors (unless through_old), so that a second derivative, torch.func and
    forward-mode AD agree with `_backward` (design.md section 2: W and R_old never get gradients).
    In F.linear of x alone, which a nested tensor of either layout takes (nn.Linear does; matmul of a
    strided-layout nested tensor fails) and which runs x at any rank. Not the tests' oracle
    (`reference_formula`, written as the design states it)."""
    r_old = routing_old.detach()
    new = routing_delta if projection is None else projection.detach() @ routing_delta
    t = F.linear(x, lora_a)
    if through_old:
        lora = F.linear(t, lora_b @ (r_old + new).t())
    else:
        lora = F.linear(t, lora_b @ new.t()) + F.linear(F.linear(x, lora_a.detach()), lora_b.detach() @ r_old.t())
    return F.linear(x, weight.detach(), bias) + scaling * lora


# a base weight made trainable (timm's unfreeze, model.requires_grad_()) trained nothing, silently, while
# its bias and every plain layer trained
_WEIGHT_NO_GRAD = ("a C-LoRA layer gives its base weight no gradient (docs/design.md section 2): its "
                   "requires_grad=True gets none from the layer; to train the base too, train the layers that "
                   "ck.merge_and_unload(model) gives back")


def _weight_no_grad():
    warnings.warn(_WEIGHT_NO_GRAD, UserWarning)


@torch.compiler.assume_constant_result
def _weight_no_grad_compiled() -> bool:
    """The warning while torch.compile traces `linear` (this runs then, once a compile, and is no part of
    the graph; the compiler cannot trace warnings.warn). Compiled, `_backward` runs only while
    AOTAutograd traces it, and not at all on a warm compile cache: a trainable weight got no gradient
    and no word."""
    _weight_no_grad()
    return True


def _backward(ctx, grad_y, grad_t=None):
    if grad_y is None:      # the registered op's y took no part in the loss (only its t did)
        return (None,) * 12
    if _any_autocast():
        # a backward called inside torch.autocast (autograd runs it with the caller's autocast): computed in
        # the dtypes the forward saved, the forward's choice (a forward outside autocast, then `loss.backward()`
        # inside it, failed here with a dtype mismatch, and read half-size buffers in the cuda extension's
        # kernels; nn.Linear's backward runs autocast to 16 bits there)
        with exact_math(grad_y):
            return _backward_math(ctx, grad_y)
    return _backward_math(ctx, grad_y)


def _backward_math(ctx, grad_y):
    compiling = torch.compiler.is_compiling()
    if ctx.needs_input_grad[1] and not compiling:     # (compiled: `linear` warns)
        _weight_no_grad()
    if torch.is_grad_enabled() and not compiling:   # create_graph=True
        return _double_backward(ctx, grad_y)
    x, t, weight, lora_a, lora_b, r_old, r_delta, proj, r_eff = ctx.saved_tensors     # r_eff: None but eager torch
    s = ctx.scaling
    g = grad_y
    need_x, _, need_b, need_a, need_lb, _, need_rd, _ = ctx.needs_input_grad[:8]
    if (need_lb or need_rd) and t.shape[1] != lora_a.shape[0]:
        # the op ran with need_t=False, but a gradient reads t = x·lora_aᵀ: a graph exported under no_grad
        # or with a frozen adapter (need_t is fixed when traced), then trained. x is saved: t again
        t = torch.mm(x, lora_a.t())
    dx = d_a = d_lb = d_rd = d_bias = None
    if need_x:
        impl, auto = (None, False) if compiling else (getattr(ctx, "impl", None), getattr(ctx, "auto", False))
        if not compiling and (impl is None or impl.name != "torch") and (
                _functorch_active() or _forward_ad._current_level >= 0 or _legacy_batched(g)):
            # a vmapped backward (autograd.grad's is_grads_batched, jacobian(vectorize=True)) or a dual grad_y
            # (forward-over-reverse): plain torch ops, which both transforms run through (a kernel failed on
            # vmap's batched g, and under auto was then dropped for the rest of the process; it dropped the
            # tangents of a dual g). Eager only: a kernel asked for by name (impl) or by auto (None here)
            impl, auto = plain("torch", g)
        if impl is not None:    # eager: the backend the forward resolved to (torch, or one asked for by name)
            dx, v = impl.dx(g, weight, lora_a, lora_b, r_old, r_delta, proj, s, auto, r_eff)
        else:
            dx, v = (linear_dx if compiling else _linear_dx)(g, weight, lora_a, lora_b, r_old, r_delta, proj, s,
                                                             ctx.backend)
    elif need_a or need_rd:
        v = torch.mm(g, lora_b)                            # v = g Bᵀ          (M, r)
    # the weight gradients: torch.addmm(like, a, b, beta=0, alpha=s) is s·(a @ b) in one GEMM (it ignores
    # `like`, NaN included, but its shape; s applies to the accumulator, not as a second rounding;
    # scaled_addmm keeps NaN / Inf of the product at s = 0, where BLAS skips it). With
    # s = 1 (the default scaling, alpha = rank) torch.mm, the same product: on the CPU machine addmm
    # costs 0.5 µs more per call and the `like` view 0.6 (M=1, r=4), 10 % of a small layer's backward.
    # Not while compiling: a symbolic s would be specialized on
    unit = not compiling and s == 1
    if need_a or need_lb:
        if not ctx.through_old:
            r_train = r_delta if proj is None else torch.mm(proj, r_delta)      # P R_delta
        else:
            r_train = routing_eff(r_old, r_delta, proj) if r_eff is None else r_eff
        if need_a:
            vx = torch.mm(v.t(), x)                                                     # s R_train vᵀ x  (r, K)
            d_a = torch.mm(r_train, vx) if unit else scaled_addmm(lora_a, r_train, vx, s, beta=0)
        if need_lb:
            # s gᵀ (t R_train): the plain formula's rounding (t R_train rounded, then the sum over M). Not
            # (tᵀ g)ᵀ R_train: it rounds before the sum over r, which can cancel (bf16: up to 5x the plain
            # formula's error on random draws). Two layouts of the same product (`_lb_direct`)
            tr = torch.mm(t, r_train)
            if _lb_direct(g, compiling):
                d_lb = torch.mm(g.t(), tr) if unit else scaled_addmm(lora_b, g.t(), tr, s, beta=0)
            else:
                tr = tr.t()
                d_lb = (torch.mm(tr, g) if unit else scaled_addmm(lora_b.t(), tr, g, s, beta=0)).t()
    if need_rd:   # s Pᵀ tᵀ v (P is symmetric in hard mode; Pᵀ keeps a direct caller's non-symmetric one right)
        # Not through tᵀ g: that rounds before the sum over N, which cancels (bf16 error 2x the bound, M=r=1)
        if proj is None:
            d_rd = torch.mm(t.t(), v) if unit else scaled_addmm(r_delta, t.t(), v, s, beta=0)
        else:
            tv = torch.mm(t.t(), v)
            d_rd = torch.mm(proj.t(), tv) if unit else scaled_addmm(r_delta, proj.t(), tv, s, beta=0)
    if need_b:
        d_bias = g.sum(0)
    return dx, None, d_bias, d_a, d_lb, None, d_rd, None, None, None, None, None


def _lb_direct(g, compiling):
    """Whether lora_B's gradient s gᵀ (t R_train) is computed as written, in lora_B's own (N, r)
    layout, rather than as the transpose of s (t R_train)ᵀ g, whose pass over g is an (r, M)·(M, N)
    product that autograd then copies into lora_B's layout. Measured on the CPU machine (fp32,
    r=16, 1 and 2 threads, the two forms interleaved): as written takes 0.40-0.56 of the time at
    M ≤ 24 (no copy, one op fewer), 0.65-0.92 at M=128 (N from 64 to 1024), and loses from about
    M = 100 + 80000/N (1.09-1.52 at M=1576, N from 96 to 512; 70 µs against 97-109 at N=288). The
    rule keeps below that: M < 64 + 65536/N. Only on CPU (the GPU layouts are untimed) and not
    while compiling (M may be symbolic)."""
    if compiling or not g.is_cpu:
        return False
    m, n = g.shape
    return m * n < 64 * n + 65536


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


_peek_interpreter_stack = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_CInterpreter = getattr(torch._C._functorch, "CInterpreter", ())
_forward_ad = torch.autograd.forward_ad      # _current_level >= 0 inside dual_level(): forward-mode AD
_is_tracing = torch._C._is_tracing     # torch.jit.is_tracing() less its is_scripting test (this code is never scripted)
# autograd.grad's is_grads_batched vmaps the backward with the legacy batching, not torch.func's
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


# eager only (what in_functorch asks, from the same stack, in one C call: 0.04 µs against 0.2 on the CPU machine)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: in_functorch())


def in_functorch() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running, also while torch.compile
    traces one. isinstance, not `is not None`: Dynamo wraps the stack's top as an object, None too,
    so `is not None` was true under every trace (checked on torch 2.11 and 2.14)."""
    return isinstance(_peek_interpreter_stack(), _CInterpreter)


class _EagerLinear(torch.autograd.Function):
    """clora::linear_fwd with its registered autograd, minus the custom op's wrappers (eager only).
    Old-style forward(ctx, ...): a `setup_context` staticmethod would make Function.apply bind its
    arguments through inspect.signature, 25 µs per call on the CPU machine. The dx runs on the
    backend the forward resolved to (`_resolved_forward`). The forward returns y alone: t is saved
    for the backward, not a second (non-differentiable) output for autograd to wrap, and y's gradient
    is never None."""

    @staticmethod
    def forward(ctx, *inputs):
        x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, _, need_t, backend = inputs
        out = _resolved_forward(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                                need_t, backend, ctx=ctx)
        _setup_context(ctx, inputs, out, t_is_output=False)
        return out[0]

    backward = staticmethod(_backward)


def _graph_free(x, weight, bias, lora_a, routing_old, projection) -> bool:
    """Whether none of these operands requires a gradient (`linear` asks it after lora_b and
    routing_delta): then autograd records nothing for the call, and y requires no gradient, whichever
    path computes it. weight, routing_old and projection get no gradient, but one that requires it
    still makes y require one, as the Function's output does."""
    return not (x.requires_grad or lora_a.requires_grad or weight.requires_grad or routing_old.requires_grad
                or (bias is not None and bias.requires_grad) or (projection is not None and projection.requires_grad))


def linear(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
           grad_through_old_route, backend):
    """y = clora::linear_fwd's y with autograd, for x of shape (*, K) (validated: `functional`), the one
    dispatch of every call: the registered op while torch.compile / export traces; the formula in
    plain torch ops under torch.func (compiled too: the op has no functorch rules, and
    torch.compile(vmap(grad(f))) failed on it) and the TorchScript tracer; with grad mode off, or no operand
    requiring a gradient, where autograd would record nothing, the implementation itself; else `_EagerLinear` (same implementation and
    formula as the op, a fraction of the host cost). Decides need_t: t = x·lora_Aᵀ is read only by
    the gradients of lora_B and routing_delta, so without them (inference, or a frozen adapter) a
    backend may skip it. The tests after torch.compiler.is_compiling (which the compiler must see)
    call torch's C functions directly: on a CPU most of a small layer's host cost is its Python
    frames."""
    grad = torch.is_grad_enabled()
    need_t = grad and (lora_b.requires_grad or routing_delta.requires_grad)
    dim = x.dim()
    scaling, grad_through_old_route = float(scaling), bool(grad_through_old_route)
    # flatten, not reshape(lead.numel(), K): numel() fixes a symbolic batch size, so torch.export
    # and the ONNX exporters would lose their dynamic batch dimension
    try:
        x2 = x if dim == 2 else x.unsqueeze(0) if dim == 1 else x.flatten(0, -2)
    except RuntimeError:
        if not x.is_nested:
            raise
        return _frozen_formula(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                               grad_through_old_route)
    compiling = torch.compiler.is_compiling()
    if compiling and not in_functorch():
        if grad and weight.requires_grad:
            _weight_no_grad_compiled()
        y = linear_fwd(x2, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                       grad_through_old_route, need_t, backend)[0]
    elif compiling or _functorch_active() or _is_tracing() or _forward_ad._current_level >= 0:   # (compiling: in_functorch)
        # torch.func (grad, vmap, jacrev, ...: its tensors are wrapped, and an autograd.Function without
        # setup_context cannot run under it), the TorchScript tracer (torch.jit.trace, the legacy
        # ONNX exporter, which mis-wires an autograd.Function's outputs) and forward-mode AD (dual
        # tensors: _EagerLinear has no jvp): the formula in plain torch ops, which every transform
        # supports, with the same gradient semantics (the stop-gradient on the old route; none for
        # weight, routing_old and projection). On x as given: F.linear and matmul take any leading
        # dims, so a trace runs at another rank than it was traced at (a flatten and reshape would fix it)
        return _frozen_formula(x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                               grad_through_old_route)
    elif not grad or (not need_t and _graph_free(x, weight, bias, lora_a, routing_old, projection)):
        # grad mode on but no operand requiring a gradient (an eval loop without no_grad, a frozen
        # layer, the bench's fwd rows) is the no-grad path too: autograd would record nothing
        y = _resolved_forward(x2, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling, need_t,
                              backend, pad_t=False)[0]
    else:
        try:
            y = _EagerLinear.apply(x2, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection, scaling,
                                   grad_through_old_route, need_t, backend)
        except RuntimeError as exc:
            # operands made under torch.inference_mode (a layer built there), used outside it with grad mode
            # on: the Function cannot save them for its backward ("Inference tensors cannot be saved"), where
            # nn.Linear returns its output unless a normal operand (x) needs a gradient through them, and then
            # raises this. Computed again without grad, on the same backend: the output takes no gradient (a
            # layer of inference tensors trains nothing: no optimizer can write them outside inference_mode).
            # A test of every operand before the call would cost every call; this path, the rare one, pays a
            # second forward
            operands = [t for t in (x, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection)
                        if t is not None]
            if "nference tensor" not in str(exc) or not any(t.is_inference() for t in operands) or any(
                    t.requires_grad and not t.is_inference() for t in operands):
                raise
            with torch.no_grad():
                y = _resolved_forward(x2, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection,
                                      scaling, False, backend, pad_t=False)[0]
    if dim == 2:        # nothing to flatten: the op's output (never a view) is the result
        return y
    # not a view of y (reshape would return one): nn.Linear's output is none, and FSDP2's backward
    # hooks on a layer's output fail after an in-place op on a view (aten's matmul does the same)
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
