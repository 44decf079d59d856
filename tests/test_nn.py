"""CLoRALinear, the task lifecycle, merge, persistence and the model helpers."""
import contextlib
import copy
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import clora_kernels as ck
from clora_kernels import CLoRALinear
from helpers import rel_err


def _trained(layer: CLoRALinear):
    """Give the adapter non-trivial values, as after some training."""
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.routing_delta.add_(0.3 * torch.randn_like(layer.routing_delta))
    return layer


def test_init_and_from_linear_exact(seed):
    lin = nn.Linear(37, 23)
    layer = CLoRALinear.from_linear(lin, rank=5)
    assert layer.weight is not None and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (5, 37) and layer.lora_B.shape == (23, 5)
    assert torch.equal(layer.routing_delta, torch.eye(5)) and torch.equal(layer.routing_old, torch.zeros(5, 5))
    assert torch.equal(layer.projection, torch.eye(5)) and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(37)   # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.3 * bound
    assert layer.scaling == 1.0 and layer.task_index == 0 and not layer.merged
    x = torch.randn(3, 4, 37)
    assert torch.equal(layer(x), lin(x))
    assert isinstance(layer, nn.Linear)


def test_constructor_and_alpha():
    layer = CLoRALinear(16, 8, rank=4, alpha=8, bias=False, dtype=torch.float64)
    assert layer.bias is None and layer.scaling == 2.0 and layer.weight.dtype == torch.float64
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "routing_delta"}
    r = repr(layer)
    for word in ("rank=4", "alpha=8", "scaling=2", "mode=soft", "task_index=0", "merged=False"):
        assert word in r, r


@pytest.mark.parametrize("kw,words", [
    (dict(rank=0), ["rank", "[1, 8]"]), (dict(rank=9), ["rank", "9"]), (dict(rank=-2), ["rank"]),
    (dict(rank=2.0), ["rank"]), (dict(alpha=float("nan")), ["alpha"]), (dict(alpha=float("inf")), ["alpha"]),
    (dict(alpha=10 ** 400), ["alpha"]),
    (dict(mode="medium"), ["mode", "medium"]), (dict(protect_energy=0.0), ["protect_energy"]),
    (dict(protect_energy=1.5), ["protect_energy"]), (dict(backend="tpu"), ["backend", "tpu"]),
])
def test_bad_config_clear_error(kw, words):
    args = dict(rank=4)
    args.update(kw)
    with pytest.raises(ValueError) as info:
        CLoRALinear(16, 8, **args)
    for w in words:
        assert w in str(info.value)


def test_bad_features_task_index_and_missing_operands_are_clear_errors():
    """A str feature count reached torch's '<' TypeError; `layer.task_index = -1` was kept, saved, and then
    refused by load_adapter ('two' broke state_dict()); an operand set to None failed the forward with
    AttributeError on NoneType."""
    for args in (("4", 4, 2), (4, True, 2), (0, 4, 1)):
        with pytest.raises(ValueError, match="_features must be an int >= 1"):
            CLoRALinear(*args)
    layer = CLoRALinear(6, 5, rank=2)
    for value in (-1, "2", 2.7, True):
        with pytest.raises(ValueError, match="task_index must be an int >= 0"):
            layer.task_index = value
    layer.task_index = np.int64(3)
    assert type(layer.task_index) is int and layer.task_index == 3
    for name in ("lora_A", "routing_delta", "weight"):
        layer = CLoRALinear(6, 5, rank=2)
        layer(torch.randn(2, 6))
        setattr(layer, name, None)
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got NoneType"):
            layer(torch.randn(2, 6))


def test_wrong_in_features_names_both_sizes():
    layer = CLoRALinear(16, 8, rank=4)
    with pytest.raises(ValueError, match=r"15 features.*in_features=16"):
        layer(torch.randn(2, 15))


def test_operands_revalidated_after_every_change(seed):
    """A layer checks its fixed operands once per call signature (host cost): every way they or the
    call change gets the same error a first call would (each case first passes one good call)."""
    def fresh():
        layer = CLoRALinear(16, 8, rank=4)
        layer(torch.randn(2, 16))
        return layer
    layer = fresh()
    layer.lora_A = nn.Parameter(torch.randn(5, 16))
    with pytest.raises(ValueError, match=r"lora_B must have shape .*\(8, 5\), got \(8, 4\)"):
        layer(torch.randn(2, 16))
    layer = fresh()
    layer.routing_old = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"routing_old must have shape \(rank, rank\) = \(4, 4\), got \(3, 3\)"):
        layer(torch.randn(2, 16))
    layer = fresh().double()
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but weight is torch.float64"):
        layer(torch.randn(2, 16))
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
    layer = fresh()
    with pytest.raises(ValueError, match="scaling must be a finite number"):    # refused when set
        layer.scaling = float("nan")
    layer.__dict__["scaling"] = float("nan")                                  # and if it got there anyway
    with pytest.raises(ValueError, match="scaling must be a finite real number"):
        layer(torch.randn(2, 16))
    layer = fresh()
    with pytest.raises(ValueError, match="backend must be one of"):     # refused when set (was: at the forward)
        layer.backend = "tpu"
    layer.__dict__["backend"] = "tpu"                                    # and if it got there anyway
    with pytest.raises(ValueError, match="backend must be one of"):
        layer(torch.randn(2, 16))
    layer = fresh()
    for bad in (8, 4.0):    # (reset_adapter failed later; an equal float was stored, and saved as r: 4.0)
        with pytest.raises(ValueError, match="rank is the adapter's size, 4, fixed"):
            layer.rank = bad
    layer.rank = 4
    layer.reset_adapter()
    layer = fresh()
    for bad, err, words in [(torch.randn(2, 15), ValueError, r"15 features.*in_features=16"),
                            (torch.ones(2, 16, dtype=torch.int64), TypeError, "floating-point"),
                            (torch.tensor(1.0), ValueError, "at least one dimension"),
                            ([[0.0] * 16], TypeError, "x must be a torch.Tensor")]:
        with pytest.raises(err, match=words):
            layer(bad)
    layer(torch.randn(3, 5, 16))          # leading dims are free
    # changes that go around __setattr__ and _apply: a .data cast, swapped tensors, a tensor scaling
    layer = fresh()
    layer.lora_A.data = layer.lora_A.data.double()
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but lora_A is torch.float64"):
        layer(torch.randn(2, 16))
    layer = fresh()
    layer.bias.data = layer.bias.data.double()
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but bias is torch.float64"):
        layer(torch.randn(2, 16))
    layer = fresh()
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\) = \(8,\), got \(1,\)"):
        torch.func.functional_call(layer, {"bias": torch.full((1,), 100.0)}, (torch.randn(2, 16),))
    layer = fresh()
    with pytest.raises(ValueError, match="scaling must be a finite number"):    # a tensor: refused when set
        layer.scaling = nn.Parameter(torch.tensor(layer.scaling))


def test_pruned_and_parametrized_layers_run(seed):
    """torch.nn.utils.prune and parametrize move a parameter out of _parameters: the forward still
    computes with what the attribute gives (the pruned or parametrized tensor)."""
    import torch.nn.utils.parametrize
    import torch.nn.utils.prune
    layer = CLoRALinear(8, 4, rank=2)
    x = torch.randn(3, 8)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    torch.nn.utils.parametrize.register_parametrization(layer, "lora_A", _Double())
    with torch.no_grad():
        layer.lora_B.normal_()
    want = ck.clora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.routing_old,
                           layer.routing_delta, None, layer.scaling)
    assert (layer.weight == 0).sum() == 16 and torch.equal(layer(x), want)


class _Double(nn.Module):
    def forward(self, a):
        return 2 * a


def test_routing_and_delta_weight_match_forward(seed):
    layer = _trained(CLoRALinear(24, 40, rank=6, alpha=12))
    with torch.no_grad():
        layer.routing_old.copy_(torch.randn(6, 6))
    x = torch.randn(5, 24)
    ref = nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)
    assert rel_err(layer(x), ref) < 1e-5
    assert torch.allclose(layer.routing(), layer.routing_old + layer.routing_delta)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_end_task_keeps_output_and_folds_routing(seed, mode):
    layer = _trained(CLoRALinear(24, 40, rank=6, mode=mode, protect_energy=0.8, dtype=torch.float64))
    x = torch.randn(7, 24, dtype=torch.float64)
    for task in range(3):
        before, r_eff = layer(x), layer.routing().clone()
        layer(x).sum().backward()
        layer.end_task()
        assert layer.task_index == task + 1
        assert torch.count_nonzero(layer.routing_delta) == 0
        assert layer.routing_delta.grad is None     # (the finished task's; an optimizer step would have applied it)
        assert torch.allclose(layer.routing_old, r_eff, atol=1e-12)
        assert rel_err(layer(x), before) < 1e-12
        p = layer.projection
        if mode == "soft":
            assert torch.equal(p, torch.eye(6, dtype=torch.float64))
        else:   # P = I - Q Qᵀ: symmetric, idempotent, rank r - k, kills Q = top singular vectors of R_old
            assert torch.allclose(p, p.t()) and torch.allclose(p @ p, p, atol=1e-10)
            u, sv, _ = torch.linalg.svd(layer.routing_old)
            k = 6 - round(float(torch.trace(p)))
            frac = (sv.square().cumsum(0) / sv.square().sum())
            assert frac[k - 1] >= 0.8 - 1e-9 and (k == 1 or frac[k - 2] < 0.8)
            assert torch.allclose(p @ u[:, :k], torch.zeros(6, k, dtype=torch.float64), atol=1e-10)
        with torch.no_grad():   # next task trains something new
            layer.routing_delta.normal_()
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))


def test_hard_mode_projection_is_identity_before_first_end_task():
    layer = CLoRALinear(16, 16, rank=4, mode="hard")
    assert torch.equal(layer.projection, torch.eye(4))
    assert float(layer.orthogonality_loss().detach()) == 0.0


def test_orthogonality_loss(seed):
    layer = CLoRALinear(16, 16, rank=4, dtype=torch.float64)
    assert float(layer.orthogonality_loss().detach()) == 0.0           # R_old = 0 on the first task
    with torch.no_grad():
        layer.routing_old.copy_(torch.randn(4, 4, dtype=torch.float64))
        layer.routing_delta.copy_(torch.randn(4, 4, dtype=torch.float64))
    ref = (layer.routing_old.t() @ layer.routing_delta).norm() ** 2
    assert torch.allclose(layer.orthogonality_loss(), ref)
    layer.orthogonality_loss().backward()
    assert layer.routing_delta.grad is not None
    hard = _trained(CLoRALinear(16, 16, rank=4, mode="hard", dtype=torch.float64))
    hard.end_task()
    with torch.no_grad():
        hard.routing_delta.normal_()
    assert float(hard.orthogonality_loss().detach()) < 1e-24              # 0 by construction


def test_merge_unmerge(seed):
    layer = _trained(CLoRALinear(24, 40, rank=6, alpha=15))     # scaling 2.5: a merge that drops it shows
    x = torch.randn(5, 24)
    w0, out = layer.weight.clone(), layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert rel_err(layer(x), out) < 1e-5
    layer.merge()                      # idempotent
    assert rel_err(layer(x), out) < 1e-5
    layer.unmerge()
    assert not layer.merged and rel_err(layer.weight, w0) < 1e-6 and rel_err(layer(x), out) < 1e-5


def test_state_dict_round_trip_keeps_task_state(seed):
    layer = _trained(CLoRALinear(24, 40, rank=6, mode="hard"))
    layer.end_task()
    layer.end_task()
    sd = layer.state_dict()
    assert {"lora_A", "lora_B", "routing_old", "routing_delta", "projection"} <= set(sd)
    fresh = CLoRALinear(24, 40, rank=6, mode="hard")
    fresh.load_state_dict(sd)
    assert fresh.task_index == 2 and torch.equal(fresh.projection, layer.projection)
    x = torch.randn(3, 24)
    assert torch.equal(fresh(x), layer(x))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.other = nn.Linear(16, 16)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for b in self.blocks:
            q = b.qkv(x)[..., :16]
            x = x + b.proj(b.norm(q)) + b.other(x)
        return self.head(x)


def test_inject_and_model_helpers(seed, tmp_path):
    base = _Net()
    net = copy.deepcopy(base)
    x = torch.randn(4, 16)
    before = net(x)
    out = ck.inject_clora(net, rank=4)
    assert out is net
    names = [n for n, m in net.named_modules() if isinstance(m, CLoRALinear)]
    assert names == ["blocks.0.qkv", "blocks.0.proj", "blocks.1.qkv", "blocks.1.proj"]
    assert torch.equal(net(x), before)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B", "routing_delta")}
    for _, m in ck.nn.clora_layers(net):
        _trained(m)
    y = net(x)
    ck.end_task(net)
    assert all(m.task_index == 1 for _, m in ck.nn.clora_layers(net))
    assert rel_err(net(x), y) < 1e-6
    for _, m in ck.nn.clora_layers(net):
        with torch.no_grad():
            m.routing_delta.normal_()
    loss = ck.orthogonality_loss(net)
    per_layer = [m.orthogonality_loss() for _, m in ck.nn.clora_layers(net)]
    assert len(per_layer) > 1 and loss.ndim == 0 and float(loss.detach()) > 0
    assert torch.allclose(loss, sum(per_layer))          # the model's penalty is the layers' sum
    y2 = net(x)
    ck.merge(net)
    assert rel_err(net(x), y2) < 1e-5
    ck.unmerge(net)
    assert rel_err(net(x), y2) < 1e-5

    path = tmp_path / "adapter.safetensors"
    ck.save_adapter(net, path)
    other = ck.inject_clora(copy.deepcopy(base), rank=4)
    assert rel_err(other(x), net(x)) > 1e-3
    ck.load_adapter(other, path)
    assert all(m.task_index == 1 for _, m in ck.nn.clora_layers(other))
    assert rel_err(other(x), y2) < 1e-6      # (y2: net's output before its base went through merge and unmerge,
    # whose fp32 rounding, with the adapter far larger than the base, passed 1e-6 on 0.1-0.3 % of seeds)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:   # adapter tensors only: no base weights
        assert all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "routing_old", "routing_delta", "projection")
                   for k in f.keys())


