"""PEFT and Hugging Face interop: PEFT-style targeting, transformers' Conv1D, PEFT adapters in and
out (checked with PEFT itself), and PEFT's conveniences. Tiny models built from configs: nothing
is downloaded."""
import copy
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import clora_kernels as ck
from clora_kernels.nn import clora_layers

from helpers import make_inputs, oracle, rel_err

timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             num_classes=5).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   hidden_size=16, intermediate_size=24, vocab_size=61, bos_token_id=0,
                                   eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=24,
                                  vocab_size=61, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


MODELS = {"vit": (_vit, "all-linear"), "gpt2": (_gpt2, "all-linear"), "llama": (_llama, LLAMA_TARGETS),
          "bert": (_bert, "all-linear")}


def _run(model, name, data):
    out = model(data) if name == "vit" else model(input_ids=data)
    return out if name == "vit" else out.logits


def _data(name):
    return torch.randn(2, 3, 16, 16) if name == "vit" else torch.randint(0, 61, (2, 7))


def _apart64(a, b, name, data) -> float:
    """rel_err of two models' outputs, each run as a float64 copy: what their tensors compute, without fp32's
    rounding, which these small random models amplify (factors of std 0.3 over a base of 0.02: PEFT's own fp32
    output was 1e-4 off its float64 one on 0.7 % of seeds, and the comparisons at 1e-5 failed)."""
    with torch.no_grad():
        return rel_err(*(_run(copy.deepcopy(m).double(), name, data.double() if name == "vit" else data)
                         for m in (a, b)))


def _two_tasks(model):
    """Every layer with a non-trivial adapter after one end_task: R_old and R_delta both non-zero
    and non-identity, so a folding that drops either is seen."""
    for _, m in clora_layers(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.3)
            m.routing_delta.add_(0.3 * torch.randn_like(m.routing_delta))
    ck.end_task(model)
    for _, m in clora_layers(model):
        with torch.no_grad():
            m.routing_delta.normal_(std=0.3)


# ---- targeting -----------------------------------------------------------------------------
def test_target_forms_follow_peft():
    names = lambda model: [n for n, _ in clora_layers(model)]   # noqa: E731
    vit = ck.inject_clora(_vit(), target_modules=["qkv", "fc2"], rank=2)
    assert names(vit) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    vit = ck.inject_clora(_vit(), target_modules=r"blocks\.1\..*", rank=2)        # regex: full match
    assert names(vit) == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    vit = ck.inject_clora(_vit(), target_modules="all-linear", exclude_modules=["fc1"], rank=2)
    assert "head" not in names(vit) and len(names(vit)) == 6 and not any(n.endswith("fc1") for n in names(vit))
    vit = ck.inject_clora(_vit(), target_modules="all-linear", exclude_modules=r".*\.attn\..*", rank=2)
    assert names(vit) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    llama = ck.inject_clora(_llama(), target_modules="all-linear", rank=2)
    assert len(names(llama)) == 14 and "lm_head" not in names(llama)
    bert = ck.inject_clora(_bert(), target_modules="all-linear", rank=2)
    assert "classifier" not in names(bert) and "bert.pooler.dense" in names(bert)
    gpt2 = ck.inject_clora(_gpt2(), target_modules="all-linear", rank=2)
    assert names(gpt2)[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                               "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert len(names(gpt2)) == 8 and all(m.fan_in_fan_out for _, m in clora_layers(gpt2))


def test_target_errors_are_clear():
    with pytest.raises(ValueError, match=r"no nn.Linear or Conv1D layer matches.*Linear \(9\).*Conv2d \(1\)"):
        ck.inject_clora(_vit(), target_modules=["nothing"])
    with pytest.raises(ValueError, match=r"a string is a regex on the full module name.*pass \['qkv'\]"):
        ck.inject_clora(_vit(), target_modules="qkv")
    with pytest.raises(ValueError, match=r"target_modules='\(' is not a valid regular expression"):
        ck.inject_clora(_vit(), target_modules="(")
    with pytest.raises(ValueError, match=r"without exclude_modules"):
        ck.inject_clora(_vit(), target_modules=["qkv"], exclude_modules=["qkv"])
    with pytest.raises(TypeError, match="target_modules must be a list of module names or a regex"):
        ck.inject_clora(_vit(), target_modules=3)
    with pytest.raises(ValueError, match="non-empty list"):
        ck.inject_clora(_vit(), target_modules=[])


def test_second_injection_keeps_the_first_adapter_trainable():
    vit = ck.inject_clora(_vit(), target_modules=["qkv"], rank=2)
    ck.inject_clora(vit, target_modules=["fc1"], rank=2)
    assert len(clora_layers(vit)) == 4
    assert all(m.lora_A.requires_grad and m.routing_delta.requires_grad for _, m in clora_layers(vit))
    assert not vit.head.weight.requires_grad


# ---- transformers' Conv1D ------------------------------------------------------------------
def test_conv1d_layer_with_a_missing_weight_is_a_clear_error():
    """A Conv1D layer transposed its weight before validating it: `layer.weight = None` was an
    AttributeError on NoneType."""
    layer = ck.CLoRALinear.from_linear(Conv1D(7, 5), rank=3)
    layer(torch.randn(2, 5))
    layer.weight = None
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
        layer(torch.randn(2, 5))


def test_conv1d_shares_its_weight_and_matches_the_oracle(seed):
    conv = Conv1D(7, 5)                                     # nf=7 outputs, nx=5 inputs: weight (5, 7)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 4, 5)
    layer = ck.CLoRALinear.from_linear(conv, rank=3, backend="torch")
    assert layer.weight.data_ptr() == conv.weight.data_ptr() and layer.weight.shape == (5, 7)
    assert (layer.in_features, layer.out_features) == (5, 7)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))
    inp = make_inputs(12, 5, 7, 3)
    with torch.no_grad():
        layer.weight.copy_(inp["weight"].t())
        layer.bias.copy_(inp["bias"])
        for t in ("lora_A", "lora_B", "routing_old", "routing_delta"):
            getattr(layer, t).copy_(inp[t])
    layer.scaling = inp["scaling"]
    x = inp["x"].float()
    ref, _ = oracle(inp)
    for backend in ("torch", "triton"):
        if ck.available_backends()[backend][0]:
            layer.backend = backend
            assert rel_err(layer(x), ref) < 1e-5, backend
    w0 = conv.weight.detach().clone()
    layer.merge()
    assert rel_err(conv(x), ref) < 1e-5                     # the shared Conv1D weight is merged
    layer.unmerge()
    assert torch.allclose(conv.weight, w0, atol=1e-6)


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="plain nn.Linear or a transformers Conv1D, got Conv2d"):
        ck.CLoRALinear.from_linear(nn.Conv2d(2, 2, 1))


# ---- PEFT out: save_peft_adapter, loaded by PEFT itself ------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_save_peft_adapter_loads_in_peft_with_the_same_outputs(tmp_path, seed, name):
    make, targets = MODELS[name]
    base = make()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=3, alpha=5, backend="torch")
    _two_tasks(model)
    data = _data(name)
    with torch.no_grad():
        want = _run(model, name, data)
        assert rel_err(want, _run(base, name, data)) > 1e-2   # the adapter changes the output
    ck.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 5, "LORA")
    if name == "llama":          # short names where they select exactly the layers (what vLLM expects)
        assert config["target_modules"] == sorted(LLAMA_TARGETS)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert _apart64(served, model, name, data) < 1e-5      # (the routing folded into lora_B in fp32: its rounding)


# ---- PEFT in: load_peft_adapter of what PEFT's save_pretrained wrote ------------------------
def _peft_trained(base, targets, tmp_path, **config):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                                   **config))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.normal_(std=0.3)
    pm.save_pretrained(str(tmp_path))
    return pm.eval()


