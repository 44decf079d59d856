"""clora_linear on the torch backend against the float64 oracle; validation; dispatch; ops."""
import os
import warnings

import numpy as np
import pytest
import torch

import clora_kernels
from clora_kernels import clora_linear
from clora_kernels.backends import BackendUnavailableError
from clora_kernels.backends.torch_ref import reference_formula
from helpers import GRAD_NAMES, TOL, call, cast_inputs, check_backend, grads_of, make_inputs, oracle, rel_err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", [(1, 24, 200, 1), (7, 200, 24, 5), (129, 24, 40, 16), (3, 64, 72, 64)])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("through_old", [False, True])
def test_torch_backend_matches_oracle(seed, dtype, m, k, n, r, hard, through_old):
    if r > min(k, n):
        pytest.skip("rank above min(K, N)")
    check_backend("torch", dtype, m=m, k=k, n=n, r=r, hard=hard, through_old=through_old, bias=(k % 3 != 0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("through_old", [False, True])
def test_unit_scaling_matches_oracle(seed, dtype, hard, through_old):
    """scaling = 1 (the default, alpha = rank), where the backward computes the weight gradients with
    torch.mm instead of addmm's scaled product: every gradient still matches the oracle."""
    check_backend("torch", dtype, m=9, k=24, n=40, r=5, hard=hard, through_old=through_old, scaling=1.0)


@pytest.mark.parametrize("m,n", [(9, 40), (2100, 33)])
@pytest.mark.parametrize("scaling", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lora_b_gradient_layouts_match_oracle(seed, m, n, scaling, dtype):
    """lora_B's gradient has two layouts (`ops._lb_direct`: as written at small M·N, as a transpose
    at large): both occur on CPU (and neither while compiling), and both match the oracle at unit
    and non-unit scaling."""
    from clora_kernels.backends import ops
    g = torch.zeros(m, n)
    assert ops._lb_direct(g, False) == (m == 9) and not ops._lb_direct(g, True)
    check_backend("torch", dtype, m=m, k=24, n=n, r=5, scaling=scaling)


@pytest.mark.parametrize("bias", [False, True])
def test_3d_and_noncontiguous_inputs(seed, bias):
    check_backend("torch", torch.float32, lead=(2, 3, 5), k=24, n=40, r=4, bias=bias)
    check_backend("torch", torch.float32, m=9, k=24, n=40, r=4, bias=bias, noncontig=True)


@pytest.mark.parametrize("hard", [False, True])
def test_stop_gradient_differs_from_plain_gradient(seed, hard):
    """The library's default route stops the old-route gradient to lora_A / lora_B and
    grad_through_old_route=True lets it through: each setting matches the oracle's, and the two
    differ where they should (lora_A, lora_B) and agree where they should (y, x, routing_delta)."""
    base = make_inputs(5, 16, 24, 4, hard=hard)
    g = torch.randn(5, 24, dtype=torch.float64)
    got = {}
    for through_old in (False, True):
        y_ref, d = oracle(base, through_old)
        y_ref.backward(g)
        inp = cast_inputs(base, torch.float64)
        y = call(clora_linear, inp, grad_through_old_route=through_old, backend="torch")
        y.backward(g)
        assert rel_err(y, y_ref) < TOL[torch.float64]
        for name in GRAD_NAMES:
            assert rel_err(inp[name].grad, d[name].grad) < TOL[torch.float64], (through_old, name)
        got[through_old] = {"y": y.detach(), **{name: inp[name].grad for name in GRAD_NAMES}}
    stop, plain = got[False], got[True]
    for name in ("lora_A", "lora_B"):
        assert rel_err(stop[name], plain[name]) > 1e-3, name
    for name in ("y", "x", "bias", "routing_delta"):
        assert rel_err(stop[name], plain[name]) < 1e-12, name


@pytest.mark.parametrize("trainable", [("x",), ("x", "lora_A"), ("lora_A", "bias"), ("routing_delta",)])
def test_partial_gradients(seed, trainable):
    """Only some inputs need a gradient (a frozen adapter, or A trained alone): t is skipped when
    neither lora_B nor routing_delta needs it, and the gradients asked for still match the oracle."""
    base = make_inputs(6, 24, 40, 4, hard=True)
    y_ref, d = oracle(base)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    inp = cast_inputs(base, torch.float64, requires_grad=False)
    for name in trainable:
        inp[name].requires_grad_(True)
    y = call(clora_linear, inp)
    assert rel_err(y, y_ref) < TOL[torch.float64]
    y.backward(g)
    for name in ("x", "bias", "lora_A", "lora_B", "routing_delta"):
        if name in trainable:
            assert rel_err(inp[name].grad, d[name].grad) < TOL[torch.float64], name
        else:
            assert inp[name].grad is None, name


@pytest.mark.parametrize("frozen_grad", [None, "weight", "routing_old", "projection"])
def test_nothing_to_differentiate_skips_autograd(monkeypatch, seed, frozen_grad):
    """Grad mode on, but no operand requiring a gradient (an eval loop without no_grad): the call takes
    the no-grad path (no autograd.Function), with the no-grad result. An operand that gets no gradient
    but requires one (weight, routing_old, projection) still makes y require one, as before."""
    from clora_kernels.backends import ops
    inp = cast_inputs(make_inputs(6, 24, 40, 4, hard=True), torch.float64, requires_grad=False)
    with torch.no_grad():
        want = call(clora_linear, inp)
    assert rel_err(want, oracle(inp)[0]) < TOL[torch.float64]
    applied = []
    real = ops._EagerLinear.apply
    monkeypatch.setattr(ops._EagerLinear, "apply", lambda *a: applied.append(1) or real(*a))
    if frozen_grad is not None:
        inp[frozen_grad].requires_grad_(True)
    y = call(clora_linear, inp)
    assert torch.equal(y, want)
    assert y.requires_grad == bool(applied) == (frozen_grad is not None)
    if frozen_grad is not None:
        if frozen_grad == "weight":     # a weight made trainable trains nothing: said, once per place
            with pytest.warns(UserWarning, match="gives its base weight no gradient.*merge_and_unload"):
                y.sum().backward()
        else:
            y.sum().backward()
        assert inp[frozen_grad].grad is None


@pytest.mark.parametrize("dtype,step", [(torch.bfloat16, 2.0 ** -7), (torch.float32, 2.0 ** -20)])
def test_lora_b_gradient_rounds_like_the_plain_formula(seed, dtype, step):
    """lora_B's gradient s·gᵀ(t R_train) where t R_train cancels over r: t = (1, 1 + step) is exact
    in the dtype and R_delta's rows are (1, 1) and (-1, -1), so t R_delta = (-step, -step). Rounding
    tᵀg before the sum over r (the form (tᵀg)ᵀR_train) loses the difference (bf16 error 0.19 against
    the plain formula's 0.0015); rounding t R_train first, as the plain formula does, keeps it."""
    n = 64
    x = torch.tensor([[1.0, 0.0]], dtype=dtype)
    w, lora_b, g = torch.randn(n, 2), torch.randn(n, 2), torch.randn(1, n)
    lora_a = torch.tensor([[1.0, 0.0], [1.0 + step, 0.0]])
    r_delta = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])

    def grad_b(fn, dt, **kw):
        lb = lora_b.to(dt, copy=True).requires_grad_(True)
        fn(x.to(dt), w.to(dt), None, lora_a.to(dt), lb, torch.zeros(2, 2, dtype=dt), r_delta.to(dt), None, 1.0,
           **kw).backward(g.to(dt))
        return lb.grad

    from clora_kernels.reference import reference_formula
    want = grad_b(reference_formula, torch.float64)
    plain = rel_err(grad_b(reference_formula, dtype), want)
    for backend in ("torch", "auto"):
        assert rel_err(grad_b(clora_linear, dtype, backend=backend), want) <= max(TOL[dtype], 2 * plain), backend


def test_op_without_t_recomputes_it_for_gradients_that_read_it(seed):
    """need_t is fixed when a graph is traced: one exported under no_grad (or with a frozen adapter), then
    trained, runs the op without t. The backward makes t again from the saved x (it raised)."""
    base = make_inputs(3, 24, 40, 4)
    y_ref, d = oracle(base)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    inp = cast_inputs(base, torch.float64)
    y, t = torch.ops.clora.linear_fwd(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
                                      inp["routing_old"], inp["routing_delta"], None, base["scaling"], False, False,
                                      "torch")
    assert t.shape == (3, 0)
    y.backward(g)
    for name in ("x", "bias", "lora_A", "lora_B", "routing_delta"):
        assert rel_err(inp[name].grad, d[name].grad) < TOL[torch.float64], name


def test_empty_batch(seed):
    inp = cast_inputs(make_inputs(1, 24, 40, 4), torch.float32)
    inp["x"] = torch.randn(0, 3, 24, requires_grad=True)
    y = call(clora_linear, inp)
    assert y.shape == (0, 3, 40)
    y.sum().backward()
    assert inp["x"].grad.shape == (0, 3, 24)
    assert torch.count_nonzero(inp["lora_A"].grad) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("k,n", [(0, 6), (5, 0), (0, 0)])
def test_empty_features_match_the_formula(seed, backend, k, n):
    """K = 0 (y is the bias) and N = 0 (no outputs), forward and backward, against autograd
    through the formula (the Triton dx of N = 0 divided by zero; K = 0 failed to reshape)."""
    if not clora_kernels.available_backends()[backend][0]:
        pytest.skip(f"{backend} is not usable here")
    inp = make_inputs(3, k, n, 2)
    ref, d = oracle(inp)
    probe = torch.randn(ref.shape, dtype=torch.float64)
    (ref * probe).sum().backward()
    got = cast_inputs(inp, torch.float32)
    y = call(clora_linear, got, backend=backend)
    (y * probe.float()).sum().backward()
    assert y.shape == ref.shape and rel_err(y, ref) < 1e-6
    for name in GRAD_NAMES:
        if d[name] is not None:
            assert got[name].grad.shape == d[name].shape and rel_err(got[name].grad, d[name].grad) < 1e-6, name


def test_nan_propagates_like_linear(seed):
    inp = cast_inputs(make_inputs(4, 24, 40, 4), torch.float32, requires_grad=False)
    inp["x"][1, 3] = float("nan")
    y = call(clora_linear, inp)
    ref = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


def test_weight_gradient_does_not_read_its_parameter(seed):
    """dlora_A = s·R_train·vᵀx does not depend on lora_A's values: the one-GEMM scaled product
    (addmm, beta = 0) must ignore the parameter it borrows its shape from, NaN included."""
    base = make_inputs(6, 24, 40, 4)
    y_ref, d = oracle(base)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    inp = cast_inputs(base, torch.float64)
    with torch.no_grad():
        inp["lora_A"][1, 2] = float("nan")
    call(clora_linear, inp).backward(g)
    assert rel_err(inp["lora_A"].grad, d["lora_A"].grad) < TOL[torch.float64]


def test_autocast_like_linear(seed):
    inp = cast_inputs(make_inputs(6, 32, 48, 8), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(clora_linear, inp)
        ref = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert inp["lora_A"].grad.dtype == torch.float32 and inp["x"].grad.dtype == torch.float32
    y64, _ = oracle(inp)
    assert rel_err(y, y64) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backward_inside_autocast_after_a_forward_outside_it(seed, backend):
    """`loss.backward()` inside torch.autocast after an fp32 forward outside it (autograd runs the
    backward with the caller's autocast): the gradients are the fp32 backward's, to fp32 precision, as
    nn.Linear's are (the backward's products were autocast to bf16 and the dx failed with a dtype
    mismatch; the cuda extension read half-size buffers); also with create_graph=True."""
    inp = make_inputs(40, 24, 40, 4)
    want = cast_inputs(inp, torch.float32)
    call(clora_linear, want, backend=backend).square().sum().backward()
    for create in (False, True):
        got = cast_inputs(inp, torch.float32)
        y = call(clora_linear, got, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y.square().sum().backward(create_graph=create)
        for k, g in grads_of(want).items():
            assert got[k].grad.dtype == torch.float32 and rel_err(got[k].grad, g) < 1e-6, (k, create)


def test_autocast_leaves_float64_alone_like_linear(seed):
    """autocast casts no float64 tensor (F.linear stays float64 under it): neither does the op,
    and the result is the float64 oracle's to float64 precision."""
    inp = make_inputs(5, 12, 9, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(clora_linear, inp)
        ref = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    assert y.dtype == ref.dtype == torch.float64
    y64, _ = oracle(inp)
    assert rel_err(y, y64) < TOL[torch.float64]


# ---- bad input: one clear error, naming the argument and the sizes ---------------------
def _bad(**change):
    inp = cast_inputs(make_inputs(4, 24, 40, 4), torch.float32, requires_grad=False)
    inp.update(change)
    return inp


@pytest.mark.parametrize("change,exc,words", [
    (dict(x=torch.randn(4, 23)), ValueError, ["23", "in_features=24"]),
    (dict(lora_A=torch.randn(4, 25)), ValueError, ["lora_A", "(4, 25)"]),
    (dict(lora_B=torch.randn(40, 3)), ValueError, ["lora_B", "(40, 4)", "(40, 3)"]),
    (dict(routing_delta=torch.randn(3, 3)), ValueError, ["routing_delta", "(3, 3)"]),
    (dict(routing_old=torch.randn(4, 5)), ValueError, ["routing_old"]),
    (dict(projection=torch.randn(5, 5)), ValueError, ["projection", "(4, 4)", "(5, 5)"]),
    (dict(bias=torch.randn(41)), ValueError, ["bias", "(40,)", "(41,)"]),
    (dict(scaling=float("nan")), ValueError, ["scaling"]),
    (dict(scaling=float("inf")), ValueError, ["scaling"]),
    (dict(x=torch.randn(4, 24, dtype=torch.float64)), TypeError, ["float64", "weight", "float32"]),
    (dict(lora_B=torch.randn(40, 4, dtype=torch.bfloat16)), TypeError, ["lora_B", "bfloat16"]),
    (dict(x=torch.randint(0, 3, (4, 24))), TypeError, ["floating"]),
    (dict(x=torch.randn(4, 24, device="meta")), ValueError, ["device", "meta"]),
    (dict(lora_A=torch.randn(4, 24).numpy()), TypeError, ["lora_A must be a torch.Tensor", "ndarray"]),
    (dict(bias=torch.randn(40).numpy()), TypeError, ["bias must be a torch.Tensor or None", "ndarray"]),
    (dict(routing_old=None), TypeError, ["routing_old must be a torch.Tensor", "NoneType"]),
])
def test_bad_input_clear_error(change, exc, words):
    with pytest.raises(exc) as info:
        call(clora_linear, _bad(**change))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("name", ["x", "weight", "bias", "lora_A", "lora_B", "routing_old", "routing_delta",
                                  "projection"])
@pytest.mark.parametrize("fault", ["type", "dtype", "device"])
def test_every_operand_checked(name, fault):
    """Each operand alone of the wrong type, dtype or device gets the error that names it (check_inputs
    tests all operands in one expression first: this pins that expression to the per-operand rules)."""
    inp = _bad(projection=torch.eye(4))
    good = inp[name]
    inp[name] = {"type": good.numpy(), "dtype": good.double(), "device": good.to("meta")}[fault]
    with pytest.raises(TypeError if fault != "device" else ValueError) as info:
        call(clora_linear, inp)
    text = str(info.value)
    if fault == "type":
        assert text.startswith(f"{name} must be a torch.Tensor") and "ndarray" in text, text
    else:   # x is the reference the others are compared with: its message names weight
        other = "weight" if name == "x" else name
        assert other in text and ("float64" if fault == "dtype" else "meta") in text, text


@pytest.mark.parametrize("scaling,ok", [(2.0, True), (2, True), (True, True), (np.float32(0.5), True),
                                        (np.int64(2), True), (-1e30, True), (float("nan"), False),
                                        (np.float32("nan"), False), (float("-inf"), False), (10 ** 400, False),
                                        (10 ** 39, False), (1e39, False), (-1e39, False),
                                        (torch.tensor(2.0), False), ("2", False), (None, False)])
def test_scaling_rule(scaling, ok):
    """scaling: any finite real number (int, float, bool, a NumPy scalar) within the float32 range
    of the GEMMs' alpha (addmm failed on 1e39 with "cannot be converted to type float without
    overflow"); not a tensor, a string, None, nan, inf or an int too large for a float."""
    if ok:
        assert torch.isfinite(call(clora_linear, _bad(scaling=scaling))).all()
    else:
        with pytest.raises(ValueError, match="scaling must be a finite real number"):
            call(clora_linear, _bad(scaling=scaling))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_x_takes_a_scaling_beyond_its_own_range(seed, dtype):
    """A 16-bit GEMM's alpha is a float32: scaling 1e5 (beyond float16's 65504) runs, 1e39 does not;
    and a NumPy float32 scaling with float64 x raises no overflow warning from the range test."""
    inp = make_inputs(4, 24, 40, 4, scaling=1e5)
    inp["lora_B"] *= 1e-5                                       # s·lora_B of order 1: a finite output
    inp = cast_inputs(inp, dtype, requires_grad=False)
    assert torch.isfinite(call(clora_linear, inp)).all()
    with pytest.raises(ValueError, match=r"float32 range of the GEMMs' alpha for torch.(b)?float16 x"):
        call(clora_linear, dict(inp, scaling=1e39))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(clora_linear, cast_inputs(make_inputs(4, 24, 40, 4, scaling=np.float32(0.5)), torch.float64))


def test_unknown_backend_and_env(monkeypatch):
    inp = _bad()
    with pytest.raises(ValueError, match="backend must be one of"):
        call(clora_linear, inp, backend="tpu")
    monkeypatch.setenv("CLORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="CLORA_BACKEND"):
        call(clora_linear, inp)


def test_explicit_unusable_backend_says_why(monkeypatch):
    inp = _bad()
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run this call: .*CUDA"):
        call(clora_linear, inp, backend="cuda")
    monkeypatch.setenv("CLORA_BACKEND", "cuda")   # the env var selects like the argument
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        call(clora_linear, inp)
    monkeypatch.setenv("CLORA_BACKEND", "torch")
    assert torch.isfinite(call(clora_linear, inp)).all()


def test_available_backends_reports_each():
    """Each backend's (usable, why) says what runs it or why it cannot, and a backend reported
    unusable, asked for by name, raises BackendUnavailableError with that same reason."""
    info = clora_kernels.available_backends()
    assert set(info) == {"torch", "triton", "cuda"}
    for name, (ok, why) in info.items():
        assert isinstance(ok, bool) and isinstance(why, str) and why, name
    assert info["torch"] == (True, "plain PyTorch ops; runs on every device")
    if not torch.cuda.is_available():
        assert info["cuda"][0] is False and ("no CUDA GPU" in info["cuda"][1]
                                            or "CPU-only build" in info["cuda"][1]), info["cuda"]
        if os.environ.get("TRITON_INTERPRET") == "1":   # set by conftest.py on a machine without a GPU
            assert info["triton"][0] is True and "under TRITON_INTERPRET=1" in info["triton"][1], info["triton"]
        else:
            assert info["triton"][0] is False and "no CUDA GPU" in info["triton"][1], info["triton"]
    inp = _bad()
    for name, (ok, why) in info.items():
        if not ok:
            with pytest.raises(BackendUnavailableError) as err:
                call(clora_linear, inp, backend=name)
            assert str(err.value) == f"backend {name!r} cannot run this call: {why}"


@pytest.mark.parametrize("m,k,n,plans", [(200, 24, 40, ("merge", "merge")), (120, 24, 40, ("merge", "eager")),
                                         (60, 24, 40, ("eager", "eager")), (120, 40, 24, ("eager", "merge"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_on_cpu_merges_where_it_pays(monkeypatch, seed, m, k, n, plans, dtype):
    """auto on CPU: the per-call merged weight where the cost model prefers it (the forward's x
    (M, K), dx's g (M, N); with t, from M > K(r + 4N)/(N + r)), the unmerged ops otherwise; every
    output and gradient against the float64 oracle and within 2x the eager torch backend's error."""
    from clora_kernels import reference
    from clora_kernels.backends import auto, torch_ref
    r = 5
    assert (auto.torch_plan(torch.empty(m, k), n, r, True), auto.torch_plan(torch.empty(m, n), k, r, True)) == plans
    ran = []

    def spy(x, *args):
        ran.append(x.shape[1])
        return reference.merged_gemm(x, *args)
    monkeypatch.setitem(torch_ref.PLANS, "merge", spy)
    check_backend("auto", dtype, m=m, k=k, n=n, r=r, hard=True)
    assert set(ran) == {width for width, plan in ((k, plans[0]), (n, plans[1])) if plan == "merge"}
    ran.clear()
    check_backend("torch", dtype, m=m, k=k, n=n, r=r)
    assert not ran                                  # an explicit backend="torch" is the unmerged reference


@pytest.mark.parametrize("dx", [False, True])
@pytest.mark.parametrize("w_transposed", [False, True])     # a Conv1D weight: the (K, N) storage's view
def test_torch_plans_in_both_orientations_and_layouts(seed, dx, w_transposed):
    """lora_gemm and merged_gemm, the forward's views (y = x·wᵀ) and dx's (y = g·w, dx=True), on a
    contiguous weight and on a transposed view, against float64; the merged weight keeps w's layout."""
    from clora_kernels.reference import lora_gemm, merged_gemm, merged_weight
    m, k, n, r, s = 37, 23, 29, 5, 0.7
    w = torch.randn(k, n).t() if w_transposed else torch.randn(n, k)       # (N, K)
    la, lb, reff = torch.randn(r, k), torch.randn(n, r), torch.randn(r, r)
    if dx:      # g (M, N); a = lora_B, b = lora_A, r = R_effᵀ (dx has no bias; a bias is still added)
        x, a, b, rr, bias = torch.randn(m, n), lb, la, reff.t(), torch.randn(k)
        want = x.double() @ (w.double() + s * lb.double() @ reff.double().t() @ la.double()) + bias.double()
    else:
        x, a, b, rr, bias = torch.randn(m, k), la.t(), lb.t(), reff, torch.randn(n)
        want = x.double() @ (w.double() + s * lb.double() @ reff.double().t() @ la.double()).t() + bias.double()
    w_eff = merged_weight(w, a, b, rr, s, dx)
    assert w_eff.shape == (n, k) and w_eff.stride() == w.stride()
    for plan in (lora_gemm, merged_gemm):
        y, t = plan(x, w, a, b, rr, bias, s, True, dx)
        assert rel_err(y, want) < 1e-5, plan.__name__
        assert rel_err(t, x.double() @ a.double()) < 1e-6, plan.__name__


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("reentrant,edit", [(False, False), (True, False), (False, True)])
def test_activation_checkpointing(seed, backend, reentrant, edit):
    """torch.utils.checkpoint: every gradient matches the oracle. With routing_delta changed in place
    between the forward and the backward (non-reentrant checkpoint raises nothing then, for plain
    torch ops either), every gradient is the recomputed forward's, at the new values: nothing the
    first forward computed (its R_eff) is mixed in."""
    from torch.utils.checkpoint import checkpoint
    inp = make_inputs(300, 24, 40, 5, hard=True)      # M=300: auto merges in the forward and in dx
    for name in GRAD_NAMES:
        inp[name].requires_grad_(True)
    y = checkpoint(lambda x: call(clora_linear, {**inp, "x": x}, backend=backend), inp["x"], use_reentrant=reentrant)
    if edit:
        with torch.no_grad():
            inp["routing_delta"].add_(0.5)
    g = torch.randn_like(y)
    y.backward(g)
    want, d = oracle(inp)
    want.backward(g)
    for name in GRAD_NAMES:
        assert rel_err(inp[name].grad, d[name].grad) < TOL[torch.float64], name


def test_auto_cost_model_thresholds():
    """Without t (inference) merging pays earlier than with it; never where M <= K (memory rule)."""
    from clora_kernels.backends.auto import merge_pays
    assert merge_pays(60, 24, 40, 5, need_t=False) and not merge_pays(60, 24, 40, 5, need_t=True)
    assert not merge_pays(57, 24, 40, 5, need_t=False)
    assert merge_pays(89, 24, 40, 5, need_t=True) and not merge_pays(88, 24, 40, 5, need_t=True)
    assert not any(merge_pays(m, 640, 64, 16, t) for m in range(1, 641) for t in (False, True))


def test_auto_never_merges_float16(seed):
    """float16 under auto: no per-call merged weight, whose W + s·ΔW overflows the float16 range where
    the unmerged plan's output is finite (a large scaling on small inputs); the output is finite and
    matches the oracle. The same shapes in float32 do merge, and bfloat16 (float32's range) may."""
    from clora_kernels.backends import auto
    from clora_kernels.reference import reference_formula
    m, k, n, r, s = 512, 64, 64, 8, 4096.0
    assert auto.torch_plan(torch.empty(m, k), n, r, False) == "merge"
    assert auto.torch_plan(torch.empty(m, k, dtype=torch.bfloat16), n, r, False) == "merge"
    assert auto.torch_plan(torch.empty(m, k, dtype=torch.float16), n, r, False) == "eager"
    inp = {"x": torch.randn(m, k, dtype=torch.float64) * 1e-3, "weight": torch.randn(n, k, dtype=torch.float64) / 8,
           "bias": torch.zeros(n, dtype=torch.float64), "lora_A": torch.randn(r, k, dtype=torch.float64),
           "lora_B": torch.randn(n, r, dtype=torch.float64), "routing_old": torch.eye(r, dtype=torch.float64),
           "routing_delta": torch.eye(r, dtype=torch.float64), "projection": None}
    want = reference_formula(*inp.values(), s)
    assert want.abs().max() < 2e3          # far inside float16's range; W_eff reaches ~1e5
    with torch.no_grad():
        y = clora_linear(*(v if v is None else v.half() for v in inp.values()), s, backend="auto")
    assert torch.isfinite(y).all() and rel_err(y, want) < 1e-2


def test_auto_falls_back_with_one_warning(monkeypatch, seed):
    """A backend that fails under auto is warned about once and skipped afterwards."""
    from clora_kernels import backends as reg
    from clora_kernels.backends import auto
    reg._load_all()

    class Broken:
        name = "triton"
        auto_devices = ("cpu",)       # so that auto asks it for these CPU tensors
        calls = 0

        def availability(self):
            return True, "test double"

        def not_supported_reasons(self, x, weight, rank, auto=False):
            return []

        def forward(self, *a, auto=False):
            Broken.calls += 1
            raise RuntimeError("simulated compile failure\nsecond line")
        dx = forward

    monkeypatch.setitem(reg._registry, "triton", Broken())
    monkeypatch.setattr(auto, "broken", {})
    inp = cast_inputs(make_inputs(3, 24, 40, 4), torch.float32, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="'triton' failed .*simulated compile failure"):
        y1 = call(clora_linear, inp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = call(clora_linear, inp)
    assert Broken.calls == 1 and torch.equal(y1, y2)
    assert clora_kernels.available_backends()["triton"][0] is False
    with pytest.raises(RuntimeError, match="simulated"):   # explicit request raises
        call(clora_linear, inp, backend="triton")



def test_plain_resolution(monkeypatch, seed):
    """auto.plain names the torch backend exactly where no kernel backend is tried (backend="torch";
    auto, after CLORA_BACKEND, on a device no kernel backend serves), and the forward then calls it
    without run's kernel path; a kernel backend that serves the device (or is named) sends the call
    through run, with its fallback."""
    from clora_kernels import backends as reg
    from clora_kernels.backends import auto
    reg._load_all()
    x = torch.randn(3, 24)
    monkeypatch.delenv("CLORA_BACKEND", raising=False)
    assert auto.plain("auto", x) == (reg.get("torch"), True)
    assert auto.plain("torch", x) == (reg.get("torch"), False)
    assert auto.plain("triton", x) is None and auto.plain("cuda", x) is None
    monkeypatch.setenv("CLORA_BACKEND", "torch")
    assert auto.plain("auto", x) == (reg.get("torch"), False)
    monkeypatch.setenv("CLORA_BACKEND", "triton")
    assert auto.plain("auto", x) is None
    monkeypatch.delenv("CLORA_BACKEND")

    def no_kernel_path(*args):
        raise AssertionError("run_kernels called where plain answers")
    monkeypatch.setattr(auto, "run_kernels", no_kernel_path)
    from clora_kernels.backends import ops
    monkeypatch.setattr(ops, "run_kernels", no_kernel_path)
    inp = cast_inputs(make_inputs(3, 24, 40, 4), torch.float32)
    call(clora_linear, inp).sum().backward()        # the eager forward and its dx, on CPU under auto
    with torch.no_grad():
        call(clora_linear, inp, backend="torch")

    class ServesCpu:             # a kernel backend that auto may give CPU tensors: plain steps aside
        name, auto_devices = "triton", ("cpu",)
    monkeypatch.setitem(reg._registry, "triton", ServesCpu())
    assert auto.plain("auto", x) is None and auto.plain("torch", x) == (reg.get("torch"), False)


# ---- registered ops ------------------------------------------------------------------------
@pytest.mark.parametrize("proj,need_t", [(False, True), (True, True), (False, False)])
def test_opcheck_linear_fwd(seed, proj, need_t):
    inp = cast_inputs(make_inputs(5, 24, 40, 4, hard=proj), torch.float32, requires_grad=need_t)
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["routing_old"],
            inp["routing_delta"], inp["projection"], 0.5, False, need_t, "torch")
    # test_aot_dispatch_dynamic differentiates the backward itself (double backward), which
    # these ops do not support; single backward under AOT is covered by the compile tests.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.clora.linear_fwd.default, args, test_utils=utils)
    g = torch.randn(5, 40)
    torch.library.opcheck(torch.ops.clora.linear_dx.default,
                          (g, inp["weight"], inp["lora_A"], inp["lora_B"], inp["routing_old"],
                           inp["routing_delta"], inp["projection"], 0.5, "torch"), test_utils=utils)


@pytest.mark.parametrize("through_old,trainable", [(False, None), (True, None), (False, ("lora_A", "bias"))])
def test_eager_path_equals_registered_op(seed, through_old, trainable):
    """clora_linear's eager path (an autograd.Function over the op's implementation, for host cost;
    it returns y alone and keeps t for its backward) and the registered op with its
    register_autograd (what torch.compile traces) give the same output and the same gradient for
    every input, also where t is skipped."""
    from clora_kernels.backends import ops
    base = make_inputs(6, 24, 40, 4, hard=True)
    g = torch.randn(6, 40, dtype=torch.float64)
    runs = []
    for eager, fn in ((True, ops._EagerLinear.apply), (False, torch.ops.clora.linear_fwd)):
        inp = cast_inputs(base, torch.float64, requires_grad=trainable is None)
        for name in trainable or ():
            inp[name].requires_grad_(True)
        need_t = inp["lora_B"].requires_grad or inp["routing_delta"].requires_grad
        out = fn(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["routing_old"],
                 inp["routing_delta"], inp["projection"], 0.7, through_old, need_t, "torch")
        y = out if eager else out[0]
        y.backward(g)
        runs.append((y, out, inp))
    (y0, _, i0), (y1, (_, t1), i1) = runs
    assert torch.equal(y0, y1) and t1.shape[1] == (4 if trainable is None else 0)
    for name in ("x", "bias", "lora_A", "lora_B", "routing_delta"):
        a, b = i0[name].grad, i1[name].grad
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert i0["lora_A"].grad is not None


def test_compile_traces_the_registered_op(seed):
    """Under torch.compile and torch.export clora_linear must reach the opaque registered op, never
    the eager path (whose backends launch Triton kernels that fake tensors cannot run)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    layer = clora_kernels.CLoRALinear(24, 40, rank=4, backend="torch")
    torch.compile(layer, fullgraph=True, backend=backend)(torch.randn(3, 24)).sum().backward()
    for strict in (True, False):      # torch.export, both tracers
        graphs.append(str(torch.export.export(layer, (torch.randn(3, 24),), strict=strict).graph))
    assert len(graphs) == 3 and all("clora.linear_fwd" in gr for gr in graphs), graphs


def test_compile_fullgraph_single_layer(seed):
    layer = clora_kernels.CLoRALinear(24, 40, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 24)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert rel_err(y, layer(x)) < 1e-6
    y.sum().backward()
    assert layer.routing_delta.grad is not None and torch.isfinite(layer.routing_delta.grad).all()


def test_non_symmetric_projection_gradient(seed):
    """A direct caller's projection need not be symmetric: routing_delta's gradient is
    s·Pᵀ·tᵀ·v (autograd through the formula agrees); P·tᵀ·v, right only for a symmetric P, errs by
    0.3-1.2 relative here."""
    inp = make_inputs(7, 24, 40, 5)
    inp["projection"] = torch.randn(5, 5, dtype=torch.float64)
    ref, leaves = oracle(inp)
    g = torch.randn_like(ref)
    ref.backward(g)
    d = cast_inputs(inp, torch.float64)
    call(clora_linear, d, backend="torch").backward(g)
    assert rel_err(d["routing_delta"].grad, leaves["routing_delta"].grad) < 1e-12
    assert rel_err(d["lora_A"].grad, leaves["lora_A"].grad) < 1e-12


@pytest.mark.parametrize("through_old", [False, True])
def test_double_backward_matches_the_formula(seed, through_old):
    """create_graph=True (a gradient penalty on x and on the adapter): second derivatives equal
    autograd's through the reference formula in float64 (the errors this catches measured 0.3-1.2
    relative)."""
    inp = make_inputs(6, 16, 12, 4, hard=True)

    def penalty(fn_out, leaves):
        grads = torch.autograd.grad(fn_out.square().sum(), [leaves[k] for k in ("x", "lora_A", "routing_delta")],
                                    create_graph=True)
        total = sum(gr.square().sum() for gr in grads)
        total.backward()
        return {k: leaves[k].grad for k in ("x", "lora_A", "lora_B", "routing_delta", "bias")}

    ref, leaves = oracle(inp, grad_through_old_route=through_old)
    want = penalty(ref, leaves)
    d = cast_inputs(inp, torch.float64)
    got = penalty(call(clora_linear, d, backend="torch", grad_through_old_route=through_old), d)
    for k in want:
        if want[k] is None:
            assert got[k] is None or float(got[k].abs().max()) == 0.0, k
        else:
            assert rel_err(got[k], want[k]) < 1e-10, k


@pytest.mark.parametrize("through_old", [False, True])
def test_double_backward_when_x_depends_on_the_adapter(seed, through_old):
    """The op applied to its own output (one layer used twice, with the same adapter) and to an x
    computed from lora_A, backward with create_graph=True: the first-order gradients are the
    oracle's, and so are the second-order ones (a gradient penalty). The double backward counted
    the paths through x's own graph twice (40-100 % off) when it differentiated in the saved
    tensors themselves."""
    inp = make_inputs(5, 9, 9, 3, hard=True)

    def twice(fn, d):       # the same operands, x = the first call's output, then lora_A enters x too
        first = fn(d)
        return fn(dict(d, x=first + d["lora_A"].sum()))

    def run(fn, d):
        y = twice(fn, d)
        names = ("x", "lora_A", "lora_B", "routing_delta")
        grads = torch.autograd.grad(y.square().sum(), [d[k] for k in names], create_graph=True)
        sum(gr.square().sum() for gr in grads).backward()
        return [g.detach() for g in grads], {k: d[k].grad for k in names}

    def ref_fn(d):
        return reference_formula(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["routing_old"],
                                 d["routing_delta"], d["projection"], d["scaling"], through_old)
    _, leaves = oracle(inp, grad_through_old_route=through_old)
    want_first, want = run(ref_fn, leaves)
    d = cast_inputs(inp, torch.float64)
    got_first, got = run(lambda e: call(clora_linear, e, backend="torch", grad_through_old_route=through_old), d)
    for w, g in zip(want_first, got_first):
        assert rel_err(g, w) < 1e-10
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-10, k


@pytest.mark.parametrize("through_old", [False, True])
def test_torch_func_transforms(seed, through_old):
    """torch.func.grad equals autograd (the old route's stop-gradient included) and vmap equals
    the batched call: under a transform the op runs as the plain formula (an autograd.Function
    without setup_context could not run there)."""
    from torch.func import grad, vmap
    inp = cast_inputs(make_inputs(5, 12, 10, 3, hard=True), torch.float64)
    names = ("lora_A", "lora_B", "routing_delta")

    def loss(params, x):
        d = dict(inp, x=x, **params)
        return call(clora_linear, d, grad_through_old_route=through_old, backend="torch").square().sum()
    got = grad(loss)({n: inp[n].detach() for n in names}, inp["x"].detach())
    call(clora_linear, inp, grad_through_old_route=through_old, backend="torch").square().sum().backward()
    for n in names:
        assert rel_err(got[n], inp[n].grad) < 1e-12, n
    xs = torch.randn(4, 5, 12, dtype=torch.float64)
    batched = vmap(lambda x: call(clora_linear, dict(inp, x=x)))(xs)
    assert rel_err(batched, call(clora_linear, dict(inp, x=xs))) < 1e-12


_DUAL = ("x", "weight", "bias", "lora_A", "lora_B", "routing_old", "routing_delta", "projection")


@pytest.mark.filterwarnings("ignore:a C-LoRA layer gives its base weight")     # (the weight requires grad here)
@pytest.mark.parametrize("through_old", [False, True])
def test_forward_mode_ad_is_the_backwards_transpose(seed, through_old):
    """Dual tensors (torch.autograd.forward_ad) run, and the tangent is the transpose of the layer's
    own backward: uᵀ (J v) = Σ (Jᵀ u)ᵀ v over every operand, in float64, where weight, routing_old
    and projection, which get no gradient, contribute none (the stop-gradient on the old route
    included). The module takes a dual input too."""
    import torch.autograd.forward_ad as fwAD
    inp = cast_inputs(make_inputs(6, 11, 9, 3, hard=True), torch.float64)
    tangents = {n: torch.randn_like(inp[n]) for n in _DUAL}
    with fwAD.dual_level():
        duals = dict(inp, **{n: fwAD.make_dual(inp[n].detach(), tangents[n]) for n in _DUAL})
        y, jv = fwAD.unpack_dual(call(clora_linear, duals, grad_through_old_route=through_old))
    for n in _DUAL:
        inp[n].requires_grad_(True)
    want = call(clora_linear, inp, grad_through_old_route=through_old, backend="torch")
    assert rel_err(y, want) < 1e-12
    u = torch.randn_like(want)
    want.backward(u)
    vjp = sum(float((inp[n].grad * tangents[n]).sum()) for n in _DUAL if inp[n].grad is not None)
    assert inp["weight"].grad is None and inp["routing_old"].grad is None and inp["projection"].grad is None
    assert abs(float((u * jv).sum()) - vjp) < 1e-10 * (1 + abs(vjp))
    layer = clora_kernels.CLoRALinear(11, 9, rank=3).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x, v = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    with fwAD.dual_level():
        y, jv = fwAD.unpack_dual(layer(fwAD.make_dual(x, v)))
    assert rel_err(y, layer(x)) < 1e-12 and rel_err(jv, layer(v) - layer.bias) < 1e-12


@pytest.mark.filterwarnings("ignore:a C-LoRA layer gives its base weight")     # (the weight requires grad here)
def test_frozen_operands_get_no_gradient_on_any_path(seed):
    """weight, routing_old and projection get no gradient (docs/design.md section 2) under torch.func
    and in a double backward as in the first-order backward (both run the plain formula)."""
    from torch.func import grad
    inp = cast_inputs(make_inputs(5, 8, 7, 3, hard=True), torch.float64)
    frozen = ("weight", "routing_old", "projection")

    def loss(params):
        return call(clora_linear, dict(inp, **params)).square().sum()
    got = grad(loss)({n: inp[n].detach() for n in frozen})
    assert all(float(got[n].abs().max()) == 0.0 for n in frozen)
    for n in frozen:
        inp[n].requires_grad_(True)
    y = call(clora_linear, inp)
    gx, = torch.autograd.grad(y.square().sum(), inp["x"], create_graph=True)
    gx.square().sum().backward()
    assert all(inp[n].grad is None for n in frozen) and float(inp["lora_A"].grad.abs().max()) > 0


@pytest.mark.parametrize("m", [9, 700])     # 700: the CPU plan merges (merged_weight)
@pytest.mark.parametrize("hard", [False, True])
def test_scaling_zero_keeps_non_finite_values_as_the_oracle_does(seed, m, hard):
    """At scaling 0 BLAS skips addmm's product (alpha = 0), so a NaN / Inf in the adapter vanished from
    the torch backend's output and gradients, while the float64 oracle, the Triton kernels and PEFT
    keep it (0 · NaN = NaN): the same NaN pattern as the oracle's, on every CPU plan."""
    inp = make_inputs(m, 24, 40, 5, hard=hard, scaling=0.0)
    inp["lora_B"][3, 1] = float("nan")
    inp["lora_A"][0, 2] = float("inf")
    y_ref, d = oracle(inp)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    for backend in ("torch", "auto"):
        for dtype in (torch.float32, torch.float64):
            got = cast_inputs(inp, dtype)
            y = call(clora_linear, got, backend=backend)
            y.backward(g.to(dtype))
            assert torch.equal(y.isnan(), y_ref.isnan()) and bool(y_ref.isnan().any()), (backend, dtype)
            for name, ref in grads_of(d).items():
                assert torch.equal(got[name].grad.isfinite(), ref.isfinite()), (backend, dtype, name)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_a_vmapped_backward_never_reaches_a_kernel(monkeypatch, backend):
    """is_grads_batched vmaps the backward: a kernel's dx fails on the batched g, and under auto the kernel
    backend was then dropped for the rest of the process (auto's dx resolves again, past the check the
    forward's own backend had). A stand-in kernel backend on the CPU that fails on a batched g, as the
    triton kernels do (a review of this change)."""
    import torch._C._functorch as functorch
    from clora_kernels import CLoRALinear, backends
    from clora_kernels.backends import auto, torch_ref

    class Kernel(torch_ref.TorchBackend):
        name, auto_devices = "triton", ("cpu",)

        def dx(self, g, *args, **kwargs):
            if functorch.is_legacy_batchedtensor(g) or functorch.is_batchedtensor(g):
                raise RuntimeError("a kernel cannot take a batched g")
            return super().dx(g, *args, **kwargs)
    monkeypatch.setitem(backends._registry, "triton", Kernel())
    monkeypatch.setattr(auto, "broken", {})
    layer = CLoRALinear(6, 4, rank=2, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6, requires_grad=True)
    gs = torch.eye(12).reshape(12, 3, 4)
    got = torch.autograd.grad(layer(x), x, gs, is_grads_batched=True)[0]
    assert torch.allclose(got, gs @ (layer.weight + layer.delta_weight()).detach(), atol=1e-5)
    assert auto.broken == {}