def test_load_adapter_mismatch_errors(tmp_path):
    path = tmp_path / "a.safetensors"
    ck.save_adapter(ck.inject_clora(_Net(), rank=4), path)
    with pytest.raises(ValueError, match=r"blocks.0.qkv.*lora_A.*\(4, 16\).*\(8, 16\)"):
        ck.load_adapter(ck.inject_clora(_Net(), rank=8), path)
    with pytest.raises(ValueError, match=r"no entry for .*blocks.0.other"):
        ck.load_adapter(ck.inject_clora(_Net(), target_modules=("qkv", "proj", "other"), rank=4), path)
    with pytest.raises(ValueError, match=r"holds layer\(s\) .*blocks.0.proj"):
        ck.load_adapter(ck.inject_clora(_Net(), target_modules=("qkv",), rank=4), path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    # a ValueError naming the file, with safetensors' own reason (the header is unreadable)
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file .*deserializing header"):
        ck.load_adapter(ck.inject_clora(_Net(), rank=4), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="a folder, not a safetensors file"):
        ck.load_adapter(ck.inject_clora(_Net(), rank=4), tmp_path)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(dict(load_file(str(path)), **{"blocks.0.qkv.lora_C": torch.zeros(2)}), str(tmp_path / "more.safetensors"),
              metadata=meta)
    with pytest.warns(UserWarning, match=r"holds 1 tensor\(s\) that no layer reads, not loaded: \['blocks.0.qkv.lora_C'\]"):
        ck.load_adapter(ck.inject_clora(_Net(), rank=4), tmp_path / "more.safetensors")


def test_helpers_refuse_models_without_clora():
    for fn in (ck.end_task, ck.orthogonality_loss, ck.merge, ck.unmerge):
        with pytest.raises(ValueError, match="no CLoRALinear"):
            fn(_Net())
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer matches"):
        ck.inject_clora(_Net(), target_modules=("nothing",))
    # no model, no path: the helper and its argument named (None met `.modules` or os.stat first)
    for fn in (ck.end_task, ck.orthogonality_loss, ck.merge, ck.unmerge, ck.merge_and_unload, ck.inject_clora,
               ck.trainable_parameters, ck.disable_adapter, ck.observe_task):
        with pytest.raises(TypeError, match=f"{fn.__name__}: model must be a torch.nn.Module, got NoneType"):
            with contextlib.ExitStack() as stack:
                out = fn(None)
                if hasattr(out, "__enter__"):
                    stack.enter_context(out)
    net = ck.inject_clora(_Net(), rank=4)
    for fn in (ck.save_adapter, ck.load_adapter):
        with pytest.raises(TypeError, match=f"{fn.__name__}: path must be a str or os.PathLike, got NoneType"):
            fn(net, None)


@pytest.mark.parametrize("tensor,protection", [("routing_delta", "freeze"), ("lora_A", "project"),
                                               ("lora_B", "freeze")])
def test_end_task_refuses_a_non_finite_adapter_and_changes_nothing(tensor, protection):
    """NaN in any adapter tensor of one layer: no layer ends its task (with "project" a NaN lora_A
    failed in linalg.eigh after the layers before it, and this one's routing, had changed; "freeze"
    froze an inf lora_B for good)."""
    net = ck.inject_clora(_Net(), rank=4, protection=protection)
    layers = [m for _, m in ck.nn.clora_layers(net)]
    with torch.no_grad(), ck.observe_task(net):
        net(torch.randn(8, 16))
    before = [m.routing_old.clone() for m in layers]
    with torch.no_grad():
        getattr(layers[-1], tensor)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"non-finite adapter .* in .*{tensor}.*no layer was changed"):
        ck.end_task(net)
    for m, r_old in zip(layers, before):    # the finite layers were not folded either
        assert m.task_index == 0 and torch.equal(m.routing_old, r_old) and m.lora_A.requires_grad
    with pytest.raises(ValueError, match=f"{tensor} holds non-finite values"):
        layers[-1].end_task()
    assert layers[-1].task_index == 0


def test_load_adapter_adopts_the_files_configuration(seed, tmp_path):
    """An adapter trained with alpha=8 (and hard mode, another protect_energy) loads into a model
    built with the defaults and gives the saved model's output, not a rescaled one."""
    base = _Net()
    net = ck.inject_clora(copy.deepcopy(base), rank=4, alpha=8, mode="hard", protect_energy=0.7)
    for _, m in ck.nn.clora_layers(net):
        _trained(m)
    ck.end_task(net)
    path = tmp_path / "a.safetensors"
    ck.save_adapter(net, path)
    other = ck.inject_clora(copy.deepcopy(base), rank=4)
    ck.load_adapter(other, path)
    x = torch.randn(5, 16)
    assert rel_err(other(x), net(x)) < 1e-6
    m = dict(ck.nn.clora_layers(other))["blocks.0.qkv"]
    assert m.scaling == 2.0 and m.mode == "hard" and m.protect_energy == 0.7


def _rewrite_metadata(src, dst, edit=None, drop_tensor=None, tensors_edit=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json as _json
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop_tensor}
    if tensors_edit:
        tensors_edit(tensors)
    if edit:
        layers = _json.loads(meta["layers"])
        edit(meta, layers)
        if "layers" in meta:
            meta["layers"] = _json.dumps(layers)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("case,words", [
    ("task_index", r"layer 'blocks.1.proj'.*task_index must be an int"),
    ("no_layers", "no readable 'layers' entry"),
    ("missing_tensor", r"no tensor 'blocks.1.qkv.routing_old'"),
    ("protection", "protection must be one of"),
])
def test_load_adapter_bad_file_changes_nothing(tmp_path, case, words):
    src = tmp_path / "a.safetensors"
    ck.save_adapter(ck.inject_clora(_Net(), rank=4), src)
    dst = tmp_path / "b.safetensors"

    def edit(meta, layers):
        if case == "task_index":
            layers["blocks.1.proj"]["task_index"] = "3"      # the last layer: the others would load first
        elif case == "no_layers":
            del meta["layers"]
        elif case == "protection":
            layers["blocks.1.proj"]["protection"] = {"name": "gpm"}
    _rewrite_metadata(src, dst, edit, "blocks.1.qkv.routing_old" if case == "missing_tensor" else None)
    model = ck.inject_clora(_Net(), rank=4)
    for _, m in ck.nn.clora_layers(model):
        _trained(m)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        ck.load_adapter(model, dst)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if torch.is_tensor(before[k]))


def test_unmerge_restores_the_base_after_the_adapter_changed_while_merged(seed):
    """An optimizer step with momentum, or a load, while merged: unmerge takes out what merge put
    in, so the shared base weight comes back (subtracting the changed adapter's delta instead leaves it
    0.4-0.5 away); the forward then uses the adapter as it is now."""
    lin = nn.Linear(24, 40)
    w0 = lin.weight.detach().clone()
    layer = _trained(CLoRALinear.from_linear(lin, rank=6))
    layer.merge()
    with torch.no_grad():
        layer.lora_B.add_(torch.randn_like(layer.lora_B))
        layer.routing_delta.mul_(3.0)
    layer.unmerge()
    assert rel_err(lin.weight, w0) < 1e-6
    x = torch.randn(5, 24)
    ref = nn.functional.linear(x, w0 + layer.delta_weight(), lin.bias)
    assert rel_err(layer(x), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_merge_unmerge_restores_the_base_bit_for_bit(seed, dtype):
    """W + Δ − Δ rounds away from W in 16 bits (most elements move): merge keeps the
    original for 16-bit weights and unmerge puts it back exactly; without the copy it drifts
    (the reason for the default); merged output still equals the unmerged layer's."""
    lin = nn.Linear(48, 40).to(dtype)
    w0 = lin.weight.detach().clone()
    layer = _trained(CLoRALinear.from_linear(lin, rank=6).float()).to(dtype)
    assert layer.weight is lin.weight
    x = torch.randn(7, 48, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    assert rel_err(layer(x).float(), unmerged.float()) < 5e-2
    layer.unmerge()
    assert torch.equal(lin.weight, w0)
    layer.merge(keep_original=False)
    layer.unmerge()
    assert not torch.equal(lin.weight, w0)


def test_inject_is_all_or_nothing_and_once():
    net = _Net()
    net.blocks[1].proj = nn.Linear(16, 3)           # rank 4 fits every layer but this one
    before = {n: p.requires_grad for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"layer 'blocks.1.proj'.*rank.*the model was not changed"):
        ck.inject_clora(net, ["qkv", "proj"], rank=4)      # (a named list: the default targets leave it out)
    with pytest.raises(ValueError, match=r"layer 'blocks.0.qkv': rank must be"):
        ck.inject_clora(net, rank=64)       # every default target too narrow: the rank's error, not "no match"
    assert not ck.nn.clora_layers(net) and {n: p.requires_grad for n, p in net.named_parameters()} == before
    ck.inject_clora(net, target_modules=("qkv",), rank=4)
    with pytest.raises(ValueError, match=r"C-LoRA layers already \(\['blocks.0.qkv', 'blocks.1.qkv'\]\)"):
        ck.inject_clora(net, target_modules=("qkv",), rank=4)
    with pytest.raises(TypeError, match="already holds an adapter"):
        CLoRALinear.from_linear(net.blocks[0].qkv, rank=2)


def _encoder(nested=True):
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=nested)
    for layer in enc.layers:
        layer.self_attn.dropout = 0.0       # (a float, not a Dropout module)
    return enc


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("grad", [False, True])
def test_an_adapted_transformer_encoder_evaluates_with_its_adapter(seed, grad):
    """nn.TransformerEncoderLayer in eval mode runs a fused op on linear1 / linear2's weights without
    calling them (no gradient to record: no_grad, or only frozen base weights), and nn.TransformerEncoder
    turns a padded batch into a nested tensor first: the adapter was left out of every evaluation
    (the output was the base model's, to 7e-7). Evaluated, the model now computes what training mode
    does; unloaded, the fused paths come back (a copy and a pickle keep the guard)."""
    enc = _encoder()
    base = copy.deepcopy(enc)
    ck.inject_clora(enc, target_modules=("linear1", "linear2"), rank=4)
    for m in ck.nn.clora_layers(enc):
        _trained(m[1])
    x = torch.randn(3, 7, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    with torch.no_grad():
        trained = [enc(x), enc(x, src_key_padding_mask=mask)]      # training mode: the modules run
        plain = base.eval()(x)
    enc.eval()
    for model in (enc, copy.deepcopy(enc)):
        with torch.set_grad_enabled(grad):
            got = [model(x), model(x, src_key_padding_mask=mask)]
        assert not got[1].is_nested
        assert (got[0] - plain).abs().max() > 0.1
        assert rel_err(got[0], trained[0]) < 1e-5
        assert rel_err(got[1][~mask], trained[1][~mask]) < 1e-5
    merged = ck.merge_and_unload(enc)
    assert merged.use_nested_tensor and not any(layer._forward_pre_hooks for layer in merged.layers)
    with torch.no_grad():
        fused = merged(x, src_key_padding_mask=mask)      # the fused path, the merged weights
    assert rel_err(fused[~mask], trained[1][~mask]) < 1e-5
    layer = _encoder().layers[0]            # the layer itself is the model, an encoder built of it after
    ck.inject_clora(layer, target_modules=("linear1",), rank=4)     # (its clones keep the hook; the encoder
    _trained(layer.linear1)                                         # makes nested batches, which the layer takes)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    with torch.no_grad():
        trained = enc(x, src_key_padding_mask=mask)
        got = enc.eval()(x, src_key_padding_mask=mask)
    assert rel_err(got[~mask], trained[~mask]) < 1e-5
    layer = _encoder().layers[0]
    ck.inject_clora(layer, target_modules=("linear1",), rank=4)
    _trained(layer.linear1)
    with torch.no_grad():
        trained = layer(x)
    with torch.set_grad_enabled(grad):
        assert rel_err(layer.eval()(x), trained) < 1e-5


def test_layers_whose_parent_reads_their_weight_are_not_adapted(seed):
    """torchvision's Swin attention passes qkv.weight and proj.weight to a function and never calls the
    modules: the default targets adapted all 24 and the output stayed the base's exactly. Named, they
    are an error naming the parent; under "all-linear" they are left out with a warning, and the layers
    that are adapted run. A target name matching only nn.MultiheadAttention's out_proj (a subclass of
    nn.Linear, never adapted) said nothing while another name matched."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.swin_t(weights=None, num_classes=5)
    with pytest.raises(ValueError, match=r"'features.1.0.attn.qkv' cannot be adapted: ShiftedWindowAttention passes "
                                         r"the weight of 'qkv' to shifted_window_attention.*24 such layer"):
        ck.inject_clora(model, rank=4)
    assert not ck.nn.clora_layers(model)
    with pytest.warns(UserWarning, match="'all-linear' leaves out 24 layer"):
        ck.inject_clora(model, "all-linear", rank=4)
    layers = ck.nn.clora_layers(model)
    assert layers and not any(n.endswith(("qkv", "attn.proj")) for n, _ in layers)
    x = torch.randn(1, 3, 32, 32)
    base = model(x)
    for _, layer in layers:
        _trained(layer)
    assert (model(x) - base).abs().max() > 1e-3
    if hasattr(nn, "LinearCrossEntropyLoss"):       # torch 2.14: F.linear_cross_entropy on linear.weight
        holder = nn.Module()
        holder.loss = nn.LinearCrossEntropyLoss(8, 5)
        with pytest.raises(ValueError, match="LinearCrossEntropyLoss passes the weight of 'linear'"):
            ck.inject_clora(holder, ["linear"], rank=2)
    transformer = nn.Transformer(32, 4, 1, 1, 48, batch_first=True)
    with pytest.warns(UserWarning, match=r"'out_proj' matches no layer that is adapted.*NonDynamicallyQuantizableLinear"):
        ck.inject_clora(transformer, ["out_proj", "linear1"], rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # a second injection names layers adapted already: nothing to say
        ck.inject_clora(transformer, ["linear1", "linear2"], rank=4)


@pytest.mark.filterwarnings("ignore::FutureWarning")    # (torch.jit's and torch.ao.quantization's deprecations)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_tools_that_cannot_take_a_layer_say_so(seed):
    """torch.jit.script failed inside TorchScript's frontend ('try blocks aren't supported'),
    torch.fx.symbolic_trace with 'x must be a torch.Tensor, got Proxy', a quantized input (what
    torch.ao.quantization's convert, which swaps exact types only, hands the float layer) as a dtype error;
    a base weight made trainable (timm's unfreeze) got no gradient while its bias trained. Each now says
    what happened and the way round."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ck.inject_clora(model, target_modules=["0"], rank=4)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile a C-LoRA layer.*merge_and_unload"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="x is a torch.fx Proxy.*leaf_modules"):
        torch.fx.symbolic_trace(model)

    class KeepWhole(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, CLoRALinear) or super().is_leaf_module(m, name)
    _trained(model[0])
    traced = torch.fx.GraphModule(model, KeepWhole().trace(model))
    x = torch.randn(3, 8)
    assert torch.equal(traced(x), model(x))
    q = torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match="got torch.quint8: a C-LoRA layer computes in floating point"):
        model[0](q)
    model.requires_grad_(True)
    with pytest.warns(UserWarning, match="gives its base weight no gradient"):
        model(x).sum().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is not None and model[0].lora_B.grad is not None


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
@pytest.mark.parametrize("protection", ["freeze", "project"])
def test_nested_input(seed, protection, layout):
    """A nested tensor, which nn.Linear takes (either layout), gives the rows' outputs and gradients
    and, observed, the rows' Gram. (Both layouts were torch's errors from inside the layer: the flatten
    to 2-D, and the strided layout has no shape; nn.TransformerEncoder makes one from a padded batch.)"""
    layer, dense_layer = (_trained(CLoRALinear(8, 6, rank=3, protection=protection)) for _ in range(2))
    dense_layer.load_state_dict(layer.state_dict())
    x = torch.randn(7, 8)
    nested = torch.nested.nested_tensor([x[:3], x[3:]], layout=layout)
    with ck.observe_task(layer), ck.observe_task(dense_layer):
        y = layer(nested)
        assert y.is_nested and rel_err(torch.cat(y.unbind()), dense_layer(x)) < 1e-6
    if protection == "project":
        assert torch.allclose(layer._observed, dense_layer._observed)
    torch.cat(y.unbind()).square().sum().backward()
    dense_layer(x).square().sum().backward()
    for name in ("lora_A", "lora_B", "routing_delta"):
        assert rel_err(getattr(layer, name).grad, getattr(dense_layer, name).grad) < 1e-5
    assert layer.weight.grad is None
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.routing_old, layer.routing_delta, None, 1.0)
    assert rel_err(torch.cat(ck.clora_linear(nested, *args).unbind()), dense_layer(x)) < 1e-6
    wide = torch.nested.nested_tensor([torch.randn(2, 9), torch.randn(1, 9)], layout=layout)
    with pytest.raises(ValueError, match="x has 9 features in its last dimension"):
        layer(wide)