@pytest.mark.parametrize("name,rslora", [("llama", False), ("gpt2", True), ("vit", False)])
def test_load_peft_adapter_gives_the_peft_models_outputs(tmp_path, seed, name, rslora):
    make, targets = MODELS[name]
    if name == "vit":          # PEFT's "all-linear" takes timm's head too (its rule skips only transformers' heads)
        targets = ["qkv", "fc1", "fc2"]
    base = make()
    pm = _peft_trained(base, targets, tmp_path, use_rslora=rslora)
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path)
    data = _data(name)
    with torch.no_grad():
        want = _run(pm, name, data)
        assert rel_err(_run(model, name, data), want) < 1e-5
    assert all(m.task_index == 0 and torch.equal(m.routing_delta, torch.eye(3)) for _, m in clora_layers(model))
    ck.end_task(model)                                     # the PEFT adapter becomes the first task
    with torch.no_grad():
        assert rel_err(_run(model, name, data), want) < 1e-5


def _train_steps(model, ids, labels, steps: int = 6) -> list:
    """Adam steps on a transformers model's own loss; the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_llama_trains_generates_and_round_trips(tmp_path, seed):
    base = _llama()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=LLAMA_TARGETS, rank=2, backend="torch")
    ids = torch.randint(2, 61, (4, 9))
    losses = _train_steps(model, ids, ids)
    assert losses[-1] < losses[0]
    # min_new_tokens: a random model may pick the end-of-sequence token (1 of 61) and stop early
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out = model.generate(ids[:1, :3], **greedy)
    assert out.shape == (1, 7)
    ck.save_adapter(model, tmp_path / "a.safetensors")
    again = ck.inject_clora(copy.deepcopy(base), target_modules=LLAMA_TARGETS, rank=2, backend="torch")
    ck.load_adapter(again, tmp_path / "a.safetensors")
    assert torch.equal(again.generate(ids[:1, :3], **greedy), out)
    ck.save_peft_adapter(model, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert torch.equal(served.generate(input_ids=ids[:1, :3], **greedy), out)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_transformers_models_train_and_round_trip(tmp_path, seed, name):
    """A few steps on GPT-2 (Conv1D) and BERT: the loss falls, only the adapters and nothing else
    move, and save_adapter / load_adapter give the trained outputs back."""
    make, targets = MODELS[name]
    base = make()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=2, backend="torch")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(2, 61, (4, 7))
    labels = ids if name == "gpt2" else torch.tensor([0, 1, 2, 0])

    def eval_loss():        # (without dropout: the training losses' noise left a margin of 0.02 % on some seeds)
        with torch.no_grad():
            return model.eval()(input_ids=ids, labels=labels).loss.item()
    before = eval_loss()
    model.train()
    _train_steps(model, ids, labels)
    assert eval_loss() < before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    ck.save_adapter(model, tmp_path / "a.safetensors")
    again = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=2, backend="torch").eval()
    ck.load_adapter(again, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert rel_err(_run(again, name, ids), _run(model, name, ids)) < 1e-6


def _adapter_state(model):
    return [t.clone() for _, m in clora_layers(model) for t in (m.lora_A, m.lora_B, m.routing_delta)]


@pytest.mark.parametrize("option,match", [
    ({"use_dora": True}, r"use_dora=True is not supported"),
    ({"bias": "all"}, r"bias='all' is not supported"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported.*modified base weight")])
def test_load_peft_adapter_refuses_unsupported_options(tmp_path, option, match):
    base = _vit()
    _peft_trained(base, ["qkv", "fc1"], tmp_path, **option)
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["qkv", "fc1"], rank=3)
    before = _adapter_state(model)
    with pytest.raises(ValueError, match=match):
        ck.load_peft_adapter(model, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, _adapter_state(model)))


@pytest.mark.parametrize("option", ["kasa_config", "monteclora_config", "arrow_config"])
def test_load_peft_adapter_refuses_options_that_change_the_computation(tmp_path, option):
    """PEFT 0.21's KaSA, MonteCLoRA and Arrow compute something else from lora_A / lora_B (Arrow's factors
    alone would load and serve another model): refused by name."""
    base = _vit()
    _peft_trained(base, ["qkv"], tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["qkv"], rank=3)
    for value in ({"top_k": 2}, {}):       # ({}: PEFT's default config of the option, which turns it on)
        config[option] = value
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=rf"option {option}=.* is not supported"):
            ck.load_peft_adapter(model, tmp_path)


def test_load_peft_adapter_refuses_mismatches_and_changes_nothing(tmp_path):
    base = _vit()
    _peft_trained(base, ["qkv", "fc1"], tmp_path)
    cases = [(dict(target_modules=["qkv", "fc1"], rank=4), r"layer 'blocks.0.attn.qkv': the adapter's rank is r=3, "
                                                           r"the layer's is 4"),
             (dict(target_modules=["qkv", "fc1", "fc2"], rank=3), r"no factors for the model's C-LoRA layer\(s\) "
                                                                  r"\['blocks.0.mlp.fc2', 'blocks.1.mlp.fc2'\]"),
             (dict(target_modules=["qkv"], rank=3), r"holds layer\(s\) \['blocks.0.mlp.fc1', 'blocks.1.mlp.fc1'\] "
                                                    r"that the model has no C-LoRA layer for")]
    for kwargs, match in cases:
        model = ck.inject_clora(copy.deepcopy(base), **kwargs)
        before = _adapter_state(model)
        with pytest.raises(ValueError, match=match):
            ck.load_peft_adapter(model, tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(before, _adapter_state(model)))
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.blocks.0.attn.qkv.lora_magnitude_vector"] = torch.ones(3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'base_model.model.blocks.0.attn.qkv.lora_magnitude_vector' is not "
                                         r"a LoRA factor"):
        ck.load_peft_adapter(ck.inject_clora(copy.deepcopy(base), target_modules=["qkv", "fc1"], rank=3), tmp_path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        ck.load_peft_adapter(ck.inject_clora(copy.deepcopy(base), rank=3), tmp_path / "nowhere")


def test_save_peft_adapter_killed_mid_write_leaves_the_previous_adapter(tmp_path, monkeypatch):
    base = _vit()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["qkv"], rank=2)
    _two_tasks(model)
    ck.save_peft_adapter(model, tmp_path)
    x = _data("vit")
    with torch.no_grad():
        want = model(x)
    _two_tasks(model)
    import safetensors.torch

    def dies(src, dst):     # (killed after the temporary file's bytes, zeros here, before the rename)
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save", lambda tensors, metadata=None: b"\x00" * 100)
        patch.setattr(os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            ck.save_peft_adapter(model, tmp_path)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert rel_err(served(x), want) < 1e-5


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_per_layer_ranks_and_alphas_travel_as_peft_patterns(tmp_path, seed, name):
    """PEFT's rank_pattern / alpha_pattern: inject_clora takes them (PEFT's rule, the first key the name ends
    with), save_peft_adapter writes a model of mixed ranks and alphas with them (it refused one), and
    load_peft_adapter reads PEFT's own (it refused them): each side computes what the other does."""
    make, targets = MODELS[name]
    base = make()
    ranks = {"0.attn.qkv": 5, "fc1": 2} if name == "vit" else {"layers.1.self_attn.q_proj": 5, "down_proj": 2}
    alphas = {"qkv": 7} if name == "vit" else {"q_proj": 7.5}
    targets = ["qkv", "fc1", "fc2"] if name == "vit" else targets
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=3, rank_pattern=ranks,
                            alpha_pattern=alphas, backend="torch")
    got = {n: (m.rank, m.alpha) for n, m in clora_layers(model)}
    if name == "vit":
        assert got["blocks.0.attn.qkv"] == (5, 7.0) and got["blocks.1.attn.qkv"] == (3, 7.0)
        assert got["blocks.0.mlp.fc1"] == (2, 2.0) and got["blocks.1.mlp.fc2"] == (3, 3.0)
    else:
        assert got["model.layers.1.self_attn.q_proj"] == (5, 7.5) and got["model.layers.0.self_attn.q_proj"] == (3, 7.5)
        assert got["model.layers.0.mlp.down_proj"] == (2, 2.0) and got["model.layers.0.self_attn.k_proj"] == (3, 3.0)
    _two_tasks(model)
    data = _data(name)
    with torch.no_grad():
        want = _run(model, name, data)
    ck.save_peft_adapter(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] and config["alpha_pattern"]
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert rel_err(_run(served, name, data), want) < 1e-5
    # PEFT's own file with patterns, into a model injected with the same ones
    pm = _peft_trained(base, targets, tmp_path / "in", rank_pattern=ranks, alpha_pattern=alphas)
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=3, rank_pattern=ranks, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "in")
    assert _apart64(model, pm, name, data) < 1e-10      # (the same tensors: the same values)
    config = json.loads((tmp_path / "in" / "adapter_config.json").read_text())     # a file that contradicts itself
    (tmp_path / "in" / "adapter_config.json").write_text(json.dumps(dict(config, rank_pattern={
        k: v + 1 for k, v in config["rank_pattern"].items()})))
    with pytest.raises(ValueError, match=r"the config's rank_pattern .* gives it r=\d, but the adapter's lora_A has "
                                         r"\d rows: the file contradicts itself"):
        ck.load_peft_adapter(model, tmp_path / "in")
    (tmp_path / "in" / "adapter_config.json").write_text(json.dumps(config))
    plain = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=3)
    with pytest.raises(ValueError, match=r"the adapter's rank is r=\d, the layer's is 3 "
                                         r"\(inject_clora\(\.\.\., rank=3, rank_pattern="):
        ck.load_peft_adapter(plain, tmp_path / "in")


