"""The float64 oracle of DESIGN.md section 6 and shared test utilities."""
from __future__ import annotations

import torch

from clora_kernels.backends.torch_ref import reference_formula

# ‖out − ref‖ / ‖ref‖ bounds per dtype (DESIGN.md section 6)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# unit roundoff of the accumulation: every kernel and the torch reference accumulate half types in fp32
ACC_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24,
                torch.bfloat16: 2.0 ** -24}
GRAD_NAMES = ("x", "bias", "lora_A", "lora_B", "routing_delta")


def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())


def make_inputs(m, k, n, r, *, bias=True, hard=False, lead=None, seed_tensors=True):
    """Fresh random float64 CPU inputs (never zeros): routing_old non-zero, as after a task."""
    x = torch.randn(*(lead or (m,)), k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, dtype=torch.float64) if bias else None
    la = torch.randn(r, k, dtype=torch.float64) / k ** 0.5
    lb = torch.randn(n, r, dtype=torch.float64) / r ** 0.5
    r_old = torch.randn(r, r, dtype=torch.float64) / r ** 0.5
    r_delta = torch.randn(r, r, dtype=torch.float64) / r ** 0.5
    p = None
    if hard:
        q, _ = torch.linalg.qr(torch.randn(r, max(1, r // 2), dtype=torch.float64))
        p = torch.eye(r, dtype=torch.float64) - q @ q.t()
    return dict(x=x, weight=w, bias=b, lora_A=la, lora_B=lb, routing_old=r_old, routing_delta=r_delta,
                projection=p, scaling=0.7)


def oracle(inp, grad_through_old_route=False):
    """Autograd through the plain formula in float64 on CPU; the old route carries no gradient
    to lora_A / lora_B unless grad_through_old_route."""
    d = {k: (v.detach().double().cpu() if torch.is_tensor(v) else v) for k, v in inp.items()}
    for name in GRAD_NAMES:
        if d[name] is not None:
            d[name].requires_grad_(True)
    y = reference_formula(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["routing_old"],
                          d["routing_delta"], d["projection"], d["scaling"], grad_through_old_route)
    return y, d


def grads_of(inputs: dict) -> dict:
    return {k: inputs[k].grad for k in GRAD_NAMES if inputs[k] is not None}


def cast_inputs(inp, dtype, device="cpu", requires_grad=True):
    """Copies of the oracle's inputs in dtype/device; differentiable ones require grad."""
    out = {}
    for k, v in inp.items():
        if torch.is_tensor(v):
            v = v.detach().to(device=device, dtype=dtype).clone()
            if requires_grad and k in GRAD_NAMES:
                v.requires_grad_(True)
        out[k] = v
    return out


def call(fn, inp, **kw):
    return fn(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["routing_old"],
              inp["routing_delta"], inp["projection"], inp["scaling"], **kw)


def check_backend(backend, dtype, *, m=7, k=24, n=40, r=5, bias=True, hard=False, through_old=False, lead=None,
                  device="cpu", noncontig=False, ref_backend="torch"):
    """Forward and every gradient of `clora_linear(backend=...)` against the float64 oracle.

    Bound per output: ‖out − ref‖/‖ref‖ ≤ max(TOL[dtype], 2 × the error of the plain formula
    evaluated by autograd in the same dtype on the same inputs, u·κ). The last two terms only
    matter on ill-conditioned draws (e.g. M = r = 1, where a gradient is one cancelling dot product
    times a vector and no evaluation in that dtype meets TOL). u is the accumulation's unit
    roundoff (fp32's for half types too) and κ = ‖oracle on |inputs| and |g|‖ / ‖oracle‖ the
    output's condition: u·κ is the error of rounding each product and sum once. The plain
    formula's error alone is one sample, which a lucky summation order makes small (seed
    840054436: t = x·aᵀ = 0.0027 from terms whose magnitudes sum to 2.77, κ = 1034 for lora_B,
    plain error < 1e-5, every Triton plan 1.8e-5, the same at the commit before). u·κ exceeds TOL
    only in fp32 and only where κ > 167 (at most ~2e-4 over the tests' shapes and 30 seeds); a
    tf32 or half-precision slip in an fp32 path errs by ~1e-3 and still fails. A non-reference
    backend must also stay within 2× the same-dtype torch backend's error + max(a rounding floor,
    u·κ). Returns the errors."""
    from clora_kernels import clora_linear
    base = make_inputs(m, k, n, r, bias=bias, hard=hard, lead=lead)
    # the oracle sees the inputs the backend sees: rounded to dtype (error measures compute only)
    base = {key: (v.to(dtype).double() if torch.is_tensor(v) else v) for key, v in base.items()}
    g = torch.randn(*base["x"].shape[:-1], n, dtype=torch.float64).to(dtype).double()

    def oracle_outputs(inputs, grad):
        y, d = oracle(inputs, through_old)
        y.backward(grad)
        return {"y": y.detach(), **grads_of(d)}
    refs = oracle_outputs(base, g)
    absolute = oracle_outputs({key: (v.abs() if torch.is_tensor(v) else v) for key, v in base.items()}, g.abs())
    cond_floor = {key: ACC_ROUNDOFF[dtype] * float(v.norm() / refs[key].norm().clamp_min(1e-300))
                  for key, v in absolute.items()}

    def run(fn, **kw):
        inp = cast_inputs(base, dtype, device)
        if noncontig:  # x as a strided view: every other column of a wider tensor
            wide = torch.randn(*inp["x"].shape[:-1], 2 * k, dtype=dtype, device=device)
            wide[..., ::2] = inp["x"].detach()
            inp["x"] = wide[..., ::2].requires_grad_(True)
            assert not inp["x"].is_contiguous()
        y = call(fn, inp, **kw)
        y.backward(g.to(device=device, dtype=dtype))
        assert inp["weight"].grad is None and inp["routing_old"].grad is None
        return {"y": y, **grads_of(inp)}

    outs = run(clora_linear, grad_through_old_route=through_old, backend=backend)
    plain = run(reference_formula, grad_through_old_route=through_old)
    errs = {key: rel_err(outs[key], refs[key]) for key in refs}
    bound = {key: max(TOL[dtype], 2 * rel_err(plain[key], refs[key]), cond_floor[key]) for key in refs}
    bad = {key: (e, bound[key]) for key, e in errs.items() if not e <= bound[key]}
    assert not bad, f"{backend} {dtype}: (error, bound) over bound: {bad}"
    if backend != ref_backend:
        touts = run(clora_linear, grad_through_old_route=through_old, backend=ref_backend)
        floor = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 0.0)
        for key in refs:
            te = rel_err(touts[key], refs[key])
            slack = max(floor, cond_floor[key])
            assert errs[key] <= 2 * te + slack, \
                f"{backend} {dtype} {key}: error {errs[key]:.3g} > 2 x torch reference {te:.3g} + {slack:g}"
    return errs


def check_cuda_graph_capture(layer, x):
    """Capture layer(x) in a CUDA graph after one warm-up call, replay it on new input, and compare
    with eager calls (relative error below 1e-6)."""
    from clora_kernels.bench.core import capture_graph
    with torch.no_grad():
        ref = layer(x).clone()            # an eager call first (compiles, tunes, allocates)
        static_x = x.clone()
        graph, static_y = capture_graph(lambda: layer(static_x))
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, layer(x2)) < 1e-6
        assert rel_err(ref, layer(x)) < 1e-6