def test_a_layer_from_a_local_linear_subclass_pickles(seed):
    """from_linear recorded the type of any nn.Linear subclass it wrapped (for merge_and_unload), and a
    class defined in a function does not pickle (a review): only the types it puts back are recorded."""
    class Local(nn.Linear):
        pass
    layer = CLoRALinear.from_linear(Local(8, 4), rank=2)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).weight, layer.weight)


def test_training_a_merged_layer_is_a_clear_error(seed):
    layer = _trained(CLoRALinear(24, 40, rank=6))
    x = torch.randn(5, 24)
    out = layer(x).detach()
    layer.merge()
    y = layer(x)                                   # inference with grad enabled works
    assert rel_err(y, out) < 1e-5
    with pytest.raises(RuntimeError, match="backward through a merged CLoRALinear.*unmerge"):
        y.square().sum().backward()
    layer.unmerge()
    layer(x).square().sum().backward()
    assert layer.routing_delta.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_state_replaces_what_an_earlier_merge_remembered(seed, dtype):
    """Merged, then a merged state loaded (say the best checkpoint, for evaluation), then unmerged:
    the loaded adapter's delta comes out of the loaded weight, as in a process that never merged.
    (It took out the layer's own earlier delta, or put back its own earlier weight: 0.5-1.3 off.)"""
    a, b = (_trained(CLoRALinear(8, 6, rank=4)).to(dtype) for _ in range(2))
    base_b = b.weight.detach().clone()
    a.merge()
    b.merge()
    a.load_state_dict(b.state_dict())
    a.unmerge()
    assert rel_err(a.weight, base_b) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_an_adapter_only_state_leaves_the_weights_merged_state(seed):
    """load_state_dict(strict=False) of the adapter alone (no weight) into a merged layer: the weight
    takes the loaded adapter in place of the merged one (it kept computing the old one), and unmerge
    gives the base back; into an unmerged layer it stays unmerged (the state's `merged` flag is the
    saved weight's, not this one's)."""
    a, b = _trained(CLoRALinear(8, 6, rank=4)), _trained(CLoRALinear(8, 6, rank=4))
    base_a = a.weight.detach().clone()
    b.merge()
    adapter_only = {k: v for k, v in b.state_dict().items() if k not in ("weight", "bias")}
    a.merge()
    a.load_state_dict(adapter_only, strict=False)
    assert a.merged
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = nn.functional.linear(x, base_a + b.delta_weight(), a.bias)
        assert rel_err(a(x), want) < 1e-5
    a.unmerge()
    assert rel_err(a.weight, base_a) < 1e-6
    w = a.weight.detach().clone()
    a.load_state_dict(adapter_only, strict=False)       # b's flag says merged, a's weight is not
    assert not a.merged and torch.equal(a.weight, w)


def test_unmerge_uses_the_mode_the_adapter_was_merged_in(seed):
    """Merged in hard mode (P ≠ I), then the mode changed while merged (an adapter-only state saved in
    soft mode, or an assignment): unmerge takes out the delta that merge put in (it took out the
    new mode's, leaving the weight 0.3-0.9 away from the base)."""
    def layer(mode):
        m = _trained(CLoRALinear(12, 20, rank=4, mode=mode, protection="paper", dtype=torch.float64))
        with torch.no_grad():
            m.routing_old.normal_()
            m.projection.copy_(torch.eye(4, dtype=torch.float64) - 0.25)
        return m
    for change in ("load", "assign"):
        m = layer("hard")
        w0 = m.weight.detach().clone()
        m.merge()
        if change == "load":
            m.load_state_dict({k: v for k, v in layer("soft").state_dict().items() if k not in ("weight", "bias")},
                              strict=False)
        else:
            m.mode = "soft"
        assert m.mode == "soft" and m.merged
        m.unmerge()
        assert rel_err(m.weight, w0) < 1e-12, change


def test_a_plain_weight_loaded_into_a_merged_layer_leaves_it_unmerged(seed):
    """A plain nn.Linear checkpoint (weight and bias, no C-LoRA state) loaded with strict=False into a
    merged layer: that weight holds no adapter, so the layer is unmerged; its forward adds the adapter
    and unmerge leaves the loaded weight alone (it stayed merged: the adapter was dropped from the
    output, and unmerge subtracted it from the fresh base)."""
    base = nn.Linear(12, 20)
    layer = _trained(CLoRALinear(12, 20, rank=4))
    fresh = copy.deepcopy(layer)
    fresh.load_state_dict(base.state_dict(), strict=False)
    layer.merge()
    layer.load_state_dict(base.state_dict(), strict=False)
    assert not layer.merged
    x = torch.randn(5, 12)
    assert torch.equal(layer(x), fresh(x))
    layer.unmerge()
    assert torch.equal(layer.weight, base.weight)
    # not so a state that holds the adapter without the task state (safetensors refuses that dict),
    # nor a weight the load refused (the layer's weight is still its merged one)
    layer = _trained(CLoRALinear(12, 20, rank=4))
    x_out = layer(x).detach()
    layer.merge()
    layer.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "_extra_state"}, strict=False)
    assert layer.merged and rel_err(layer(x), x_out) < 1e-5
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.zeros(20, 13)}, strict=False)
    assert layer.merged and rel_err(layer(x), x_out) < 1e-5


@pytest.mark.parametrize("how", ["prune", "parametrize"])
def test_merge_refuses_a_computed_weight(seed, how):
    """A pruned or parametrized weight is recomputed on every access, so an in-place merge into it was
    lost while the layer said merged (the adapter vanished from the output): merge, unmerge and the
    model-level helpers refuse by name, before any layer of the model changes."""
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ck.inject_clora(net, target_modules=("0", "1"), rank=2)
    for layer in net:
        _trained(layer)
    x = torch.randn(3, 8)
    if how == "prune":
        import torch.nn.utils.prune as prune
        prune.l1_unstructured(net[1], "weight", amount=0.3)
    else:
        import torch.nn.utils.parametrize as parametrize
        parametrize.register_parametrization(net[1], "weight", _Double())
    before = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    y = net(x)
    for call in (ck.merge, ck.merge_and_unload, net[1].merge):
        with pytest.raises(ValueError, match=r"merge: this layer's weight is computed by torch.nn.utils.prune"):
            call(net) if call != net[1].merge else call()       # (a bound method is new at each access: ==)
        assert not net[0].merged and not net[1].merged
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items() if torch.is_tensor(v))
    assert torch.equal(net(x), y)
    ck.merge(nn.Sequential(net[0]))               # (a layer with a stored weight still merges)
    assert net[0].merged
    # merged before the weight became computed: unmerge refuses too, every layer left as it was
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ck.inject_clora(net, target_modules=("0", "1"), rank=2)
    ck.merge(net)
    import torch.nn.utils.prune as prune
    prune.identity(net[1], "weight")
    for call in (ck.unmerge, lambda n: ck.disable_adapter(n).__enter__(), lambda n: n[1].unmerge()):
        with pytest.raises(ValueError, match=r"unmerge: this layer's weight is computed"):
            call(net)
        assert net[0].merged and net[1].merged and net[0].adapter_enabled


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_reset_parameters_of_a_merged_layer_leaves_it_unmerged(seed):
    layer = _trained(CLoRALinear(8, 6, rank=4))
    layer.merge()
    layer.reset_parameters()
    w = layer.weight.detach().clone()
    assert not layer.merged
    layer.unmerge()                                # nothing to take out of the fresh weight
    assert torch.equal(layer.weight, w)
    x = torch.randn(3, 8)
    assert rel_err(layer(x), nn.functional.linear(x, w, layer.bias)) < 1e-6


def test_a_layer_loaded_in_part_onto_meta_refuses_the_lifecycle_by_name(seed):
    """A model built on the meta device and given only its base weights (assign=True, strict=False): end_task
    failed with torch's "Tensor.item() cannot be called on meta tensors" and merge set merged with nothing
    added. Each names the tensors still on meta; a layer wholly on meta merges as before."""
    with torch.device("meta"):
        model = nn.Sequential(CLoRALinear(6, 5, rank=2))
    model.load_state_dict({"0.weight": torch.randn(5, 6), "0.bias": torch.zeros(5)}, strict=False, assign=True)
    for step in (ck.end_task, ck.merge):
        with pytest.raises(ValueError, match=r"\['lora_A', 'lora_B', 'routing_delta', 'routing_old', 'projection'\] "
                                             r"are on the meta device and the rest of the layer is not"):
            step(model)
    assert not model[0].merged and model[0].task_index == 0
    with torch.device("meta"):          # the policy's buffers are named too
        project = nn.Sequential(CLoRALinear(6, 5, rank=2, protection="project"))
    state = _trained(CLoRALinear(6, 5, rank=2, protection="project")).state_dict()
    project.load_state_dict({f"0.{k}": v for k, v in state.items() if not k.startswith("protect_")}, strict=False,
                            assign=True)
    with pytest.raises(ValueError, match=r"\['protect_input_basis', .* are on the meta device"):
        ck.end_task(project)
    with torch.device("meta"):          # and a parametrization's original (merge added nothing, and said merged)
        computed = CLoRALinear(6, 5, rank=2)
    torch.nn.utils.parametrize.register_parametrization(computed, "lora_A", _Identity())
    computed.load_state_dict({k: v for k, v in CLoRALinear(6, 5, rank=2).state_dict().items() if k != "lora_A"},
                             strict=False, assign=True)
    with pytest.raises(ValueError, match=r"\['parametrizations.lora_A.original'\] are on the meta device"):
        computed.merge()
    assert not computed.merged


def test_what_merge_remembered_moves_with_the_layer(seed):
    """.to() moves merge's memo with the weights, so unmerge works where the layer is now (here the
    meta device; a CPU memo beside a CUDA weight would fail the same way)."""
    layer = _trained(CLoRALinear(8, 6, rank=4))
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.double()
    layer.unmerge()
    assert layer.weight.dtype == torch.float64 and rel_err(layer.weight, w0) < 1e-6
    layer.merge()
    layer.to("meta")
    assert all(t.is_meta for t in layer._merged_adapter if torch.is_tensor(t))    # (CPU before the fix)
    assert "_extra_state" in layer.state_dict()      # (no comparison of meta tensors: `_merged_as`)
    layer.unmerge()
    assert layer.weight.is_meta and not layer.merged