def test_rank_and_alpha_patterns_are_checked():
    for kwargs, error, match in [
            (dict(rank_pattern=["fc1"]), TypeError, "rank_pattern must be a dict"),
            (dict(rank_pattern={"fc1": 0}), ValueError, r"rank_pattern\['fc1'\] must be an int >= 1, got 0"),
            (dict(rank_pattern={"fc1": True}), ValueError, "must be an int >= 1, got True"),
            (dict(alpha_pattern={"fc1": float("nan")}), ValueError, "must be a finite number"),
            (dict(rank_pattern={"fc(1": 2}), ValueError, r"key 'fc\(1' is not a regex"),
            (dict(rank_pattern={"(?i)fc1": 2}), ValueError, r"key '\(\?i\)fc1' is not a regex"),   # (in PEFT's wrapper)
            (dict(rank_pattern={"qkv": 200}), ValueError, r"layer 'blocks.0.attn.qkv'.*got 200 \(its rank from "
                                                          r"rank_pattern\['qkv'\]\)")]:
        model = _vit()
        with pytest.raises(error, match=match):
            ck.inject_clora(model, target_modules=["qkv", "fc1"], rank=2, **kwargs)
        assert not clora_layers(model)
    with pytest.warns(UserWarning, match=r"rank_pattern key\(s\) \['fc2'\] match no adapted layer"):
        ck.inject_clora(_vit(), target_modules=["qkv"], rank=2, rank_pattern={"fc2": 3})
    # "all-linear" leaves out a layer narrower than its own rank, the pattern's where one matches (it left out a
    # layer narrower than `rank` that the pattern fits, where PEFT adapts it), and a key valid only inside
    # PEFT's wrapper `(.*\.)?(key)$` selects what PEFT's does
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4), nn.Linear(4, 32), nn.Linear(32, 3))
    with pytest.warns(UserWarning, match=r"leaves out 1 layer\(s\) narrower than rank=8 or their rank_pattern rank"):
        ck.inject_clora(net, "all-linear", rank=8, rank_pattern={"1": 2, "2": 2, "1)|(zzz": 5})
    assert {n: m.rank for n, m in clora_layers(net)} == {"0": 8, "1": 2, "2": 2}


# ---- PEFT's conveniences --------------------------------------------------------------------
def test_trainable_parameters_and_print(capsys):
    model = ck.inject_clora(_vit(), target_modules=["qkv"], rank=2)
    trainable, total = ck.trainable_parameters(model)
    layers = [m for _, m in clora_layers(model)]
    assert trainable == sum(m.lora_A.numel() + m.lora_B.numel() + m.routing_delta.numel() for m in layers)
    assert total == sum(p.numel() for p in model.parameters())
    ck.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"trainable params: {trainable:,d} \|\| all params: {total:,d} \|\| trainable%: "
                        rf"{100 * trainable / total:.4f}", line)
    ck.end_task(model)                                      # freeze: the factors stop training
    assert ck.trainable_parameters(model)[0] == sum(m.routing_delta.numel() for m in layers)


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_disable_adapter_and_merge_and_unload(seed, name):
    make, targets = MODELS[name]
    base = make()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=2, backend="torch")
    _two_tasks(model)
    data = _data(name)
    with torch.no_grad():
        want, plain = _run(model, name, data), _run(base, name, data)
        with ck.disable_adapter(model):
            assert rel_err(_run(model, name, data), plain) < 1e-6
        assert rel_err(_run(model, name, data), want) < 1e-6
        ck.merge(model)
        with ck.disable_adapter(model):
            assert rel_err(_run(model, name, data), plain) < 1e-5
        assert all(m.merged for _, m in clora_layers(model))
        unloaded = ck.merge_and_unload(model)
        assert not clora_layers(unloaded)
        kinds = {type(m) for n, m in unloaded.named_modules() if n in {n for n, _ in clora_layers(
            ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=2))}}
        assert kinds == ({Conv1D} if name == "gpt2" else {nn.Linear})
        assert rel_err(_run(unloaded, name, data), want) < 1e-5


def test_readme_transformers_quick_start_runs_as_written(tmp_path, monkeypatch, seed):
    """The README's transformers block, with a tiny Llama in place of the download: the served
    PEFT model gives the trained model's logits."""
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- quickstart-transformers -->\n```python\n(.*?)```", readme, re.S).group(1)
    tiny = _llama()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, name: copy.deepcopy(tiny)))
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(2, 61, (2, 6))
    env = {"tasks": [[ids], [ids.flip(0)]]}
    exec(code, env)
    model, served = env["model"], env["served"].eval()
    assert all(m.task_index == 2 for _, m in clora_layers(model))
    with torch.no_grad():
        assert rel_err(served(input_ids=ids).logits, model.eval()(input_ids=ids).logits) < 1e-5


# ---- cases a review found (each fails without its handling) -------------------------------------
def test_a_trained_head_travels_as_modules_to_save(tmp_path, seed):
    base = _vit()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["qkv"], rank=2)
    _two_tasks(model)
    model.head.requires_grad_(True)
    with torch.no_grad():
        model.head.weight.normal_()
    with pytest.raises(ValueError, match=r"trains parameters outside its adapters in \['head'\]; pass "
                                         r"modules_to_save=\['head'\]"):
        ck.save_peft_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    ck.save_peft_adapter(model, tmp_path, modules_to_save=["head"])
    x = _data("vit")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    again = ck.inject_clora(copy.deepcopy(base), target_modules=["qkv"], rank=2)
    ck.load_peft_adapter(again, tmp_path)                  # the head comes back too
    ck.save_peft_adapter(again, tmp_path / "again")        # and is stored again (it was dropped, frozen)
    served_again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
    with torch.no_grad():
        assert rel_err(served(x), model(x)) < 1e-5 and rel_err(again(x), model(x)) < 1e-5
        assert rel_err(served_again(x), model(x)) < 1e-5


def test_an_adapted_layers_own_training_is_refused_clearly(tmp_path):
    """A trained bias of an adapted layer has no place in a PEFT LoRA adapter, and PEFT cannot store
    whole a module it adapts: both refused by name (it ended in safetensors' shared-memory error)."""
    model = ck.inject_clora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), ["0"], rank=2)
    model[0].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"C-LoRA layer\(s\) \['0'\] train their base weight or bias"):
        ck.save_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"hold the C-LoRA layer\(s\) \['0'\]"):
        ck.save_peft_adapter(model, tmp_path, modules_to_save=["0"])
    assert not any(tmp_path.iterdir())


def test_targets_that_are_suffixes_of_other_names(tmp_path, seed):
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4)))
    model = ck.inject_clora(copy.deepcopy(base), target_modules=r"0", rank=2)      # '0' only, not '2.0'
    _two_tasks(model)
    ck.save_peft_adapter(model, tmp_path)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert rel_err(served(x), model(x)) < 1e-5


