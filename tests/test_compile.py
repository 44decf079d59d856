"""torch.compile(fullgraph=True) of a C-LoRA ViT: the registered ops trace with no graph break."""
import warnings

import pytest
import torch

import clora_kernels as ck
from helpers import rel_err

timm = pytest.importorskip("timm")


def test_compile_vit_fullgraph(seed):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5)
    ck.inject_clora(model, rank=4, backend="torch")
    for _, m in ck.nn.clora_layers(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.02)
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, eager) < 1e-5
    out.sum().backward()
    grads = [m.routing_delta.grad for _, m in ck.nn.clora_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_inductor_single_layer(seed):
    layer = ck.CLoRALinear(24, 40, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 24)
    y = torch.compile(layer, fullgraph=True)(x)
    assert rel_err(y, layer(x)) < 1e-5


def test_compile_dynamic_shapes(seed):
    """dynamic=True traces the module's scaling as a symbolic float (math.isfinite on it would be a
    graph break under fullgraph): one graph serves every batch size, forward and backward equal eager."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    ck.inject_clora(model, target_modules=["0", "2"], rank=4, alpha=6, backend="torch")
    for _, m in ck.nn.clora_layers(model):
        with torch.no_grad():
            m.lora_B.normal_()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 5, 9):
        x = torch.randn(batch, 16)
        assert rel_err(compiled(x), model(x)) < 1e-6
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    x = torch.randn(7, 16)
    compiled(x).square().sum().backward()
    got = [m.routing_delta.grad.clone() for _, m in ck.nn.clora_layers(model)]
    model.zero_grad()
    model(x).square().sum().backward()
    assert all(rel_err(g, m.routing_delta.grad) < 1e-5 for g, (_, m) in zip(got, ck.nn.clora_layers(model)))
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames      # batch 7 needed no recompile


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_refuses_nonfinite_scaling(seed, dynamic):
    """Under torch.compile the functional call refuses a nan or inf scaling as eager does (it once
    skipped that test while compiling); a finite float and an int still run."""
    torch._dynamo.reset()
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    eye, zero = torch.eye(2), torch.zeros(2, 2)

    def f(x, s):
        return ck.clora_linear(x, w, None, a, b, eye, zero, None, s, backend="torch")

    compiled = torch.compile(f, dynamic=dynamic, backend="eager")
    for s in (0.5, 2, 1e-3):
        assert rel_err(compiled(x, s), f(x, s)) < 1e-6, s
    for s in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="scaling must be a finite real number"):
            compiled(x, s)


def test_a_torchscript_trace_leaves_the_model_exportable(seed):
    """The TorchScript tracer (torch.jit.trace, the legacy ONNX exporter) gives the layer a traced
    width: kept as the validation memo's key it failed every later torch.export (a data-dependent
    guard) and fullgraph compile of the model."""
    torch._dynamo.reset()
    model = ck.inject_clora(torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                            ["0", "2"], rank=2, backend="torch")
    x = torch.randn(3, 12)
    traced = torch.jit.trace(model, x)
    assert rel_err(traced(x), model(x)) < 1e-6
    exported = torch.export.export(model, (x,))
    assert rel_err(exported.module()(x), model(x)) < 1e-6


def test_project_policy_exports_and_compiles(seed):
    """protection='project' from the second task: torch.export gives the eager output (its enforce,
    which reads data pointers and writes the factors in place, failed on fake tensors; the exported
    graph is inference, the weights as enforced), and compiled training keeps the projection (the
    enforce runs outside the graph)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, protection="project", backend="torch"))
    x = torch.randn(16, 12)
    with torch.no_grad(), ck.observe_task(model):
        model(x)
    ck.end_task(model)
    layer = model[0]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    compiled = torch.compile(model, backend="eager")
    for _ in range(3):
        loss = compiled(x).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        want = model(x)
    assert layer.protect_input_basis.shape[1] > 0
    assert float((layer.lora_A @ layer.protect_input_basis - layer.protect_input_anchor).abs().max()) < 1e-5
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert rel_err(exported.module()(x), want) < 1e-6


