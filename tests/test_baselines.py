"""The baselines (clora_kernels/baselines.py). per_task_lora: the sum of its branches, the engine's op
with a block-diagonal routing matrix (float64 oracle), frozen earlier branches, its run in the
harness. dual_lora: the orthogonal adapter keeps earlier tasks' outputs (exactly inside the bases,
within the energy bound outside), the residual adapter trains in the task's own bases and leaves
earlier tasks' outputs alone, its run."""
import pytest
import torch
from torch import nn

import clora_kernels as ck
from clora_kernels import continual as cc
from clora_kernels.baselines import (DualLoRALinear, PerTaskLoRALinear, inject_dual_lora, inject_per_task_lora,
                                    next_task, observe_inputs, observe_new_inputs, per_task_layers, task_branches)
from helpers import oracle, rel_err


def _three_branches(seed):
    torch.manual_seed(seed)
    layer = PerTaskLoRALinear(nn.Linear(13, 11).double(), rank=3, alpha=5)
    for _ in range(2):
        with torch.no_grad():
            layer.lora_B[-1].normal_()
        layer.next_task()
    with torch.no_grad():
        layer.lora_B[-1].normal_()
    return layer


def test_per_task_lora_is_the_sum_of_its_branches_and_the_engine_op(seed):
    layer = _three_branches(seed)
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    s = 5 / 3
    by_hand = layer.base(x) + sum(s * x @ a.t() @ b.t() for a, b in zip(layer.lora_A, layer.lora_B))
    assert rel_err(y, by_hand) < 1e-12
    a, b, r_old, r_delta = layer.stacked()
    ref, d = oracle(dict(x=x, weight=layer.base.weight, bias=layer.base.bias, lora_A=a, lora_B=b, routing_old=r_old,
                         routing_delta=r_delta, projection=None, scaling=s))
    engine = ck.clora_linear(x, layer.base.weight, layer.base.bias, a, b, r_old, r_delta, None, s, backend="torch")
    assert rel_err(engine, ref) < 1e-12 and rel_err(y, ref) < 1e-12
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (y * g).sum().backward()
    r = layer.rank
    assert rel_err(layer.lora_A[-1].grad, d["lora_A"].grad[-r:]) < 1e-12      # the newest branch: the new route
    assert rel_err(layer.lora_B[-1].grad, d["lora_B"].grad[:, -r:]) < 1e-12
    assert d["lora_A"].grad[:-r].abs().max() == 0                             # frozen branches: the old route
    assert all(p.grad is None for p in list(layer.lora_A[:-1]) + list(layer.lora_B[:-1]))