def test_tied_output_embeddings(seed):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = _gpt2()

        def forward(self, ids):
            return self.lm(input_ids=ids).logits
    wrapped = ck.inject_clora(Wrap(), target_modules="all-linear", rank=2)
    assert not any("lm_head" in n for n, _ in clora_layers(wrapped))      # found inside the wrapper
    gpt2 = _gpt2()
    total = sum(p.numel() for p in gpt2.parameters())
    ck.inject_clora(gpt2, target_modules=["c_attn", "lm_head"], rank=2)
    layer = gpt2.lm_head
    assert layer.tied_to == ["transformer.wte.weight"]
    assert ck.trainable_parameters(gpt2)[1] == total + sum(m.lora_A.numel() + m.lora_B.numel() + 4
                                                           for _, m in clora_layers(gpt2))   # wte counted once
    with pytest.raises(ValueError, match=r"tied to \['transformer.wte.weight'\].*would change those too"):
        layer.merge()
    # "untie the weights first", as the message says: then ck.merge(model) finds no tie and merges (the
    # names found at injection were kept, and the refusal stayed)
    wte = gpt2.transformer.wte
    wte.weight = nn.Parameter(wte.weight.detach().clone(), requires_grad=False)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        want = gpt2(input_ids=ids).logits
        ck.merge(gpt2)
        assert layer.merged and layer.tied_to == [] and torch.allclose(gpt2(input_ids=ids).logits, want, atol=1e-4)
    ck.unmerge(gpt2)
    gpt2.transformer.wte = nn.Embedding(61, 16)         # a tie made after injection is found too
    gpt2.transformer.wte.weight = layer.weight
    with pytest.raises(ValueError, match=r"tied to \['transformer.wte.weight'\]"):
        ck.merge(gpt2)


def test_merge_inside_disable_adapter_and_a_lone_layer(tmp_path, seed):
    model = ck.inject_clora(_vit(), target_modules=["qkv"], rank=2)
    with ck.disable_adapter(model), pytest.raises(ValueError, match="merge inside disable_adapter"):
        ck.merge(model)
    lone = ck.CLoRALinear(6, 4, rank=2)
    plain = ck.merge_and_unload(lone)
    assert type(plain) is nn.Linear and plain.weight is lone.weight
    with pytest.raises(ValueError, match="single CLoRALinear; PEFT adapts submodules"):
        ck.save_peft_adapter(ck.CLoRALinear(6, 4, rank=2), tmp_path)


def test_disable_adapter_merges_again_as_merged(seed):
    """A layer merged with keep_original=True is merged again after disable_adapter with its copy of the
    base, so the next unmerge gives the base back bit for bit (without the copy: 3e-8 away in fp32)."""
    layer = ck.CLoRALinear(24, 16, rank=3)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.routing_delta.normal_()
    base = layer.weight.detach().clone()
    layer.merge(keep_original=True)
    with ck.disable_adapter(layer):
        pass
    assert layer.merged and layer._original_weight is not None
    layer.unmerge()
    assert torch.equal(layer.weight, base)


def test_peft_directory_details(tmp_path):
    base = _vit()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["qkv"]), adapter_name="mine")
    pm.save_pretrained(str(tmp_path))                        # a non-default name: saved in a subfolder
    model = ck.inject_clora(copy.deepcopy(base), target_modules="ALL-LINEAR", exclude_modules=r".*(proj|fc\d)", rank=2)
    with pytest.raises(ValueError, match=r"adapters in its subfolders: \['mine'\]"):
        ck.load_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    del config["lora_alpha"]                                 # PEFT's default, 8
    (tmp_path / "mine" / "adapter_config.json").write_text(json.dumps(config))
    ck.load_peft_adapter(model, tmp_path / "mine")
    assert all(m.alpha == 8.0 for _, m in clora_layers(model))
    (tmp_path / "mine" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ck.load_peft_adapter(model, tmp_path / "mine")


# ---- modules_to_save as PEFT keeps them, and alpha as scaling (cases a second review found) ----------
def _headed():
    """A body to adapt and a nested head holding buffers (BatchNorm), PEFT's modules_to_save case."""
    from collections import OrderedDict
    head = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(8), out=nn.Linear(8, 3)))
    return nn.Sequential(OrderedDict(body=nn.Linear(6, 8), act=nn.ReLU(), head=head)).eval()


def _peft_headed(base, tmp_path):
    """PEFT's model with modules_to_save=['head'], its adapter and its head's copy (buffers too) moved; saved."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["body"],
                                                                   modules_to_save=["head"]))
    with torch.no_grad():
        for n, t in [*pm.named_parameters(), *pm.named_buffers()]:
            if "lora_" in n or ("modules_to_save" in n and t.is_floating_point()):
                t.add_(0.5 * torch.randn_like(t)).abs_()
    pm.save_pretrained(str(tmp_path))
    return pm.eval()


def test_nested_modules_to_save_with_buffers_round_trip_with_peft(tmp_path, seed):
    base = _headed()
    pm = _peft_headed(base, tmp_path / "peft")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "peft")        # 'head.norm.running_mean' is part of 'head' (it was refused)
    x = torch.randn(5, 6)
    with torch.no_grad():
        want = pm(x)
        assert rel_err(model(x), want) < 1e-6 and rel_err(want, base(x)) > 1e-2
    ck.save_peft_adapter(model, tmp_path / "ours")        # the head's buffers are stored (PEFT's loader needs them)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    again = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(again, tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(served(x), want) < 1e-6 and rel_err(again(x), want) < 1e-6


def test_peft_load_under_inference_mode_nan_factors_and_a_wrapped_save(tmp_path, seed):
    """load_peft_adapter inside torch.inference_mode gave the head inference tensors (training it then
    failed); a NaN factor loaded silently; save_peft_adapter of a DataParallel / DDP model wrote
    `module.`-prefixed keys that PEFT loaded as the bare base model, with a warning."""
    base = _headed()
    pm = _peft_headed(base, tmp_path / "peft")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    with torch.inference_mode():
        ck.load_peft_adapter(model, tmp_path / "peft")
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    model.head.requires_grad_(True)
    model(torch.randn(5, 6)).sum().backward()       # (eval: BatchNorm keeps its statistics)
    assert model.head.out.weight.grad is not None
    ck.save_peft_adapter(nn.DataParallel(model), tmp_path / "ours")
    weights = tmp_path / "ours" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(weights))
    assert "base_model.model.body.lora_A.weight" in tensors
    x = torch.randn(5, 6)
    with torch.no_grad():
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        assert rel_err(served(x), pm(x)) < 1e-6
    tensors["base_model.model.body.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    fresh = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    with pytest.raises(ValueError, match=r"layer 'body': lora_B in the adapter holds non-finite values"):
        ck.load_peft_adapter(fresh, tmp_path / "ours")


def test_peft_files_from_a_wrapper_load_and_non_float_factors_are_refused(tmp_path, seed):
    """An adapter saved from a DDP / DataParallel wrapper before the helpers unwrapped it names its
    tensors `base_model.model.module.<name>`: it loads (head included); a complex or integer factor
    lost its imaginary part with a warning, or loaded silently."""
    from safetensors.torch import load_file, save_file
    base = _headed()
    pm = _peft_headed(base, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace("base_model.model.", "base_model.model.module.", 1): v for k, v in tensors.items()},
              str(weights), metadata={"format": "pt"})
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "peft")
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert rel_err(model(x), pm(x)) < 1e-6
    for dtype in (torch.complex64, torch.int64):
        bad = dict(tensors)
        bad["base_model.model.body.lora_A.weight"] = bad["base_model.model.body.lora_A.weight"].to(dtype)
        save_file(bad, str(weights), metadata={"format": "pt"})
        fresh = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
        with pytest.raises(ValueError, match=f"lora_A in the adapter is {dtype}, not a floating-point tensor"):
            ck.load_peft_adapter(fresh, tmp_path / "peft")


def test_loaded_modules_to_save_keep_the_base_for_disable_adapter_and_the_next_load(tmp_path, seed):
    """PEFT keeps the original module beside its trained copy: disable_adapter computes the base model,
    and a second adapter without modules_to_save runs on the base's head, not the first adapter's."""
    base = _headed()
    pm = _peft_headed(base, tmp_path / "a")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "a")
    x = torch.randn(5, 6, requires_grad=True)
    y = model(x)            # a graph built before the block (DPO's policy pass) backpropagates after it
    with torch.no_grad():
        with ck.disable_adapter(model), pm.disable_adapter():
            assert rel_err(model(x), base(x)) < 1e-6 and rel_err(pm(x), base(x)) < 1e-6
        assert rel_err(model(x), pm(x)) < 1e-6
    y.square().sum().backward()
    assert x.grad is not None and model.body.lora_B.grad is not None
    _peft_trained(base, ["body"], tmp_path / "b")
    second = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    ck.load_peft_adapter(model, tmp_path / "b")
    with torch.no_grad():
        assert rel_err(model(x), second(x)) < 1e-6


def test_tied_lm_head_as_modules_to_save_is_untied_as_in_peft(tmp_path, seed):
    base = _gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                   modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["c_attn"], rank=2, backend="torch")
    with pytest.warns(UserWarning, match=r"\['lm_head.weight'\] values of their own, untied from "
                                         r"\['transformer.wte.weight'\].*not into one that ties them"):
        ck.load_peft_adapter(model, tmp_path / "peft")
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)    # (it moved with lm_head)
    ids = _data("gpt2")
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm.eval()(input_ids=ids).logits) < 1e-6
    tied = ck.inject_clora(copy.deepcopy(base), target_modules=["c_attn"], rank=2, backend="torch")
    tied.lm_head.requires_grad_(True)        # trains wte too (tied): both stored, apart (a shared-memory error)
    ck.save_peft_adapter(tied, tmp_path / "tied", modules_to_save=["transformer.wte", "lm_head"])
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "tied")).eval()
    with torch.no_grad():
        assert rel_err(served(input_ids=ids).logits, tied(input_ids=ids).logits) < 1e-6


def test_peft_adapter_on_lm_head_with_its_saved_base_weight(tmp_path, seed):
    """PEFT's save_embedding_layers='auto' stores lm_head.base_layer.weight beside the factors: the same as the
    model's is accepted, another (a resized vocabulary) refused by name."""
    base = _gpt2()
    pm = _peft_trained(base, ["c_attn", "lm_head"], tmp_path)
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["c_attn", "lm_head"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path)
    ids = _data("gpt2")
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-6
    other = _gpt2()          # another base
    model = ck.inject_clora(other, target_modules=["c_attn", "lm_head"], rank=3, backend="torch")
    before = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    with pytest.raises(ValueError, match=r"base weight for layer 'lm_head' .* differs from the model's"):
        ck.load_peft_adapter(model, tmp_path)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if torch.is_tensor(t))


