"""per_task_lora (clora_kernels/baselines.py): the sum of its branches, the engine's op with a
block-diagonal routing matrix (float64 oracle), frozen earlier branches, and its run in the harness."""
import torch
from torch import nn

import clora_kernels as ck
from clora_kernels import continual as cc
from clora_kernels.baselines import PerTaskLoRALinear, inject_per_task_lora, next_task, per_task_layers
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


def test_per_task_lora_in_the_digits_harness():
    args = cc.build_parser().parse_args(["--seeds", "0", "--epochs", "1", "--methods", "per_task_lora", "seq_lora",
                                         "--no-progress"])
    res = cc.run_experiment(args, progress=False)
    assert [len(r) for r in res["per_task_lora"]["acc_matrix"]] == [1, 2, 3, 4, 5]
    branch = 8 * 64 + 128 * 8 + 8 * 128 + 128 * 8                # one rank-8 branch on fc1 and fc2
    assert res["per_task_lora"]["extra_floats"] == res["seq_lora"]["extra_floats"] + 4 * branch


def test_task_scaling_benchmark_runs_quick(tmp_path):
    """benchmarks/task_scaling.py at T = 1, 3: C-LoRA's stored adapter stays the same size while
    per_task_lora's grows with the tasks (counts, not timings: those are the benchmark's)."""
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
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