def test_next_task_keeps_the_output_and_grows_the_adapter(seed):
    model = inject_per_task_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], rank=2)
    with torch.no_grad():
        for _, m in per_task_layers(model):
            m.lora_B[0].normal_()
    x = torch.randn(5, 8)
    before = model(x)
    next_task(model)
    assert torch.equal(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A.1", "0.lora_B.1", "2.lora_A.1", "2.lora_B.1"]
    assert sum(m.adapter_numel() for _, m in per_task_layers(model)) == 2 * (2 * 8 + 8 * 2 + 2 * 8 + 4 * 2)


def test_a_given_task_takes_its_own_branches(seed):
    """task_branches(model, j): the branches of tasks 0..j alone, the model as it was when task j
    trained (task-IL, where the task id is given); outside the block every branch again."""
    layer = _three_branches(seed)
    x = torch.randn(7, 13, dtype=torch.float64)
    s = 5 / 3
    model = nn.Sequential(layer)
    for j in range(3):
        with task_branches(model, j):
            branches = zip(layer.lora_A[:j + 1], layer.lora_B[:j + 1])
            want = layer.base(x) + sum(s * x @ a.t() @ b.t() for a, b in branches)
            assert rel_err(model(x), want) < 1e-12
    assert layer.branches is None and rel_err(model(x), layer.base(x) + sum(
        s * x @ a.t() @ b.t() for a, b in zip(layer.lora_A, layer.lora_B))) < 1e-12


def test_per_task_lora_routes_by_the_task_in_task_il():
    """In task-IL the harness gives per_task_lora the task id: an old task is scored with its own
    branches (and its own head rows, which later tasks' masked loss leaves alone), so it keeps the
    accuracy it had (summing every branch cost it up to 0.04 on digits)."""
    args = cc.build_parser().parse_args(["--seeds", "0", "--epochs", "1", "--methods", "per_task_lora", "--setting",
                                         "task-il", "--no-progress"])
    acc = cc.run_experiment(args, progress=False)["per_task_lora"]["acc_matrix"]
    assert all(acc[i][j] == acc[j][j] for i in range(len(acc)) for j in range(i + 1)), acc


def test_per_task_lora_in_the_digits_harness():
    args = cc.build_parser().parse_args(["--seeds", "0", "--epochs", "1", "--methods", "per_task_lora", "seq_lora",
                                         "--no-progress"])
    res = cc.run_experiment(args, progress=False)
    assert [len(r) for r in res["per_task_lora"]["acc_matrix"]] == [1, 2, 3, 4, 5]
    branch = 8 * 64 + 128 * 8 + 8 * 128 + 128 * 8                # one rank-8 branch on fc1 and fc2
    assert res["per_task_lora"]["extra_floats"] == res["seq_lora"]["extra_floats"] + 4 * branch


def test_task_scaling_benchmark_runs_quick(tmp_path):
    """benchmarks/task_scaling.py at T = 1, 3: C-LoRA's stored adapter stays the same size while
    per_task_lora's and dual_lora's grow with the tasks (counts, not timings: those are the
    benchmark's)."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "task_scaling.py"
    spec = importlib.util.spec_from_file_location("task_scaling", path)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    assert ts.main(["--quick", "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    c, p = data["results"]["clora_freeze"], data["results"]["per_task_lora"]
    assert [r["tasks"] for r in c] == [1, 3] == [r["tasks"] for r in p]
    assert c[0]["adapter_stored"] == c[1]["adapter_stored"] and c[0]["adapter_file_bytes"] == c[1]["adapter_file_bytes"]
    assert p[1]["adapter_stored"] == 3 * p[0]["adapter_stored"] and p[1]["trainable"] == p[0]["trainable"]
    d = data["results"]["dual_lora"]          # its bases grow with the tasks (until they span the inputs)
    assert [r["tasks"] for r in d] == [1, 3] and d[1]["adapter_stored"] > d[0]["adapter_stored"]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _train(model, x, steps=30, lr=1e-2):
    """Adam on a random regression target: every trainable tensor moves."""
    target = torch.randn(x.shape[0], model(x).shape[-1], dtype=x.dtype)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - target) ** 2).mean().backward()
        opt.step()


def _orthogonal_out(layer, x):
    return layer.scaling * (x @ layer.orthogonal_A().t()) @ layer.lora_B.t()


def _boundary(model, x):
    with torch.no_grad(), observe_inputs(model):
        model(x)
    next_task(model)


def test_dual_lora_orthogonal_adapter_keeps_earlier_inputs_exactly_in_their_span(seed):
    """Task 0's inputs span 5 of 12 dimensions, so the bases hold them exactly (energy 1): two
    later tasks of Adam on full-dimensional inputs leave their orthogonal outputs unchanged to
    float64 rounding, while the adapter does move on the new inputs."""
    torch.manual_seed(seed)
    layer = DualLoRALinear(nn.Linear(12, 10).double(), rank=3, alpha=6, energy=1.0)
    x0 = torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 12, dtype=torch.float64)
    _begin(layer, x0)
    _train(layer, x0)
    _boundary(layer, x0)
    assert layer.bases.shape == (12, 5)
    kept = _orthogonal_out(layer, x0).detach()
    assert kept.abs().max() > 1e-2                      # task 0 trained it
    x1 = torch.randn(40, 12, dtype=torch.float64)
    new_before = _orthogonal_out(layer, x1).detach()
    for _ in range(2):
        _begin(layer, x1)
        _train(layer, x1)
        _boundary(layer, x1)
    assert rel_err(_orthogonal_out(layer, x0), kept) < 1e-10
    assert rel_err(_orthogonal_out(layer, x1), new_before) > 1e-2     # plastic where task 0 was not


def test_dual_lora_orthogonal_drift_is_within_the_energy_bound(seed):
    """Full-dimensional task-0 inputs with energy 0.9: the bases keep >= 90 % of their energy, and
    the orthogonal output's change on them is at most s·‖B ΔA‖₂·‖(I − M Mᵀ) X‖_F, with
    ‖(I − M Mᵀ) X‖_F² <= 0.1·‖X‖_F² (GPM's threshold)."""
    torch.manual_seed(seed)
    layer = DualLoRALinear(nn.Linear(16, 9).double(), rank=4, energy=0.9)
    x0 = torch.randn(60, 16, dtype=torch.float64) * torch.linspace(3, 0.1, 16, dtype=torch.float64)
    _begin(layer, x0)
    _train(layer, x0)
    _boundary(layer, x0)
    m = layer.bases
    outside = x0 - x0 @ m @ m.t()
    assert outside.square().sum() <= 0.1 * x0.square().sum() * (1 + 1e-9)
    a_before, kept = layer.orthogonal_A().detach().clone(), _orthogonal_out(layer, x0).detach()
    _train(layer, torch.randn(60, 16, dtype=torch.float64))
    delta = layer.scaling * layer.lora_B @ (layer.orthogonal_A() - a_before)
    drift = (_orthogonal_out(layer, x0) - kept).norm()
    assert drift <= torch.linalg.matrix_norm(delta, 2) * outside.norm() * (1 + 1e-9)
    assert drift > 0                                    # the bound is not met by standing still


def _begin(model, x):
    with torch.no_grad(), observe_new_inputs(model):
        model(x)


def test_dual_lora_residual_adapter_trains_in_the_tasks_own_bases(seed):
    """begin_task takes M_t, the task's input directions outside the earlier tasks' bases; the
    residual adapter's new directions stay inside it, the dynamic memory g(x) = ‖x[M, M_t]‖²/‖x‖²
    scales it, and B_o and B_r freeze after the first task. So a later task leaves the whole layer's
    output on an earlier task's inputs unchanged (DualLoRA's "without interaction across tasks";
    exact here, where those inputs lie in their bases), while it adapts to its own; next_task's
    folds change no output. (The residual adapter acted in the earlier tasks' bases: a later task
    rewrote their outputs, and dual_lora forgot as much as sequential LoRA.)"""
    torch.manual_seed(seed)
    model = inject_dual_lora(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)).double(), ["0"], rank=2,
                             energy=1.0)
    layer = model[0]
    trainable = lambda: [n for n, p in model.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable() == ["0.lora_A", "0.lora_B", "0.res_A", "0.res_B"]
    x0 = torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 10, dtype=torch.float64)
    _begin(model, x0)
    assert layer.task_bases.shape == (10, 4) and layer.bases.shape == (10, 0)
    assert rel_err(layer.gate(x0), torch.ones(30, 1, dtype=torch.float64)) < 1e-12
    _train(model, x0)
    res0 = layer.residual(x0).detach()
    assert res0.abs().max() > 1e-3                       # the residual adapter trained on the first task
    before = layer(x0).detach()
    _boundary(model, x0)
    assert trainable() == ["0.lora_A", "0.res_A"] and layer.task_bases.shape == (10, 0)
    assert rel_err(layer(x0), before) < 1e-12
    x1 = torch.randn(30, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    _begin(model, x1)
    m, mt = layer.bases, layer.task_bases
    assert mt.shape == (10, 3) and (m.t() @ mt).abs().max() < 1e-12
    out = torch.randn(5, 10, dtype=torch.float64)
    out = out - (out @ m) @ m.t() - (out @ mt) @ mt.t()
    assert layer.gate(out).abs().max() < 1e-12
    new_before = layer(x1).detach()
    _train(model, x1)
    assert rel_err(layer.residual(x0), res0) < 1e-10 and rel_err(layer(x0), before) < 1e-10
    assert rel_err(layer(x1), new_before) > 1e-2         # plastic on the new task's inputs
    after = layer(x1).detach()
    _boundary(model, x1)
    assert rel_err(layer(x1), after) < 1e-12 and rel_err(layer(x0), before) < 1e-10


def test_dual_lora_refusals():
    with pytest.raises(ValueError, match="no inputs were observed"):
        DualLoRALinear(nn.Linear(4, 4), rank=2).next_task()
    with pytest.raises(ValueError, match="no inputs were observed for the task that begins"):
        DualLoRALinear(nn.Linear(4, 4), rank=2).begin_task()
    layer = DualLoRALinear(nn.Linear(4, 4), rank=2)     # trained without begin_task: its residual did not train
    with torch.no_grad(), observe_inputs(layer):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="begin_task did not run before the task trained"):
        layer.next_task()
    with pytest.raises(ValueError, match="no 'task_bases'"):
        layer = DualLoRALinear(nn.Linear(4, 4), rank=2)
        layer.load_task_state({k: v for k, v in layer.task_state().items() if k != "task_bases"})
    with pytest.raises(ValueError, match="energy"):
        DualLoRALinear(nn.Linear(4, 4), rank=2, energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        DualLoRALinear(nn.Linear(4, 4), rank=5)
    with pytest.raises(ValueError, match="inject_dual_lora: no nn.Linear"):
        inject_dual_lora(nn.Sequential(nn.Linear(4, 4)), ["nope"])


def test_dual_lora_in_the_digits_harness():
    args = cc.build_parser().parse_args(["--seeds", "0", "--epochs", "1", "--methods", "dual_lora", "seq_lora",
                                         "--no-progress"])
    res = cc.run_experiment(args, progress=False)
    assert [len(r) for r in res["dual_lora"]["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert res["dual_lora"]["extra_floats"] > res["seq_lora"]["extra_floats"]     # the bases and folded factors


def test_dual_lora_run_checkpoint_resumes_the_same_layer(tmp_path, seed):
    """images._Checkpoint (the --out/--resume files) keeps a dual_lora layer whole: both adapters,
    the folded factors, the grown bases and which factors train."""
    from clora_kernels.images import _Checkpoint
    torch.manual_seed(seed)
    make = lambda: inject_dual_lora(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), ["0"], rank=2)  # noqa: E731
    model = make()
    fresh = make()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "bases" not in k}, strict=False)
    for _ in range(2):
        x = torch.randn(20, 10)
        _begin(model, x)
        _train(model, x, steps=5)
        _boundary(model, x)
    x = torch.randn(20, 10)
    _begin(model, x)
    _train(model, x, steps=5)
    ckpt = _Checkpoint(str(tmp_path / "run"))
    gen = torch.Generator().manual_seed(0)
    ckpt.save(model, 1, [[0.5], [0.5, 0.5]], None, gen)
    ckpt.restore(fresh, ckpt.load(), None, torch.Generator())
    x = torch.randn(6, 10)
    assert torch.equal(fresh(x), model(x)) and fresh[0].bases.shape == model[0].bases.shape
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]