def test_merged_layer_input_gradients_and_compile(seed):
    """A merged layer in training mode whose adapter requires grad refuses a backward (the guard
    above), compiled too (without fullgraph the compiler breaks the graph there and the guard runs;
    with fullgraph the trace says why); in eval mode the inputs' gradient flows as through nn.Linear
    and torch.compile(fullgraph) runs with grad enabled, the adapter getting no gradient."""
    layer = _trained(CLoRALinear(24, 40, rank=6))
    x = torch.randn(5, 24)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"training mode.*model.eval\(\)"):
        layer(x.requires_grad_()).sum().backward()
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="backward through a merged CLoRALinear in training mode"):
        torch.compile(layer, backend="eager")(x).sum().backward()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="merged CLoRALinear in training mode"):
        torch.compile(layer, fullgraph=True, backend="eager")(x)
    layer.eval()
    x.grad = None
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert rel_err(out, nn.functional.linear(x, layer.weight, layer.bias)) < 1e-6
    layer(x).square().sum().backward()
    want = 2 * nn.functional.linear(x, layer.weight, layer.bias) @ layer.weight
    assert rel_err(x.grad, want) < 1e-5 and layer.routing_delta.grad is None


def test_merged_layer_guard_when_only_the_factors_train(seed):
    """The guard holds for a plain LoRA too (routing_delta frozen, lora_A and lora_B trained, as the
    seq_lora baseline): a backward through the merged layer in training mode refuses, where lora_A and
    lora_B trained nothing, silently (torch's "does not require grad" on a bare layer)."""
    layer = _trained(CLoRALinear(12, 10, rank=3))
    layer.routing_delta.requires_grad_(False)
    layer.merge()
    with pytest.raises(RuntimeError, match="backward through a merged CLoRALinear in training mode"):
        layer(torch.randn(4, 12)).sum().backward()
    layer.lora_A.requires_grad_(False)
    with pytest.raises(RuntimeError, match="backward through a merged CLoRALinear in training mode"):
        layer(torch.randn(4, 12)).sum().backward()
    layer.lora_B.requires_grad_(False)      # nothing trains: a frozen layer, as nn.Linear's
    x = torch.randn(4, 12, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_a_live_state_dict_out_of_date_is_refused(seed):
    """`sd = model.state_dict()` without a copy holds the layer's own tensors: after an end_task, a merge
    or an unmerge changed them in place, loading sd put back the old task state alone (a freeze layer
    back at task 0 trained its frozen factors again; a merged layer added its adapter twice: 1.0 off),
    where nn.Linear's load is a no-op. It is refused, naming what changed, and nothing of the layer is
    loaded (another layer's live state_dict too); a copy loads, and so do a live state_dict whose layer
    took no such step, one whose tensors were copied but not its task state (`{k: v.cpu()}` of a GPU
    model), and one whose layer has new tensors since (`.double()`)."""
    model = nn.Sequential(_trained(CLoRALinear(10, 8, rank=3)))
    x = torch.randn(4, 10)
    sd = model.state_dict()
    kept = copy.deepcopy(sd)
    ck.end_task(model)
    y = model(x).detach()
    with pytest.raises(ValueError, match=r"0\._extra_state: this state_dict is this layer's own.*task_index 0 -> 1"):
        model.load_state_dict(sd)
    assert model[0].task_index == 1 and not model[0].lora_A.requires_grad and torch.equal(model(x), y)
    live = model.state_dict()
    model[0].merge()
    with pytest.raises(ValueError, match=r"merged False -> True"):
        model.load_state_dict(live)
    assert rel_err(model(x), y) < 1e-6
    model[0].unmerge()
    model.load_state_dict(live)          # (back as it was: the load changes nothing)
    assert model[0].task_index == 1 and rel_err(model(x), y) < 1e-6
    twin = copy.deepcopy(model)          # another layer's live state_dict, out of date too
    theirs = twin.state_dict()
    ck.end_task(twin)
    with pytest.raises(ValueError, match=r"another layer's.*task_index 1 -> 2"):
        model.load_state_dict(theirs)
    model.load_state_dict(twin.state_dict())    # (up to date, and a copy: they load)
    assert model[0].task_index == 2
    model.load_state_dict(kept)
    assert model[0].task_index == 0 and model[0].lora_A.requires_grad
    floats = {k: v.clone() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ck.end_task(model)
    model.load_state_dict(floats)        # (a snapshot: its tensors are copies)
    assert model[0].task_index == 0
    before = model.state_dict()
    model.double()                       # (new tensors: `before` holds the old ones, a snapshot now)
    ck.end_task(model)
    model.load_state_dict(before)
    assert model[0].task_index == 0
    hard = nn.Sequential(_trained(CLoRALinear(10, 8, rank=3, mode="hard")))
    ck.end_task(hard)
    live = hard.state_dict()
    hard[0].protect_energy = 0.3         # P made again, in place
    with pytest.raises(ValueError, match=r"protect_energy 0.9 -> 0.3"):
        hard.load_state_dict(live)
    soft = nn.Sequential(_trained(CLoRALinear(10, 8, rank=3)))
    live = soft.state_dict()
    soft[0].mode, soft[0].protection = "hard", "paper"      # (at task 0: settings, no tensor written)
    soft.load_state_dict(live)           # a roll back of settings loads, as before
    assert soft[0].mode == "soft" and soft[0].protection.name == "freeze"


def test_from_linear_refuses_what_the_wrapped_layer_decides():
    """dtype, device and bias come from the wrapped layer: a clear TypeError, not Python's "got
    multiple values for keyword argument"."""
    model = nn.Sequential(nn.Linear(8, 6))
    for kw in (dict(dtype=torch.float64), dict(device="cpu"), dict(bias=False)):
        with pytest.raises(TypeError, match=r"come from the wrapped layer"):
            ck.inject_clora(model, ["0"], rank=2, **kw)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_a_switch_to_hard_keeps_unmerge_of_a_layer_merged_elsewhere(seed):
    """A layer loaded merged has no memory of what was merged, so unmerge takes out delta_weight(); a
    switch to hard changes P and so that delta (1.49 off the base): the switch remembers the merged one."""
    torch.manual_seed(seed)
    src = CLoRALinear(12, 10, rank=3, protection="paper")
    with torch.no_grad():
        src.lora_B.normal_()
    src.end_task()
    with torch.no_grad():
        src.routing_delta.normal_()
    base = src.weight.detach().clone()
    src.merge()
    layer = CLoRALinear(12, 10, rank=3, protection="paper")
    layer.load_state_dict(src.state_dict())
    assert layer.merged
    layer.mode = "hard"
    layer.unmerge()
    assert rel_err(layer.weight, base) < 1e-6
    for change in (dict(alpha=7.0), dict(mode="soft")):     # any change of what the delta is
        other = CLoRALinear(12, 10, rank=3, protection="paper", mode="hard" if "mode" in change else "soft")
        src.mode = other.mode
        src.merge()
        other.load_state_dict(src.state_dict())
        src.unmerge()
        for k, v in change.items():
            setattr(other, k, v)
        other.unmerge()
        assert rel_err(other.weight, base) < 1e-6, change


@pytest.mark.parametrize("name", ["alpha", "scaling"])
@pytest.mark.parametrize("value", [torch.tensor(8.0), "2", None, float("nan"), True])
def test_alpha_and_scaling_assignment_refuses_what_is_not_a_number(name, value):
    """`layer.alpha = <tensor>` was taken while scaling kept its old value (the forward computed with
    one, a save wrote the other; None made state_dict() raise): refused, nothing changed."""
    layer = CLoRALinear(16, 8, rank=4, alpha=8)
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        setattr(layer, name, value)
    assert layer.alpha == 8.0 and layer.scaling == 2.0


def test_alpha_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    layer = CLoRALinear(16, 8, rank=4, alpha=np.float32(8))
    assert layer.scaling == 2.0
    layer.alpha = np.float64(12)
    assert layer.scaling == 3.0 and type(layer.alpha) is float


def test_grad_through_old_route_must_be_a_bool():
    """bool("False") is True: a string turned the plain gradients on silently."""
    with pytest.raises(TypeError, match="grad_through_old_route must be a bool, got 'False'"):
        CLoRALinear(16, 8, rank=4, grad_through_old_route="False")
    layer = CLoRALinear(16, 8, rank=4)
    layer(torch.randn(2, 16))            # (the validation memo: an assignment after a call is checked too)
    with pytest.raises(TypeError, match="grad_through_old_route must be a bool, got 'False'"):
        layer.grad_through_old_route = "False"
    assert layer.grad_through_old_route is False
    np = pytest.importorskip("numpy")
    layer.grad_through_old_route = np.bool_(True)       # numpy's bool (NumPy 1 and 2 name it differently)
    assert layer.grad_through_old_route is True
    a = [torch.randn(3, 16), torch.randn(8, 16), None, torch.randn(4, 16), torch.randn(8, 4), torch.randn(4, 4),
         torch.randn(4, 4), None, 1.0]
    with pytest.raises(TypeError, match="grad_through_old_route must be a bool, got 0"):
        ck.clora_linear(*a, grad_through_old_route=0)


def test_layer_grad_through_old_route_gradients(seed):
    """The layer's flag reaches the op: with it, lora_A / lora_B get the plain formula's gradients
    through the old route too (the oracle's), without it the stop-gradient ones; a save keeps it."""
    from clora_kernels.reference import reference_formula
    for plain in (False, True):
        layer = _trained(CLoRALinear(12, 10, rank=3, alpha=6, grad_through_old_route=plain, protection="paper",
                                     dtype=torch.float64))
        ck.end_task(layer)
        _trained(layer)
        x = torch.randn(5, 12, dtype=torch.float64)
        layer(x).square().sum().backward()
        a, b, rd = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.routing_delta))
        reference_formula(x, layer.weight, layer.bias, a, b, layer.routing_old, rd, None, layer.scaling,
                          plain).square().sum().backward()
        for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad), (layer.routing_delta.grad, rd.grad)):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), plain