@pytest.mark.parametrize("task_type, model_class, head", [
    ("SEQ_CLS", "BertForSequenceClassification", "classifier"),
    ("TOKEN_CLS", "BertForTokenClassification", "classifier"),
    ("QUESTION_ANS", "BertForQuestionAnswering", "qa_outputs")])
def test_task_types_store_the_heads_peft_expects(tmp_path, seed, task_type, model_class, head):
    """PEFT's model class for these task types stores its heads whole, and its loader expects them: the
    directory written with modules_to_save None ended in PEFT's raw KeyError (a helper's attack)."""
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=24,
                                  vocab_size=61, num_labels=2)
    base = getattr(transformers, model_class)(cfg).eval()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["query", "value"], rank=2)
    _two_tasks(model)
    ck.save_peft_adapter(model, tmp_path, task_type=task_type)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == task_type and config["modules_to_save"] == [head]
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = _data("bert")
    with torch.no_grad():
        a, b = served(input_ids=ids), model(input_ids=ids)
        key = "start_logits" if task_type == "QUESTION_ANS" else "logits"
        assert rel_err(a[key], b[key]) < 1e-6
    adapted = ck.inject_clora(copy.deepcopy(base), target_modules=["query", head], rank=2)
    with pytest.raises(ValueError, match=rf"hold the C-LoRA layer\(s\) \['{head}'\].*task_type '{task_type}' stores"):
        ck.save_peft_adapter(adapted, tmp_path / "adapted", task_type=task_type)


def test_save_peft_adapter_argument_errors_and_a_trained_tied_head(tmp_path, seed):
    base = _gpt2()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["c_attn"], rank=2, backend="torch")
    _two_tasks(model)
    model.lm_head.requires_grad_(True)       # tied to transformer.wte: trained there too
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    with pytest.raises(TypeError, match=r"modules_to_save must be a list of module names .* got 'lm_head'"):
        ck.save_peft_adapter(model, tmp_path / "a", modules_to_save="lm_head")     # (it was split into letters)
    with pytest.raises(ValueError, match=r"task_type 'BOGUS' is none of PEFT's \(SEQ_CLS, "):
        ck.save_peft_adapter(model, tmp_path / "a", modules_to_save=["lm_head"], task_type="BOGUS")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"'.*file' is a file; give a directory"):
        ck.save_peft_adapter(model, tmp_path / "file", modules_to_save=["lm_head"])
    assert not (tmp_path / "a").exists()
    # the trained head alone, as the README says: its tied partner goes with it, under ensure_weight_tying (the
    # partner counted as a module trained outside modules_to_save, and was refused)
    ck.save_peft_adapter(model, tmp_path / "tied", modules_to_save=(n for n in ["lm_head"]))    # (an iterator
    # was read by the check, and an empty list was saved)
    assert json.loads((tmp_path / "tied" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight.tying.*")
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "tied")).eval()
    ids = _data("gpt2")
    with torch.no_grad():
        assert rel_err(served(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-6


def test_save_peft_adapter_refuses_the_root_module_by_name(tmp_path):
    model = ck.inject_clora(_vit(), target_modules=["qkv"], rank=2)
    model.cls_token.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trains its own parameter\(s\) \['cls_token'\]"):
        ck.save_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"modules_to_save names the whole model"):
        ck.save_peft_adapter(model, tmp_path, modules_to_save=[""])
    assert not any(tmp_path.iterdir())


def test_scaling_and_alpha_are_one_setting(tmp_path, seed):
    """scaling (what the forward uses) and alpha (what a save writes) move together, and a state_dict keeps
    them: a PEFT adapter written after layer.scaling = 3 serves the same outputs."""
    base = _headed()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=2, backend="torch")
    _two_tasks(model)
    layer = model.body
    layer.scaling = 3
    assert (layer.alpha, layer.scaling) == (6.0, 3.0) and type(layer.scaling) is float
    layer.alpha = 1
    assert layer.scaling == 0.5
    layer.scaling = np.float32(3)          # the forward takes NumPy scalars: so does the setting
    assert (layer.alpha, layer.scaling) == (6.0, 3.0)
    ck.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 6
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    copied = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=2, backend="torch")
    copied.load_state_dict(model.state_dict())
    assert copied.body.scaling == 3.0
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert rel_err(served(x), model(x)) < 1e-6 and rel_err(copied(x), model(x)) < 1e-6


def test_load_peft_adapter_refuses_a_meta_model(tmp_path, seed):
    _peft_trained(_headed(), ["body"], tmp_path)
    with torch.device("meta"):
        model = ck.inject_clora(_headed(), target_modules=["body"], rank=3, backend="torch")
    with pytest.raises(ValueError, match="on the meta device, where a load writes nothing"):
        ck.load_peft_adapter(model, tmp_path)