def test_a_sequence_trained_in_two_calls_equals_one_call(seed):
    """train_sequence's `start` with a first call that ended at its last task: that call ran no boundary, so
    per_task_lora's tasks 1 and 2 shared a branch (task 1's 'frozen' branch was trained again). The second
    call runs the boundary it finds pending: the matrices and branches equal one call's."""
    _, tasks = cc.digits_splits()
    tasks = tasks[:4]
    kw = dict(setting="task-il", epochs=1, classifier="linear", clora=False, progress=False,
              **cc.method_hooks("per_task_lora"))
    runs = []
    for split in (False, True):
        torch.manual_seed(seed)
        model = cc.build_method(cc.MLP(), "per_task_lora", 4, 0.9, False, 0.99)[0]
        gen = torch.Generator().manual_seed(0)
        if split:
            acc = cc.train_sequence(model, tasks[:2], gen=gen, **kw)
            acc = cc.train_sequence(model, tasks, start=2, acc=acc, gen=gen, **kw)
        else:
            acc = cc.train_sequence(model, tasks, gen=gen, **kw)
        runs.append((acc, [len(m.lora_A) for _, m in per_task_layers(model)]))
    assert runs[0] == runs[1] and runs[1][1] == [4, 4]
    again = cc.train_sequence(model, tasks, start=4, acc=runs[1][0], **kw)     # a finished run resumed: nothing
    assert again == runs[1][0] and [len(m.lora_A) for _, m in per_task_layers(model)] == [4, 4]
    with pytest.raises(ValueError, match=r"set up to train task 3"):
        cc.train_sequence(model, tasks, start=1, acc=runs[1][0], **kw)
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 4\)"):
        with task_branches(model, 4):
            pass