def test_freeze_after_the_first_task_compiles_in_one_graph(seed):
    """The default policy from the second task on: fullgraph compile, no graph break (the project
    policy's enforce, which runs outside the graph, is not called for a policy that enforces nothing)."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"), torch.nn.ReLU(),
                                ck.CLoRALinear(8, 4, rank=2, backend="torch"))
    ck.end_task(model)
    x = torch.randn(5, 12)
    assert rel_err(torch.compile(model, fullgraph=True, backend="eager")(x), model(x)) < 1e-6


@torch._dynamo.config.patch(**{"recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit")
                                else "cache_size_limit": 3})     # (its name before torch 2.7)
def test_a_compiled_model_is_not_compiled_again_for_every_task(seed):
    """The policies' forward read task_index > 0, and Dynamo guarded on the int: every end_task under
    "freeze" (the default) compiled the model again, so fullgraph=True failed at the 9th task (torch's
    8 compiles) and without it the run fell back to eager (a helper's attack). At most one compile more
    now (the factors' requires_grad, off from the second task)."""
    torch._dynamo.reset()
    for protection in ("freeze", "project"):
        model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch", protection=protection),
                                    torch.nn.ReLU(), ck.CLoRALinear(8, 4, rank=2, backend="torch",
                                                                    protection=protection))
        compiled = torch.compile(model, fullgraph=protection == "freeze", backend="eager")
        x = torch.randn(5, 12)
        for task in range(6):
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            y = compiled(x)
            assert rel_err(y, model(x)) < 1e-6, (protection, task)
            y.square().sum().backward()
            opt.step()
            opt.zero_grad()
            if protection == "project":
                with torch.no_grad(), ck.observe_task(model):
                    model(x)
            ck.end_task(model)
        torch._dynamo.reset()
    layer = ck.CLoRALinear(6, 5, rank=2, backend="torch")
    layer.end_task()
    state = layer.__getstate__()
    del state["_after_first_task"]          # a layer pickled before the flag
    old = ck.CLoRALinear.__new__(ck.CLoRALinear)
    old.__setstate__(state)
    x = torch.randn(3, 6)
    assert old._after_first_task is True and torch.equal(old(x), layer(x))


def test_observe_task_does_not_compile_the_model_again(seed):
    """observe_task's first write of `_observing` put the key into the layer's __dict__, where Dynamo had
    guarded on its absence: a model compiled before the pass compiled again after it."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch", protection="project"))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 12)
    compiled(x)
    with torch.no_grad(), ck.observe_task(model):
        model(x)
    assert rel_err(compiled(x), model(x)) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# ---- cases a review of the compile / export surface found (each fails without its fix) ------------
def test_compiled_activation_checkpointing_in_one_graph(seed):
    """The validation memo's write, a mutation of the module inside the traced region, was refused by
    compiled checkpointing under fullgraph and cost every compiled model a second compile."""
    from torch.utils.checkpoint import checkpoint
    torch._dynamo.reset()
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"))
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(5, 12, requires_grad=True)
    compiled = torch.compile(lambda x: checkpoint(model, x, use_reentrant=False), fullgraph=True, backend="eager")
    out = compiled(x)
    assert rel_err(out, model(x)) < 1e-6
    out.sum().backward()
    assert model[0].lora_B.grad is not None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_trainable_weight_is_warned_about(seed, backend):
    """A base weight made trainable gets no gradient (design.md section 2), which eager says in the
    backward. Compiled, that backward runs only while AOTAutograd traces it (and not at all on a warm
    compile cache), where it said nothing: the weight trained silently not at all. It is said while the
    forward is traced, in one graph."""
    torch._dynamo.reset()
    layer = ck.CLoRALinear(12, 8, rank=2)
    layer.weight.requires_grad_(True)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(5, 12)
    with pytest.warns(UserWarning, match="gives its base weight no gradient"):
        y = compiled(x)
    assert rel_err(y, layer(x)) < 1e-6
    y.sum().backward()
    assert layer.weight.grad is None and layer.lora_A.grad is not None
    layer.weight.requires_grad_(False)      # (guarded: a recompile, and nothing said)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x).sum().backward()


def test_a_graph_exported_without_grad_trains(seed):
    """need_t is fixed when traced: a model exported under no_grad, then trained, ran the op without t and
    its backward raised; it makes t again from the saved x, with eager's gradients."""
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"))
    with torch.no_grad():
        model[0].lora_B.normal_()
    x = torch.randn(5, 12)
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()
    exported(x).square().sum().backward()
    model(x).square().sum().backward()
    got = dict(exported.named_parameters())
    for name in ("0.lora_A", "0.lora_B", "0.routing_delta"):
        assert rel_err(got[name].grad, dict(model.named_parameters())[name].grad) < 1e-6, name


def test_adapter_files_of_a_compiled_model_name_its_layers(seed, tmp_path):
    """torch.compile's wrapper names every submodule `_orig_mod.<name>`: the files carried those names (a
    PEFT model then served the plain base). The helpers name the wrapped model's layers."""
    model = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"), torch.nn.ReLU())
    with torch.no_grad():
        model[0].lora_B.normal_()
    compiled = torch.compile(model)       # (never called: nothing compiles)
    ck.save_adapter(compiled, tmp_path / "a.safetensors")
    ck.save_peft_adapter(compiled, tmp_path / "peft")
    plain = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"), torch.nn.ReLU())
    plain[0].weight, plain[0].bias = model[0].weight, model[0].bias
    x = torch.randn(3, 12)
    for load, path in ((ck.load_adapter, tmp_path / "a.safetensors"), (ck.load_peft_adapter, tmp_path / "peft")):
        ck.nn.clora_layers(plain)[0][1].reset_adapter()
        load(plain, path)                                   # the compiled model's file, into a plain one
        with torch.no_grad():
            assert rel_err(plain(x), model(x)) < 1e-6, load.__name__
    ck.save_adapter(plain, tmp_path / "b.safetensors")
    again = torch.nn.Sequential(ck.CLoRALinear(12, 8, rank=2, backend="torch"), torch.nn.ReLU())
    ck.load_adapter(torch.compile(again), tmp_path / "b.safetensors")      # a plain model's file, into a compiled one
    assert torch.equal(again[0].lora_B, model[0].lora_B)
    with ck.disable_adapter(compiled), torch.no_grad():
        assert rel_err(model(x), torch.nn.functional.relu(torch.nn.functional.linear(x, model[0].weight,
                                                                                     model[0].bias))) < 1e-6


def test_a_torchscript_trace_runs_at_any_rank_and_records_no_projection(seed):
    """A trace at a 3-D input ran a 4-D one to the wrong shape and refused a 2-D one (a flatten and a
    reshape of one rank were recorded), and the project policy's in-place projection was recorded as
    writes into the parameters (torch.jit.trace's check failed; the TorchScript ONNX exporter refused
    aten::copy)."""
    layer = ck.CLoRALinear(8, 4, rank=2, protection="project", backend="torch")
    x = torch.randn(2, 3, 8)
    with torch.no_grad(), ck.observe_task(layer):
        layer(x)
    layer.end_task()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).square().sum().backward()
    opt.step()                              # the next forward projects
    traced = torch.jit.trace(layer, x)
    assert "aten::copy_" not in str(traced.graph)
    for shape in ((7, 8), (1, 1, 1, 8), (8,)):
        z = torch.randn(shape)
        with torch.no_grad():
            assert traced(z).shape == layer(z).shape and rel_err(traced(z), layer(z)) < 1e-6, shape


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("protection", ["freeze", "project"])
def test_compile_over_torch_func(backend, protection, seed):
    """torch.compile(vmap(grad(loss))) (per-sample gradients, compiled) traced the registered op, which
    has no functorch rules ('autograd.Function with functorch transforms must override setup_context'),
    and a project layer after its first task broke the graph for its in-place projection; under a
    transform the compiled layer runs the formula on projected operands, as eager torch.func does,
    equal to it, and a plain compile keeps the op."""
    from torch.func import functional_call, grad, vmap
    layer = ck.CLoRALinear(12, 10, rank=4, backend="torch", protection=protection)
    if protection == "project":
        with torch.no_grad(), ck.observe_task(layer):
            layer(torch.randn(30, 12))
        layer.end_task()
    with torch.no_grad():
        layer.lora_B.normal_()
    params = {n: p.detach() + 0.1 for n, p in layer.named_parameters() if p.requires_grad}

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()
    x = torch.randn(6, 1, 12)
    torch._dynamo.reset()
    eager = vmap(grad(loss), in_dims=(None, 0))(params, x)
    out = torch.compile(vmap(grad(loss), in_dims=(None, 0)), backend=backend, fullgraph=True)(params, x)
    assert all(rel_err(out[n], eager[n]) < 1e-6 for n in eager)
    graphs = []
    torch._dynamo.reset()
    if protection == "freeze":      # (project's in-place projection is a graph break in a plain compile)
        torch.compile(layer, backend=lambda gm, _: graphs.append(str(gm.graph)) or gm.forward, fullgraph=True)(x)
        assert graphs and "clora.linear_fwd" in graphs[0]
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_compiled_backward_inside_autocast_after_a_forward_outside_it(seed, backend):
    """A compiled fp32 forward outside torch.autocast, then `loss.backward()` inside it: the graph calls
    clora::linear_dx at run time, under the caller's autocast, where the dx failed with a dtype mismatch
    (the eager path runs its whole backward without autocast). Gradients equal eager's fp32 ones."""
    torch._dynamo.reset()
    layer = ck.CLoRALinear(12, 10, rank=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    grads = []
    for fn in (layer, torch.compile(layer, backend=backend)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y.square().sum().backward()
        grads.append(xi.grad)
    assert grads[1].dtype == torch.float32 and rel_err(grads[1], grads[0]) < 1e-6