def test_modules_to_save_after_a_move_and_inside_wrappers(tmp_path, seed):
    """The base's tensors kept beside the loaded ones follow the model: a second load after .double()
    puts them back in float64 (float32 before: a mixed-dtype error), and disable_adapter finds them
    through a wrapper (torch.compile's, a Sequential: it computed with the adapter's head there)."""
    base = _headed()
    _peft_headed(base, tmp_path / "a")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "a")
    x = torch.randn(5, 6)
    with torch.no_grad():
        for wrapper in (nn.Sequential(model), torch.compile(model)):
            with ck.disable_adapter(wrapper):
                assert rel_err(model(x), base(x)) < 1e-6
    _peft_trained(base, ["body"], tmp_path / "b")
    second = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval().double()
    model.double()
    ck.load_peft_adapter(model, tmp_path / "b")
    assert {t.dtype for t in model.head.state_dict().values() if t.is_floating_point()} == {torch.float64}
    with torch.no_grad():
        assert rel_err(model(x.double()), second(x.double())) < 1e-9


def test_transformers_save_pretrained_and_safetensors_take_the_state_dict(tmp_path, seed):
    """The layer's task state is a tensor in the state_dict (a dict failed save_pretrained and safetensors'
    save_model with "'dict' object has no attribute 'device'"); it comes back through load_state_dict."""
    from safetensors.torch import load_file, save_model
    model = ck.inject_clora(_gpt2(), target_modules=["c_attn"], rank=2)
    _two_tasks(model)
    model.save_pretrained(str(tmp_path / "hf"))
    save_model(model, str(tmp_path / "m.safetensors"))
    again = ck.inject_clora(_gpt2(), target_modules=["c_attn"], rank=2)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    ids = _data("gpt2")
    assert all(m.task_index == 1 for _, m in clora_layers(again))
    with torch.no_grad():
        assert rel_err(again(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-6
    state = model.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    assert ck.nn.task_state(state["transformer.h.0.attn.c_attn._extra_state"])["task_index"] == 1
    half = ck.inject_clora(_gpt2(), target_modules=["c_attn"], rank=2).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})     # a state_dict cast whole
    assert all(m.task_index == 1 for _, m in clora_layers(half))


def test_load_peft_adapter_refuses_modules_to_save_holding_an_adapted_layer(tmp_path, seed):
    """It loaded the module's saved weight into the C-LoRA layer's base (a new tensor): a module is either
    adapted or stored whole."""
    base = _headed()
    _peft_headed(base, tmp_path)
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body", "out"], rank=3)
    with pytest.raises(ValueError, match=r"modules_to_save module 'head' holds the C-LoRA layer\(s\) \['head.out'\]"):
        ck.load_peft_adapter(model, tmp_path)


def test_falcon_linear_layers_are_adapted_and_put_back(tmp_path, seed):
    """Every Falcon linear is transformers' FalconLinear, an nn.Linear subclass whose forward is
    x·Wᵀ + b: "all-linear" found nothing ('no nn.Linear matches'; PEFT adapts all four). They are
    adapted; merge_and_unload gives FalconLinear back; PEFT loads the saved adapter to the same logits."""
    cfg = transformers.AutoConfig.for_model("falcon", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            vocab_size=100, new_decoder_architecture=False, multi_query=True)
    base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = ck.inject_clora(copy.deepcopy(base), "all-linear", rank=2)
    assert len(clora_layers(model)) == 4
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
        for _, layer in clora_layers(model):
            nn.init.normal_(layer.lora_B, std=0.1)
        want = model(ids).logits
        assert (want - base(ids).logits).abs().max() > 1e-3
    ck.save_peft_adapter(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    plain = ck.merge_and_unload(model)
    linear = plain.transformer.h[0].self_attention.query_key_value
    assert type(linear).__name__ == "FalconLinear"
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, want) < 1e-5 and rel_err(plain(ids).logits, want) < 1e-5


def test_all_linear_says_a_moe_models_fused_experts_get_no_adapter(seed):
    """transformers 5 keeps Mixtral's (Qwen-MoE's, DeepSeek-V3's) experts in fused 3-D parameters, no
    linear layers: "all-linear" adapted attention alone, silently (PEFT reaches the experts)."""
    cfg = transformers.AutoConfig.for_model("mixtral", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2, intermediate_size=48, vocab_size=100,
                                            num_local_experts=4)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if not any(ck.nn._fused_experts(m) for m in model.modules()):
        pytest.skip("this transformers keeps Mixtral's experts as linear layers")
    with pytest.warns(UserWarning, match=r"experts of 1 mixture-of-experts block.*fused 3-D.*layers.0.mlp.experts"):
        ck.inject_clora(copy.deepcopy(model), "all-linear", rank=2)
    with pytest.warns(UserWarning, match=r"'down_proj' matches no layer that is adapted, only MixtralExperts.down_proj"):
        ck.inject_clora(model, LLAMA_TARGETS, rank=2)       # (PEFT's usual list: attention alone, silently)


def test_reentrant_checkpointing_turned_on_before_injection_trains_the_adapters(seed):
    """transformers' reentrant activation checkpointing, on before inject_clora in a model that is not a
    text model (a ViT): no input of a checkpointed block required a gradient, so no adapter got one
    (the loss required none; PEFT's get_peft_model calls enable_input_require_grads, and so does
    inject_clora now). The gradients are those of the model without checkpointing."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=5)
    base = transformers.ViTForImageClassification(cfg).train()
    plain = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], rank=4)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings():     # (transformers 5 deprecates is_gradient_checkpointing with a FutureWarning)
        warnings.simplefilter("error", FutureWarning)
        model = ck.inject_clora(base, target_modules=["q_proj", "v_proj"], rank=4)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        for _, layer in clora_layers(plain):
            layer.lora_B.normal_()
    model.load_state_dict(plain.state_dict())
    for m in (model, plain):
        m(pixel_values=x, labels=y).loss.backward()
    got, want = dict(model.named_parameters()), dict(plain.named_parameters())
    assert sorted(n for n, p in got.items() if p.grad is not None) == sorted(n for n, p in want.items()
                                                                            if p.grad is not None)
    for n, p in want.items():
        if p.grad is not None:
            assert rel_err(got[n].grad, p.grad) < 1e-5, n


def test_injection_into_a_peft_model_reads_no_deprecated_attribute():
    """inject_clora reads whether activation checkpointing is on; on a PeftModel, whose class lacks
    is_activation_checkpointing, the first form fell back to is_gradient_checkpointing, which PeftModel
    forwards to transformers' deprecated property (a FutureWarning; a review)."""
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg)
    base.gradient_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["v_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ck.inject_clora(model, target_modules=["q_proj"], rank=2)
    assert clora_layers(model)


def _tied_llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   hidden_size=16, intermediate_size=24, vocab_size=61, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_tied_head_travels_tied_with_peft_ensure_weight_tying(tmp_path, seed):
    """PEFT 0.21's ensure_weight_tying stores a saved module's tied partner too (modules_to_save
    ['model.embed_tokens'], lm_head.weight beside it): load_peft_adapter refused the file ("not part of
    modules_to_save"). It loads tied now, as PEFT does, and a state_dict round trip into a fresh tied model
    is exact. The other way, a stored tensor that the model ties to one outside modules_to_save (an edited
    head, frozen) was stored alone: PEFT's copy left the embeddings on the base's values (3.6 off in logits);
    the partner is stored too, with ensure_weight_tying."""
    torch.manual_seed(seed)
    base = _tied_llama()
    ids = torch.randint(0, 61, (2, 7))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"],
                                                                   ensure_weight_tying=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "peft"))
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "peft")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        want = served(input_ids=ids).logits
        assert rel_err(model(input_ids=ids).logits, want) < 1e-6
        fresh = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2, backend="torch")
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    ck.save_peft_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
        assert rel_err(again(input_ids=ids).logits, want) < 1e-6
    edited = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2, backend="torch")
    with torch.no_grad():
        edited.lm_head.weight.add_(0.3 * torch.randn_like(edited.lm_head.weight))     # (and embed_tokens: tied)
        for _, m in clora_layers(edited):
            m.lora_B.normal_()
    ck.save_peft_adapter(edited, tmp_path / "edited", modules_to_save=["lm_head"])
    with torch.no_grad():
        served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "edited")).eval()
        assert rel_err(served(input_ids=ids).logits, edited(input_ids=ids).logits) < 1e-6
    # both tied names stored, without ensure_weight_tying: PEFT's two copies are apart, and so are these (said)
    both = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     modules_to_save=["lm_head", "embed_tokens"]))
    both.save_pretrained(str(tmp_path / "both"))
    loaded = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2, backend="torch")
    with pytest.warns(UserWarning, match=r"untied from"):
        ck.load_peft_adapter(loaded, tmp_path / "both")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    loaded.to(torch.float64)        # the base's tensors, moved when they are put back, are tied as they were
    with ck.disable_adapter(loaded):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.lm_head.weight.dtype == torch.float64
    loaded.to(torch.float32)
    # a stored tensor tied to an adapted layer's base weight: PEFT cannot keep that tie (it computed 6.4 off)
    head = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "lm_head"], rank=2, backend="torch")
    with pytest.raises(ValueError, match=r"ties to the base weight of the C-LoRA layer\(s\) \['lm_head.weight'\]"):
        ck.save_peft_adapter(head, tmp_path / "head", modules_to_save=["model.embed_tokens"])
    assert not (tmp_path / "head").exists()
    bad = tmp_path / "peft"
    tensors = ck.interop._read_tensors(bad)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    from safetensors.torch import save_file
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"ensure_weight_tying, but the tied tensors .* hold different values"):
        ck.load_peft_adapter(ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2), bad)