def test_a_refused_dual_lora_boundary_changes_no_layer(seed):
    model = inject_dual_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], rank=2)
    x = torch.randn(32, 8)
    with torch.no_grad(), observe_new_inputs(model):
        model(x)
    with torch.no_grad(), observe_inputs(model):
        model[0](x)                     # the pass reached one layer of two
    with pytest.raises(ValueError, match=r"no inputs were observed .* \(layer '2'; no layer was changed\)"):
        next_task(model)
    assert [m.tasks_done for m in (model[0], model[2])] == [0, 0]
    with torch.no_grad(), observe_inputs(model):
        model(x)
    next_task(model)                    # the retry the message asks for
    assert [m.tasks_done for m in (model[0], model[2])] == [1, 1]


# ---- cases a review of the baselines as drop-in layers found (each fails without its fix) --------------
def test_dual_lora_gate_does_not_overflow_in_half(seed):
    """‖x‖² of an ordinary float16 row (K = 64, |x| ~ 40: about 1e5) overflows 65504: the gate, and
    the layer, gave NaN where nn.Linear does not. It is computed in float32 and returned in x's dtype."""
    layer = DualLoRALinear(nn.Linear(64, 16), rank=4, energy=0.9)
    x = 40 * torch.randn(8, 64)
    with torch.no_grad(), observe_new_inputs(layer):
        layer(x)
    with torch.no_grad():
        layer.res_B.normal_()
        want = layer(x)
        half = layer.half()
        y = half(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel_err(y.float(), want) < 1e-2 and half.gate(x.half()).dtype == torch.float16


def test_baseline_boundaries_under_inference_mode(seed):
    """A task boundary called under torch.inference_mode (a validation loop's hook) made the new branch,
    or DualLoRA's bases, inference tensors: per_task_lora's new branch then got no gradient, silently,
    and dual_lora's next backward failed. They run outside it, as CLoRALinear's lifecycle does."""
    x = torch.randn(20, 8)
    model = inject_per_task_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0"], rank=2)
    with torch.inference_mode():
        next_task(model)
    model(x).sum().backward()
    assert model[0].lora_A[1].grad is not None and model[0].lora_A[1].grad.abs().sum() == 0    # (lora_B = 0)
    assert model[0].lora_B[1].grad.abs().sum() > 0
    model = inject_dual_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], rank=2)
    with torch.inference_mode(), observe_new_inputs(model):
        model(x)
    model(x).sum().backward()
    with torch.inference_mode():
        with observe_inputs(model):
            model(x)
        next_task(model)
    assert not model[0].bases.is_inference() and model[0].bases.shape[1] > 0
    with torch.no_grad(), observe_new_inputs(model):
        model(x)
    model.zero_grad()
    model(x).sum().backward()
    assert model[0].lora_A.grad is not None     # (the backward failed: inference tensors saved for it)
    with observe_inputs(model):     # a pass mixing inference_mode and no_grad batches sums them all (it failed)
        with torch.inference_mode():
            model(x[:12])
        with torch.no_grad():
            model(x[12:])
    assert torch.allclose(model[0]._gram, x.double().t() @ x.double())


