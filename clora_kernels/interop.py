"""PEFT LoRA adapters in and out of C-LoRA layers (docs/design.md section 2, "Storage layout and public names").

A C-LoRA adapter with its routing folded in is an ordinary LoRA: the layer adds
    scaling · lora_B R_effᵀ lora_A x,   R_eff = routing_old + projection · routing_delta,
so PEFT's lora_B' = lora_B R_effᵀ with the same lora_A and scaling (alpha / r) gives the same output.
`save_peft_adapter` writes that; `load_peft_adapter` reads a PEFT LoRA directory as the first
task's state (R_old = 0, R_delta = I, P = I), from which continual training goes on.

The directory layout is PEFT's `save_pretrained`: adapter_config.json and adapter_model.safetensors,
tensors named base_model.model.<module name>.lora_A.weight / .lora_B.weight, and the whole
modules of `modules_to_save` (a trained head, say) as base_model.model.<module name>.<parameter or
buffer>.
PEFT itself is not needed to read or write it (the tests check the files with PEFT).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import torch
from torch import nn

from ._io import check_path, read_safetensors, write_atomic, write_safetensors_atomic
from .functional import exact_math, finite_number
from .nn import (CLoRALinear, _full, _like, _require_layers, _sharded, _write_once, check_patterns, nonfinite,
                 pattern_value, placed_originals, refuse_meta, set_tensors, tensor_at, unwrapped, wrapper_prefix)
from .reference import folded_lora_B

_PREFIX = "base_model.model."
_CONFIG, _WEIGHTS, _LEGACY_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# PEFT's task types (peft.TaskType) and the heads its model class for each stores whole: every module whose
# name ends with one of them joins modules_to_save, in its save_pretrained and in its loader, which expects them
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": ()}
_ADAPTER_PARAMS = ("lora_A", "lora_B", "routing_delta")

# options of a PEFT LoRA config that change what the adapter computes or which tensors it holds,
# with the values that mean "not used"
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
                "layer_replication": (None, ()), "target_parameters": (None, ()),
                "trainable_token_indices": (None, {}), "use_qalora": (False, None),
                "alora_invocation_tokens": (None, ()), "use_bdlora": (None, False),
                # KaSA (a truncated base, singular values), MonteCLoRA (sampled factors), Arrow (routing
                # between adapters at inference): PEFT 0.21's options that change what the adapter computes
                # ({} is not "unset" there: PEFT makes it the option's default config, which turns it on)
                "kasa_config": (None,), "monteclora_config": (None,), "arrow_config": (None,)}
# the options of PEFT 0.21's LoraConfig (and PeftConfig's): a key outside them that is set (not None / False) is a
# newer PEFT's option, which may change what the adapter computes and which this load does not read: it warns
# (PEFT 0.22 writes "astra_config": null, unset). Whether the installed PEFT knows the key does not matter: this
# load would ignore it all the same
_KNOWN_OPTIONS = frozenset((
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
    "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config"))
# initialisations that leave the base weights as they are (MiCA too: plain LoRA's forward, lora_B frozen
# in PEFT's training); the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) train the adapter against a
# modified base, which PEFT rebuilds on load and this does not
_BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _read_config(directory) -> dict:
    path = os.path.join(directory, _CONFIG)
    if not os.path.isfile(path):
        inner = sorted(d for d in (os.listdir(directory) if os.path.isdir(directory) else [])
                       if os.path.isfile(os.path.join(directory, d, _CONFIG)))
        hint = f"; adapters in its subfolders: {inner} (PEFT saves a non-default adapter name there)" if inner else ""
        raise ValueError(f"{directory}: no {_CONFIG} (not a PEFT adapter directory, which save_pretrained writes)"
                         + hint)
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got "
                         f"{config.get('peft_type') if isinstance(config, dict) else config!r}")
    for option, unused in _UNSUPPORTED.items():
        value = config.get(option, unused[0])
        if value not in unused and not (isinstance(value, (list, tuple, dict)) and not value
                                        and option not in ("kasa_config", "monteclora_config", "arrow_config")):
            raise ValueError(f"{path}: option {option}={value!r} is not supported by C-LoRA layers "
                             f"(supported: plain LoRA, with use_rslora, any lora_dropout, modules_to_save)")
    unknown = sorted(k for k in set(config) - _KNOWN_OPTIONS if config[k] not in (None, False))
    if unknown:
        warnings.warn(f"load_peft_adapter: {path}: option(s) {unknown[:8]} are unknown to this version (saved by a "
                      f"newer PEFT?) and are ignored; if one changes what the adapter computes, the loaded model "
                      f"computes something else than the PEFT model", UserWarning, stacklevel=3)
    init = config.get("init_lora_weights", True)
    if init not in _BASE_KEEPING_INITS:
        raise ValueError(f"{path}: option init_lora_weights={init!r} is not supported: that initialisation trains "
                         f"the adapter against a modified base weight, which load_peft_adapter does not rebuild")
    r, alpha = config.setdefault("r", 8), config.setdefault("lora_alpha", 8)     # PEFT's defaults
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not finite_number(alpha):
        raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    try:
        config["rank_pattern"], config["alpha_pattern"] = check_patterns(config.get("rank_pattern"),
                                                                         config.get("alpha_pattern"), path)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return config


def _read_tensors(directory) -> dict:
    weights, legacy = os.path.join(directory, _WEIGHTS), os.path.join(directory, _LEGACY_WEIGHTS)
    if os.path.isfile(weights):
        return read_safetensors(weights)[0]
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:       # a truncated or foreign file
            raise ValueError(f"{legacy}: the adapter weights cannot be read ({type(exc).__name__}: {exc})") from None
    raise ValueError(f"{directory}: no {_WEIGHTS} (nor {_LEGACY_WEIGHTS})")


def _module_kind(model: nn.Module, name: str) -> str:
    try:
        return type(model.get_submodule(name)).__name__
    except AttributeError:
        return "missing"


def _converts_experts(model_type) -> bool:
    """Whether transformers converts `model_type`'s checkpoints (fusing the experts), which PEFT 0.21 applies to a
    saved adapter's keys too: a layer named shared_experts there is mapped onto the fused experts and left out
    (DeepSeek-V2 / V3 / V3.2, GLM-4-MoE, ERNIE-4.5-MoE, dots1, Solar-Open, EXAONE-MoE, two helpers' sweeps).
    Qwen2-MoE names its shared_expert in the singular and loads exactly; a model without a config is not a
    transformers one."""
    if model_type is None:
        return False
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return True
    return get_checkpoint_conversion_mapping(model_type) is not None


def _fast_path_layer(layer: nn.Module) -> bool:
    """Whether torch's fused eval path of nn.TransformerEncoderLayer can take this layer, by the conditions
    its forward tests on the layer itself (batch_first, an input-projection bias, one packed qkv weight, relu
    or gelu, equal norm eps, an even head count); those on the call (gradients, autocast, masks, hooks) are
    the serving side's."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return False
    attn = layer.self_attn
    return bool(attn.batch_first and attn.in_proj_bias is not None and attn._qkv_same_embed_dim
                and layer.activation_relu_or_gelu and layer.norm1.eps == layer.norm2.eps and attn.num_heads % 2 == 0)


def _served_without_adapter(model: nn.Module, names: list) -> list:
    """Where PEFT, given this adapter and a fresh base model, would not run some of its layers (each
    measured against PEFT 0.21 by a helper): timm attention whose `qkv` inject_clora made callable
    (`qkv_bias_separate`, off in a fresh model: BEiT 2.4e-2, EVA-02 0.27 off), torch's fused eval path of
    nn.TransformerEncoderLayer (0.26 off), and the shared experts of a model type whose checkpoints
    transformers converts (`_converts_experts`), whose saved names PEFT maps onto the fused experts
    (0.22-0.38 off)."""
    out = []
    qkv = [n for n in names if n.rpartition(".")[2] == "qkv"
           and getattr(model.get_submodule(n.rpartition(".")[0]), "qkv_bias_separate", None) is True]
    if qkv:
        out.append(f"a fresh timm model computes {qkv[:3]} without calling them (qkv_bias_separate=False), so PEFT "
                   f"would never run their adapter: set qkv_bias_separate=True on those attention modules of the "
                   f"model PEFT is given, as inject_clora did here")
    fused = [n for n in names if n.rpartition(".")[2] in ("linear1", "linear2")
             and _fast_path_layer(model.get_submodule(n.rpartition(".")[0]))]
    if fused:
        out.append(f"in eval mode without gradients, torch's fused path of nn.TransformerEncoderLayer reads "
                   f"{fused[:3]}'s weight without calling them, so PEFT's model would leave their adapter out: "
                   f"serve it after torch.backends.mha.set_fastpath_enabled(False)")
    kind = getattr(getattr(model, "config", None), "model_type", None)
    shared = [n for n in names if ".shared_experts." in f".{n}."] if _converts_experts(kind) else []
    if shared:
        out.append(f"PEFT 0.21 maps the saved names of shared experts ({shared[:3]}) onto the fused experts of "
                   f"transformers 5's {kind} (as for DeepSeek-V2 / V3, GLM-4-MoE, ERNIE-4.5-MoE and dots1), and then "
                   f"applies none of them: keep clora_kernels.save_adapter there, or leave the shared experts out of "
                   f"the targets")
    return out


def _refuse_disabled(layers: list, what: str) -> None:
    """A ValueError inside disable_adapter(), where the modules of modules_to_save hold the base model's
    tensors for the block: a save wrote the base's head for the trained one (PEFT serving it 0.995 off),
    and a load's modules were put back to the earlier ones as the block closed (1.38 off)."""
    if any(not m.adapter_enabled for _, m in layers):
        raise ValueError(f"{what} inside disable_adapter(): in the block, the modules of modules_to_save hold the "
                         f"base model's tensors and the adapter is off; leave the block first")


def load_peft_adapter(model: nn.Module, directory) -> None:
    """Load a PEFT LoRA adapter directory into the C-LoRA layers of `model` (made by inject_clora
    on the same targets, with the adapter's rank), as the first task's state: lora_A, lora_B and
    the scaling (lora_alpha / r, or / sqrt(r) with use_rslora) from the adapter, routing_old = 0,
    routing_delta = I, projection = I, task_index = 0; the modules of `modules_to_save` get their
    saved weights (their requires_grad left as it is), and save_peft_adapter stores them again
    unless told otherwise. The model then computes what the PEFT model computes. Every layer is
    checked first; on any error nothing is changed and a ValueError names the layer, the tensor or the
    option. lora_dropout is not kept (C-LoRA layers have no dropout)."""
    check_path(directory, "load_peft_adapter", "directory")
    model = unwrapped(model)
    layers = _require_layers(model, "load_peft_adapter")
    _refuse_disabled(layers, "load_peft_adapter")
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    rslora = bool(config.get("use_rslora"))

    def rank_alpha(name):       # the layer's r, and its alpha for scaling = alpha / r (rsLoRA: lora_alpha / sqrt(r))
        # (matched against the name PEFT's model gave the layer: with the wrapper's prefix where the adapter has one;
        # without it an alpha_pattern key 'module.<name>' was dropped, silently: PEFT's scaling 20, this one's 2)
        r = pattern_value(config["rank_pattern"], strip + name, config["r"])
        alpha = pattern_value(config["alpha_pattern"], strip + name, config["lora_alpha"])
        return r, alpha * (math.sqrt(r) if rslora else 1.0)
    saved_modules = config.get("modules_to_save") or []
    tying = config.get("ensure_weight_tying") is True
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    own.update(model.__dict__.get("_clora_originals", {}))      # (the base's tensors, tied as they were)
    found, whole, skipped, holders, plain = {}, {}, {}, {}, {}
    layer_names = {n for n, _ in layers}
    strip = wrapper_prefix({k.removeprefix(_PREFIX).rpartition(".lora_")[0] for k in tensors
                            if k.startswith(_PREFIX) and ".lora_" in k}, layer_names)
    if strip:       # (an adapter saved from a DDP / DataParallel wrapper before the helpers unwrapped it)
        tensors = {(_PREFIX + k[len(_PREFIX + strip):] if k.startswith(_PREFIX + strip) else k): v
                   for k, v in tensors.items()}
    for key, value in tensors.items():
        name, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if key.startswith(_PREFIX) and kind in ("A.weight", "B.weight"):
            found.setdefault(name, {})["lora_" + kind[0]] = value
            continue
        param = key.removeprefix(_PREFIX)
        layer, _, base = param.rpartition(".base_layer.")
        if key.startswith(_PREFIX) and layer in layer_names and base in ("weight", "bias"):
            skipped[param] = (layer, base, value)       # PEFT's save_embedding_layers: the base, checked below
            continue
        holder = _saved_module(param, saved_modules) if key.startswith(_PREFIX) else ""
        if not holder and tying and key.startswith(_PREFIX) and param in own:
            # PEFT's ensure_weight_tying (0.21) stores a saved module's tied partner too, with the same values
            # (lm_head.weight beside model.embed_tokens.weight, modules_to_save naming the latter): it loads
            # into the model's tensor that the two names share, tied as it was
            holder = next((h for q, t in own.items() if t is own[param] and (h := _saved_module(q, saved_modules))),
                          "")
        if not holder and key.startswith(_PREFIX) and param in own:
            # PEFT's save_embedding_layers (its default where the vocabulary was resized) stores the embeddings of a
            # layer it does not adapt under their own names: the model's tensor, checked below
            plain[param] = value
            continue
        if not holder:
            raise ValueError(f"{directory}: tensor {key!r} is not a LoRA factor "
                             f"({_PREFIX}<module>.lora_A.weight / .lora_B.weight) nor part of modules_to_save "
                             f"{saved_modules}; not supported")
        if param not in own or tuple(own[param].shape) != tuple(value.shape):
            raise ValueError(f"{directory}: modules_to_save tensor {key!r} of shape {tuple(value.shape)} has no "
                             f"parameter or buffer of that shape in the model"
                             + (f" (the model's is {tuple(own[param].shape)})" if param in own else ""))
        adapted = [n for n in layer_names if n == holder or n.startswith(holder + ".")]
        if adapted:
            raise ValueError(f"{directory}: modules_to_save module {holder!r} holds the C-LoRA layer(s) "
                             f"{sorted(adapted)[:8]}; a module is either adapted or stored whole, not both")
        whole[param] = value
        holders[param] = holder
    # without it, PEFT's copy of each saved module is its own: a tensor that the model shares with another name
    # (stored too, or not) gets a tensor of its own
    untied = {} if tying else {p: [q for q, t in own.items() if t is own[p] and q != p] for p in whole}
    untied = {p: q for p, q in untied.items() if q}
    if tying:
        shared = {}
        for param, value in whole.items():
            first = shared.setdefault(id(own[param]), param)
            if not torch.equal(whole[first], value):
                raise ValueError(f"{directory}: ensure_weight_tying, but the tied tensors {first!r} and {param!r} "
                                 f"hold different values in the adapter")
    if any(t.is_meta for _, m in layers for t in (m.weight, m.lora_A)) or any(own[p].is_meta for p in whole):
        raise ValueError(f"{directory}: the model's tensors are on the meta device, where a load writes nothing: "
                         f"materialise the model first (to_empty, then its base weights), then load the adapter")
    if whole and _sharded(model):
        raise ValueError(f"{directory}: the adapter stores whole modules (modules_to_save {saved_modules}), which "
                         f"load_peft_adapter gives new tensors: load it before FSDP2 shards the model (fully_shard)")
    missing, extra = sorted(layer_names - set(found)), sorted(set(found) - layer_names)
    if missing:
        raise ValueError(f"{directory}: the adapter has no factors for the model's C-LoRA layer(s) {missing[:8]}")
    if extra:
        kinds = sorted({_module_kind(model, n) for n in extra})
        raise ValueError(f"{directory}: the adapter holds layer(s) {extra[:8]} that the model has no C-LoRA layer "
                         f"for (they are {kinds} here; C-LoRA adapts nn.Linear, transformers' Conv1D and Falcon's "
                         f"FalconLinear only: inject_clora on exactly the adapter's layers, target_modules "
                         f"{config.get('target_modules')!r})")
    for name, m in layers:
        where = f"{directory}: layer {name!r}"
        if m.merged:
            raise ValueError(f"{where} is merged; unmerge the model before load_peft_adapter")
        r = rank_alpha(name)[0]
        stored = found[name].get("lora_A")
        if config["rank_pattern"] and stored is not None and stored.dim() == 2 and stored.shape[0] != r:
            # (PEFT writes adapter_config.json with sorted keys: an order-dependent rank_pattern can come back
            # reordered, giving a layer another rank than its tensors have; PEFT's own load fails there too)
            raise ValueError(f"{where}: the config's rank_pattern {config['rank_pattern']!r} gives it r={r}, but the "
                             f"adapter's lora_A has {stored.shape[0]} rows: the file contradicts itself (keys of "
                             f"rank_pattern that more than one layer's name matches depend on their order, which "
                             f"PEFT's saved config sorts)")
        if m.rank != r:
            pattern = config["rank_pattern"]
            given = f", rank_pattern={pattern!r}" if pattern else ""
            raise ValueError(f"{where}: the adapter's rank is r={r}, the layer's is {m.rank} "
                             f"(inject_clora(..., rank={config['r']}{given}))")
        for t, want in (("lora_A", (r, m.in_features)), ("lora_B", (m.out_features, r))):
            if t not in found[name]:
                raise ValueError(f"{where}: the adapter has no {t}")
            if not found[name][t].is_floating_point():
                raise ValueError(f"{where}: {t} in the adapter is {found[name][t].dtype}, not a floating-point tensor")
            if tuple(found[name][t].shape) != want:
                raise ValueError(f"{where}: {t} has shape {tuple(found[name][t].shape)}, the layer needs {want} "
                                 f"(a per-module rank, or another base model?)")
        bad = nonfinite(found[name].items())
        if bad:
            raise ValueError(f"{where}: {bad} in the adapter holds non-finite values (NaN/Inf; was it saved from a "
                             f"diverged run?)")
    for param, value in plain.items():
        mine = own[param]
        if not _holds(mine, value):
            raise ValueError(f"{directory}: tensor {_PREFIX + strip + param!r} is not a LoRA factor nor part of "
                             f"modules_to_save {saved_modules}, and it differs from the model's {param!r} (shape "
                             f"{tuple(value.shape)} against {tuple(mine.shape)}): a trained module left out of "
                             f"modules_to_save, or embeddings PEFT's save_embedding_layers stored from a model with "
                             f"another vocabulary; load the adapter into the base model it was trained on")
    for param, (layer, base, value) in skipped.items():     # (after the merged check: a merged base differs)
        mine = getattr(model.get_submodule(layer), base)
        if not _holds(mine, value):
            raise ValueError(f"{directory}: the adapter holds a base {base} for layer {layer!r} ({param}, PEFT's "
                             f"save_embedding_layers) that differs from the model's: load the adapter into the base "
                             f"model it was trained on (with the same vocabulary size)")
    with torch.no_grad():
        for name, m in layers:
            m.reset_adapter()
            m.alpha = float(rank_alpha(name)[1])      # (and scaling = alpha / rank)
            m.lora_A.copy_(_like(m.lora_A, found[name]["lora_A"]))
            m.lora_B.copy_(_like(m.lora_B, found[name]["lora_B"]))
        # the modules of modules_to_save get new tensors holding the saved values, beside the model's own
        # (PEFT's ModulesToSaveWrapper: its trained copy of a module): a tied tensor (GPT-2's lm_head and
        # wte) is untied, so its other module keeps the base's values, and disable_adapter computes with the
        # originals. A later load starts from the originals (a module it does not store is the base's again)
        set_tensors(model, placed_originals(model))        # (on the model's device and dtype now)
        model.__dict__.pop("_clora_originals", None)
        fresh, made = {}, {}
        for param, value in whole.items():
            mine = tensor_at(model, param)
            if tying and id(own[param]) in made:    # (one new tensor for names that share one: still tied)
                fresh[param] = made[id(own[param])]
                continue
            with torch.inference_mode(mine.is_inference()):     # (normal tensors, as the model's, under it)
                value = value.to(device=mine.device, dtype=mine.dtype).clone()
                fresh[param] = made[id(own[param])] = nn.Parameter(value, requires_grad=mine.requires_grad) \
                    if isinstance(mine, nn.Parameter) else value
        if fresh:
            model._clora_originals = set_tensors(model, fresh)
    # what save_peft_adapter stores again by default, as PEFT's own config keeps modules_to_save
    model._clora_modules_to_save = sorted(set(holders.values()))
    if untied:      # (PEFT warns of the same at get_peft_model)
        warnings.warn(f"load_peft_adapter: {directory}: the adapter's modules_to_save give {sorted(untied)[:4]} values "
                      f"of their own, untied from {sorted({q for v in untied.values() for q in v})[:4]} (as PEFT's copy "
                      f"of the module is, without ensure_weight_tying): this model's state_dict now holds both, and "
                      f"loads into a model where they are untied too (e.g. tie_word_embeddings=False), not into one "
                      f"that ties them (both would be written into its one tensor)", UserWarning, stacklevel=2)


def _holds(mine, value) -> bool:
    """Whether the model's tensor `mine` (None, or on the meta device: it holds nothing) holds the adapter
    file's `value`: the base tensors PEFT's save_embedding_layers stores beside the factors."""
    return mine is not None and not mine.is_meta and tuple(mine.shape) == tuple(value.shape) \
        and torch.equal(_full(mine).detach().cpu(), value.to(mine.dtype))


def _saved_module(path: str, entries) -> str:
    """The module holding the tensor `path` (a name in the model) that an entry of modules_to_save names
    (the outermost such module, whose whole state PEFT saves), or "" when none does."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if peft_stores(module, entries):
            return module
    return ""


def peft_stores(module: str, entries) -> bool:
    """PEFT's rule for modules_to_save (`_set_trainable`): a module whose name ends with an entry, as
    text, is stored whole: 'classifier' stores DistilBERT's pre_classifier too, 'norm' Llama's
    input_layernorm (a load refused PEFT's own files, and a save wrote one that PEFT could not load)."""
    return any(module.endswith(s) for s in entries)


def _peft_number(value: float):
    """A float written as PEFT's configs write it: an int where it is one."""
    return int(value) if float(value).is_integer() else value


def _common_and_pattern(model: nn.Module, values: list) -> tuple:
    """(the most common value of (name, value) pairs, the smaller of a tie; {key: value} for the names with
    another), each key a name PEFT's pattern rule (`pattern_value`) gives to that module alone: the
    escaped name, anchored with ^ where another module's name ends with '.' + it."""
    counts = {}
    for _, v in values:
        counts[v] = counts.get(v, 0) + 1
    common = min(counts, key=lambda v: (-counts[v], v))
    modules = [n for n, _ in model.named_modules()]
    pattern = {}
    for name, v in values:
        if v != common:
            key = re.escape(name)
            pattern["^" + key if any(n.endswith("." + name) for n in modules) else key] = v
    return common, pattern


def _target_modules(model: nn.Module, names: list):
    """PEFT target_modules that select exactly `names`: their last name components when those
    select nothing else under PEFT's suffix rule (what vLLM and TGI expect, e.g. q_proj); else a
    regex that PEFT full-matches (full names as a list could also select a module whose name ends
    with one of them, e.g. '0' and '2.0')."""
    short = sorted({n.rpartition(".")[2] for n in names})
    chosen = {n for n, _ in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in short)}
    if chosen == set(names):
        return short
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _trained_elsewhere(model: nn.Module) -> list:
    """Names of the modules outside the C-LoRA adapters that hold a parameter with requires_grad."""
    out = []
    for name, module in model.named_modules():
        own = [(p_name, p) for p_name, p in module.named_parameters(recurse=False)
               if not (isinstance(module, CLoRALinear) and p_name in _ADAPTER_PARAMS)]
        if any(p.requires_grad for _, p in own):
            out.append(name)
    return out


def save_peft_adapter(model: nn.Module, directory, *, modules_to_save=None, base_model_name_or_path=None,
                      task_type=None) -> None:
    """Write the model's C-LoRA adapter as a standard PEFT LoRA adapter directory, the routing
    folded into lora_B (lora_B R_effᵀ); `peft.PeftModel.from_pretrained(base_model, directory)`
    then computes what this model computes, and LoRA servers (vLLM, TGI) serve it as any LoRA.

    modules_to_save: a list of names of whole modules to store as well (PEFT's option: a trained
    classifier head, say); None means those that load_peft_adapter last loaded into this model
    (none if it loaded none). A model that trains parameters outside its adapters (requires_grad)
    must list their modules here: leaving them out would make the PEFT model compute something
    else, so that is refused; so is a module holding a C-LoRA layer (PEFT cannot both adapt and
    store one, and a trained bias of an adapted layer has no place in a PEFT LoRA adapter). A
    trained tensor that the model ties to one of a listed module (lm_head and the input embeddings)
    is stored with it, under PEFT's ensure_weight_tying.
    task_type: None or one of PEFT's (peft.TaskType values, e.g. "SEQ_CLS"); as PEFT's model class
    for the type does, "SEQ_CLS" and "TOKEN_CLS" store every module named ...classifier or ...score
    whole, "QUESTION_ANS" every ...qa_outputs (PEFT's loader expects them).
    Layers of different ranks or alphas are written as PEFT writes them: `r` and `lora_alpha` the
    most common (the smaller of a tie), the others in `rank_pattern` / `alpha_pattern` under their
    full names (escaped; anchored where a longer name ends with one).
    Each file is replaced atomically (weights first, then the config): a save that is killed leaves
    the previous files, or the new weights beside the previous config. Under FSDP2 every rank calls
    it and rank 0 writes (as save_adapter)."""
    check_path(directory, "save_peft_adapter", "directory")
    model = unwrapped(model)
    layers = _require_layers(model, "save_peft_adapter")
    _refuse_disabled(layers, "save_peft_adapter")
    refuse_meta(layers, "save_peft_adapter")
    if any(name == "" for name, _ in layers):
        raise ValueError("save_peft_adapter: the model is a single CLoRALinear; PEFT adapts submodules, so wrap it "
                         "(e.g. nn.Sequential(layer)) and save that")
    rank, rank_pattern = _common_and_pattern(model, [(n, m.rank) for n, m in layers])
    alpha, alpha_pattern = _common_and_pattern(model, [(n, _peft_number(m.alpha)) for n, m in layers])
    if modules_to_save is not None:
        iterable = hasattr(modules_to_save, "__iter__") and not isinstance(modules_to_save, (str, bytes))
        names = list(modules_to_save) if iterable else []      # (an iterator: read once)
        if not iterable or not all(isinstance(n, str) for n in names):
            raise TypeError(f"save_peft_adapter: modules_to_save must be a list of module names (PEFT's form), got "
                            f"{modules_to_save!r}")
        modules_to_save = names
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"save_peft_adapter: base_model_name_or_path must be a str (a hub name or a folder) or None, "
                        f"got {base_model_name_or_path!r}")
    if task_type is not None and task_type not in _PEFT_TASK_HEADS:
        raise ValueError(f"save_peft_adapter: task_type {task_type!r} is none of PEFT's ({', '.join(_PEFT_TASK_HEADS)}) "
                         f"or None")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_peft_adapter: {os.fspath(directory)!r} is a file; give a directory (PEFT's adapter "
                         f"is a folder)")
    saved = list(getattr(model, "_clora_modules_to_save", []) if modules_to_save is None else modules_to_save)
    if "" in saved:
        raise ValueError("save_peft_adapter: modules_to_save names the whole model (''); PEFT stores submodules")
    modules = dict(model.named_modules())
    unknown = [s for s in saved if s not in modules]
    if unknown:
        raise ValueError(f"save_peft_adapter: modules_to_save {unknown} are not modules of the model (full names, "
                         f"e.g. 'head')")
    heads = _PEFT_TASK_HEADS.get(task_type, ())
    saved += [n for n in modules if n and n.endswith(heads) and n not in saved]    # (str.endswith, as PEFT's test)
    # every module PEFT's model will store whole (`peft_stores`: the names that end with an entry), the outermost
    wrapped = [n for n in modules if n and peft_stores(n, saved)]
    wrapped = [n for n in wrapped if not any(n.startswith(w + ".") for w in wrapped)]

    def stored(n):      # (the name is a stored module's, or inside one)
        return any(n == s or n.startswith(s + ".") for s in wrapped)
    adapted = [n for n, _ in layers if stored(n)]
    if adapted:
        by_text = sorted(set(wrapped) - set(saved))
        raise ValueError(f"save_peft_adapter: modules_to_save {saved} hold the C-LoRA layer(s) {adapted[:8]}; a PEFT "
                         f"adapter cannot both adapt a module and store it whole"
                         + (f" (task_type {task_type!r} stores PEFT's heads {list(heads)} whole: leave them out of "
                            f"target_modules)" if heads and any(n.endswith(heads) for n in adapted) else "")
                         + (f" (PEFT stores every module whose name ends with an entry, as text: also {by_text[:8]})"
                            if by_text else ""))
    # (a trained tensor tied to one of a stored module, lm_head's weight that is the input embeddings', is stored
    # with it as its partner, below)
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    inside = {id(t) for n, t in named.items() if stored(n)}
    left_out = [n for n in _trained_elsewhere(model) if not stored(n)
                and any(id(p) not in inside for p in modules[n].parameters(recurse=False) if p.requires_grad)]
    layer_names = {n for n, _ in layers}
    biased = [n for n in left_out if n in layer_names]
    if biased:
        raise ValueError(f"save_peft_adapter: the C-LoRA layer(s) {biased[:8]} train their base weight or bias "
                         f"(requires_grad), which a PEFT LoRA adapter cannot hold (PEFT's bias='lora_only' is not "
                         f"written): freeze them (requires_grad_(False)), or keep the model's own format "
                         f"(clora_kernels.save_adapter with the model's state_dict)")
    if "" in left_out:
        own = [n for n, p in model.named_parameters(recurse=False) if p.requires_grad]
        raise ValueError(f"save_peft_adapter: the model trains its own parameter(s) {own[:8]} (requires_grad), "
                         f"outside any submodule, which a PEFT LoRA adapter cannot store (its modules_to_save are "
                         f"submodules): freeze them (requires_grad_(False)), or keep the model's own format "
                         f"(clora_kernels.save_adapter with the model's state_dict)")
    if left_out:
        raise ValueError(f"save_peft_adapter: the model trains parameters outside its adapters in {left_out[:8]}; "
                         f"pass modules_to_save={left_out[:8]!r} to store them with the adapter, or freeze them "
                         f"(requires_grad_(False)) if the PEFT model should not have them")
    on_meta = [s for s in wrapped if any(t.is_meta for t in modules[s].state_dict(keep_vars=True).values()
                                         if isinstance(t, torch.Tensor))]
    if on_meta:
        raise ValueError(f"save_peft_adapter: modules_to_save {on_meta} are on the meta device and hold no values: "
                         f"materialise the model first")
    tensors = {}
    for name, m in layers:
        with torch.no_grad(), exact_math(m.lora_B):
            m.protection.enforce(m)         # (as save_adapter: a save changes nothing of the run)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = _full(m.lora_A).detach().to("cpu").contiguous()
            folded = folded_lora_B(_full(m.lora_B), m.routing())
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = folded.detach().to("cpu").contiguous()
        bad = nonfinite((t, tensors[f"{_PREFIX}{name}.{t}.weight"]) for t in ("lora_A", "lora_B"))
        if bad:     # (load_peft_adapter refuses such a file; PEFT would serve NaN)
            raise ValueError(f"save_peft_adapter: the adapter's {bad} of layer {name!r} holds non-finite values "
                             f"(NaN/Inf; did training diverge?); nothing was written")
    for s in wrapped:   # the module's whole state (buffers too), as PEFT saves it; tied tensors stored apart
        for p_name, p in modules[s].state_dict(keep_vars=True).items():
            if isinstance(p, torch.Tensor):
                tensors[f"{_PREFIX}{s}.{p_name}"] = _full(p).detach().to("cpu", copy=True).contiguous()
    # a stored tensor that the model shares with a module outside them (lm_head tied to embed_tokens): PEFT's
    # copy of the stored module alone left the other on the base's values (a trained tied head computed 3.6
    # off in logits), so the partner is stored too, with PEFT's ensure_weight_tying (0.21), which ties the copies
    partners = [n for n, t in named.items() if id(t) in inside and not stored(n)]
    adapted_partners = [n for n in partners if any(n.startswith(s + ".") for s in layer_names)]
    if adapted_partners:    # (PEFT's copy of the module would leave the adapted layer's base on the original)
        raise ValueError(f"save_peft_adapter: modules_to_save {saved} store a tensor that the model ties to the base "
                         f"weight of the C-LoRA layer(s) {adapted_partners[:4]}, which a PEFT adapter cannot keep "
                         f"tied (its model would compute with the original there): leave the module out, or keep "
                         f"the model's own format (clora_kernels.save_adapter with the model's state_dict)")
    for n in partners:
        tensors[f"{_PREFIX}{n}"] = _full(named[n]).detach().to("cpu", copy=True).contiguous()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": _target_modules(model, [n for n, _ in layers]), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": all(m.fan_in_fan_out for _, m in layers), "use_rslora": False, "use_dora": False,
              "modules_to_save": saved or None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "init_lora_weights": True,
              "inference_mode": True, "task_type": task_type,
              "base_model_name_or_path": None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)}
    if partners:
        config["ensure_weight_tying"] = True
    for why in _served_without_adapter(model, [n for n, _ in layers]):
        warnings.warn(f"save_peft_adapter: {why}", UserWarning, stacklevel=2)

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)

    def write():
        os.makedirs(directory, exist_ok=True)
        write_safetensors_atomic(os.path.join(directory, _WEIGHTS), tensors, {"format": "pt"})
        write_atomic(os.path.join(directory, _CONFIG), write_config)
    _write_once(model, write)      # FSDP2: every rank gathered the tensors, rank 0 writes