def test_transformers_layers_whose_parent_reads_their_weight_are_refused(seed):
    """The XVector heads' TDNNLayer convolves with `kernel.weight`, DAB-DETR's attention map with
    `k_linear.weight`, LayoutLMv2's encoder looks up rows of its relative-position layers' weights: an
    adapter there never ran (the outputs stayed the base's exactly, and merge then changed them), with no
    word (a helper's attack). Named, they are refused; under "all-linear" left out with a warning."""
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, tdnn_dim=(16, 16, 32),
        tdnn_kernel=(3, 1, 1), tdnn_dilation=(1, 1, 1), xvector_output_dim=16, num_labels=3)
    model = transformers.Wav2Vec2ForXVector(cfg).eval()
    with pytest.raises(ValueError, match=r"'tdnn.0.kernel' cannot be adapted: TDNNLayer convolves with the weight "
                                         r"of 'kernel'.*3 such layer"):
        ck.inject_clora(model, target_modules=["kernel"], rank=4)
    with pytest.warns(UserWarning, match="'all-linear' leaves out 3 layer"):
        ck.inject_clora(model, "all-linear", rank=4)
    assert clora_layers(model) and not any(n.endswith("kernel") for n, _ in clora_layers(model))
    from transformers.models.dab_detr.modeling_dab_detr import DabDetrMHAttentionMap
    with pytest.raises(ValueError, match="DabDetrMHAttentionMap convolves with the weight of 'k_linear'"):
        ck.inject_clora(DabDetrMHAttentionMap(16, 16, 2, 0.0), target_modules=["q_linear", "k_linear"], rank=2)
    from transformers.models.layoutlmv2.modeling_layoutlmv2 import LayoutLMv2Encoder
    encoder = LayoutLMv2Encoder(transformers.LayoutLMv2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        has_relative_attention_bias=True, has_spatial_attention_bias=True))
    with pytest.raises(ValueError, match="LayoutLMv2Encoder looks up rows of the weight of 'rel_pos_bias'"):
        ck.inject_clora(encoder, target_modules=["rel_pos_bias", "query"], rank=2)


def test_peft_directories_that_are_no_paths_are_named(tmp_path):
    """None as the directory met os.stat's message, which named neither the helper nor the argument; a
    base model name that is no str went into adapter_config.json, and merge's keep_original took a str
    for its truth (a helper's attack)."""
    net = ck.inject_clora(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=2)
    for fn in (ck.save_peft_adapter, ck.load_peft_adapter):
        with pytest.raises(TypeError, match=f"{fn.__name__}: directory must be a str or os.PathLike, got NoneType"):
            fn(net, None)
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str .* got 5"):
        ck.save_peft_adapter(net, tmp_path / "a", base_model_name_or_path=5)     # (it was written into the config)
    with pytest.raises(TypeError, match="keep_original must be a bool, got 'no'"):
        ck.merge(net, keep_original="no")                                   # (taken for its truth: True)
    assert not clora_layers(net)[0][1].merged and not (tmp_path / "a").exists()
    ck.save_peft_adapter(net, tmp_path / "b", base_model_name_or_path=tmp_path / "base")    # a path is a str there
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")