def test_dual_lora_state_dict_loads_into_a_fresh_model(seed):
    """The bases grow from (K, 0): a state_dict after a task met a size mismatch in a fresh model, and
    the task count (which B factors train) was no part of it. Both load now."""
    def make():
        torch.manual_seed(1)
        return inject_dual_lora(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), ["0"], rank=2, energy=0.9)
    model, x = make(), torch.randn(20, 10)
    _begin(model, x)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].res_B.normal_()
    _boundary(model, x)
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x)) and fresh[0].tasks_done == 1
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["0.lora_A", "0.res_A"]
    with pytest.raises(RuntimeError, match="size mismatch for 0.bases"):
        make().load_state_dict({**model.state_dict(), "0.bases": torch.zeros(7, 2)})
    # the task state is a tensor (a review: a dict failed safetensors), and a state_dict of an earlier
    # version, which has none, loads strictly as it did
    from safetensors.torch import load, save
    again = make()
    again.load_state_dict(load(save(model.state_dict())))
    assert again[0].tasks_done == 1 and torch.equal(again(x), model(x))
    older = {k: v for k, v in make().state_dict().items() if not k.endswith("_extra_state")}
    make().load_state_dict(older)


def test_baseline_injection_second_call_refusals_and_conv1d(seed):
    """A second injection froze the first one's adapters (and 'all-linear' wrapped the baselines' own
    base layers); a refused injection left the layers built before it frozen and did not name the
    layer; a transformers Conv1D among the targets was skipped silently (inject_clora adapts it)."""
    transformers = pytest.importorskip("transformers")
    for inject in (inject_per_task_lora, inject_dual_lora):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
        inject(model, ["0"], rank=2)
        inject(model, ["2"], rank=2)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(n.startswith("0.lora_A") for n in trainable) and any(n.startswith("2.lora_A") for n in trainable)
        with pytest.raises(ValueError, match=r"holds baseline layers already \(\['0', '2'\]\)"):
            inject(model, ["0.base", "2.base"], rank=2)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        with pytest.raises(ValueError, match=r"layer '2': rank must be an int in \[1, 2\], got 4; the model was not changed"):
            inject(model, ["0", "2"], rank=4)
        assert all(p.requires_grad for p in model.parameters())
        model = nn.Sequential(transformers.pytorch_utils.Conv1D(16, 8), nn.ReLU(), nn.Linear(16, 2))
        with pytest.raises(ValueError, match=r"plain nn.Linear layers only.*\('0', 'Conv1D'\)"):
            inject(model, ["0", "2"], rank=2)
        assert all(p.requires_grad for p in model.parameters())