def test_merged_layer_in_training_mode_allows_inplace_after_it(seed):
    """A merged model in training mode: the forward works (a ReLU(inplace=True) after the layer
    failed on the guard's view of the output), and a backward says why it cannot train."""
    net = nn.Sequential(_trained(CLoRALinear(12, 10, rank=3)), nn.ReLU(inplace=True))
    x = torch.randn(4, 12)
    with torch.no_grad():
        want = net(x).clone()
    ck.merge(net)
    net.train()
    y = net(x)
    assert torch.allclose(y, want, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged CLoRALinear in training mode"):
        y.sum().backward()


def test_merged_layer_in_training_mode_traces_and_vmaps(seed, tmp_path):
    """The guard of a merged layer in training mode is a backward's refusal, not a forward's: a
    TorchScript trace (inference, as nn.Linear's) failed its check and could not be saved, and
    torch.func.vmap of the forward failed on the guard's autograd.Function; grad meets the refusal."""
    layer = _trained(CLoRALinear(12, 10, rank=3))
    x = torch.randn(4, 12)
    layer.merge()
    traced = torch.jit.trace(layer, (x,))
    torch.jit.save(traced, tmp_path / "t.pt")
    assert torch.equal(torch.jit.load(tmp_path / "t.pt")(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert torch.equal(torch.func.vmap(layer)(x[:, None]).squeeze(1), layer(x))
    with pytest.raises(RuntimeError, match="backward through a merged CLoRALinear in training mode"):
        torch.func.grad(lambda x: layer(x).sum())(x)


def test_merged_layer_in_training_mode_runs_forward_mode_ad(seed):
    """Forward-mode AD (torch.func.jvp, jacfwd, dual tensors) through a merged layer in training mode met
    torch's "You must implement the jvp function" of the guard's autograd.Function; it gets F.linear's
    tangent (it trains nothing), and a tangent of the adapter meets the guard's refusal."""
    import torch.autograd.forward_ad as fwAD
    layer = _trained(CLoRALinear(12, 10, rank=3)).double()
    layer.merge()
    x, t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    want = t @ layer.weight.detach().t()
    assert torch.allclose(torch.func.jvp(layer, (x,), (t,))[1], want)
    assert torch.allclose(torch.func.jacfwd(layer)(x[0]), layer.weight.detach())
    with fwAD.dual_level():
        assert torch.allclose(fwAD.unpack_dual(layer(fwAD.make_dual(x, t)))[1], want)
    for name in ("routing_delta", "lora_B"):     # (lora_B's tangent was dropped: the guard took routing_delta alone)
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD in the adapter through a merged"):
            dual = fwAD.make_dual(getattr(layer, name), torch.ones_like(getattr(layer, name)))
            torch.func.functional_call(layer, {name: dual}, (x,))


def test_end_task_under_inference_mode_keeps_loadable_state(seed):
    """end_task called inside torch.inference_mode (a validation hook) made the project policy's
    bases inference tensors, so every later load_state_dict / load_adapter failed half-way."""
    layer = _trained(CLoRALinear(12, 10, rank=3, protection="project"))
    with ck.observe_task(layer):
        layer(torch.randn(20, 12))
    ckpt = copy.deepcopy(layer.state_dict())
    with torch.inference_mode():
        ck.end_task(layer)
    assert not any(t.is_inference() for t in layer.state_dict().values())
    layer.load_state_dict(ckpt)
    assert layer.task_index == 0
    with torch.inference_mode():          # the other lifecycle steps that build the policy's state
        layer.protection = "freeze"
        layer.protection = "project"
    assert not any(t.is_inference() for t in layer.state_dict().values())      # (before a reset re-makes them)
    with torch.inference_mode():
        layer.reset_adapter()
    assert not any(t.is_inference() for t in layer.state_dict().values())
    layer.load_state_dict(ckpt)
    with torch.inference_mode():         # a layer made under inference_mode: its end_task stays in it
        made = _trained(CLoRALinear(12, 10, rank=3))
        made.end_task()
    assert made.task_index == 1


def test_an_adapter_injected_under_inference_mode_trains_and_explains_after_it(seed):
    """A server's loader under @torch.inference_mode() injecting into a model made outside it: the adapter
    was made of inference tensors, which the layer's backward saves, so every later forward with grad (an
    eval forward without no_grad, an input-saliency backward, more training) failed with torch's "cannot
    be saved for backward" (PEFT's adapter made so survives a plain eval forward only). A base made inside
    inference_mode keeps its adapter there, as nn.Linear's tensors are."""
    from clora_kernels.reference import reference_formula
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))
    with torch.inference_mode():
        ck.inject_clora(model, target_modules=["0", "2"], rank=3)
    layers = [model[0], model[2]]
    assert all(isinstance(m, CLoRALinear) for m in layers)
    assert not any(t.is_inference() for m in layers for t in m.state_dict().values())
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_()
            m.routing_delta.add_(0.3 * torch.randn(3, 3))
    names = ("lora_A", "lora_B", "routing_delta")
    # the float64 oracle, on leaf copies of every trained tensor
    ref = [{n: getattr(m, n).detach().double().requires_grad_() for n in names} for m in layers]
    x = torch.randn(5, 12, requires_grad=True)
    h = x.detach().double().requires_grad_()
    out = h
    for i, m in enumerate((model[0], None, model[2])):
        if m is None:
            out = torch.nn.functional.gelu(out)
            continue
        r = ref[i // 2]
        out = reference_formula(out, m.weight.double(), m.bias.double(), r["lora_A"], r["lora_B"],
                                m.routing_old.double(), r["routing_delta"], None, m.scaling)
    out.square().sum().backward()
    model(x).square().sum().backward()
    assert rel_err(x.grad, h.grad) < 1e-5
    for m, r in zip(layers, ref):
        for n in names:
            assert rel_err(getattr(m, n).grad, r[n].grad) < 1e-5, n
    before = [m.lora_A.detach().clone() for m in layers]
    torch.optim.SGD(model.parameters(), lr=0.1).step()                  # and it trains
    assert all(not torch.equal(m.lora_A, b) for m, b in zip(layers, before))
    with torch.inference_mode():
        made = ck.CLoRALinear.from_linear(nn.Linear(12, 10), rank=3)
    assert made.weight.is_inference() and made.lora_A.is_inference()
    # and runs outside it with grad mode on, as nn.Linear made there does (the Function's save for the
    # backward failed with torch's "Inference tensors cannot be saved for backward"; a helper's attack)
    with torch.inference_mode():
        made.lora_B.copy_(torch.randn(10, 3))
    x = torch.randn(4, 12)
    want = reference_formula(x.double(), made.weight.double(), made.bias.double(), made.lora_A.double(),
                             made.lora_B.double(), made.routing_old.double(), made.routing_delta.double(), None,
                             made.scaling)
    assert rel_err(made(x), want) < 1e-6
    with torch.inference_mode():
        built = nn.Sequential(ck.CLoRALinear(12, 10, rank=3), nn.GELU())
    assert built(x).shape == (4, 10) and built(torch.randn(2, 3, 12)).shape == (2, 3, 10)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):   # (x needs dx: as nn.Linear)
        made(x.requires_grad_())


def test_load_adapter_refuses_a_meta_model(tmp_path):
    """A load into meta tensors writes nothing: refused, as load_peft_adapter does (it set the task
    index and left the adapter uninitialised)."""
    path = tmp_path / "a.safetensors"
    ck.save_adapter(ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3), path)
    with torch.device("meta"):
        net = ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3)
    with pytest.raises(ValueError, match="meta device"):
        ck.load_adapter(net, path)
    assert net[0].task_index == 0


def test_model_orthogonality_loss_keeps_a_wider_dtype(seed):
    """The model's penalty summed in float32 always: a float64 model got a float32 penalty."""
    net = nn.Sequential(CLoRALinear(12, 10, rank=3, dtype=torch.float64), CLoRALinear(10, 8, rank=3,
                                                                                       dtype=torch.float64))
    for m in net:
        _trained(m)
        m.end_task()
        _trained(m)
    loss = ck.orthogonality_loss(net)
    assert loss.dtype == torch.float64 and torch.equal(loss, net[0].orthogonality_loss() + net[1].orthogonality_loss())



def test_lifecycle_math_ignores_the_callers_autocast(seed):
    """merge / unmerge, end_task's fold and the project policy's projection inside a caller's
    torch.autocast (a training loop wrapped whole) computed in bf16: a merge then unmerge moved the
    fp32 base by 1.5e-2, a hard-mode end_task changed the output, the projection drifted."""
    layer = _trained(CLoRALinear(24, 16, rank=4, alpha=8, mode="hard"))
    x = torch.randn(5, 24)
    w0, y0 = layer.weight.clone(), layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
    assert rel_err(layer(x), y0) < 1e-6
    layer.unmerge()
    assert rel_err(layer.weight, w0) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ck.end_task(layer)
    assert rel_err(layer(x), y0) < 1e-6
    proj = _trained(CLoRALinear(24, 16, rank=4, protection="project"))
    with ck.observe_task(proj):
        proj(torch.randn(40, 24))
    ck.end_task(proj)
    with torch.no_grad():
        proj.lora_A.add_(torch.randn_like(proj.lora_A))     # a step that leaves the allowed set
        proj.lora_B.add_(torch.randn_like(proj.lora_B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj.protection.enforce(proj, force=True)
    assert torch.allclose(proj.lora_A @ proj.protect_input_basis, proj.protect_input_anchor, atol=1e-5)
    assert torch.allclose(proj.lora_B @ proj.protect_output_basis, proj.protect_output_anchor, atol=1e-5)


def test_observe_passes_in_and_out_of_inference_mode_add_up(seed):
    """An observe pass under torch.inference_mode, then one under no_grad: the Gram was an inference
    tensor, the second pass failed and both were dropped."""
    layer = _trained(CLoRALinear(12, 10, rank=3, protection="project"))
    xs = torch.randn(30, 12), torch.randn(20, 12)
    with ck.observe_task(layer):
        with torch.inference_mode():
            layer(xs[0])
        with torch.no_grad():
            layer(xs[1])
    assert layer._observed_rows == 50
    assert torch.allclose(layer._observed, xs[0].t() @ xs[0] + xs[1].t() @ xs[1], atol=1e-4)
    ck.end_task(layer)


def test_weight_data_swap_to_another_shape_is_validated(seed):
    """transformers' resize_token_embeddings swaps a tied lm_head's weight .data to another shape:
    after a first call the validation memo let it through to torch's raw in-place error."""
    layer = CLoRALinear(8, 6, rank=2)
    layer(torch.randn(3, 8))
    layer.weight.data = torch.randn(7, 8)
    with pytest.raises(ValueError, match="lora_B"):
        layer(torch.randn(3, 8))
    for name, shape, words in (("routing_delta", (1, 1), "routing_delta"), ("routing_old", (2, 1), "routing_old"),
                               ("bias", (1,), "bias")):
        # the shapes that would broadcast silently key the memo: these did after a first call
        layer = CLoRALinear(8, 6, rank=2)
        layer(torch.randn(3, 8))
        getattr(layer, name).data = torch.randn(shape)
        with pytest.raises(ValueError, match=words):
            layer(torch.randn(3, 8))


def test_a_parametrized_layer_deep_copies_after_a_forward(seed):
    """The validation memo kept a parametrization's computed operand (with its graph) after a forward
    with grad, so copy.deepcopy of the layer failed (only graph leaves support deepcopy)."""
    import torch.nn.utils.parametrize
    layer = CLoRALinear(8, 4, rank=2)
    torch.nn.utils.parametrize.register_parametrization(layer, "lora_A", _Double())
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x))


def test_lifecycle_steps_compile_and_keep_an_inference_weight(seed):
    """routing() / delta_weight() compile with fullgraph (a loss on them); a merge under inference_mode
    of a layer whose base weight is an inference tensor (a base loaded there, injected outside) stays
    in inference mode, where writing that weight is allowed."""
    layer = _trained(CLoRALinear(12, 10, rank=3, alpha=6))
    want = layer.delta_weight().detach()
    got = torch.compile(lambda m: m.delta_weight(), fullgraph=True, backend="eager")(layer)
    assert torch.allclose(got, want)
    with torch.inference_mode():
        base = nn.Linear(12, 10)
    net = ck.inject_clora(nn.Sequential(base), target_modules=["0"], rank=3)
    _trained(net[0])
    x = torch.randn(4, 12)
    with torch.inference_mode():
        y = net(x)
        ck.merge(net)
        assert torch.allclose(net(x), y, atol=1e-5)



# ---- persistence cases a review of the save / load paths found (tenth session) -----------------
def test_a_layer_loaded_merged_unmerges_what_was_merged_after_the_adapter_changes(seed):
    """A layer loaded from a merged state remembers the loaded adapter as what is in the weight (as
    merge does): a reset of the adapter, or an adapter-only load, before unmerge no longer changes what
    unmerge takes out (it took out the new adapter's delta: the weight ended 1.1 away from the base)."""
    src = _trained(CLoRALinear(10, 8, rank=3))
    base = src.weight.detach().clone()
    src.merge()
    merged_state = copy.deepcopy(src.state_dict())
    other = {k: v for k, v in _trained(CLoRALinear(10, 8, rank=3)).state_dict().items() if k not in ("weight", "bias")}
    for change in ("reset", "adapter-only load"):
        layer = CLoRALinear(10, 8, rank=3)
        layer.load_state_dict(merged_state)
        assert layer.merged
        if change == "reset":
            layer.reset_adapter()
        else:
            layer.load_state_dict(other, strict=False)
        layer.unmerge()
        assert rel_err(layer.weight, base) < 1e-6, change


@pytest.mark.parametrize("change", ["alpha", "hard mode", "reset", "step"])
def test_a_merged_layer_changed_since_its_merge_saves_what_its_weight_holds(change, seed):
    """A merged layer keeps its merged output, and its unmerge, through a change of the scaling, the mode or
    the adapter; its state_dict holds the merged weight and the adapter as it is now. A load took that adapter
    for the merged one, and unmerge left the base 0.2-0.9 off, silently. The task state now says what the
    weight holds: the merged scaling and mode, which the load remembers; after a change of the adapter's
    tensors the base is in no tensor of the state, and the loaded layer's unmerge is refused by name (its
    merged forward exact). A second save and load keeps either."""
    src = _trained(CLoRALinear(10, 8, rank=3))
    base = src.weight.detach().clone()
    src.merge()
    if change == "alpha":
        src.alpha = 3 * src.alpha
    elif change == "hard mode":
        src.end_task()
        src.mode = "hard"
    elif change == "reset":
        src.reset_adapter()
    else:
        with torch.no_grad():
            src.lora_B.add_(1.0)
    x = torch.randn(4, 10)
    want = src(x).detach()
    twin = CLoRALinear(10, 8, rank=3)
    twin.load_state_dict(copy.deepcopy(src.state_dict()))
    again = CLoRALinear(10, 8, rank=3)
    again.load_state_dict(copy.deepcopy(twin.state_dict()))
    for layer in (twin, again):
        assert layer.merged and torch.equal(layer(x), want)
        if change in ("reset", "step"):
            with pytest.raises(ValueError, match="loaded merged from a state saved after its adapter changed"):
                ck.unmerge(nn.Sequential(layer))
            with pytest.raises(ValueError, match="^disable_adapter: unmerge: this layer was loaded merged"):
                with ck.disable_adapter(nn.Sequential(layer)):
                    pass
            with pytest.raises(ValueError, match="cannot be loaded into this merged layer"):
                layer.load_state_dict({k: v for k, v in src.state_dict().items() if k != "weight"}, strict=False)
            assert layer.merged and torch.equal(layer(x), want)
        else:
            layer.unmerge()
            assert rel_err(layer.weight, base) < 1e-6, change
    if change == "alpha":       # a checkpoint in parts (the weight apart, either first): the same
        state = copy.deepcopy(src.state_dict())
        for first in ("weight", "adapter"):
            parted = CLoRALinear(10, 8, rank=3)
            weight = {k: state[k] for k in ("weight", "bias")}
            rest = {k: v for k, v in state.items() if k not in weight}
            for part in ((weight, rest) if first == "weight" else (rest, weight)):
                parted.load_state_dict(part, strict=False)
            assert parted.merged and torch.equal(parted(x), want)
            parted.unmerge()
            assert rel_err(parted.weight, base) < 1e-6, first
        other = _trained(CLoRALinear(10, 8, rank=3, alpha=6.0))    # a part of that checkpoint alone, then another
        other_base = other.weight.detach().clone()      # merged unchanged, in parts: the first's merged scaling
        other.merge()                                   # was taken for the second's (2.9 off)
        other_state = copy.deepcopy(other.state_dict())
        stray = CLoRALinear(10, 8, rank=3, alpha=6.0)
        stray.load_state_dict({k: v for k, v in state.items() if k not in ("weight", "bias")}, strict=False)
        stray.load_state_dict({k: v for k, v in other_state.items() if k not in ("weight", "bias")}, strict=False)
        stray.load_state_dict({k: other_state[k] for k in ("weight", "bias")}, strict=False)
        stray.unmerge()
        assert rel_err(stray.weight, other_base) < 1e-6
    src.unmerge()
    assert rel_err(src.weight, base) < 1e-6
    assert ck.nn.task_state(src.state_dict()["_extra_state"]).get("merged_as") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_and_adapter_without_task_state_replace_what_the_merge_remembered(dtype, seed):
    """A merged model's weight and adapter without their task state (strict=False) into another merged
    layer: it stays merged (the state says nothing of merging), and unmerge takes the loaded adapter out
    of the loaded weight. It took out the merge done before the load (0.5 off), or put back the weight from
    before it (16 bits: the loaded weight thrown away, 1.0 off)."""
    src = _trained(CLoRALinear(8, 6, rank=3)).to(dtype)
    with torch.no_grad():
        src.weight.add_(1.0)
    base = src.weight.detach().clone()
    src.merge()
    state = {k: v.clone() for k, v in src.state_dict().items() if k != "_extra_state"}
    dst = _trained(CLoRALinear(8, 6, rank=3)).to(dtype)
    dst.merge()
    dst.load_state_dict(state, strict=False)
    assert dst.merged
    dst.unmerge()
    assert rel_err(dst.weight, base) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_state_dict_keeps_protect_energy_and_grad_through_old_route(seed):
    """The state_dict's task state carries every setting save_adapter keeps: a hard-mode layer with
    protect_energy 0.5 and the old route trained, restored into a default layer, trained with the
    default gradients (lora_A's 100 % off) and made a 0.9-energy P at its next end_task."""
    src = _trained(CLoRALinear(10, 8, rank=4, mode="hard", protect_energy=0.5, grad_through_old_route=True,
                               protection="paper"))
    src.end_task()
    _trained(src)
    dst = CLoRALinear(10, 8, rank=4)
    dst.load_state_dict(src.state_dict())
    assert dst.protect_energy == 0.5 and dst.grad_through_old_route is True and dst.mode == "hard"
    x = torch.randn(6, 10)
    for layer in (src, dst):
        layer(x).square().sum().backward()
    assert rel_err(dst.lora_A.grad, src.lora_A.grad) < 1e-6
    src.end_task()
    dst.end_task()
    assert torch.equal(dst.projection, src.projection)
    with pytest.raises(ValueError, match=r"protect_energy must be in \(0, 1\]"):
        dst.protect_energy = 1.5
    with pytest.raises(ValueError, match=r"protect_energy must be in \(0, 1\]"):
        dst.protect_energy = float("nan")