def test_averaged_copies_save_and_load_as_their_model(tmp_path):
    """torch's AveragedModel and timm's ModelEmaV3 name every layer `module.<name>`: an averaged copy's
    PEFT directory held those names, which PEFT loaded with a warning and no adapter (outputs 1.35 off),
    and its adapter file refused a plain model's (a helper's attack). They are unwrapped as DDP's is."""
    from peft import PeftModel
    from torch.optim.swa_utils import AveragedModel

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = ck.inject_clora(build(), ["0", "2"], rank=3)
    with torch.no_grad():
        for _, m in clora_layers(model):
            m.lora_B.normal_()
    x = torch.randn(4, 6)
    averaged = AveragedModel(model)
    ck.save_peft_adapter(averaged, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)         # (PEFT's "missing adapter keys")
        served = PeftModel.from_pretrained(build(), str(tmp_path / "peft"))
    assert rel_err(served(x), model(x)) < 1e-6
    ck.save_adapter(model, tmp_path / "plain.safetensors")
    ck.load_adapter(averaged, tmp_path / "plain.safetensors")
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    ema = timm_ema.ModelEmaV3(model, decay=0.9)
    ck.save_adapter(ema, tmp_path / "ema.safetensors")
    ck.load_adapter(ema, tmp_path / "plain.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as f:
        assert sorted(json.loads(f.metadata()["layers"])) == ["0", "2"]
    # timm's first ModelEma keeps its copy in .ema (no nn.Module), and a subclass of the others is one too
    class MyEma(timm_ema.ModelEmaV3):
        pass
    for wrapper in (timm_ema.ModelEma(model), MyEma(model)):
        ck.save_adapter(wrapper, tmp_path / "w.safetensors")
        with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
            assert sorted(json.loads(f.metadata()["layers"])) == ["0", "2"]


# ---- cases a helper's attack on the PEFT interop found (2026-12-07; each fails without its fix) --------------
def _peft_saved(base, directory, save_kw=None, **config):
    """A PEFT model of `base` with random factors (and trained modules_to_save), saved by PEFT itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(**config))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(std=0.3)
                elif p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        pm.save_pretrained(str(directory), **(save_kw or {}))
    return pm.eval()


def test_patterns_of_an_adapter_saved_from_a_wrapped_model(tmp_path, seed):
    """PEFT on a DataParallel model names the layers module.<name>, in the tensors and in alpha_pattern: the
    tensors' prefix was stripped and the pattern's not, so layer 0's q_proj got scaling 2 where PEFT's is 20,
    with no word (logits 72 % off)."""
    base, ids = _llama(), torch.randint(2, 61, (2, 7))
    pm = _peft_saved(nn.DataParallel(copy.deepcopy(base)), tmp_path, r=2, lora_alpha=4,
                     target_modules=["q_proj", "v_proj"], alpha_pattern={"module.model.layers.0.self_attn.q_proj": 40})
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], rank=2, backend="torch")
    ck.load_peft_adapter(model, tmp_path)
    assert model.model.layers[0].self_attn.q_proj.scaling == 20.0
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5


def test_modules_to_save_follow_peft_text_suffix_rule(tmp_path, seed):
    """PEFT stores every module whose name ends with an entry, as text: DistilBERT's SEQ_CLS adapter (the PEFT
    tutorial's) holds pre_classifier too, and Llama's modules_to_save=['norm'] every *_layernorm. Both loads were
    refused ('not ... part of modules_to_save'); a save whose 'classifier' entry also named an adapted
    pre_classifier wrote a directory PEFT could not load."""
    ids = torch.randint(2, 61, (2, 7))
    distil = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=61, dim=16, n_layers=2, n_heads=2, hidden_dim=24, num_labels=3)).eval()
    for base, targets, kw, where in ((distil, ["q_lin", "v_lin"], {"task_type": "SEQ_CLS"}, "distil"),
                                     (_llama(), ["q_proj", "v_proj"], {"modules_to_save": ["norm"]}, "llama")):
        pm = _peft_saved(copy.deepcopy(base), tmp_path / where, r=2, lora_alpha=4, target_modules=targets, **kw)
        model = ck.inject_clora(copy.deepcopy(base), target_modules=targets, rank=2, backend="torch")
        ck.load_peft_adapter(model, tmp_path / where)
        with torch.no_grad():
            assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5, where
    model = ck.inject_clora(copy.deepcopy(distil), target_modules="all-linear", rank=2)
    assert "pre_classifier" in dict(clora_layers(model))
    model.classifier.requires_grad_(True)
    with pytest.raises(ValueError, match=r"hold the C-LoRA layer\(s\) \['pre_classifier'\].*as text: also "
                                         r"\['pre_classifier'\]"):
        ck.save_peft_adapter(model, tmp_path / "refused", modules_to_save=["classifier"])


def test_embeddings_that_peft_saved_with_the_adapter(tmp_path, seed):
    """save_embedding_layers=True (PEFT's default where the vocabulary was resized) stores the embeddings under
    their own names: refused as 'not a LoRA factor'; they load where they equal the model's, and otherwise the
    refusal says why."""
    base, ids = _llama(), torch.randint(2, 61, (2, 7))
    pm = _peft_saved(copy.deepcopy(base), tmp_path, {"save_embedding_layers": True}, r=2, lora_alpha=4,
                     target_modules=["q_proj", "v_proj"])
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], rank=2, backend="torch")
    ck.load_peft_adapter(model, tmp_path)
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, pm(input_ids=ids).logits) < 1e-5
        other = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], rank=2)
        other.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"differs from the model's 'model.embed_tokens.weight' \(shape \(61, 16\) "
                                         r"against \(61, 16\)\).*save_embedding_layers stored from a model with "
                                         r"another vocabulary"):
        ck.load_peft_adapter(other, tmp_path)


def test_options_of_a_newer_peft_are_named(tmp_path, seed):
    """An option this version does not know (a newer PEFT's) was ignored without a word; PEFT warns."""
    base = _llama()
    _peft_saved(copy.deepcopy(base), tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_hira": True}))
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj"], rank=2)
    with pytest.warns(UserWarning, match=r"option\(s\) \['use_hira'\] are unknown to this version"):
        ck.load_peft_adapter(model, tmp_path)
    # PEFT's own keys, and a newer PEFT's left unset (0.22 writes "astra_config": null): no warning
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "astra_config": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ck.load_peft_adapter(model, tmp_path)


def test_peft_files_are_refused_inside_disable_adapter(tmp_path, seed):
    """Inside disable_adapter the modules of modules_to_save hold the base model's tensors: save_peft_adapter
    there wrote the base's head for the trained one (PEFT serving it 0.995 off), and load_peft_adapter's
    modules were put back to the earlier ones as the block closed (1.38 off); both are refused, naming the
    block, and work after it (a helper's attack on PEFT interop)."""
    base = _headed()
    pm = _peft_headed(base, tmp_path / "a")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["body"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path / "a")
    with ck.disable_adapter(model):
        for step in (lambda: ck.save_peft_adapter(model, tmp_path / "ours"),
                     lambda: ck.load_peft_adapter(model, tmp_path / "a")):
            with pytest.raises(ValueError, match="inside disable_adapter"):
                step()
    assert not (tmp_path / "ours").exists()
    ck.save_peft_adapter(model, tmp_path / "ours")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert rel_err(served(x), pm(x)) < 1e-6


def test_a_mica_adapter_loads_as_lora(tmp_path, seed):
    """PEFT's MiCA init keeps the base weight and computes plain LoRA (lora_B frozen in its training): it
    loads (it was refused as training against a modified base)."""
    base = _llama()
    pm = _peft_trained(base, ["q_proj", "v_proj"], tmp_path, init_lora_weights="mica")
    model = ck.inject_clora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], rank=3, backend="torch")
    ck.load_peft_adapter(model, tmp_path)
    data = _data("llama")
    with torch.no_grad():
        assert rel_err(_run(model, "llama", data), _run(pm, "llama", data)) < 1e-5


def test_injecting_into_a_peft_model_leaves_peft_layers_alone(seed):
    """inject_clora(peft_model, "all-linear") adapted PEFT's own base_layer, lora_A and lora_B (22 layers,
    no word), and a save then wrote a file PEFT's loader refused: "all-linear" leaves them out with a
    warning and adapts the other linear layers; a regex that reaches them is refused, naming them."""
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"q_proj.base_layer.*parts of PEFT's adapter layers"):
        ck.inject_clora(copy.deepcopy(pm), target_modules=r".*q_proj.*", rank=2)
    with pytest.warns(UserWarning, match="parts of PEFT's adapter layers.*left out"):
        ck.inject_clora(pm, target_modules="all-linear", rank=2)
    names = [n for n, _ in clora_layers(pm)]
    assert names and not any("q_proj" in n for n in names) and any(n.endswith("k_proj") for n in names)
    headed = peft.get_peft_model(_headed(), peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    with pytest.warns(UserWarning, match="parts of PEFT's adapter layers"):    # (its copies of the head too)
        with pytest.raises(ValueError, match="no nn.Linear or Conv1D layer matches"):
            ck.inject_clora(headed, target_modules="all-linear", rank=2)


def test_save_peft_adapter_warns_where_peft_would_not_run_the_adapter(tmp_path, seed):
    """A fresh base given to PEFT leaves out some adapters that this model runs: timm's qkv that inject_clora
    made callable (qkv_bias_separate), nn.TransformerEncoderLayer's fused eval path, and the shared experts
    of several MoE models, whose names PEFT maps onto the fused experts. Each is said at save."""
    import timm
    beit = ck.inject_clora(timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, embed_dim=32,
                                             num_heads=2, num_classes=3), target_modules=["qkv"], rank=2)
    encoder = nn.Sequential()
    encoder.add_module("enc", nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                                    enable_nested_tensor=False))
    ck.inject_clora(encoder, target_modules=["linear1"], rank=2)
    moe = nn.Sequential()
    moe.add_module("mlp", nn.Module())
    moe.mlp.add_module("shared_experts", nn.Sequential())
    moe.mlp.shared_experts.add_module("up_proj", nn.Linear(8, 8))
    ck.inject_clora(moe, target_modules=["up_proj"], rank=2)
    with warnings.catch_warnings():     # (another model type's shared experts: PEFT runs them)
        warnings.simplefilter("error")
        ck.save_peft_adapter(moe, tmp_path / "other_moe")
    import types
    moe.config = types.SimpleNamespace(model_type="deepseek_v2")
    for model, match in ((beit, r"\['blocks.0.attn.qkv'\].*qkv_bias_separate=True"),
                         (encoder, r"TransformerEncoderLayer.*enc.layers.0.linear1.*set_fastpath_enabled"),
                         (moe, r"shared experts \(\['mlp.shared_experts.up_proj'\]\).*DeepSeek")):
        with pytest.warns(UserWarning, match=match):
            ck.save_peft_adapter(model, tmp_path / type(model).__name__)
    plain = ck.inject_clora(_llama(), target_modules=["q_proj"], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.save_peft_adapter(plain, tmp_path / "plain")
    for i, kwargs in enumerate(({"nhead": 1}, {"activation": torch.tanh}, {"batch_first": False},
                                {"layer_norm_eps": 1e-6})):   # torch's own fast-path conditions keep it off
        kwargs = {"nhead": 2, "batch_first": True, **kwargs}
        layer = nn.TransformerEncoderLayer(16, dim_feedforward=32, **kwargs)
        if "layer_norm_eps" in kwargs:
            layer.norm2.eps = 1e-5
        slow = ck.inject_clora(nn.Sequential(layer), target_modules=["linear2"], rank=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ck.save_peft_adapter(slow, tmp_path / f"slow{i}")