def test_dual_lora_merged_is_a_copy(seed):
    """merged(), "an inference copy", kept the live layer: its residual branch moved when the layer
    trained on, and its parameters were the layer's trainable factors."""
    model = inject_dual_lora(nn.Sequential(nn.Linear(10, 8)), ["0"], rank=2, energy=0.9)
    x = torch.randn(20, 10)
    _begin(model, x)
    with torch.no_grad():
        model[0].res_B.normal_()
    merged = model[0].merged()
    before = merged(x).detach()
    assert rel_err(before, model[0](x)) < 1e-6
    _train(model, x, steps=5)
    assert torch.equal(merged(x), before) and rel_err(model[0](x), before) > 1e-3
    assert not any(p.requires_grad for p in merged.parameters())


# ---- cases a helper's attack on the baselines' API found (2026-12-07; each fails without its fix) -----------
def _two_dual_layers(seed=0):
    torch.manual_seed(seed)
    return inject_dual_lora(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), ["0", "2"], rank=2)


def test_dual_lora_non_finite_inputs_change_no_layer(seed):
    """A diverged layer fed NaN to the next: next_task's eigendecomposition failed there after the first
    layer had moved on (tasks_done [1, 0], a retry moved it twice), and a begin left begun [True, False].
    Both are refused before any layer changes, naming the cause."""
    model, x = _two_dual_layers(), torch.randn(16, 8)
    _begin(model, x)
    with torch.no_grad():
        model[0].lora_B.fill_(float("nan"))
    with torch.no_grad(), observe_inputs(model):
        model(x)
    with pytest.raises(ValueError, match=r"next_task: the inputs observed for the task hold NaN or Inf .* "
                                         r"\(layer '2'; no layer was changed\)"):
        next_task(model)
    assert [m.tasks_done for m in (model[0], model[2])] == [0, 0]
    model = _two_dual_layers()
    with torch.no_grad():
        model[0].lora_A.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"begin_task: the inputs observed .* NaN or Inf .*no layer was changed"):
        _begin(model, x)
    assert [m.begun for m in (model[0], model[2])] == [False, False]