def test_loads_under_inference_mode_keep_normal_tensors(seed, tmp_path):
    """A later task's project-policy adapter loaded inside torch.inference_mode: its resized bases were
    inference tensors, and the next load outside it failed half-way (after changing the adapter)."""
    def trained_project(seed_):
        torch.manual_seed(seed_)
        layer = _trained(CLoRALinear(12, 10, rank=3, protection="project"))
        for _ in range(2):
            with ck.observe_task(layer):
                layer(torch.randn(20, 12))
            layer.end_task()
            _trained(layer)
        return nn.Sequential(layer)
    a, b = trained_project(1), trained_project(2)
    ck.save_adapter(a, tmp_path / "a.safetensors")
    ck.save_adapter(b, tmp_path / "b.safetensors")
    dst = nn.Sequential(CLoRALinear(12, 10, rank=3, protection="project"))
    with torch.inference_mode():
        ck.load_adapter(dst, tmp_path / "a.safetensors")
    assert not any(t.is_inference() for t in dst.state_dict().values())
    ck.load_adapter(dst, tmp_path / "b.safetensors")
    state = copy.deepcopy(b.state_dict())
    with torch.inference_mode():
        dst.load_state_dict(copy.deepcopy(a.state_dict()))
    assert not any(t.is_inference() for t in dst.state_dict().values())
    dst.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in dst.state_dict().items())


def test_adapter_files_refuse_non_finite_and_non_float_tensors_and_meta_saves(tmp_path):
    """A NaN adapter loaded silently (end_task refused it later, asking whether training diverged); a
    complex one lost its imaginary part with a warning; a save of a meta model raised torch's copy error;
    a folder given for the file, safetensors' I/O error. Each is a ValueError naming the case."""
    net = ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3)
    path = tmp_path / "new" / "a.safetensors"       # (its folder is made)
    ck.save_adapter(net, path)
    with pytest.raises(ValueError, match="is a folder; save_adapter writes one file"):
        ck.save_adapter(net, tmp_path)
    for name, value, words in (("lora_B", float("nan"), "lora_B in the adapter holds non-finite values"),
                               ("lora_A", None, "lora_A in the adapter is torch.complex64, not a floating-point")):
        def edit(tensors):
            t = tensors[f"0.{name}"]
            tensors[f"0.{name}"] = t.to(torch.complex64) if value is None else t.fill_(value)
        _rewrite_metadata(path, tmp_path / "bad.safetensors", edit=None, drop_tensor=None, tensors_edit=edit)
        fresh = ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3)
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ValueError, match=words):
            ck.load_adapter(fresh, tmp_path / "bad.safetensors")
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with torch.device("meta"):
        meta = ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3)
    for save in (ck.save_adapter, ck.save_peft_adapter):
        with pytest.raises(ValueError, match="on the meta device and holds no values"):
            save(meta, tmp_path / "meta")


def test_a_corrupt_task_state_names_its_key():
    net = ck.inject_clora(nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 4)), target_modules=["0", "1"], rank=3)
    state = net.state_dict()
    state["1._extra_state"] = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^1\._extra_state: a CLoRALinear's _extra_state holds no task state"):
        net.load_state_dict(state)