def test_dual_lora_a_second_begin_is_refused_before_its_pass(seed):
    """Task B began while task A had not ended: its bases replaced A's and re-projected A's trained residual
    delta, moving A's outputs silently. Refused, before the pass, with what to do."""
    model, x = _two_dual_layers(), torch.randn(16, 8)
    _begin(model, x)
    _train(model, x, steps=5)
    before, bases = model(x).detach(), model[0].task_bases.clone()
    with pytest.raises(ValueError, match=r"the task that began has not ended; .*observe_inputs.*next_task"):
        _begin(model, torch.randn(16, 8))
    assert torch.equal(model(x), before) and torch.equal(model[0].task_bases, bases) and model[0]._gram is None
    with pytest.raises(ValueError, match="the task that began has not ended"):
        model[0].begin_task()
    _boundary(model, x)
    _begin(model, torch.randn(16, 8))               # after the boundary, the next task begins
    assert model[0].begun and model[0].tasks_done == 1


def test_per_task_lora_state_dict_after_tasks_loads_into_a_fresh_model(seed):
    """A state saved after two tasks (three branches) met 'Unexpected key(s) 0.lora_A.1, ...' in a freshly
    injected model, and a non-strict load dropped the later branches (another output). The layer takes the
    saved branch count, in both directions, the newest branch training."""
    from safetensors.torch import load, save

    def make():
        torch.manual_seed(1)
        return inject_per_task_lora(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], rank=2)
    model, x = make(), torch.randn(20, 10)
    for _ in range(2):
        _train(model, x, steps=3)
        next_task(model)
    _train(model, x, steps=3)
    for state in (model.state_dict(), load(save(model.state_dict()))):
        fresh = make()
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), model(x)) and len(fresh[0].lora_A) == 3
        assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
            "0.lora_A.2", "0.lora_B.2", "2.lora_A.2", "2.lora_B.2"]
    first = make().state_dict()
    model.load_state_dict(first)                     # back to one branch
    assert torch.equal(model(x), make()(x)) and len(model[2].lora_B) == 1 and model[2].lora_B[0].requires_grad


def test_dual_lora_merged_runs_without_the_callers_autocast(seed):
    """merged() inside torch.autocast built the merged weight in bfloat16 (off by 0.027, outputs 1e-2 off);
    the lifecycle methods already ran without autocast."""
    model, x = inject_dual_lora(nn.Sequential(nn.Linear(10, 8)), ["0"], rank=2, energy=0.9), torch.randn(20, 10)
    _begin(model, x)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[0].res_B.normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = model[0].merged()
    assert merged.linear.weight.dtype == torch.float32 and rel_err(merged(x), model[0](x)) < 1e-6


def test_baseline_arguments_are_checked_by_name():
    """alpha=inf gave NaN on the first forward and alpha='4' / True were taken; rank=2.0 / True / '2' / None
    and energy='0.9' / None failed in torch.empty or a comparison, without naming the argument; energy=True
    was taken as 1.0."""
    for layer in (PerTaskLoRALinear, DualLoRALinear):
        for alpha in (float("inf"), float("nan"), "4", True):
            with pytest.raises(ValueError, match=r"alpha must be a finite number or None"):
                layer(nn.Linear(4, 4), rank=2, alpha=alpha)
        for rank in (2.0, True, "2", None):
            with pytest.raises(ValueError, match=r"rank must be an int in \[1, 4\], got"):
                layer(nn.Linear(4, 4), rank=rank)
    for energy in ("0.9", None, True):
        with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got"):
            DualLoRALinear(nn.Linear(4, 4), rank=2, energy=energy)


def test_dual_lora_gate_is_scale_free(seed):
    """‖x‖² of a float32 row of 1e19s (K = 16) overflowed: the gate was inf / inf = NaN and so the output,
    where nn.Linear is finite; rows of 1e-20s underflowed to a wrong share (0.11 for 0.61)."""
    layer, x = DualLoRALinear(nn.Linear(16, 4), rank=2, energy=0.9), torch.randn(12, 16)
    with torch.no_grad(), observe_new_inputs(layer):
        layer(x[:4])
    with torch.no_grad():
        layer.res_B.normal_()
        want = layer.gate(x)
        for scale in (1e19, 1e-20, 1e-30):
            assert rel_err(layer.gate(scale * x), want) < 1e-5, scale
        assert torch.isfinite(layer(1e19 * x)).all()
        assert torch.equal(layer.gate(torch.zeros(2, 16)), torch.zeros(2, 1))


def test_dual_lora_a_layer_without_room_is_named(seed):
    """Once a layer's bases span its inputs (energy 1, full-rank inputs) neither adapter can move on the next
    task: the layer trained nothing, silently; the begin names it (protection='project' warns likewise)."""
    model = inject_dual_lora(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), ["0", "2"], rank=2,
                             energy=1.0)
    x = torch.randn(32, 4)
    _begin(model, x)
    with torch.no_grad(), observe_inputs(model):
        model[0](x)                 # layer 2's inputs here: a 2-dimensional subspace of its 8
        model[2](torch.randn(32, 2) @ torch.randn(2, 8))
    next_task(model)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) have no input direction left .*\['0'\]"):
        _begin(model, x)


def test_review_of_the_baseline_fixes(seed):
    """A review of this session's fixes: the gate's row scale was kept for autograd (3 more copies of x per
    layer in training; detached, the share does not depend on it); a per_task_lora load that changes the
    branch count drew from torch's generator (next_task's init) and made a frozen layer's newest branch
    train."""
    layer = DualLoRALinear(nn.Linear(64, 32), rank=4, energy=0.9)
    with torch.no_grad(), observe_new_inputs(layer):
        layer(torch.randn(100, 64))
    x = torch.randn(256, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        g = layer.gate(x)
    assert sum(saved) < 2 * x.numel() * 4, sum(saved)
    want, = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(want).all()

    def make():
        torch.manual_seed(1)
        return inject_per_task_lora(nn.Sequential(nn.Linear(10, 8)), ["0"], rank=2)
    trained = make()
    next_task(trained)
    next_task(trained)
    frozen = make().requires_grad_(False)
    state = torch.get_rng_state()
    frozen.load_state_dict(trained.state_dict())
    assert torch.equal(torch.get_rng_state(), state) and len(frozen[0].lora_A) == 3
    assert not any(p.requires_grad for p in frozen.parameters())