def test_wrapped_models_are_unwrapped_for_adapter_files(tmp_path):
    """DataParallel / DistributedDataParallel / torch.compile wrappers, nested: the file names the model's
    own layers (DDP's `module.` made a PEFT file that PEFT loaded as the bare base, with a warning)."""
    from clora_kernels.nn import unwrapped
    net = ck.inject_clora(nn.Sequential(nn.Linear(12, 10)), target_modules=["0"], rank=3)
    assert unwrapped(torch.compile(nn.DataParallel(torch.compile(net)))) is net
    ck.save_adapter(nn.DataParallel(net), tmp_path / "a.safetensors")
    ck.load_adapter(nn.DataParallel(net), tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert sorted(f.keys())[0].startswith("0.")


# ---- cases a review of the tenth session's own changes found ---------------------------------------
def test_adapter_files_saved_from_a_wrapper_still_load(seed, tmp_path):
    """Files written from a DataParallel / DDP wrapper before the helpers unwrapped it name the layers
    `module.<name>`: they load into the bare model and the wrapper alike."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    net = ck.inject_clora(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)), target_modules=["0", "2"],
                          rank=3)
    for i in (0, 2):
        _trained(net[i])
    ck.save_adapter(net, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = dict(f.metadata())
        tensors = {"module." + k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    meta["layers"] = json.dumps({"module." + k: v for k, v in layers.items()})
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    x = torch.randn(5, 12)
    for target in (lambda m: m, nn.DataParallel):
        fresh = ck.inject_clora(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)),
                                target_modules=["0", "2"], rank=3)
        fresh.load_state_dict({k: v for k, v in net.state_dict().items() if k.endswith(("weight", "bias"))},
                              strict=False)
        ck.load_adapter(target(fresh), tmp_path / "old.safetensors")
        with torch.no_grad():
            assert torch.equal(fresh(x), net(x))


def test_a_bad_task_state_is_refused_before_any_tensor_loads(seed):
    """A state whose task_index is -1 (the code before allowed the assignment and saved it) loaded the
    merged weight, then raised, leaving the layer unmerged on a merged weight (output 100 % off)."""
    src = _trained(CLoRALinear(10, 8, rank=3))
    src.merge()
    state = copy.deepcopy(src.state_dict())
    ts = ck.nn.task_state(state["_extra_state"])
    ts["task_index"] = -1
    state["_extra_state"] = ts
    dst = CLoRALinear(10, 8, rank=3)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match=r"_extra_state: task_index must be an int >= 0, got -1"):
        dst.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items()) and not dst.merged


def test_a_task_state_alone_into_a_merged_layer_remerges_what_changed(seed):
    """strict=False with the task state alone (no weight, no adapter) into a merged layer: a new alpha
    is merged in (the forward kept the old scaling), and a state that changes nothing leaves the
    weight bit for bit (an unmerge and merge would round it)."""
    layer = _trained(CLoRALinear(10, 8, rank=3))
    layer.merge()
    w = layer.weight.detach().clone()
    layer.load_state_dict({"_extra_state": layer.state_dict()["_extra_state"]}, strict=False)
    assert torch.equal(layer.weight, w)
    other = copy.deepcopy(layer)
    other.unmerge()
    other.alpha = 7.0
    layer.load_state_dict({"_extra_state": other.state_dict()["_extra_state"]}, strict=False)
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert layer.merged and layer.alpha == 7.0 and rel_err(layer(x), other(x)) < 1e-5
    layer.unmerge()
    assert rel_err(layer.weight, other.weight) < 1e-6


def test_set_extra_state_takes_the_energy_before_the_mode(seed):
    """A direct set_extra_state switching a later-task layer to hard built P with the layer's old
    protect_energy, not the state's."""
    src = _trained(CLoRALinear(10, 8, rank=4, mode="hard", protect_energy=0.3, protection="paper"))
    with torch.no_grad():
        src.routing_old.normal_()
    src.end_task()
    dst = CLoRALinear(10, 8, rank=4, protection="paper")
    dst.task_index = 1
    with torch.no_grad():
        dst.routing_old.copy_(src.routing_old)
    dst.set_extra_state(src.get_extra_state())
    assert dst.mode == "hard" and dst.protect_energy == 0.3
    assert torch.allclose(dst.projection, src.projection, atol=1e-6)


def test_module_calls_with_computed_operands_keep_no_memo(seed):
    """torch.func.functional_call with computed (non-leaf) tensors, or a transform: the memo kept
    them, so copy.deepcopy of the layer failed afterwards."""
    layer = _trained(CLoRALinear(8, 6, rank=2))
    x = torch.randn(3, 8)
    params = {k: v * 1.0 for k, v in layer.named_parameters()}      # computed: they have a grad_fn
    torch.func.functional_call(layer, params, (x,)).sum()
    copy.deepcopy(layer)
    torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(dict(layer.named_parameters()))
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


def test_long_names_are_written_through_a_temporary_name_that_fits(tmp_path):
    """A legal name of up to 255 bytes is written atomically: the temporary name NAME.<pid>.<thread id>.tmp
    was longer than the file system takes for names of 230-255 bytes, so a JSON, an adapter file or a
    checkpoint failed at its first write, and the CLIs refused such names up front. The name is now cut
    short for the temporary file, with a hash of the whole name (two names cut alike do not share it); a
    name over the limit is still refused by the CLIs."""
    import argparse
    from clora_kernels import _cli
    from clora_kernels._io import _tmp_path, write_json_atomic, write_safetensors_atomic
    ap = argparse.ArgumentParser(prog="p")
    for name in ("b" * 255, "b" * 240, "é" * 127, "é" * 120 + "x" * 14, "c" * 200):
        path = str(tmp_path / name)
        _cli.check_output(ap, "--json", path)
        write_json_atomic(path, {"name": name})
        assert json.load(open(path)) == {"name": name}
        os.remove(path)
    write_safetensors_atomic(str(tmp_path / ("d" * 255)), {"t": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["d" * 255]         # (no temporary file left)
    one, two = _tmp_path(str(tmp_path / ("e" * 254 + "1"))), _tmp_path(str(tmp_path / ("e" * 254 + "2")))
    assert one != two and max(len(os.fsencode(os.path.basename(t))) for t in (one, two)) <= 255
    with pytest.raises(SystemExit):
        _cli.check_output(ap, "--json", str(tmp_path / ("f" * 256)))


def test_adapter_files_written_into_a_pipe_and_with_the_umask(tmp_path):
    """save_adapter (and every safetensors file the package writes) goes through write_atomic: a named pipe
    is written into and stays one (safetensors' save_file renamed its own temporary file over it, so a
    device, /dev/null as root, became a plain file and a pipe's reader got nothing), and a new file has the
    umask's mode (save_file's was 0600)."""
    import stat
    import threading
    from safetensors.torch import load
    model = nn.Sequential(_trained(CLoRALinear(6, 4, rank=2)))
    fifo = tmp_path / "a.safetensors"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    ck.save_adapter(model, fifo)
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert torch.equal(load(got[0])["0.lora_B"], model[0].lora_B)
    umask = os.umask(0o022)
    try:
        ck.save_adapter(model, tmp_path / "b.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "b.safetensors").st_mode) == 0o644
    with pytest.raises(ValueError, match="save_adapter: path is empty"):
        ck.save_adapter(model, "")
    with pytest.raises(ValueError, match="is a folder; save_adapter writes one file"):
        ck.save_adapter(model, str(tmp_path / "run") + os.sep)      # (a file named 'run' was made)
    assert not (tmp_path / "run").exists()


def test_outputs_that_are_pipes_are_written_into_and_folders_that_take_no_file_are_refused(tmp_path):
    """An output that is a device or a pipe was replaced by the atomic write's rename (root's --json
    /dev/null became a regular file), or failed after the work (/dev/stdout: no folder for the temporary
    file); a folder that takes no file (/proc) passed the check and failed at the first write."""
    import argparse
    import stat
    import threading
    from clora_kernels import _cli
    from clora_kernels._io import write_json_atomic
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    ap = argparse.ArgumentParser(prog="p")
    _cli.check_output(ap, "--json", str(fifo))
    write_json_atomic(fifo, {"a": 1})
    reader.join(10)
    assert got and json.loads(got[0]) == {"a": 1}
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    if os.path.isdir("/proc/self"):
        for bad in ("/proc/x.json", "/proc/new/x.json", "/dev/stdout"):     # (the last: its table's stream)
            with pytest.raises(SystemExit):
                _cli.check_output(ap, "--json", bad)
    # /dev/null is written into even where the command's own output goes there too (cron, `> /dev/null`)
    import subprocess
    import sys
    code = ("import argparse, sys; from clora_kernels import _cli; "
            "_cli.check_output(argparse.ArgumentParser(prog='p'), '--json', '/dev/null')")
    assert subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0
    import socket
    with socket.socket(socket.AF_UNIX) as sock:             # (open() fails on one: refused before the work)
        sock.bind(str(tmp_path / "s"))
        with pytest.raises(SystemExit):
            _cli.check_output(ap, "--json", str(tmp_path / "s"))
    os.remove(tmp_path / "s")
    assert os.listdir(tmp_path) == ["out.json"]             # (the check's probe file is gone)
    _cli.check_output(ap, "--json", str(tmp_path / "fine.json"))
    assert os.listdir(tmp_path) == ["out.json"]


def test_one_module_under_several_names_is_no_tie(seed):
    """timm's CoaT reaches one Mlp as mlp2, mlp3 and mlp4: the adapted layer counted as tied to itself
    and merge / merge_and_unload refused it; a weight shared by two modules is still a tie."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(6, 6))
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))
    model = ck.inject_clora(Aliased(), target_modules=["0"], rank=2)
    assert model.a[0] is model.b[0] and model.a[0].tied_to == []
    _trained(model.a[0])
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = model(x)
        ck.merge(model)
        assert rel_err(model(x), want) < 1e-6
        ck.unmerge(model)
        plain = ck.merge_and_unload(model)
        assert not ck.nn.clora_layers(plain) and rel_err(plain(x), want) < 1e-6
    tied = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    tied[1].weight = tied[0].weight
    tied = ck.inject_clora(tied, target_modules=["0"], rank=2)
    with pytest.raises(ValueError, match=r"tied to \['1.weight'\]"):
        ck.merge(tied)

    class Alias(nn.Module):          # one Linear under two names, one of them replaced: the other is a tie
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.fc2 = self.fc1
    alias = ck.inject_clora(Alias(), target_modules=["fc1"], rank=2)
    assert type(alias.fc2) is nn.Linear and alias.fc1.tied_to == ["fc2.weight"]
    with pytest.raises(ValueError, match=r"tied to \['fc2.weight'\]"):
        alias.fc1.merge()

    # a tied checkpoint loaded with assign=True (torch's idiom for a model built on meta): two Parameter
    # objects over one memory, a tie all the same (merge wrote the head's delta into the other layer, silently)
    src = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6, bias=False))
    src[2].weight = src[0].weight
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6, bias=False))
    meta.load_state_dict(torch.load(buf), assign=True)
    assert meta[0].weight is not meta[2].weight and meta[0].weight.data_ptr() == meta[2].weight.data_ptr()
    loaded = ck.inject_clora(meta, target_modules=["1", "2"], rank=2)
    assert loaded[2].tied_to == ["0.weight"] and loaded[1].tied_to == []
    with pytest.raises(ValueError, match=r"tied to \['0.weight'\]"):
        ck.merge(loaded)
    apart = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))     # views of one buffer, not the same elements
    flat = torch.randn(72)
    apart[0].weight, apart[1].weight = nn.Parameter(flat[:36].view(6, 6)), nn.Parameter(flat[36:].view(6, 6))
    apart = ck.inject_clora(apart, target_modules=["1"], rank=2)
    assert apart[1].tied_to == []
    ck.merge(apart)


class _Identity(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("name", ["routing_delta", "lora_A"])
def test_steps_that_write_a_parametrized_adapter_refuse(name, seed, tmp_path):
    """end_task, reset_adapter and load_adapter write the adapter in place; where a parametrization
    computes one of its tensors the write went into the computed copy and was lost: end_task then
    doubled the routing (the output jumped by 1.05), load_adapter loaded nothing. Each refuses,
    naming the tensor, and changes nothing."""
    model = nn.Sequential(_trained(CLoRALinear(12, 10, rank=4)))
    ck.save_adapter(model, tmp_path / "a.safetensors")
    torch.nn.utils.parametrize.register_parametrization(model[0], name, _Identity())
    x = torch.randn(3, 12)
    y = model(x).detach()
    for step in (model[0].end_task, lambda: ck.end_task(model), model[0].reset_adapter, model[0].reset_parameters,
                 lambda: ck.load_adapter(model, tmp_path / "a.safetensors")):
        with pytest.raises(ValueError, match=rf"computes \['{name}'\] by torch.nn.utils.prune or parametrize"):
            step()
    assert torch.equal(model(x), y) and model[0].task_index == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv1d", [False, True])
def test_a_layer_merged_wide_then_cast_to_16_bits_unmerges_to_its_base(dtype, conv1d, seed):
    """merge keeps the original weight only for 16-bit weights; a layer merged in fp32, then cast to
    16 bits for serving, subtracted the delta in 16 bits at unmerge (64 % of the elements moved, by
    up to 2e-2 of max |W|). The cast keeps the weight as it was before the merge."""
    layer = _trained(CLoRALinear(96, 80, rank=4))
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        model = nn.Sequential(Conv1D(80, 96))
        ck.inject_clora(model, ["0"], rank=4)
        layer = _trained(model[0])
    base = layer.weight.detach().clone()
    layer.merge()
    layer.to(dtype)
    x = torch.randn(5, 96, dtype=dtype)
    assert torch.equal(layer.eval()(x), torch.nn.functional.linear(x, layer.base_weight(), layer.bias))
    layer.unmerge()
    differ = (layer.weight != base.to(dtype)).float().mean().item()
    # (an element whose fp32 subtraction, rounded at |W + delta|, crosses a 16-bit rounding boundary: 0.1 %
    # here, where the delta is several times W; all bf16 elements and 99.99 % of fp16 at delta ~ W)
    assert differ < 1e-2, differ
    layer.merge()           # (16 bits: the original kept, and cast with the layer)
    layer.float()
    layer.unmerge()
    assert (layer.weight != base.to(dtype).float()).float().mean().item() < 1e-2


def test_saves_refuse_a_diverged_adapter(seed, tmp_path):
    """save_adapter and save_peft_adapter wrote NaN adapters that load_adapter / load_peft_adapter
    then refused (or PEFT served NaN); they refuse before writing, naming the tensor and layer."""
    model = nn.Sequential(_trained(CLoRALinear(12, 10, rank=4)))
    with torch.no_grad():
        model[0].routing_delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"save_adapter: routing_delta of layer '0' holds non-finite"):
        ck.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"save_peft_adapter: the adapter's lora_B of layer '0' holds non-finite"):
        ck.save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "peft").exists()


def test_selective_activation_checkpointing_of_the_matmuls(seed):
    """torch.utils.checkpoint with a selective policy that saves the matmuls caches the base GEMM's
    output, which the unmerged plan then wrote in place (y.addmm_): 'Tensor cached during selective
    activation checkpoint has been mutated'. Gradients match the run without checkpointing."""
    import functools
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    ops = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default]

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE
    for bias in (True, False):
        layer = _trained(CLoRALinear(12, 10, rank=4, bias=bias, backend="torch"))
        x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
        layer.double()
        grads = []
        for sac in (False, True):
            y = checkpoint(layer, x, use_reentrant=False,
                           context_fn=functools.partial(create_selective_checkpoint_contexts, policy)) if sac \
                else layer(x)
            grads.append(torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B, layer.routing_delta]))
        for a, b in zip(*grads):
            assert rel_err(a, b) < 1e-12


def _split(state: dict, *parts) -> list:
    """The state in load_state_dict parts, as a sharded checkpoint's files hold it: each part lists its
    keys; the last takes the rest."""
    out = [{k: state[k] for k in keys} for keys in parts]
    taken = {k for p in out for k in p}
    return out + [{k: v for k, v in state.items() if k not in taken}]


@pytest.mark.parametrize("parts", [(["weight"],), (["_extra_state"],), (["weight"], ["_extra_state"]),
                                   (["lora_A", "_extra_state"], ["weight", "bias"]), (["weight", "_extra_state"],)],
                         ids=["weight|rest", "extra|rest", "weight|extra|rest", "A+extra|weight|rest",
                              "weight+extra|rest"])
def test_a_merged_state_loaded_in_parts(parts, seed):
    """A merged layer's state in several load_state_dict calls (transformers' load_sharded_checkpoint,
    a Trainer resuming a sharded checkpoint): the layer took the merged weight, met without its task
    state, for a plain base and added the adapter again (a Llama's logits moved 0.5-0.7). The task
    state carries the merged weight's sums, so either order finds it; unmerge restores the base."""
    src = _trained(CLoRALinear(16, 24, rank=4))
    base = src.weight.detach().clone()
    x = torch.randn(5, 16)
    src.end_task()
    src.merge()
    want = src(x).detach()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    for merged_before in (False, True):     # (into a fresh layer, and into one merged with another adapter)
        layer = _trained(CLoRALinear(16, 24, rank=4))
        if merged_before:
            layer.merge()
        for part in _split(state, *parts):
            layer.load_state_dict(part, strict=False)
        assert layer.merged and torch.equal(layer(x), want)
        layer.unmerge()
        assert rel_err(layer.weight, base) < 1e-6 and rel_err(layer(x), want) < 1e-6


@pytest.mark.parametrize("first", ["weight", "_extra_state"])
def test_an_old_merged_state_loaded_in_parts_warns(first, seed):
    """A merged state saved before the task state carried its weight's sums (before 2026-12-06) has
    nothing that tells its weight from the base: loaded in parts it added the adapter again, silently
    (a helper's attack on checkpoints of six earlier revisions: 0.33 off). It warns, either order."""
    src = _trained(CLoRALinear(16, 24, rank=4))
    src.merge()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    old = ck.nn.task_state(state["_extra_state"])
    del old["weight_sums"]
    state["_extra_state"] = ck.nn._encode_task_state(old)
    layer = CLoRALinear(16, 24, rank=4)
    with pytest.warns(UserWarning, match="saved by an earlier version.*load such a checkpoint whole"):
        for part in _split(state, [first]):
            layer.load_state_dict(part, strict=False)
    whole = CLoRALinear(16, 24, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # loaded whole, the old state is exact and says nothing
        whole.load_state_dict(state)
    x = torch.randn(5, 16)
    assert whole.merged and torch.equal(whole(x), src(x))


def test_a_base_weight_then_a_merged_models_adapter_stays_unmerged(seed):
    """The merged weight is recognised by its sums: a plain base weight, loaded before the adapter and
    task state of a merged model (its weight left out), is no merged weight, and the adapter computes."""
    src = _trained(CLoRALinear(16, 24, rank=4))
    base = {"weight": src.weight.detach().clone(), "bias": src.bias.detach().clone()}
    x = torch.randn(5, 16)
    want = src(x).detach()
    src.merge()
    layer = CLoRALinear(16, 24, rank=4)
    layer.load_state_dict(base, strict=False)
    layer.load_state_dict({k: v for k, v in src.state_dict().items() if k not in ("weight", "bias")}, strict=False)
    assert not layer.merged and rel_err(layer(x), want) < 1e-6


@pytest.mark.parametrize("into", ["freeze", "project"])
@pytest.mark.parametrize("first", [["_extra_state"], None], ids=["extra|rest", "rest|extra"])
def test_a_project_state_loaded_in_parts_into_another_policy(first, into, seed):
    """A project layer's state in parts into a layer of the default policy (load adopts the saved one):
    a part with the bases before the task state lost them (unexpected keys, dropped), and the layer
    protected nothing; and split loads re-projected the adapter at the first forward (a resumed run
    was no longer bit-identical). Both parts' results equal one load's."""
    src = CLoRALinear(16, 24, rank=4, protection="project")
    x = torch.randn(64, 16)
    with torch.no_grad(), ck.observe_task(src):
        src(x)
    src.end_task()
    opt = torch.optim.Adam([p for p in src.parameters() if p.requires_grad], lr=1e-2)
    src(x).square().sum().backward()
    opt.step()
    src(x)      # (enforced: the state carries its fingerprint)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    assert ck.nn.task_state(state["_extra_state"])["enforced"] is not None
    parts = _split(state, first) if first else _split(state, [k for k in state if k != "_extra_state"])
    layer = CLoRALinear(16, 24, rank=4, protection=into)
    for part in parts:
        result = layer.load_state_dict(part, strict=False)
        assert not result.unexpected_keys
    assert layer.protection.config() == src.protection.config()
    for name, value in state.items():
        if name != "_extra_state":
            assert torch.equal(layer.state_dict()[name], value), name
    adapter = [t.clone() for t in (layer.lora_A, layer.lora_B, layer.routing_delta)]
    layer(x)
    assert all(torch.equal(a, b) for a, b in zip(adapter, (layer.lora_A, layer.lora_B, layer.routing_delta)))


def test_torch_distributed_checkpoint_partial_loads(seed):
    """set_model_state_dict of one shard at a time (accelerate's sharded loader) hands every layer whose
    task state is in another shard torch's placeholder; it was refused ('must be the uint8 tensor')."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    src = nn.Sequential(_trained(CLoRALinear(8, 8, rank=2)), _trained(CLoRALinear(8, 8, rank=2)))
    for m in src:
        m.end_task()
    state = src.state_dict()
    dst = nn.Sequential(CLoRALinear(8, 8, rank=2), CLoRALinear(8, 8, rank=2))
    for i in "01":
        set_model_state_dict(dst, {k: v for k, v in state.items() if k.startswith(i + ".")},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    x = torch.randn(3, 8)
    assert [m.task_index for m in dst] == [1, 1] and torch.equal(dst(x), src(x))


def test_an_interrupted_save_keeps_the_previous_file(seed, tmp_path, monkeypatch):
    """save_adapter wrote the file in place: a process killed mid-save (a torchrun rank, Ctrl-C) left
    a truncated file where the last good one was. It writes a temporary file and renames it."""
    import safetensors.torch
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ck.inject_clora(model, ["0"], rank=2)
    path = tmp_path / "adapter.safetensors"
    ck.save_adapter(model, path)
    good = path.read_bytes()
    _trained(model[0])

    def dies(src, dst):     # (killed after the temporary file's bytes, half of them here, before the rename)
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save", lambda tensors, metadata=None: b"half")
        patch.setattr(os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            ck.save_adapter(model, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_a_save_writes_through_a_symlink_and_keeps_the_files_mode(seed, tmp_path):
    """The atomic save (a temporary file renamed) replaced a symlinked adapter path with a regular file
    and reset a 0600 file to the umask's mode, where writing in place had kept both (a review)."""
    import os
    import stat
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ck.inject_clora(model, ["0"], rank=2)
    target, link = tmp_path / "real.safetensors", tmp_path / "adapter.safetensors"
    ck.save_adapter(model, target)
    os.chmod(target, 0o600)
    link.symlink_to(target)
    _trained(model[0])
    ck.save_adapter(model, link)
    assert link.is_symlink() and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fresh.load_state_dict(model.state_dict(), strict=False)
    ck.inject_clora(fresh, ["0"], rank=2)
    ck.load_adapter(fresh, target)
    assert torch.equal(fresh[0].lora_B, model[0].lora_B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_layer_keeps_a_float32_adapter(seed, dtype):
    """from_linear / inject_clora on a 16-bit layer make a float32 adapter (PEFT's autocast_adapter_dtype,
    its default), cast to the layer's dtype as it enters the op: the output is the 16-bit adapter's to
    the bit, its gradients are float32, and an Adam step below bf16's spacing at 1.0 is kept (a bf16
    routing_delta kept its diagonal at exactly 1.0 over ten steps at lr 1e-3: the first task never
    trained it). observe_task records the 16-bit inputs (the policy read the adapter's dtype as the
    input's and skipped them). autocast_adapter_dtype=False keeps the layer's dtype."""
    base = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6)).to(dtype)
    wide = ck.inject_clora(copy.deepcopy(base), ["0", "2"], rank=4, protection="project")
    narrow = ck.inject_clora(copy.deepcopy(base), ["0", "2"], rank=4, protection="project",
                             autocast_adapter_dtype=False)
    assert wide[0].lora_A.dtype == wide[0].routing_old.dtype == torch.float32 and wide[0].weight.dtype == dtype
    assert narrow[0].lora_A.dtype == narrow[0].routing_delta.dtype == dtype
    with torch.no_grad():
        for m in (wide[0], wide[2]):
            m.lora_A.copy_(m.lora_A.to(dtype))
            m.lora_B.normal_()
            m.lora_B.copy_(m.lora_B.to(dtype))
    narrow.load_state_dict(wide.state_dict())
    x = torch.randn(32, 24, dtype=dtype)
    y = wide(x)
    assert y.dtype == dtype and torch.equal(y, narrow(x))
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in wide.parameters() if p.requires_grad)
    opt = torch.optim.Adam([p for p in wide.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    assert (wide[0].routing_delta.diagonal() != 1).all()
    with torch.no_grad(), ck.observe_task(wide):
        wide(x)
    ck.end_task(wide)           # (project refuses a task whose inputs it did not see)
    assert wide[0].routing_old.abs().sum() > 0 and wide[0].lora_A.dtype == torch.float32
    assert wide.to(torch.float32)[0].lora_A.dtype == torch.float32 and wide.to(dtype)[0].lora_A.dtype == dtype


@pytest.mark.parametrize("protection", ["paper", "freeze", "project"])
def test_a_lower_protect_energy_after_a_task_makes_p_again(seed, protection):
    """end_task's warning of a hard-mode P = 0 advises a lower protect_energy; set after the task, it
    changed nothing until the next end_task (P stayed 0, routing_delta's gradient 0: the layer learned
    nothing in the task). It now makes P from R_old as end_task does, as a switch to hard mode does."""
    from clora_kernels.nn import _hard_projection
    torch.manual_seed(seed)
    layer = CLoRALinear(16, 12, rank=4, mode="hard", protection=protection, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
        # singular values whose energy 0.9 needs all four directions (P = 0), 0.5 two (trace 2)
        layer.routing_delta.copy_(torch.diag(torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)))
    if protection == "project":
        with ck.observe_task(layer):
            layer(torch.randn(8, 16, dtype=torch.float64))
        ck.end_task(layer)      # (project is never stuck: its factors learn outside the old inputs)
    else:
        twin = copy.deepcopy(layer)
        with pytest.warns(RuntimeWarning, match="is now 0") as record:
            ck.end_task(layer)
        assert record[0].filename == __file__
        with pytest.warns(RuntimeWarning, match=r"\['<this layer>'\] is now 0") as record:
            twin.end_task()         # (the layer's method warns too, at the caller's line)
        assert record[0].filename == __file__
    assert float(torch.trace(layer.projection)) < 0.5
    layer.protect_energy = 0.5
    want = _hard_projection(layer.routing_old, 0.5)
    assert torch.equal(layer.projection, want) and float(torch.trace(want)) > 1.5
    x = torch.randn(5, 16, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert layer.routing_delta.grad.abs().max() > 1e-3     # the next task's routing learns
    layer.protect_energy = 0.5                              # the same value: nothing made again
    assert torch.equal(layer.projection, want)


def test_a_layer_offloaded_by_accelerate_is_refused_and_dispatch_after_injection_works(seed, tmp_path):
    """inject_clora on a model loaded with a device_map that offloads a targeted layer (its weight on the
    meta device, loaded by accelerate's hook on the layer at each forward) replaced the layer and dropped
    the hook: the adapter was made on the meta device and the forward failed ("device mismatch"). Refused
    now, naming the layer; the route it names (inject, then dispatch_model) computes what the model did."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(seed)

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 4))
    device_map = {"0": "cpu", "1": "disk"}      # (a block's hook is the block's: its layers are adapted)
    dispatched = accelerate.dispatch_model(model(), device_map=device_map, offload_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"layer '1'.*offloaded by accelerate's .*dispatch_model.*"
                                         r"the model was not changed"):
        ck.inject_clora(dispatched, ["0.0", "1"], rank=2)
    assert type(dispatched[0][0]) is nn.Linear and type(dispatched[1]) is nn.Linear
    assert dispatched[0][0].weight.requires_grad
    x = torch.randn(5, 8)
    plain = ck.inject_clora(model(), ["0.0", "1"], rank=2)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, CLoRALinear):
                m.lora_B.normal_()
        want = plain(x)
        accelerate.dispatch_model(plain, device_map=device_map, offload_dir=str(tmp_path / "b"))
        assert torch.equal(plain(x), want)


def test_a_data_swap_of_a_factor_to_another_shape_is_named(seed):
    """The validation memo keyed the shapes of the weight, bias and routing but not of the factors (a
    swap of those 'meets torch's own shape error'): a helper swapped lora_B's .data to (5, 1) on a
    one-output layer, and the merge plan (M = 700) broadcast it into a (700, 5) output without a word; the
    other swaps raised torch's errors, naming no argument."""
    torch.manual_seed(seed)
    layer = CLoRALinear(16, 1, rank=1)
    x = torch.randn(700, 16, requires_grad=True)
    layer(x).sum().backward()
    good = layer.lora_B.data
    layer.lora_B.data = torch.randn(5, 1)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(out_features, rank\) = \(1, 1\), got \(5, 1\) "
                                         r"\(out_features from weight \(1, 16\), rank from lora_A \(1, 16\)\)"):
        layer(x)
    layer.lora_B.data = good
    assert layer(x).shape == (700, 1)
    layer.lora_A.data = torch.randn(1, 17)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(rank, in_features=16\) with rank >= 1, got \(1, 17\)"):
        layer(x[:5])
    hard = CLoRALinear(16, 24, rank=4, mode="hard")
    hard(x[:5])
    hard.projection.data = torch.eye(5)
    with pytest.raises(ValueError, match=r"projection must have shape \(rank, rank\) = \(4, 4\), got \(5, 5\)"):
        hard(x[:5])


def test_inject_and_merge_and_unload_carry_the_layers_hooks(seed):
    """Hooks registered on a Linear before inject_clora were dropped with it (a pre-hook clamping the input
    stopped running, silently; PEFT keeps the hooked layer inside its own), and merge_and_unload dropped
    the C-LoRA layer's: both carry them, and the handles given for them still remove them."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    seen = []
    clamp = model[0].register_forward_pre_hook(lambda m, args: (args[0].clamp(-0.1, 0.1),))
    model[2].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    x = torch.randn(3, 6)
    want = model(x)
    ck.inject_clora(model, target_modules=["0", "2"], rank=2)
    assert torch.equal(model(x), want) and seen == ["Linear", "CLoRALinear"]
    with torch.no_grad():
        model[0].lora_B.normal_()
    adapted = model(x)
    ck.merge_and_unload(model)
    assert type(model[2]) is nn.Linear and torch.allclose(model(x), adapted, atol=1e-6)
    assert seen[-1] == "Linear"
    clamp.remove()
    assert not model[0]._forward_pre_hooks and not torch.allclose(model(x), adapted, atol=1e-3)
    # the state_dict hooks too, a load pre-hook given the new layer (torch holds its module by a weak reference:
    # the old one, dead after the swap, failed every later load); a layer kept aside keeps its own hooks
    import gc
    base, loads = nn.Linear(6, 5), []
    base._register_load_state_dict_pre_hook(lambda module, *a: loads.append(type(module).__name__), with_module=True)
    base.register_state_dict_post_hook(lambda module, sd, prefix, meta: sd.__setitem__(prefix + "marker", 1))
    held = nn.Sequential(base)
    ck.inject_clora(held, target_modules=["0"], rank=2)
    del base
    gc.collect()
    state = held.state_dict()
    assert state.pop("0.marker") == 1
    held.load_state_dict(state)
    assert loads == ["CLoRALinear"]
    kept = nn.Linear(6, 5)
    kept.register_forward_hook(lambda *a: None)
    layer = CLoRALinear.from_linear(kept, rank=2)
    layer.register_forward_hook(lambda m, a, out: seen.append("new layer's"))
    kept(x)
    assert "new layer's" not in seen
    from torch.ao import quantization as tq
    prepared = nn.Sequential(nn.Linear(6, 5))
    prepared.qconfig = tq.default_qconfig
    tq.prepare(prepared, inplace=True)
    with pytest.raises(ValueError, match="prepared for quantization"):
        ck.inject_clora(prepared, target_modules=["0"], rank=2)
    qat = nn.Sequential(nn.Linear(6, 5)).train()      # a subclass named as nn.Linear is named in full
    qat.qconfig = tq.get_default_qat_qconfig("fbgemm")
    tq.prepare_qat(qat, inplace=True)
    with pytest.raises(ValueError, match=r"by type: torch\.ao\.nn\.qat\.modules\.linear\.Linear \(1\)"):
        ck.inject_clora(qat, target_modules=["0"], rank=2)


def test_load_pre_hooks_run_before_the_layer_reads_the_state(seed):
    """A load_state_dict pre-hook on the layer (one putting a weight saved (in, out) back in shape) ran after
    the layer's own shape check, which then took the state for another layer's and dropped its task state:
    "All keys matched", task_index 0, and the output 3.4 off. The hooks run first, once."""
    src = _trained(CLoRALinear(6, 5, rank=2, alpha=4.0))
    src.end_task()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["weight"] = state["weight"].t().contiguous()
    dst = CLoRALinear(6, 5, rank=2)
    calls = []

    def transpose(module, sd, prefix, *rest):
        calls.append(prefix)
        sd[prefix + "weight"] = sd[prefix + "weight"].t()
    dst._register_load_state_dict_pre_hook(transpose, with_module=True)
    dst.load_state_dict(state)
    x = torch.randn(3, 6)
    assert calls == [""] and dst.task_index == 1 and dst.alpha == 4.0 and not dst.lora_A.requires_grad
    assert torch.allclose(dst(x), src(x))


def test_a_pruned_target_is_refused_and_the_model_left_as_it_was():
    """inject_clora on a Linear pruned by torch.nn.utils.prune (or the old weight_norm) failed deep in the swap
    with torch's "can only change requires_grad flags of leaf variables", leaving other layers frozen: refused,
    naming the cause, with every requires_grad as it was."""
    from torch.nn.utils import prune
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"layer '2'.*computed on every forward.*prune.remove"):
        ck.inject_clora(model, target_modules=["0", "2"], rank=2)
    assert all(p.requires_grad for p in model.parameters()) and type(model[0]) is nn.Linear


def test_a_layer_used_under_a_meta_default_device(seed):
    """Inside torch.device("meta") (or set_default_device), a real layer's reset_parameters failed half-way
    (its identity routing made on meta), and its state_dict held a meta task state that saved without a
    word and could not be loaded: both are made on the CPU."""
    layer = CLoRALinear(6, 5, rank=2)
    with torch.device("meta"):
        layer.reset_parameters()
        state = layer.state_dict()
        made = CLoRALinear.from_linear(nn.Linear(6, 5, device="cpu"), rank=2)
    assert torch.equal(layer.routing_delta, torch.eye(2)) and state["_extra_state"].device.type == "cpu"
    assert not made.lora_A.is_meta and torch.equal(made.projection, torch.eye(2))
    CLoRALinear(6, 5, rank=2).load_state_dict(state)
