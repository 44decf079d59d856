"""`CLoRALinear` (a drop-in `nn.Linear`) and the model helpers (docs/design.md section 2,
"Storage layout and public names").

PEFT layout: lora_A is (r, K), lora_B is (N, r); routing_old / projection are buffers and
routing_delta the trainable r×r routing. The layer computes
    y = x Wᵀ + b + scaling · x lora_Aᵀ (routing_old + projection · routing_delta) lora_Bᵀ
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import check_path, read_safetensors, write_safetensors_atomic
from .backends import BACKEND_NAMES
from .backends.ops import _is_tracing, in_functorch
from .reference import delta_weight, routing_eff
from .functional import _HALF, check_flag, exact_math, finite_number, module_linear
from .protection import (Project, Protection, factor_leaves, forget_observed, make_protection, protection_lock,
                         sum_dtype)

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:             # a torch built without torch.distributed: no parameter is ever a DTensor
    DTensor = ()

_MODES = ("soft", "hard")
_ADAPTER_TENSORS = ("lora_A", "lora_B", "routing_old", "routing_delta", "projection")
_REFUSED = object()     # CLoRALinear._loading while a load of another shape runs: set_extra_state takes nothing


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a parameter that FSDP2 (`fully_shard`) keeps sharded between forwards
    (a DTensor: an all-gather, so under FSDP2 every rank runs the lifecycle methods together), else
    `t` itself. Differentiable: a loss on it (orthogonality_loss) sends each rank's shard its part."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def nonfinite(named) -> str:
    """The names of the (name, tensor) pairs whose tensor holds NaN or Inf, joined ('' when none)."""
    return ", ".join(n for n, t in named if not bool(torch.isfinite(t).all()))


def _same_memo(a, b) -> bool:
    """Whether two of merge's memories (`CLoRALinear._merge_memo`: tensors, then scaling and mode) are equal."""
    return a is not None and len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, Tensor) else x == y for x, y in zip(a, b))


def _weight_sums(weight: Tensor):
    """Two float64 sums of a weight (absolute, squared), or None where it has no local values (meta,
    FSDP2's DTensor): a merged layer's task state carries them, so that a sharded checkpoint's weight,
    loaded by another load_state_dict call than the task state, is known for the merged one."""
    if weight.is_meta or isinstance(weight, DTensor):
        return None
    with torch.no_grad():
        return [float(torch.linalg.vector_norm(weight, 1, dtype=torch.float64)),
                float(torch.linalg.vector_norm(weight, 2, dtype=torch.float64)) ** 2]


def _same_sums(a, b) -> bool:
    """Whether two `_weight_sums` are of the same weight (to 1e-9: the sums' rounding depends on the
    device and the threads; a merged delta moves them far more)."""
    return a is not None and b is not None and len(a) == len(b) == 2 and all(
        abs(x - y) <= 1e-9 * max(abs(x), abs(y)) for x, y in zip(a, b))


def _task_state_entry(state_dict, prefix: str):
    """The layer's task state in a state_dict, or None: absent, or torch.distributed.checkpoint's
    placeholder (set_model_state_dict, accelerate's sharded loader, passes one for every module whose
    task state is in another shard)."""
    value = state_dict.get(prefix + "_extra_state")
    return None if _placeholder(value) else value


def _placeholder(value) -> bool:
    dcp = sys.modules.get("torch.distributed.checkpoint.state_dict")
    return value is not None and dcp is not None and isinstance(value, getattr(dcp, "_EXTRA_STATE", ()))


def _resized(buffer: Tensor, shape) -> Tensor:
    """A new empty tensor of `shape` to replace `buffer` in a load: an inference tensor only where
    `buffer` is one (a load run under torch.inference_mode made inference tensors of normal buffers,
    and every later load or training step failed on them)."""
    with torch.inference_mode(buffer.is_inference()):
        return buffer.new_empty(shape)


def _like(ref: Tensor, value: Tensor) -> Tensor:
    """`value`, a whole tensor every rank holds, laid out as `ref` is: ref's shard of it when ref is a
    DTensor (cut locally, no communication), else `value` itself. For in-place writes into `ref`."""
    if not isinstance(ref, DTensor):
        return value
    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards some of the model's parameters (the lifecycle helpers are then collective)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _write_once(model: nn.Module, write) -> None:
    """Run `write()`, which writes a file from the model's gathered tensors: where it is called, or,
    when FSDP2 shards the model (every rank gathered them), on rank 0, every rank returning once the
    file is there, or raising when rank 0's write failed (the others waited for it in a barrier
    forever)."""
    if not _sharded(model):
        write()
        return
    failure = [None]
    if torch.distributed.get_rank() == 0:
        try:
            write()
        except Exception as exc:
            failure[0] = f"{type(exc).__name__}: {exc}"
            torch.distributed.broadcast_object_list(failure, src=0)
            raise
    torch.distributed.broadcast_object_list(failure, src=0)     # (every rank waits here for rank 0's write)
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 could not write the file: {failure[0]}")


DEFAULT_PROTECTION = "freeze"   # docs/design.md section 2: what won on the tuning seeds (README "Continual learning")


def _finite_real(value) -> bool:
    """A finite real number, not a bool: what alpha and scaling take."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and finite_number(value)


def _check_mode(mode) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")


def _check_energy(protect_energy, name: str = "protect_energy") -> None:
    if isinstance(protect_energy, bool) or not isinstance(protect_energy, numbers.Real) \
            or not (0.0 < protect_energy <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {protect_energy!r}")


def _check_task_index(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"task_index must be an int >= 0, got {value!r}")


def _check_task_state(state: dict) -> None:
    """The values of a task state (get_extra_state's dict) that a load would set, checked as the
    layer's assignments check them, before anything is set."""
    if "task_index" not in state:
        raise ValueError(f"the task state has no task_index: {state!r}")
    _check_task_index(state["task_index"])
    _check_mode(state.get("mode", "soft"))
    if not _finite_real(state.get("alpha", 1.0)):
        raise ValueError(f"alpha must be a finite number, got {state['alpha']!r}")
    _check_energy(state.get("protect_energy", 0.9))
    check_flag("grad_through_old_route", state.get("grad_through_old_route", False))
    merged_as = state.get("merged_as")
    if not (merged_as in (None, "unknown") or isinstance(merged_as, dict) and set(merged_as) == {"scaling", "mode"}
            and _finite_real(merged_as["scaling"])):
        raise ValueError(f"the task state's merged_as must be None, 'unknown' or {{'scaling', 'mode'}}, "
                         f"got {merged_as!r}")
    if isinstance(merged_as, dict):
        _check_mode(merged_as["mode"])


def _check_config(in_features: int, out_features: int, rank, alpha, mode, protect_energy, backend,
                  protection=DEFAULT_PROTECTION) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank > min(in_features, out_features):
        raise ValueError(f"rank must be an int in [1, min(in_features, out_features)] = [1, "
                         f"{min(in_features, out_features)}] for a {in_features}->{out_features} layer, got {rank!r}")
    if alpha is not None and not _finite_real(alpha):
        raise ValueError(f"alpha must be a finite number or None (None means alpha = rank), got {alpha!r}")
    _check_mode(mode)
    _check_energy(protect_energy)
    _check_backend(backend)
    make_protection(protection)


def _check_backend(backend) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {backend!r}")


def _lifecycle_step(method):
    """A lifecycle method that computes or builds state kept across steps and tasks (the policy's
    buffers, the folded routing, a merged weight) runs without the caller's torch.autocast
    (`functional.exact_math`), and outside torch.inference_mode (a validation loop's hook calling
    it) where the layer's tensors are normal: inference tensors made there could never be loaded
    into or updated again (every later load_state_dict / load_adapter failed half-way). A layer made
    under inference_mode stays in it."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if torch.compiler.is_compiling():       # (the compiler traces neither test)
            return method(self, *args, **kwargs)
        kept = self._kept_state()       # (tensors of the layer: their device, and whether it was made there)
        with exact_math(kept[0]):
            if torch.is_inference_mode_enabled() and not any(t.is_inference() for t in kept):
                with torch.inference_mode(False), torch.no_grad():    # (inference_mode(False) turns grad mode on)
                    return method(self, *args, **kwargs)
            return method(self, *args, **kwargs)
    return run


class CLoRALinear(nn.Linear):
    """Drop-in `nn.Linear` with one C-LoRA adapter. `weight` and `bias` are the frozen base."""
    _checked = None      # the last call whose operands passed validation (functional.module_linear)
    _observing = False   # inside observe_task: the forward gives its input to the protection policy

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: Optional[float] = None,
                 bias: bool = True, *, mode: str = "soft", protect_energy: float = 0.9,
                 grad_through_old_route: bool = False, backend: str = "auto", protection=DEFAULT_PROTECTION,
                 device=None, dtype=None):
        _check_config(in_features, out_features, rank, alpha, mode, protect_energy, backend, protection)
        self.rank = rank
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.alpha = float(rank if alpha is None else alpha)        # and scaling = alpha / rank (__setattr__)
        self.mode = mode
        self.protect_energy = float(protect_energy)
        self.grad_through_old_route = grad_through_old_route        # (a bool: __setattr__ checks it)
        self.backend = backend
        self.task_index = 0
        self.merged = False
        self.fan_in_fan_out = False      # True: `weight` is stored (in, out), transformers' Conv1D layout
        self.adapter_enabled = True      # False inside disable_adapter(): the base layer alone
        self._observing = False          # (in the instance from the start: observe_task's first write into the
        # __dict__ made a model compiled before it compile again, Dynamo having guarded on the key's absence)
        self.tied_to = []                # other parameters sharing `weight` (inject_clora, ck.merge(model) find them)
        fk = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **fk))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **fk))
        self.routing_delta = nn.Parameter(torch.eye(rank, **fk))
        self.register_buffer("routing_old", torch.zeros(rank, rank, **fk))
        self.register_buffer("projection", torch.eye(rank, **fk))
        self.protection: Protection = make_protection(protection)
        self.reset_adapter()

    def _kept_state(self):      # the tensors `_lifecycle_step` reads
        return self.routing_old, self.weight

    def reset_parameters(self) -> None:
        """nn.Linear's init of weight and bias, and the adapter's first-task state (so the FSDP
        idiom, meta-device build, `to_empty`, `reset_parameters()`, gives a layer equal to its base)."""
        why = self._refusal("reset_parameters") if "protection" in self.__dict__ else ""
        if why:     # (before the weight is drawn: a refusal changes nothing)
            raise ValueError(f"reset_parameters: {why}")
        if getattr(self, "fan_in_fan_out", False):
            with torch.no_grad():    # nn.Linear's init, on the (out, in) view of a Conv1D-layout weight
                nn.init.kaiming_uniform_(self.weight.t(), a=math.sqrt(5))
                if self.bias is not None:
                    nn.init.uniform_(self.bias, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        else:
            super().reset_parameters()
        self._set_merged(False)     # the weight is new: nothing of an earlier merge is in it, or to take out
        if "protection" in self.__dict__:      # nn.Linear.__init__ calls this before the adapter exists
            self.reset_adapter()

    @_lifecycle_step
    def reset_adapter(self) -> None:
        """First-task state: routing_delta = I, routing_old = 0, P = I, lora_B = 0,
        lora_A Kaiming-uniform (PEFT's init); the protection policy's state is fresh and every
        adapter tensor trains."""
        why = self._refusal("reset_adapter")
        if why:
            raise ValueError(f"reset_adapter: {why}")
        self.__dict__.pop("_parts", None)
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=self.lora_A.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))       # drawn whole, so an FSDP2 shard gets its part
            self.lora_A.copy_(_like(self.lora_A, a))
            self.lora_B.zero_()
            # (on the CPU, not the default device: under torch.device("meta") a real layer's reset failed half-way)
            self.routing_delta.copy_(_like(self.routing_delta, torch.eye(self.rank, device="cpu")))
            self.routing_old.zero_()
            self.projection.copy_(torch.eye(self.rank, device="cpu"))
        for p in (self.lora_A, self.lora_B, self.routing_delta):
            p.requires_grad_(True)
        self.task_index = 0
        self._set_protection(self.protection)

    @torch.no_grad()
    @_lifecycle_step
    def _mode_changed(self) -> None:
        """The policy's state that depends on P, after a mode switch or a new P (outside inference_mode, as every
        lifecycle step: a basis made there broke every later load)."""
        self.protection.mode_changed(self)

    @_lifecycle_step
    def _set_protection(self, spec) -> None:
        """Give the layer a policy with fresh state (the old policy's buffers are removed)."""
        policy = make_protection(spec)
        self.protection.detach(self)
        self.__dict__["protection"] = policy
        policy.attach(self)

    def __setattr__(self, name, value):
        # layer.protection = "project" (or a Protection) switches the policy as protection= at
        # construction does, with fresh state; a plain attribute write left the new policy without its
        # buffers and flags (AttributeError at the next forward or end_task). Assigning the policy the
        # layer has (the object, or an equal configuration) changes nothing
        if name == "protection" and "protection" in self.__dict__:
            current = self.__dict__["protection"]
            if value is not current and make_protection(value).config() != current.config():
                self._set_protection(value)     # (the same policy, or an equal one, keeps its state)
                if self.task_index > 0 and current.name != "paper":     # (paper keeps nothing of its own)
                    warnings.warn(f"protection switched to {self.protection!r} after task {self.task_index}, with "
                                  f"fresh state: what {current!r} kept of the earlier tasks is no longer kept (a "
                                  f"project policy protects the inputs it observes from here on)", UserWarning,
                                  stacklevel=2)
                elif self.task_index > 0 and self.protection.name == "project":
                    # (from paper: nothing was kept, but the earlier tasks' inputs were never observed, and project
                    # trains both routes: they drifted 1.5 in the next task, without a word; a helper's attack)
                    warnings.warn(f"protection switched to {self.protection!r} after task {self.task_index}: it "
                                  f"protects the inputs it observes from here on, and the earlier tasks' were never "
                                  f"observed, so their outputs are not protected", UserWarning, stacklevel=2)
            return
        if name in ("mode", "protect_energy") and name in self.__dict__:
            # checked as at construction (a 'Hard' ran as soft); a switch to hard after a task, or another
            # protect_energy in hard mode (end_task's warning of a P = 0 advises a lower one), makes P from
            # R_old as end_task would have (with P = I the new route would not be kept off the old one; the
            # energy alone changed nothing until the next end_task, so the stuck layer stayed stuck)
            if name == "mode":
                _check_mode(value)
            else:
                _check_energy(value)
                value = float(value)
            changed = value != self.__dict__[name] and self.task_index > 0 and "_loading" not in self.__dict__ \
                and (name == "mode" or self.mode == "hard")
            self._remember_merged()
            super().__setattr__(name, value)
            if changed:
                if self.mode == "hard":
                    with torch.no_grad():
                        self.projection.copy_(_hard_projection(self.routing_old, self.protect_energy))
                self._mode_changed()
            return
        # alpha and scaling = alpha / rank are one setting: writing either sets the other (as floats), so
        # what the forward computes with (scaling) is what a save writes (alpha: save_adapter, lora_alpha)
        if name == "grad_through_old_route":
            value = check_flag(name, value)
        if name == "backend":       # (refused here, not at the next forward)
            _check_backend(value)
        if name == "rank" and "rank" in self.__dict__ and not (
                isinstance(value, int) and not isinstance(value, bool) and value == self.__dict__["rank"]):
            # (the adapter's tensors, the scaling and the policy's state are of the rank made: a write left a
            # layer whose reset_adapter, merge and saves failed or disagreed with its tensors)
            raise ValueError(f"rank is the adapter's size, {self.__dict__['rank']}, fixed when the layer is made; "
                             f"for rank {value!r}, make a new layer (CLoRALinear.from_linear, inject_clora)")
        if name == "protect_energy":    # (at construction)
            _check_energy(value)
            value = float(value)
        if name == "task_index":    # (a bad one was saved, then refused by load_adapter, or broke state_dict())
            _check_task_index(value)
            value = int(value)
            # what the forward reads of it (the policies' `acts`): a bool, so torch.compile's guard on it takes two
            # values, where one on the int recompiled after every end_task (fullgraph=True failed at the 9th task)
            self.__dict__["_after_first_task"] = value > 0
        if name in ("alpha", "scaling") and "rank" in self.__dict__:
            if not _finite_real(value):
                raise ValueError(f"{name} must be a finite number, got {value!r} (alpha and scaling = alpha / rank "
                                 f"are one setting)")
            self._remember_merged()
            value, rank = float(value), self.__dict__["rank"]
            other = ("scaling", value / rank) if name == "alpha" else ("alpha", value * rank)
            self.__dict__[other[0]] = other[1]
        super().__setattr__(name, value)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 16, alpha: Optional[float] = None, *,
                    autocast_adapter_dtype: bool = True, **kwargs) -> "CLoRALinear":
        """Wrap an existing nn.Linear, or a transformers `Conv1D` (GPT-2's (in, out) layout, kept
        as it is: the layer computes with a transposed view, PEFT's fan_in_fan_out). The weight
        and bias are shared, not copied: at init the output equals the base layer's exactly
        (lora_B = 0). `autocast_adapter_dtype` (PEFT's option, and its default): on a float16 or
        bfloat16 layer the adapter (lora_A, lora_B and the routing) is float32, and enters the
        computation in the layer's dtype (`functional.module_linear`), so the optimizer updates
        float32 values: in 16 bits an Adam step below the value's spacing was lost (a bf16 Llama's
        routing_delta kept its diagonal at exactly 1.0 over ten steps at lr 1e-3). False: the adapter
        takes the layer's dtype."""
        autocast_adapter_dtype = check_flag("autocast_adapter_dtype", autocast_adapter_dtype)
        conv1d = _is_conv1d(linear)
        if not (conv1d or isinstance(linear, nn.Linear)) or isinstance(linear, CLoRALinear):
            raise TypeError(f"from_linear expects a plain nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}" + (" (it already holds an adapter, which would be dropped)"
                                                          if isinstance(linear, CLoRALinear) else ""))
        clash = sorted(set(kwargs) & {"bias", "device", "dtype"})
        if clash:
            raise TypeError(f"from_linear / inject_clora: {clash} come from the wrapped layer (its bias, its weight's "
                            f"device and dtype); convert the model itself (model.to(...)) instead")
        hook = getattr(linear, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):
            # accelerate's hook that loads an offloaded layer's weights at each forward: a layer put in its place
            # carried none, so its weight and the adapter stayed on the meta device ("device mismatch" at the
            # forward; PEFT keeps the hooked layer inside its own). (A hook that only places the layer's inputs
            # is dropped: the hook of the block around it, which a device_map also gives, places them)
            raise ValueError(f"the layer is offloaded by accelerate's {type(hook).__name__} (a device_map entry "
                             f"'cpu' or 'disk': its weights are on the meta device until its forward), and a C-LoRA "
                             f"layer in its place would not load them: load the model without the device_map, "
                             f"inject_clora, then accelerate.dispatch_model(model, device_map, offload_dir=...)")
        if getattr(linear, "activation_post_process", None) is not None:     # (its observer hook, carried, failed)
            raise ValueError("the layer is prepared for quantization (torch.ao.quantization.prepare: it has an "
                             "activation_post_process); inject the adapter before prepare, or into the float model")
        computed = [n for n in ("weight", "bias") if getattr(linear, n, None) is not None and n not in linear._parameters]
        if computed:    # (torch.nn.utils.prune, the old weight_norm: a tensor its forward pre-hook computes, which
            # failed deep in the swap with torch's "can only change requires_grad flags of leaf variables")
            raise ValueError(f"the layer's {computed} is computed on every forward (torch.nn.utils.prune, "
                             f"parametrize or the old weight_norm), so a C-LoRA layer cannot share it; remove that "
                             f"first (prune.remove, parametrize.remove_parametrizations, remove_weight_norm)")
        w = linear.weight
        k, n = w.shape if conv1d else w.shape[::-1]
        # the adapter of a layer that was made outside torch.inference_mode is made normal inside it (a server's
        # loader under @torch.inference_mode() injecting): inference tensors there failed every later forward with
        # grad ("cannot be saved for backward"; PEFT's adapter made so survives a plain eval forward, not a backward
        # or training); a base made inside stays
        with torch.inference_mode(torch.is_inference_mode_enabled() and w.is_inference()):
            layer = cls(k, n, rank, alpha, bias=linear.bias is not None, device="meta", dtype=w.dtype, **kwargs)
            layer.fan_in_fan_out = conv1d
            cls = type(linear)
            if (cls.__module__, cls.__name__) in _PLAIN_SUBCLASSES:     # (merge_and_unload puts that type back)
                layer.__dict__["_base_class"] = cls
            layer.weight = linear.weight.requires_grad_(False)       # the same Parameter: ties stay ties
            if linear.bias is not None:
                layer.bias = linear.bias.requires_grad_(False)
            kw = {"device": w.device,
                  "dtype": torch.float32 if autocast_adapter_dtype and w.dtype in _HALF else w.dtype}
            for name in ("lora_A", "lora_B", "routing_delta"):
                setattr(layer, name, nn.Parameter(torch.empty_like(getattr(layer, name), **kw)))
            for name in ("routing_old", "projection"):
                setattr(layer, name, torch.empty_like(getattr(layer, name), **kw))
            layer.reset_adapter()           # also re-creates the policy's buffers on the weight's device
        carry_hooks(linear, layer)
        return layer

    # ---- the math -------------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        """The base weight as (out_features, in_features): `weight`, or a view of it for the
        Conv1D layout."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _projection_arg(self) -> Optional[Tensor]:
        return self.projection if self.mode == "hard" else None

    def routing(self) -> Tensor:
        """R_eff = routing_old + projection · routing_delta."""
        return routing_eff(self.routing_old, _full(self.routing_delta), self._projection_arg())

    def delta_weight(self) -> Tensor:
        """scaling · lora_B R_effᵀ lora_A, shape (out_features, in_features)."""
        self.protection.enforce(self)
        return self._delta(*self._adapter(), self.scaling)

    def _adapter(self) -> tuple:
        """The adapter tensors (_ADAPTER_TENSORS' order, _delta's arguments), whole (see _full)."""
        return tuple(_full(getattr(self, t)) for t in _ADAPTER_TENSORS)

    def _delta(self, lora_A, lora_B, routing_old, routing_delta, projection, scaling, mode=None) -> Tensor:
        """The delta of these adapter tensors in `mode` (default the layer's: merge remembers its own)."""
        return delta_weight(lora_A, lora_B, self._r_eff(routing_old, routing_delta, projection, mode), scaling)

    def _r_eff(self, routing_old, routing_delta, projection, mode=None) -> Tensor:
        """R_eff of these routing tensors in `mode` (default the layer's): soft mode reads no projection."""
        return routing_eff(routing_old, routing_delta, projection if (mode or self.mode) == "hard" else None)

    def orthogonality_loss(self) -> Tensor:
        """|| Oᵀ (P R_delta) ||_F² with O = routing_old (soft) or Q (hard; I - P = Q Qᵀ), in float32 for a
        16-bit layer (a float16 one's squares overflowed to inf at r = 32, a value of 8e4)."""
        dtype = sum_dtype(self.routing_delta.dtype)
        delta, projection = _full(self.routing_delta).to(dtype), self.projection.to(dtype)
        new = delta if self.mode == "soft" else projection @ delta
        if self.mode == "soft":
            return (self.routing_old.to(dtype).t() @ new).square().sum()
        # ||Qᵀ M||_F = ||Q Qᵀ M||_F = ||(I - P) M||_F  (Q has orthonormal columns)
        return (new - projection @ new).square().sum()

    def forward(self, input: Tensor) -> Tensor:     # nn.Linear's argument name: layer(input=x) works
        x = input
        if self._observing:     # (read in the forward, not a hook: a module compiled before observe_task
            _observe(self, x)   # runs no hook added later, and its layers protected nothing, silently)
        if self.merged or not self.adapter_enabled:
            # any adapter tensor that trains (a plain LoRA, routing_delta frozen, as seq_lora: A and B trained
            # nothing, silently)
            adapter = (self.routing_delta, self.lora_A, self.lora_B)
            trained = self.merged and self.training and torch.is_grad_enabled() and any(p.requires_grad
                                                                                        for p in adapter)
            if trained:
                if torch.compiler.is_compiling():   # the compiler cannot carry the guard's raise to the backward
                    raise RuntimeError(_MERGED_TRAINING)    # (without fullgraph: a graph break, then the guard)
                if not _is_tracing():   # (a TorchScript trace is inference: it records F.linear, as nn.Linear's)
                    # inference works; a backward says why not
                    return _MergedGuard.apply(x, self.base_weight(), self.bias, *adapter)
            return F.linear(x, self.base_weight(), self.bias)
        params, buffers = self._parameters, self._buffers
        memo = self     # (module_linear's validation memo; None where the operands are new each call)
        try:    # read where they live, not through nn.Module.__getattr__ (host cost per call)
            weight, bias, lora_A, lora_B = params["weight"], params["bias"], params["lora_A"], params["lora_B"]
            routing_delta = params["routing_delta"]
            routing_old, projection = buffers["routing_old"], buffers["projection"]
        except KeyError:    # torch.nn.utils.prune / parametrize moved one: the attribute computes it, with a
            # graph that the memo would keep alive (and that deepcopy of the layer refuses)
            weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
            routing_delta, routing_old, projection = self.routing_delta, self.routing_old, self.projection
            memo = None
        plain, mode, policy = self.grad_through_old_route, self.mode, self.protection
        factors = None
        if policy.acts(self):
            factors = (lora_A, lora_B)     # (the memo's key: operands() may return fresh views of them)
            if policy.enforces:     # ("freeze" and "paper" enforce nothing: no call, one graph when compiled)
                compiling = _is_compiling()
                # torch.func, or functional_call given tensors of the caller that are no Parameters
                # (MAML's fast weights; it wrote into them): no in-place write; the operands are projected,
                # differentiably (a parametrized one, memo None, is enforce's error). Another model's
                # Parameters given so are written (README, "protection")
                if in_functorch() or not compiling and memo is not None \
                        and not (isinstance(lora_A, nn.Parameter) and isinstance(lora_B, nn.Parameter)
                                 and isinstance(routing_delta, nn.Parameter)):
                    lora_A, routing_delta, lora_B = policy.projected(self, lora_A, routing_delta, lora_B)
                    factors, memo = (lora_A, lora_B), None
                elif getattr(self, "_is_replica", False):
                    # DataParallel's replica: its tensors are the original's, broadcast (none to write into; it
                    # refused as 'computed'): the projected values, with the plain gradient, as the original's
                    # in-place projection gives (the original's own end_task and saves still enforce)
                    lora_A, routing_delta, lora_B = (t + (p - t).detach() for t, p in zip(
                        (lora_A, routing_delta, lora_B), policy.projected(self, lora_A, routing_delta, lora_B)))
                    factors = (lora_A, lora_B)
                elif not compiling:
                    if _is_tracing():   # torch.jit.trace / the TorchScript ONNX exporter: not recorded
                        _untraced(policy.enforce, self)
                    else:
                        policy.enforce(self)
                elif not _is_exporting():       # compiled: the in-place projection runs outside the graph
                    _enforce_eagerly(self)      # (exported: inference on the weights as they are; see README)
            lora_A, lora_B, plain = policy.operands(self, lora_A, lora_B, plain)
        return module_linear(memo, x, weight, self.fan_in_fan_out, bias, lora_A, lora_B, routing_old, routing_delta,
                             projection if mode == "hard" else None, self.scaling, plain, self.backend, mode, factors)

    def __prepare_scriptable__(self):
        # (torch.jit.script asks every module before compiling it: the forward's try blocks failed there)
        raise TypeError("torch.jit.script cannot compile a C-LoRA layer (its forward uses Python that TorchScript "
                        "lacks): use torch.jit.trace or torch.export, or script after ck.merge_and_unload(model)")

    def __getstate__(self):
        # copy.deepcopy and pickle (torch.save(model)): the policy's record of what it enforced keys the
        # tensors' storage, which a copy does not share, so a copy's first forward projected its adapter
        # again (not bit-exact: a run resumed from a pickled model ended 1.5e-6 away); the fingerprint
        # carries it, as a state_dict does (`enforced_fingerprint`)
        state = super().__getstate__()
        state.pop("_enforced_values", None)     # (the project policy's copy of the adapter: made again on load)
        if state.get("_observing"):
            # made inside an observe_task block, which the copy is no part of: it recorded every later forward
            # forever; as an interrupted pass, nothing of the open one is kept (the copy observes again)
            state["_observing"] = False
            state.pop("_observing_thread", None)
            forget_observed(state)
        try:
            state["_enforced_fingerprint"] = self.protection.enforced_fingerprint(self)
        except Exception:       # (meta tensors have no sums: the copy projects again, as before)
            state["_enforced_fingerprint"] = None
        return state

    def __setstate__(self, state):
        fingerprint = state.pop("_enforced_fingerprint", None)
        state.setdefault("_after_first_task", state.get("task_index", 0) > 0)     # (a layer pickled before it)
        state.setdefault("_observing", False)
        super().__setstate__(state)
        if fingerprint is not None:
            try:
                self.protection.loaded_enforced(self, fingerprint)
            except Exception:       # (loaded to meta, map_location="meta": no sums; it projects again, as before)
                pass

    def _apply(self, fn, recurse=True):     # .to() / .half() / to_empty: the operands' validation is redone
        self.__dict__["_checked"] = None
        self.__dict__.pop("_enforced_values", None)     # (project's copy of the adapter: not left on the old device)
        policy = self.__dict__.get("protection")
        try:        # (what was enforced stays so where the values do: share_memory() moved the storage, and
            fingerprint = policy.enforced_fingerprint(self)     # read-only workers projected it again)
        except Exception:   # (meta tensors have no sums)
            fingerprint = None
        sums = {n: self._buffers[n] for n in getattr(policy, "sums", ()) if self._buffers.get(n) is not None}
        original = None     # a layer merged in fp32/fp64 cast to 16 bits: keep the weight as it was before the
        if self.__dict__.get("merged") and getattr(self, "_original_weight", None) is None \
                and not self.__dict__.get("_merged_unknown") and self.weight.dtype not in _HALF \
                and fn(self.weight.new_empty(0)).dtype in _HALF:
            with torch.no_grad():   # merge, as a 16-bit merge does (unmerge's subtraction in 16 bits moved 64 %
                original = self.weight.detach().clone()     # of the elements by up to 2e-2 of max |W|)
                self._take_out_merged(original)
        out = super()._apply(fn, recurse)
        for name, before in sums.items():   # the policy's sums stay float32 at least (`Protection.sums`)
            moved = self._buffers[name]
            if moved.is_floating_point() and moved.dtype != sum_dtype(moved.dtype):
                self._buffers[name] = before.to(device=moved.device, dtype=sum_dtype(moved.dtype))
        # what merge remembered moves with the layer, so that unmerge takes it out where the weight is now
        memo = getattr(self, "_merged_adapter", None)
        if memo is not None:
            self._merged_adapter = tuple(fn(t) if isinstance(t, Tensor) else t for t in memo)
        if getattr(self, "_original_weight", None) is not None:
            self._original_weight = fn(self._original_weight)
        if original is not None:
            self._original_weight = fn(original)
        for key in ("_observed", "_observed_shared"):   # an open observe_task pass's sums move with the layer
            held = self.__dict__.get(key)                 # (the next observed input was on the new device)
            gram = held[0] if isinstance(held, tuple) else held
            if isinstance(gram, Tensor):
                try:
                    gram = gram.to(self.lora_A.device)     # (its dtype kept: the noise floor is that of its sums)
                except (NotImplementedError, RuntimeError):     # (out of meta, to_empty: nothing to keep)
                    forget_observed(self.__dict__)
                    break
                self.__dict__[key] = (gram,) + held[1:] if isinstance(held, tuple) else gram
        if fingerprint is not None:
            try:
                policy.loaded_enforced(self, fingerprint)
            except Exception:   # (to_empty / meta: projected again, as before)
                pass
        return out

    @torch.no_grad()
    @_lifecycle_step
    def end_task(self) -> None:
        """Fold the task's routing into the frozen route: R_old <- R_old + P R_delta; in hard
        mode recompute P from R_old's singular vectors; R_delta <- 0, its gradient None. The output
        is unchanged.
        Refuses (ValueError, nothing changed) when the adapter holds NaN or Inf."""
        bad = self._nonfinite_adapter()
        if bad:
            raise ValueError(f"end_task: {bad} holds non-finite values (NaN/Inf; did training diverge?); "
                             f"the layer was left unchanged")
        why = self._refusal("end_task") or self.protection.not_ready(self)
        if why:
            raise ValueError(f"end_task: {why}; nothing was changed")
        _end_tasks([self])
        _warn_if_stuck([("", self)], stacklevel=5)

    @torch.no_grad()
    @_lifecycle_step
    def _end_task_plan(self) -> tuple:
        """Everything end_task sets, computed before anything is set (`_end_tasks`). The policy's
        projection of the factors runs first (the plan is made from the projected factors); where the
        plan fails it is undone bit for bit (`_end_task_undo`)."""
        undo = None if self.task_index == 0 or not self.protection.enforces else (   # (nothing to project)
            tuple(t.detach().clone() for t in (self.lora_A, self.routing_delta, self.lora_B)),
            self.protection.enforced_fingerprint(self))
        try:
            self.protection.enforce(self, force=True)
            routing = self.routing()
            projection = _hard_projection(routing, self.protect_energy) if self.mode == "hard" else None
            prepared = self.protection.prepare_end_task(self, routing,
                                                        self.projection if projection is None else projection)
        except BaseException:
            self._end_task_undo(undo)
            raise
        return self.task_index, routing, projection, prepared, undo

    @torch.no_grad()
    @_lifecycle_step
    def _end_task_undo(self, undo) -> None:
        if undo is None:
            return
        factors, fingerprint = undo
        for t, saved in zip((self.lora_A, self.routing_delta, self.lora_B), factors):
            t.copy_(saved)
        if fingerprint is not None:     # (the copies moved the version counters: enforced as it was)
            self.protection.loaded_enforced(self, fingerprint)

    @torch.no_grad()
    @_lifecycle_step
    def _end_task_commit(self, plan: tuple) -> None:
        """Set what the plan made; run again, it sets the same (`_end_tasks` finishes an interrupted one)."""
        index, routing, projection, prepared, _ = plan
        with protection_lock():         # (a forward of another thread projects the factors in between no more)
            self.routing_old.copy_(routing)
            self.routing_delta.zero_()
            self.routing_delta.grad = None      # (the finished task's: an optimizer step before zero_grad applied it)
            if projection is not None:
                self.projection.copy_(projection)
            self.task_index = index + 1     # (before the policy's step: freeze reads it)
            self.protection.end_task(self, prepared)
            self.__dict__.pop("_parts", None)       # (a load's parts are over)

    def _nonfinite_adapter(self) -> str:
        """Names of the adapter tensors holding NaN or Inf ('' when all are finite): a task ended on
        them would fold them into the frozen route, freeze them ("freeze") or fail half-way through
        the policy's bases ("project")."""
        return nonfinite((n, _full(getattr(self, n))) for n in _ADAPTER_TENSORS if not getattr(self, n).is_meta)

    def _remember_merged(self) -> None:
        """Before the mode or the scaling changes: a layer merged elsewhere (loaded merged) has no memory
        of what was merged, so unmerge would take out the delta of the new setting; it remembers the
        delta it holds now (not while a load sets them: the loaded state's own)."""
        d = self.__dict__
        if d.get("merged") and d.get("_merged_adapter") is None and "_loading" not in d \
                and not d.get("_merged_unknown"):
            self._merged_adapter = self._merge_memo()

    def _merge_memo(self) -> tuple:
        """What merge remembers: the adapter's small tensors as they are, the scaling and the mode."""
        return tuple(t.detach().clone() for t in self._adapter()) + (self.scaling, self.mode)

    def _merged_as(self):
        """For a merged layer's task state, where its weight does not hold the adapter as saved (the
        adapter, the scaling or the mode changed since the merge, as a merged layer allows): the merged
        scaling and mode where only they changed, "unknown" where the adapter's tensors did (a state_dict
        holds them as they are now, and the base is then in no tensor of it); None otherwise. Without it a
        load took the saved adapter for the merged one, and unmerge left the base 0.2-0.9 off."""
        if self.__dict__.get("_merged_unknown"):
            return "unknown"
        memo = self.__dict__.get("_merged_adapter")
        if not self.merged or memo is None or any(isinstance(t, DTensor) or t.is_meta
                                                  for t in (getattr(self, n) for n in _ADAPTER_TENSORS)):
            return None     # (FSDP2: no collective in a state_dict; a load remembers none: _remember_loaded_adapter)
        def factors(a, b, r_old, r_delta, p):      # what the delta reads in the merged mode
            return a, b, self._r_eff(r_old, r_delta, p, memo[-1])
        with torch.no_grad():       # (an end_task since the merge moved the routing, not R_eff: the same delta)
            if not all(map(torch.equal, factors(*memo[:5]), factors(*self._adapter()))):
                return "unknown"
        return None if (memo[-2], memo[-1]) == (self.scaling, self.mode) else {"scaling": memo[-2], "mode": memo[-1]}

    def _part_merged_as(self, merged_as) -> None:
        """A merged task state's `merged_as` in one part of a checkpoint, for when its adapter is in (one of an
        unfinished earlier load is replaced: it was taken for this checkpoint's, 2.9 off)."""
        if merged_as is None:
            self.__dict__.get("_parts", {}).pop("merged_as", None)
        else:
            self._load_parts()["merged_as"] = merged_as

    @torch.no_grad()
    @_lifecycle_step
    def merge(self, keep_original=None) -> None:
        """W <- W + delta_weight(); the forward is then a plain F.linear. The adapter as merged is
        remembered (its small tensors, not the N×K delta), so unmerge takes out exactly what went
        in even if the adapter is edited meanwhile (an optimizer step with momentum, a load).

        keep_original: also keep a copy of W, so that unmerge restores it bit for bit. Default:
        for 16-bit weights, where W + Δ − Δ rounds away from W (one bf16 cycle changed 60 % of
        the elements), at the cost of one more weight while merged; fp32/fp64 subtract (their
        rounding is far below the adapter's tolerance). merge_and_unload keeps none."""
        if keep_original is not None:       # (a str was taken for its truth: "no" kept the copy)
            keep_original = check_flag("keep_original", keep_original)
        if self.merged:
            return
        why = self._refusal("merge")
        if why:
            raise ValueError(why)
        # not forced (as the forward and the saves): a second projection of an adapter already projected
        # is not bit-exact, and a merge-for-evaluation then changed the run (project: 1e-7 relative in fp32,
        # 2.5e-3 in bf16); the merged layer computes what its forward computed
        self.protection.enforce(self)
        self._merged_adapter = self._merge_memo()
        if keep_original is None:
            keep_original = self.weight.dtype in _HALF
        self._original_weight = self.weight.detach().clone() if keep_original else None
        w = self.base_weight()
        w.add_(_like(w, self.delta_weight().to(w.dtype)))
        self.merged = True

    @torch.no_grad()
    @_lifecycle_step
    def unmerge(self) -> None:
        """W <- W - the delta that merge added; the forward is the C-LoRA op again, with the
        adapter as it is now."""
        if not self.merged:
            return
        why = self._refusal("unmerge")
        if why:
            raise ValueError(why)
        original = getattr(self, "_original_weight", None)
        if original is not None:
            self.weight.copy_(original)
        else:
            self._take_out_merged(self.weight)
        self._set_merged(False)

    def _take_out_merged(self, weight: Tensor) -> None:
        """weight (the layer's, or a copy of it) -= the delta that merge added."""
        kept = getattr(self, "_merged_adapter", None)
        # merged in another process (state_dict): the adapter as loaded is all there is
        delta = self.delta_weight() if kept is None else self._delta(*kept)
        w = weight.t() if self.fan_in_fan_out else weight
        w.sub_(_like(w, delta.to(w.dtype)))

    def _set_merged(self, merged: bool) -> None:
        """The weight's merged state where it was replaced (a load, a reset, an unmerge), and nothing of
        what an earlier merge of this layer remembered."""
        self.merged = merged
        self._merged_adapter = self._original_weight = None
        self.__dict__.pop("_merged_unknown", None)

    def _refusal(self, what: str) -> str:
        """Why this layer cannot `what` ("merge", "unmerge", or a step writing the adapter in place:
        "end_task", "reset_adapter", "load_adapter", "load_state_dict"; '' when it can): a step inside an
        open observe_task block (merging keeps the output, and what was observed); merging inside disable_adapter(),
        or into a weight tied to another module; either, where the weight is computed on every access
        (torch.nn.utils.prune's weight_orig · weight_mask, or a parametrization), so that an in-place
        change of it would be lost; the others, where an adapter tensor is computed so; any, where some of the
        layer's tensors are on the meta device and others not (a model built on meta and loaded in part)."""
        if what in ("merge", "unmerge", "end_task"):
            own = [*self.named_parameters(), *self.named_buffers()]     # (a parametrization's originals too)
            meta = [n for n, t in own if t.is_meta]
            if meta and len(meta) < len(own):
                return ((f"{what}: " if what != "end_task" else "") + f"{meta} are on the meta device and the rest "
                        f"of the layer is not (a model built on meta and loaded in part: load its whole state with "
                        f"assign=True, or reset_parameters() after to_empty())")
        if self._observing and what not in ("merge", "unmerge"):
            # (the rows observed so far were dropped, taken with the state the step replaces; an end_task
            # inside the block protected none of them: the block sums its inputs as it closes)
            return (f"{what} inside an open observe_task block (its inputs are recorded for the next end_task "
                    f"and summed when it closes); leave the block first")
        if what == "merge" and not self.adapter_enabled:
            return ("merge inside disable_adapter(): the merged layer would compute the adapter; leave the block "
                    "first")
        if what == "merge" and self.tied_to:
            return (f"merge: this layer's weight is tied to {self.tied_to} (shared embeddings?); merging would "
                    f"change those too. Keep the adapter unmerged, or untie the weights first (then "
                    f"clora_kernels.merge(model), which finds the ties again)")
        if what == "unmerge" and self.__dict__.get("_merged_unknown"):
            return ("unmerge: this layer was loaded merged from a state saved after its adapter changed (a "
                    "reset_adapter, a load or a training step on the merged layer): the state holds the merged weight "
                    "and the adapter as it was then, not the merged one, so the base weight is in none of it. Load a "
                    "state saved unmerged, or saved before that change; the merged forward is exact")
        if what in ("merge", "unmerge") and "weight" not in self._parameters:
            return (f"{what}: this layer's weight is computed by torch.nn.utils.prune or parametrize, so {what} "
                    f"could not change it in place; remove the pruning / parametrization first (prune.remove, "
                    f"parametrize.remove_parametrizations), or keep the adapter unmerged")
        computed = [n for n in _ADAPTER_TENSORS if n not in self._parameters and n not in self._buffers]
        if what not in ("merge", "unmerge") and computed:
            # (their in-place writes went into the tensor the parametrization computed, and were lost: an
            # end_task with a parametrized routing_delta doubled the routing and moved the output by 1.05)
            return (f"this layer computes {computed} by torch.nn.utils.prune or parametrize, so {what} "
                    f"could not write them in place; remove the pruning / parametrization first (prune.remove, "
                    f"parametrize.remove_parametrizations)")
        return ""

    # ---- persistence ----------------------------------------------------------------------
    def get_extra_state(self) -> Tensor:
        """The task state (`task_state` reads it), as a tensor: a state_dict of tensors only is what
        safetensors, transformers' save_pretrained and code moving every entry with .to() take (a dict
        here failed them all)."""
        state = {"task_index": int(self.task_index), "mode": self.mode, "merged": bool(self.merged),
                 "protection": self.protection.config(), "enforced": self.protection.enforced_fingerprint(self),
                 "alpha": float(self.alpha), "protect_energy": float(self.protect_energy),
                 "grad_through_old_route": bool(self.grad_through_old_route),
                 "weight_sums": _weight_sums(self.weight) if self.merged else None}
        merged_as = self._merged_as()
        if merged_as is not None:
            state["merged_as"] = merged_as
        out = _encode_task_state(state)
        _given(out, self, state, _version(self.projection))
        return out

    def _stale_live(self, entry, state: dict, state_dict, prefix: str) -> str:
        """Why a task state being loaded is out of date ('' when it is not): the very tensor get_extra_state
        gave (not a copy, not written by a loader since: it still says `state`), of a layer whose own
        tensors the state_dict still holds (not copies: views of them), and which has since ended a task,
        merged or unmerged, or made its projection P again (a switch to hard mode, or another
        protect_energy in it, after a task), each a change of those tensors in place. The task state alone
        would then go back: a freeze layer back at its first task trained its frozen factors again, a merged
        one added its adapter twice (`best = model.state_dict()` without a copy, then a load; nn.Linear's
        is a no-op). A switch of mode, energy or policy that wrote no tensor is a setting the load restores
        (a "try hard mode, then roll back" loads). A state_dict whose tensors were copied (`{k: v.cpu()}` of
        a GPU model) and whose task state was not is a snapshot and loads. Not caught: a task state made a
        new tensor (`{k: v.detach()}`), or saved after the change."""
        given = _GIVEN.get(id(entry))
        layer = given[1]() if given is not None and given[0]() is entry and given[2] == state else None
        if layer is None:
            return ""
        own = dict(layer._parameters, **layer._buffers)
        if not any(_shares(state_dict.get(prefix + n), own.get(n)) for n in ("weight",) + _ADAPTER_TENSORS):
            return ""
        now = {"task_index": int(layer.task_index), "merged": bool(layer.merged)}
        if _version(layer.projection) != given[3]:
            # P made again in place (a switch to hard mode, or another protect_energy in it, after a task); a
            # mode, energy or policy switch that wrote no tensor is a setting the load restores, as before
            now.update(mode=layer.mode, protect_energy=float(layer.protect_energy))
        changed = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in now.items() if state.get(k) != v]
        if not changed:
            return ""
        whose = "this layer's own" if layer is self else "another layer's"
        return (f"this state_dict is {whose}, taken by state_dict() and not copied, and that layer has changed "
                f"since ({', '.join(changed)}): its tensors are the layer's, changed in place, so loading it "
                f"gives the old task state with the new tensors. To keep a state to go back to, copy it "
                f"(copy.deepcopy(model.state_dict()), or torch.save)")

    def set_extra_state(self, state) -> None:
        """The task state, from a state_dict load (which calls this after copying the tensors) or a caller:
        get_extra_state's tensor, or the dict that states saved before 2026-12-06 hold."""
        if self.__dict__.get("_loading") is _REFUSED or _placeholder(state):
            return
        state = task_state(state)
        _check_task_state(state)        # (a load checked it before copying any tensor: _load_state)
        loading, prefix = self.__dict__.get("_loading", (None, ""))
        loaded = (lambda name: True) if loading is None else (lambda name: prefix + name in loading)
        # (a state from before these were kept: the layer's own) before the mode: a switch to hard
        # made outside a load builds P with the state's protect_energy
        for name in ("alpha", "protect_energy", "grad_through_old_route"):
            if name in state:
                setattr(self, name, state[name])      # (alpha: and so scaling = alpha / rank)
        self.task_index = int(state["task_index"])
        self.mode = state.get("mode", self.mode)
        if loaded("weight"):
            # the loaded weight replaces what an earlier merge of this layer remembered. A merged state
            # remembers the loaded adapter as what is in the weight (as merge does), so that unmerge takes
            # out that delta even after the adapter changes (a reset, a later load); where a tensor of it
            # was not in the state, or FSDP2 shards it (no collective inside a load), unmerge takes out
            # the adapter's delta as it is then. A state without the weight: see _load_from_state_dict
            self._set_merged(bool(state.get("merged", False)))
            if self.merged and loading is not None and all(map(loaded, _ADAPTER_TENSORS)):
                self._remember_loaded_adapter(state.get("merged_as"))
                self.__dict__.get("_parts", {}).pop("merged_as", None)     # (an unfinished earlier part's)
            elif self.merged and loading is not None:   # the adapter comes in a later part (a sharded checkpoint):
                self._load_parts()["merged"] = True     # none of it is one to merge in place of the weight's
                self._part_merged_as(state.get("merged_as"))
        elif loading is not None and state.get("merged"):
            # a sharded checkpoint's part: the merged weight comes in another load_state_dict call, before
            # this one (it is the layer's weight now) or after it (`_load_layer` takes it for the merged one,
            # also where the layer was merged before the load). Before, the layer took the merged weight for
            # its base and added the adapter a second time (a 14-layer Llama's logits moved 0.5-0.7)
            self._part_merged_as(state.get("merged_as"))     # (taken with the adapter: `_part_loaded`)
            sums = state.get("weight_sums")
            if not self.merged and _same_sums(_weight_sums(self.weight), sums):
                self._merged_from_parts()
            elif sums is not None:
                self._load_parts()["weight_sums"] = sums
            elif "weight_sums" not in state and not self.merged:
                # a merged state saved before the sums were kept (before 2026-12-06): loaded in parts, its
                # weight was taken for the base and the adapter added a second time (a helper's attack on
                # old checkpoints), and nothing here tells that weight from the base
                warnings.warn(f"layer {prefix[:-1]!r}: a merged task state saved by an earlier version (without its "
                              f"weight's sums) was loaded without the weight; if the merged weight is in another part "
                              f"of this checkpoint, the layer takes it for its base and adds the adapter again: load "
                              f"such a checkpoint whole (one load_state_dict), or load it whole once and save it again",
                              UserWarning, stacklevel=2)
        self.protection.loaded(self)
        if loading is not None and all(map(loaded, _ADAPTER_TENSORS + self.protection.buffers)):
            self.protection.loaded_enforced(self, state.get("enforced"))   # (a whole adapter, as load_adapter)
        elif loading is not None and state.get("enforced") is not None:
            self._load_parts()["enforced"] = state["enforced"]      # (when the other parts are in: _load_layer)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        onnx = sys.modules.get("torch.onnx")
        if onnx is not None and onnx.is_in_onnx_export():
            # the TorchScript-based ONNX exporter takes every state_dict entry for a tensor, and an
            # ONNX graph holds the task state as constants anyway
            destination.pop(prefix + "_extra_state", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        hooks = self._load_state_dict_pre_hooks
        if hooks:   # run first, as nn.Module's load does: the checks below read the state (a hook that put a
            # weight saved (in, out) back in shape was run after the shape check, which then dropped the task state)
            for hook in hooks.values():
                hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            self.__dict__["_load_state_dict_pre_hooks"] = OrderedDict()
            try:
                return self._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs)
            finally:
                self.__dict__["_load_state_dict_pre_hooks"] = hooks
        # an adapter or a task state without the weight (strict=False) into a merged layer: the weight then
        # takes the loaded adapter, scaling and mode in place of the merged ones (it went on computing the
        # old ones, silently), and unmerge takes out the loaded one; a state that changes none of them
        # leaves the weight as it is (an unmerge and merge would round it)
        # (only a state for this layer: a load of other modules, the head alone, goes on)
        why = self._observing and any(k.startswith(prefix) for k in state_dict) and self._refusal("load_state_dict")
        if why:
            raise ValueError(f"layer {prefix[:-1]!r}: {why}")
        remerge = self.merged and prefix + "weight" not in state_dict \
            and not self.__dict__.get("_parts", {}).get("merged") \
            and (any(prefix + n in state_dict for n in _ADAPTER_TENSORS)
                 or _task_state_entry(state_dict, prefix) is not None)
        if remerge and self.__dict__.get("_merged_unknown"):
            raise ValueError(f"layer {prefix[:-1]!r}: an adapter or task state without the weight cannot be loaded "
                             f"into this merged layer: " + self._refusal("unmerge").partition(": ")[2])
        if remerge:
            self._remember_merged()         # what is in the weight, before the load replaces the adapter
        errors = len(error_msgs)
        self._load_layer(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if remerge and self.merged and len(error_msgs) == errors and not _same_memo(self._merged_adapter,
                                                                                   self._merge_memo()):
            keep = self._original_weight is not None
            self.unmerge()
            self.merge(keep_original=keep)

    def _load_layer(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = dict(self._parameters, **self._buffers)
        if any(isinstance(state_dict.get(prefix + n), Tensor) and isinstance(own.get(n), Tensor)
               and state_dict[prefix + n].shape != own[n].shape for n in ("weight", "bias") + _ADAPTER_TENSORS):
            # a state of another shape (another rank, another layer): the load reports the size mismatch
            # and takes none of the state's task state (no policy adopted, no buffer resized, no task_index:
            # after `try: load / except: start fresh`, the fresh layer would think itself in a later task)
            self.__dict__["_loading"] = _REFUSED
            try:
                nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                                unexpected_keys, error_msgs)
            finally:
                self.__dict__.pop("_loading", None)
            return
        with _requires_grad_kept(self):
            self.__dict__["_loading"] = (state_dict, prefix)   # what set_extra_state (called last) asks of
            try:
                errors = len(error_msgs)
                self._load_state(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs)
                state_dict = self.__dict__["_loading"][0]       # (with an earlier part's buffers: _load_state)
                # a plain layer's weight (nn.Linear's checkpoint: no adapter, no task state) holds no adapter,
                # but where an earlier part of a sharded checkpoint said its weight is merged, it is that one;
                # a state with the adapter but no task state (strict=False without it) says nothing of merging
                extra = _task_state_entry(state_dict, prefix)
                if len(error_msgs) == errors and prefix + "weight" in state_dict and extra is None:
                    # (a weight the load refused is still the old one)
                    parts = self.__dict__.get("_parts")
                    if parts is not None and _same_sums(_weight_sums(self.weight), parts.pop("weight_sums", None)):
                        self._merged_from_parts()
                    elif not any(prefix + name in state_dict for name in ("lora_A", "lora_B", "routing_delta")):
                        self._set_merged(False)
                    elif self.merged:   # the loaded weight merged with the loaded adapter (what merge left, the
                        self._set_merged(True)      # weight before it, is gone: unmerge took that out, or put
                        if all(prefix + n in state_dict for n in _ADAPTER_TENSORS):     # back the old weight)
                            self._remember_loaded_adapter()
                if len(error_msgs) == errors:
                    self._part_loaded(state_dict, prefix, extra is not None)
            finally:
                self.__dict__.pop("_loading", None)

    def _load_parts(self) -> dict:
        """What one part of a sharded checkpoint (one of several load_state_dict calls, each holding some of
        this layer's entries) left for the others: the merged weight's sums, the enforced fingerprint,
        another policy's buffers, and which entries came in."""
        return self.__dict__.setdefault("_parts", {"seen": set()})

    def _part_loaded(self, state_dict, prefix: str, has_task_state: bool) -> None:
        """After a load: the entries it brought (a whole adapter with its task state replaces what earlier
        parts brought) and what earlier parts left pending: once the checkpoint's adapter is in, a merged
        layer remembers it; once every adapter tensor and buffer is in, the fingerprint the task state
        carried is taken (as a whole load takes it: a first forward then does not project again)."""
        names = [n for n in _ADAPTER_TENSORS + self.protection.buffers if prefix + n in state_dict]
        whole = has_task_state and len(names) == len(_ADAPTER_TENSORS + self.protection.buffers)
        if has_task_state:      # (a part closes once the task state is in too: it is the state_dict's last entry)
            names.append("_extra_state")
        parts = self.__dict__.get("_parts")
        if parts is None and (whole or not names):      # (nothing left by an earlier part, nothing left here)
            return
        parts = self._load_parts()
        if whole:       # a whole adapter and its task state: what earlier parts brought is replaced
            parts["seen"] = set(names)
        seen = parts["seen"]
        seen.update(names)
        if parts.get("merged") and seen.issuperset(_ADAPTER_TENSORS):
            del parts["merged"]         # the checkpoint's adapter is in: what the merged weight holds
            self._remember_loaded_adapter(parts.pop("merged_as", None))
        if parts.get("enforced") is not None and seen.issuperset(_ADAPTER_TENSORS + self.protection.buffers):
            self.protection.loaded_enforced(self, parts.pop("enforced"))
        if not (set(parts) - {"seen"}) and (whole or seen.issuperset(("_extra_state",) + _ADAPTER_TENSORS
                                                                      + self.protection.buffers)):
            del self.__dict__["_parts"]     # (the weight is no part of it: a merged one is found by its sums)

    def _remember_loaded_adapter(self, merged_as=None) -> None:
        """A merged state loaded whole: the adapter as loaded is what the weight holds (as merge remembers
        it), in the scaling and mode of its `merged_as` (`_merged_as`) where it has one, so that unmerge takes
        out that delta even after the adapter changes; not where FSDP2 shards it (no collective inside a load:
        unmerge then takes out the adapter as it is). A merged_as "unknown": the base is in no tensor of it,
        and unmerge is refused."""
        if merged_as == "unknown":
            self._merged_adapter, self.__dict__["_merged_unknown"] = None, True
        elif not any(isinstance(getattr(self, t), DTensor) for t in _ADAPTER_TENSORS):
            memo = self._merge_memo()
            self._merged_adapter = memo if merged_as is None else memo[:-2] + (float(merged_as["scaling"]),
                                                                               merged_as["mode"])

    def _merged_from_parts(self) -> None:
        """A sharded checkpoint's merged weight and its task state met: the layer is merged, and until the
        checkpoint's adapter is all in, a part of it is not an adapter to merge in place of the weight's
        (`_load_from_state_dict`)."""
        self._set_merged(True)
        self._load_parts()["merged"] = True

    def _load_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the saved policy is adopted before the buffers load, and its variable-size buffers (the
        # projection policy's bases) take the saved shapes
        extra = _task_state_entry(state_dict, prefix)
        try:        # (checked whole before any tensor is copied: a refused value leaves the layer as it was)
            entry, extra = extra, (None if extra is None else task_state(extra))
            if extra is not None:
                _check_task_state(extra)
                why = self._stale_live(entry, extra, state_dict, prefix)
                if why:
                    raise ValueError(why)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{prefix}_extra_state: {exc}") from None
        saved_a = state_dict.get(prefix + "lora_A")
        if extra is not None and (saved_a is None or saved_a.shape == self.lora_A.shape):
            # a state saved before the policies existed was trained with the paper's semantics
            policy = make_protection(extra.get("protection", "paper"))
            why = policy.sharded(self) if isinstance(policy, Project) and extra.get("task_index") else ""
            if why:
                raise ValueError(f"a state saved at task {extra['task_index']} with {why} (layer {prefix[:-1]!r})")
            if policy.config() != self.protection.config():
                self._set_protection(policy)
            kept = self.__dict__.get("_parts", {}).pop("buffers", None)
            if kept:    # an earlier part's buffers of the policy this part's task state brings (see below)
                state_dict = {**state_dict, **{prefix + n: v for n, v in kept.items()
                                               if n in self.protection.buffers and prefix + n not in state_dict}}
                self.__dict__["_loading"] = (state_dict, prefix)
        for name in self.protection.buffers:
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 2 and value.shape != self._buffers[name].shape:
                self._buffers[name] = _resized(self._buffers[name], value.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a sharded checkpoint's part holding the buffers of a policy whose task state is in a later part: kept
        # for it (they were unexpected keys, dropped, and the layer adopted the policy with empty bases; a
        # strict load of such a part still fails, on its missing task state)
        other = [n for n in Project.buffers if n not in self.protection.buffers and prefix + n in state_dict]
        if other and extra is None:
            self._load_parts().setdefault("buffers", {}).update(
                {n: state_dict[prefix + n].detach().clone() for n in other})
            unexpected_keys[:] = [k for k in unexpected_keys if k not in {prefix + n for n in other}]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, mode={self.mode}, "
                f"protection={self.protection.name}, task_index={self.task_index}, merged={self.merged}, "
                f"backend={self.backend}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


_MERGED_TRAINING = ("a merged CLoRALinear in training mode with its adapter requiring grad: the merged weight is "
                    "frozen and the adapter would not train; call clora_kernels.unmerge(model) before training (for "
                    "inference or input gradients alone: model.eval(), or model.requires_grad_(False))")


_is_compiling = torch.compiler.is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _untraced(fn, *args) -> None:
    """fn(*args) with the TorchScript tracer suspended: the project policy's in-place projection of the
    parameters, which a trace would record as writes into them on every call."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        fn(*args)
    finally:
        torch._C._set_tracing_state(state)


# The task-state tensors get_extra_state gave, while they live: id -> (the tensor's weakref, the layer's, what it
# said). Not an attribute of the tensor (torch.save pickles those) nor of the layer (a copy would share it)
_GIVEN: dict = {}


def _shares(a, b) -> bool:
    """Whether two tensors are views of one memory (a state_dict's entry and the layer's own tensor)."""
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and not isinstance(a, DTensor)
            and not isinstance(b, DTensor) and not a.is_meta and a.device == b.device and a.data_ptr() != 0
            and a.data_ptr() == b.data_ptr())


def _given(out: Tensor, layer, state: dict, projection_version) -> None:
    key = id(out)

    def gone(ref, key=key):
        if _GIVEN.get(key, (None,))[0] is ref:
            del _GIVEN[key]
    _GIVEN[key] = (weakref.ref(out, gone), weakref.ref(layer), state, projection_version)


def _version(t: Tensor):
    """t's version counter (bumped by every in-place write), or None where it keeps none (an inference tensor)."""
    try:
        return t._version
    except RuntimeError:
        return None


_TASK_STATE_BYTES = 1024     # one size for every layer and task: torch.distributed.checkpoint loads in place


def _encode_task_state(state: dict) -> Tensor:
    """A CLoRALinear's task state as a uint8 tensor of _TASK_STATE_BYTES: its JSON (floats round-trip
    exactly), zero-padded."""
    data = json.dumps(state).encode()
    if len(data) > _TASK_STATE_BYTES:       # (about 400 bytes in practice)
        raise ValueError(f"the task state takes {len(data)} bytes, more than {_TASK_STATE_BYTES}: {state!r}")
    out = torch.zeros(_TASK_STATE_BYTES, dtype=torch.uint8, device="cpu")     # (not the default device: meta lost it)
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def task_state(state) -> dict:
    """A CLoRALinear's task state as a dict, from its `_extra_state` entry in a state_dict: the uint8
    tensor get_extra_state writes, or the dict of states saved before 2026-12-06."""
    if isinstance(state, dict):
        return state
    if isinstance(state, Tensor) and state.dim() == 1 and state.dtype != torch.uint8 and not state.is_complex():
        # a state_dict cast whole (`{k: v.half() ...}`): bytes are integers every float type holds exactly
        exact = state.detach().cpu().double()
        if bool(((exact >= 0) & (exact <= 255) & (exact == exact.round())).all()):
            state = exact.to(torch.uint8)
    if not (isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
        raise ValueError(f"a CLoRALinear's _extra_state must be the uint8 tensor its state_dict holds (or the dict "
                         f"of an older one), got {type(state).__name__}"
                         + (f" of dtype {state.dtype} and shape {tuple(state.shape)}" if isinstance(state, Tensor)
                            else ""))
    data = bytes(state.detach().cpu().tolist()).rstrip(b"\0")
    try:
        out = json.loads(data.decode())
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise ValueError(f"a CLoRALinear's _extra_state holds no task state (not the JSON get_extra_state writes): "
                         f"{data[:60]!r}")
    return out


@torch._dynamo.disable
def _enforce_eagerly(layer) -> None:
    """The protection policy's enforce where torch.compile traces the forward: a graph break, so that
    its in-place projection of the parameters (and its version and data-pointer checks) run eagerly."""
    layer.protection.enforce(layer)


@contextlib.contextmanager
def _requires_grad_kept(layer):
    """A load (state_dict or adapter file) keeps the caller's requires_grad on lora_A / lora_B unless
    it changes whether the layer's policy trains them (the first task against a later one under
    "freeze", or another policy): a frozen teacher or EMA copy loading its student's state stays
    frozen, as nn.Linear's loading leaves requires_grad alone."""
    leaves = factor_leaves(layer)
    before, flags = layer.protection.factors_train(layer), [p.requires_grad for p in leaves]
    yield
    if layer.protection.factors_train(layer) == before:
        for p, flag in zip(leaves, flags):
            p.requires_grad_(flag)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The hooks registered on `old` (forward, backward, state_dict) onto `new`, which takes its place
    (inject_clora's layer, merge_and_unload's plain one): they were dropped, silently (a pre-hook that
    clamped the input stopped running; PEFT keeps the hooked layer inside its own, where they run). `new`
    takes the hook dicts themselves, so that the handles given for them remove them from it; `old` keeps
    copies (a hook registered on one later is not the other's; a handle's remove no longer reaches them).
    A load pre-hook that takes its module (held by a weak reference: the old one, dead after the swap,
    failed a later load) is given `new`."""
    wrapped = getattr(sys.modules.get("torch.nn.modules.module"), "_WrappedHook", None)
    for name in _HOOK_DICTS:
        hooks, mine = old.__dict__.get(name), new.__dict__.get(name)
        if not hooks:
            continue
        kept = type(hooks)(hooks)
        if wrapped is not None and name == "_load_state_dict_pre_hooks":
            for key, hook in hooks.items():
                if isinstance(hook, wrapped) and hook.with_module:
                    hooks[key] = wrapped(hook.hook, new)
        if mine:
            mine.update(hooks)
        else:
            new.__dict__[name] = hooks
        old.__dict__[name] = kept
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]


class _MergedGuard(torch.autograd.Function):
    """F.linear(x, weight, bias) of a merged layer in training mode; its backward refuses with the
    reason: the merged weight is frozen, so training there would leave the adapter unchanged (or
    fail with torch's "does not require grad"). In eval mode (inference, input gradients) there is
    none: the adapter then gets no gradient, as a merged PEFT layer's. The output is its own tensor,
    not a view (an in-place op after the layer, e.g. ReLU(inplace=True), failed on the view)."""

    generate_vmap_rule = True      # (torch.func: vmap of the forward runs; grad meets the refusal below)

    @staticmethod
    def forward(x, weight, bias, *adapter):     # (adapter: routing_delta, lora_A, lora_B, one of them trained)
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.set_materialize_grads(False)        # (jvp: None for an input without a tangent, not zeros)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"backward through {_MERGED_TRAINING}")

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *adapter_t):
        # forward-mode AD (torch.func.jvp, jacfwd, dual tensors): F.linear's tangent; an adapter tensor's tangent
        # has no way into the merged weight, as its gradient has none (torch's "implement the jvp" error before)
        if any(t is not None for t in adapter_t):
            raise RuntimeError(f"forward-mode AD in the adapter through {_MERGED_TRAINING}")
        x, weight = ctx.saved_tensors
        out = F.linear(x_t, weight) if x_t is not None else None
        if weight_t is not None:
            out = F.linear(x, weight_t) if out is None else out + F.linear(x, weight_t)
        if bias_t is not None:
            out = bias_t.expand(*x.shape[:-1], bias_t.shape[0]) if out is None else out + bias_t
        return out


def _hard_projection(routing_old: Tensor, protect_energy: float) -> Tensor:
    """P = I - Q Qᵀ, Q = the first k left singular vectors of R_old holding >= protect_energy
    of its squared singular values (P = I while R_old = 0)."""
    r = routing_old.shape[0]
    eye = torch.eye(r, dtype=torch.float64, device=routing_old.device)
    u, sv, _ = torch.linalg.svd(routing_old.double())
    energy = sv.square()
    total = energy.sum()
    if total <= 0:
        return eye.to(routing_old.dtype)
    frac = torch.cumsum(energy, 0) / total
    k = int((frac < protect_energy - 1e-12).sum().item()) + 1
    q = u[:, :min(k, r)]
    return (eye - q @ q.t()).to(routing_old.dtype)


# ---- model helpers ------------------------------------------------------------------------
def clora_layers(model: nn.Module) -> list:
    """(name, CLoRALinear) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CLoRALinear)]


def _resharded(model: nn.Module) -> None:
    """FSDP2 may leave parameters unsharded after a forward (its root group, reshard_after_forward=False):
    plain tensors then, which FSDP2 drops at its next reshard, so the lifecycle's in-place writes into
    them (end_task's fold, merge) were lost. The model-level helpers reshard first (local: no
    communication), so they read and write the sharded parameters."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    if module_type is None:
        return
    for m in model.modules():
        if isinstance(m, module_type):
            m.reshard()


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's, DistributedDataParallel's or DataParallel's wrapper, or an
    averaged copy's (torch's AveragedModel, timm's ModelEma / V2 / V3) (any nesting of them), else
    `model`: a wrapper names every submodule `_orig_mod.<name>` or `module.<name>`, which adapter
    files would then carry (a PEFT model would not find them: it loaded an averaged copy's PEFT
    directory with a warning and no adapter)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    swa = sys.modules.get("torch.optim.swa_utils")
    while True:
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
                swa is not None and isinstance(model, swa.AveragedModel)) or _timm_ema(model):
            model = model.module if isinstance(model, nn.Module) else model.ema     # (timm's first ModelEma: .ema)
        else:
            return model


def _timm_ema(model) -> bool:
    """Whether `model` is one of timm's ModelEma copies (a subclass too), by name: timm is not imported."""
    return any(c.__module__ == "timm.utils.model_ema" and c.__name__.startswith("ModelEma")
               for c in type(model).__mro__)


def wrapper_prefix(saved, names) -> str:
    """The wrapper prefix ('module.', '_orig_mod.', or a nesting of them) that every one of `saved` (an
    adapter file's layer names) carries and without which they are `names` (the model's): a file saved
    from a DDP / DataParallel wrapper before the helpers unwrapped it (`unwrapped`). '' when none."""
    saved, names, prefix = set(saved), set(names), ""
    while saved and saved != names:
        head = next((p for p in ("module.", "_orig_mod.") if all(n.startswith(p) for n in saved)), None)
        if head is None:
            return ""
        saved, prefix = {n[len(head):] for n in saved}, prefix + head
    return prefix if saved == names else ""


def refuse_meta(layers, what: str) -> None:
    """A ValueError for `what` (a save) where a layer's adapter is on the meta device: it holds no values."""
    on_meta = [n for n, m in layers if any(getattr(m, t).is_meta for t in _ADAPTER_TENSORS)]
    if on_meta:
        raise ValueError(f"{what}: the adapter of layer(s) {on_meta[:8]} is on the meta device and holds no values: "
                         f"materialise the model first (to_empty, then its weights or an adapter load)")


def _check_model(model, what: str) -> None:
    """A TypeError naming `what` where `model` is no nn.Module (None met `.modules` first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")


def _require_layers(model: nn.Module, what: str, reshard: bool = True) -> list:
    """The model's C-LoRA layers (a ValueError for `what` when it has none), FSDP2's parameters
    resharded first (`_resharded`) unless the caller runs inside the training step (`reshard`)."""
    _check_model(model, what)
    if reshard:
        _resharded(model)
    layers = clora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no CLoRALinear layers (call inject_clora first)")
    return layers


def _is_conv1d(module: nn.Module) -> bool:
    """A transformers `Conv1D` (GPT-2's linear layer, weight (in, out)); transformers is not
    imported for this: a model holding one has imported it already."""
    pu = sys.modules.get("transformers.pytorch_utils")
    return pu is not None and type(module) is getattr(pu, "Conv1D", None)


# subclasses of nn.Linear whose forward is nn.Linear's (x·Wᵀ + b), adapted as nn.Linear is (any other
# subclass is not: its forward may differ); merge_and_unload puts their own type back
_PLAIN_SUBCLASSES = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}   # (every Falcon linear)


def _linear_like(module: nn.Module) -> bool:
    cls = type(module)
    return cls is nn.Linear or _is_conv1d(module) or (cls.__module__, cls.__name__) in _PLAIN_SUBCLASSES


_HEAD_NAMES = ("lm_head", "classifier", "score", "head")


def _output_heads(model: nn.Module) -> set:
    """Names of the model's output layers, which "all-linear" leaves alone (PEFT's rule, and timm's):
    transformers' get_output_embeddings(), timm's get_classifier(), and top-level children named
    lm_head / classifier / score / head."""
    heads, found = set(), []
    for sub in model.modules():          # a wrapped transformers / timm model keeps its head inside
        for getter in ("get_output_embeddings", "get_classifier"):
            fn = getattr(sub, getter, None)
            try:
                head = fn() if callable(fn) else None
            except Exception:           # a model whose getter is not implemented has no such head
                head = None
            # (distilled models, timm's DeiT / LeViT / EfficientFormer / PiT: a tuple (head, head_dist))
            found.extend(h for h in (head if isinstance(head, (tuple, list)) else (head,)) if isinstance(h, nn.Module))
    heads.update(n for n, m in model.named_modules() if any(m is h for h in found))
    heads.update(n for n, _ in model.named_children() if n in _HEAD_NAMES)
    # timm's pretrained_cfg lists every classifier (VOLO's aux_head beside head: its get_classifier() names
    # head alone, and "all-linear" adapted aux_head, a num_classes-wide output, frozen under a rank-4 adapter)
    modules = dict(model.named_modules())
    for prefix, sub in modules.items():
        cfg = getattr(sub, "pretrained_cfg", None)
        names = cfg.get("classifier") if isinstance(cfg, dict) else None
        for name in (names,) if isinstance(names, str) else names if isinstance(names, (tuple, list)) else ():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(name, str) and full in modules:
                heads.add(full)
    return {n for h in heads for n in modules if n == h or n.startswith(h + ".")}


def _name_selector(spec, what: str):
    """PEFT's forms of a module selector as a predicate on qualified names: a list of names
    (a name matches when it equals one or ends with '.' + one) or a regex string (full match)."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression ({exc})") from None
        return lambda name: pattern.fullmatch(name) is not None
    try:
        names = tuple(spec)
    except TypeError:
        raise TypeError(f"{what} must be a list of module names or a regex string, got {type(spec).__name__}") from None
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{what} must be a non-empty list of non-empty names (or a regex string), got {spec!r}")
    return lambda name: any(name == t or name.endswith("." + t) for t in names)


def _candidates(model: nn.Module) -> str:
    """The model's weight-holding layers by type, a few names each, for 'nothing matched' errors."""
    by_type = {}
    for n, m in sorted(model.named_modules(), key=lambda nm: not _linear_like(nm[1])):   # linear layers first
        if n and isinstance(getattr(m, "weight", None), Tensor):   # (a class named as one of torch.nn's but not
            t = type(m)                                                # it, torch.ao's QAT Linear say, in full)
            label = t.__name__ if getattr(nn, t.__name__, t) is t else f"{t.__module__}.{t.__qualname__}"
            by_type.setdefault(label, []).append(n)
    return "; ".join(f"{t} ({len(ns)}): {ns[:6]}" for t, ns in by_type.items()) or "none"


def _always(parent) -> bool:
    return True


def _bloom_tp(parent) -> bool:
    return getattr(parent, "pretraining_tp", 1) > 1 and bool(getattr(parent, "slow_but_exact", False))


# Modules that compute with a child linear layer's weight without calling the child, so that an adapter
# there would never run: (the class's module, its name) -> (the children, when it does so, what it does
# with a child's weight, {w}[, True where it does so on one path only (the module is called on the others):
# the layer is then adapted, with a warning]).
# Found by a helper's audit of torch 2.14.1, torchvision 0.29.1, timm 1.0.31 and transformers 5.25.0,
# each confirmed by a model whose output the adapter left unchanged (BEiT / EVA / SwinV2 `qkv`:
# `_call_qkv` makes them call it; nn.TransformerEncoderLayer's eval path: `_fused_paths`)
_WEIGHT_READERS = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"):
        (("qkv", "proj"), _always, "passes {w} to shifted_window_attention"),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"):
        (("qkv", "proj"), _always, "passes {w} to shifted_window_attention"),
    ("torchvision.models.video.swin_transformer", "ShiftedWindowAttention3d"):
        (("qkv", "proj"), _always, "passes {w} to shifted_window_attention_3d"),
    ("torch.nn.modules.loss", "LinearCrossEntropyLoss"): (("linear",), _always, "passes {w} to F.linear_cross_entropy"),
    ("transformers.models.wavlm.modeling_wavlm", "WavLMAttention"):
        (("q_proj", "k_proj", "v_proj", "out_proj"), _always, "passes {w} to F.multi_head_attention_forward"),
    ("transformers.models.mobilebert.modeling_mobilebert", "MobileBertLMPredictionHead"):
        (("dense", "decoder"), _always, "multiplies by {w} (concatenated with the other layer's)"),
    ("transformers.models.mamba.modeling_mamba", "MambaMixer"): (("dt_proj",), _always, "multiplies by {w}"),
    ("transformers.models.falcon_mamba.modeling_falcon_mamba", "FalconMambaMixer"):
        (("dt_proj",), _always, "multiplies by {w}"),
    ("transformers.models.jamba.modeling_jamba", "JambaMambaMixer"): (("dt_proj",), _always, "multiplies by {w}"),
    ("transformers.models.longcat_flash.modeling_longcat_flash", "LongcatFlashTopkRouter"):
        (("classifier",), _always, "applies {w} in float32"),
    ("transformers.models.neomme.modeling_neomme", "NeoMMEForMaskedLM"):
        (("unembedding_projection",), _always, "multiplies by {w}"),
    ("transformers.models.detr.modeling_detr", "DetrMHAttentionMap"):
        (("k_proj",), _always, "convolves with {w}"),
    ("transformers.models.conditional_detr.modeling_conditional_detr", "ConditionalDetrMHAttentionMap"):
        (("k_proj",), _always, "convolves with {w}"),
    ("transformers.models.maskformer.modeling_maskformer", "MaskFormerDetrMHAttentionMap"):
        (("k_proj",), _always, "convolves with {w}"),
    ("transformers.models.dab_detr.modeling_dab_detr", "DabDetrMHAttentionMap"):
        (("k_linear",), _always, "convolves with {w}"),
    **{(f"transformers.models.{package}.modeling_{module}", "TDNNLayer"): (("kernel",), _always, "convolves with {w}")
       for package, module in (("wav2vec2", "wav2vec2"), ("wavlm", "wavlm"), ("unispeech_sat", "unispeech_sat"),
                               ("data2vec", "data2vec_audio"), ("wav2vec2_bert", "wav2vec2_bert"),
                               ("wav2vec2_conformer", "wav2vec2_conformer"))},     # (the XVector heads)
    ("transformers.models.layoutlmv2.modeling_layoutlmv2", "LayoutLMv2Encoder"):
        (("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"), _always, "looks up rows of {w} as a table"),
    ("timm.models.naflexvit", "NaFlexEmbeds"):
        (("proj",), lambda p: bool(getattr(p, "enable_patch_interpolator", False)),
         "passes {w} to its patch interpolator for pre-patchified 5-D input (enable_patch_interpolator)", True),
    ("transformers.models.bloom.modeling_bloom", "BloomAttention"):
        (("dense",), _bloom_tp, "applies slices of {w} (pretraining_tp > 1 and slow_but_exact)"),
    ("transformers.models.bloom.modeling_bloom", "BloomMLP"):
        (("dense_4h_to_h",), _bloom_tp, "applies slices of {w} (pretraining_tp > 1 and slow_but_exact)"),
    ("transformers.models.gemma3n.modeling_gemma3n", "Gemma3nTextAltUp"):
        (("correction_coefs",), lambda p: getattr(getattr(p, "config", None), "altup_coef_clip", None) is not None,
         "applies {w} clamped in training (altup_coef_clip)"),
    ("transformers.models.reformer.modeling_reformer", "LSHSelfAttention"):
        (("query_key", "value"), _always, "multiplies by {w} when decoding with a cache", True),
}


def _weight_read(model: nn.Module, name: str) -> Optional[tuple]:
    """(why an adapter at `name` would not run: its parent in _WEIGHT_READERS computes with the layer's
    weight itself, whether on one path only), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    cls = type(parent)
    entry = _WEIGHT_READERS.get((cls.__module__, cls.__name__))
    if entry is None or child not in entry[0] or not entry[1](parent):
        return None
    why = f"{cls.__name__} {entry[2].format(w=f'the weight of {child!r}')} instead of calling it"
    return why, len(entry) > 3 and entry[3]


def _fused_experts(module: nn.Module) -> bool:
    """A mixture-of-experts block that keeps its experts' weights in fused 3-D parameters (transformers 5's
    Mixtral, Qwen-MoE, DeepSeek-V3, ...): no linear layer to adapt (PEFT reaches them by target_parameters)."""
    return "Expert" in type(module).__name__ and any(
        p is not None and p.dim() >= 3 for p in module._parameters.values())


def _unadapted_names(model: nn.Module, target_modules, names: list) -> list:
    """(name, types) for each name of a target_modules list that matched no layer to adapt but a
    subclass of nn.Linear, which is not adapted (nn.MultiheadAttention's `out_proj`: it computes with
    the weight itself), and which a user asking for it by name would take for a linear layer."""
    if isinstance(target_modules, str):
        return []
    out = []
    for t in target_modules:
        hit = _name_selector([t], "target_modules")     # (the list's suffix rule, for this name alone)
        if any(hit(n) for n in names):
            continue
        # (a layer adapted already is not one: a second injection names it again)
        modules = {type(m).__name__ for n, m in model.named_modules() if n and hit(n) and (
            isinstance(m, nn.Linear) and not _linear_like(m) and not isinstance(m, CLoRALinear) or _fused_experts(m))}
        # (Llama's names on a MoE model: its experts' fused down_proj is a parameter, not a module)
        params = {f"{type(m).__name__}.{t}" for m in model.modules() if _fused_experts(m) and t in m._parameters}
        types = sorted(modules | params)
        if types:
            out.append((t, types))
    return out


def unmatched_targets(target_modules, names: list) -> list:
    """The names of a target_modules list that match none of `names` (select_targets' answer); [] for
    a regex or "all-linear". The command lines refuse them (a typo, `--targets fc2 fc3`, ran with
    fc2 alone and recorded both); inject_clora, as PEFT's, adapts what matches, where a list written
    for several architectures names layers that one of them lacks."""
    if target_modules is None or isinstance(target_modules, str):
        return []
    return [t for t in target_modules if not any(map(_name_selector([t], "target_modules"), names))]


# a module path through an attention block (blocks.0.attn.q, attn_pool.kv, layer.0.attention.self.query)
_ATTENTION_PART = re.compile(r"(^|\.)(attn|attention|self_attn)[^.]*\.")

# inject_clora's default targets (timm's ViT names); this object itself, not an equal list a caller gives,
# leaves out narrow layers as "all-linear" does (select_targets)
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def _all_linear(target_modules) -> bool:
    """Whether target_modules is PEFT's "all-linear" (any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


def select_targets(model: nn.Module, target_modules, exclude_modules=None, rank=None, warn: bool = True,
                   rank_pattern=None) -> list:
    """Names of the linear-like layers (nn.Linear, transformers Conv1D, `_PLAIN_SUBCLASSES`) that inject_clora
    would replace, in module order (see inject_clora for the forms). With `rank` (and `rank_pattern`, the
    layer's own rank where a key matches it), "all-linear"
    and the default targets leave out the layers narrower than it (min(in, out) < rank: SwinV2's
    2 -> 512 relative-position MLP, named fc1, cannot hold a rank-r adapter here; PEFT adapts it with a
    rank above its size), and warn naming them (with `warn`; where every layer is, none is left out:
    the layers' refusal names the rank); a name or regex that the caller gives keeps them, and the
    layer refuses."""
    _check_model(model, "select_targets")
    all_linear = _all_linear(target_modules)
    default = target_modules is DEFAULT_TARGETS
    heads = _output_heads(model) if all_linear or default else set()
    if all_linear:
        chosen = lambda name: name not in heads     # noqa: E731
    else:
        # the default targets leave the output head alone too: timm's MetaFormer and InceptionNeXt heads are
        # MLPs named fc1 / fc2 (their fc2 the classifier, whose weight then never trained)
        named = _name_selector(target_modules, "target_modules")
        chosen = (lambda name: named(name) and name not in heads) if default else named
    excluded = (lambda name: False) if exclude_modules is None else _name_selector(exclude_modules, "exclude_modules")
    names = [n for n, m in model.named_modules() if n and _linear_like(m) and chosen(n) and not excluded(n)]
    pattern, ranked = rank_pattern or {}, isinstance(rank, int) and not isinstance(rank, bool)

    def narrow(n):      # narrower than the rank it would get: named, the layer refuses it
        return ranked and min(model.get_submodule(n).weight.shape) < pattern_value(pattern, n, rank)
    small = []
    if (all_linear or default) and ranked:
        small = [n for n in names if narrow(n)]
        if len(small) == len(names):    # every one: the layers' refusal says the rank, not "nothing matched"
            small = []
        if small and warn:
            which = "'all-linear' leaves" if all_linear else "the default targets leave"
            theirs = " or their rank_pattern rank" if rank_pattern else ""
            warnings.warn(f"{which} out {len(small)} layer(s) narrower than rank={rank}{theirs} (min(in, out) < "
                          f"rank): {small[:8]}", UserWarning, stacklevel=3)
        names = [n for n in names if n not in small]
    read = {n: found for n in names if (found := _weight_read(model, n))}
    partly = {n: why for n, (why, part) in read.items() if part}
    if partly and warn:
        warnings.warn(f"{len(partly)} layer(s) are adapted whose parent computes with their weight on one path without "
                      f"calling them, where the adapter has no effect (ck.merge(model) before using that path): "
                      + "; ".join(f"{n}: {why}" for n, why in list(partly.items())[:8]), UserWarning, stacklevel=3)
    read = {n: why for n, (why, part) in read.items() if not part}
    if read and not all_linear:
        first = next(iter(read))
        raise ValueError(f"layer {first!r} cannot be adapted: {read[first]}, so an adapter there would never run "
                         f"({len(read)} such layer(s): {list(read)[:8]}); leave them out (exclude_modules) or "
                         f"target other layers")
    if read and warn:
        warnings.warn(f"'all-linear' leaves out {len(read)} layer(s) whose parent computes with their weight "
                      f"without calling them (an adapter there would never run): "
                      + "; ".join(f"{n}: {why}" for n, why in list(read.items())[:8]), UserWarning, stacklevel=3)
    names = [n for n in names if n not in read]
    if names and warn:
        for t, types in _unadapted_names(model, target_modules, names):
            warnings.warn(f"target_modules name {t!r} matches no layer that is adapted, only {', '.join(types)}: "
                          f"subclasses of nn.Linear are not (nn.MultiheadAttention computes with its out_proj's weight "
                          f"itself), nor MoE experts kept in fused 3-D parameters", UserWarning, stacklevel=3)
    if default and names and warn:
        # a model whose blocks name their layers otherwise (EVA-02: q_proj, k_proj, v_proj, fc1_g, fc1_x) got
        # adapters on the layers that share timm's names only, without a word
        unmatched = unmatched_targets(DEFAULT_TARGETS, names)
        # (not those narrower than the rank they would get: named, they are refused, and 'all-linear' leaves them
        # out, so the advice below failed for them: SwinV2's cpb_mlp, a small Mixer's token MLPs)
        plain = [n for n, m in model.named_modules() if n and _linear_like(m) and n not in heads and n not in names
                 and not isinstance(m, CLoRALinear) and not narrow(n)]
        # ... or where they all match somewhere, attention layers named otherwise beside them (CaiT's class
        # attention q / k / v and talking heads proj_l / proj_w, SigLIP's attention pool q / kv)
        attention = [n for n in plain if n not in read and _ATTENTION_PART.search(n)]
        if unmatched and plain:
            warnings.warn(f"the default targets {unmatched} match no layer of this model, and {len(plain)} of its "
                          f"linear layers are left without an adapter: {plain[:8]} (name them in target_modules, or "
                          f"pass 'all-linear')", UserWarning, stacklevel=3)
        elif attention:
            warnings.warn(f"the default targets (timm's ViT names {list(DEFAULT_TARGETS)}) leave {len(attention)} "
                          f"linear layer(s) of attention blocks without an adapter: {attention[:8]} (name them in "
                          f"target_modules, or pass 'all-linear')", UserWarning, stacklevel=3)
    if all_linear and warn:
        experts = [n for n, m in model.named_modules() if _fused_experts(m)]
        if experts:
            warnings.warn(f"'all-linear' adapts linear layers only: the experts of {len(experts)} mixture-of-experts "
                          f"block(s) keep their weights in fused 3-D parameters and get no adapter (attention and "
                          f"any shared expert do): {experts[:4]}", UserWarning, stacklevel=3)
    return names


def check_patterns(rank_pattern, alpha_pattern, where: str) -> tuple:
    """PEFT's rank_pattern and alpha_pattern ({regex: rank}, {regex: alpha}; None or {} for none), checked:
    keys that compile as regexes, ranks ints >= 1, alphas finite numbers. Returns them as dicts."""
    out = []
    for option, pattern, ok, what in (("rank_pattern", rank_pattern, lambda v: isinstance(v, int) and v >= 1,
                                       "an int >= 1"),
                                      ("alpha_pattern", alpha_pattern, _finite_real, "a finite number")):
        pattern = {} if pattern is None else pattern
        if not isinstance(pattern, dict):
            raise TypeError(f"{where}: {option} must be a dict {{module name regex: value}}, got "
                            f"{type(pattern).__name__}")
        for key, value in pattern.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: {option} keys are module name regexes (str), got {key!r}")
            try:
                re.compile(rf"(.*\.)?({key})$")        # (as `_pattern_matches` uses it)
            except re.error as exc:
                raise ValueError(f"{where}: {option} key {key!r} is not a regex ({exc})") from None
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"{where}: {option}[{key!r}] must be {what}, got {value!r}")
        out.append(dict(pattern))
    return tuple(out)


def pattern_value(pattern: dict, name: str, default):
    """The value that PEFT's rank_pattern / alpha_pattern gives the module called `name`, else `default`."""
    key = _pattern_key(pattern, name)
    return default if key is None else pattern[key]


def _pattern_key(pattern: dict, name: str):
    """The key of `pattern` that gives the module called `name` its value (PEFT's rule,
    peft.utils.other.get_pattern_key: the first that `_pattern_matches` the name), else None."""
    return next((key for key in pattern if _pattern_matches(key, name)), None)


def _pattern_matches(key: str, name: str) -> bool:
    """PEFT's rule for a rank_pattern / alpha_pattern key: the qualified name matches `(.*\\.)?(key)$`."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def inject_clora(model: nn.Module, target_modules=DEFAULT_TARGETS, rank: int = 16,
                 alpha: Optional[float] = None, *, exclude_modules=None, rank_pattern=None, alpha_pattern=None,
                 **kwargs) -> nn.Module:
    """Replace the targeted linear layers (nn.Linear, and transformers' Conv1D, whose (in, out)
    weight is kept as it is) with CLoRALinear layers sharing their weights, freeze every other
    parameter, and return the model. `target_modules` takes PEFT's forms:

    - a list of names: a layer matches when its qualified name equals one or ends with '.' + one;
    - a regex string: a full match on the qualified name;
    - "all-linear": every linear layer but the output head (transformers' output embeddings,
      timm's classifier, top-level lm_head / classifier / score / head).

    `exclude_modules` (a list or a regex, as above) removes layers from the selection.
    `rank_pattern` / `alpha_pattern` (PEFT's options): {regex: rank} / {regex: alpha} for the layers
    whose qualified name matches `(.*\\.)?(regex)$` (the first key that matches), `rank` / `alpha`
    for the others; a key that matches no adapted layer warns, as in PEFT. Every replacement is
    built first: if one fails (a rank too large for one layer, say), the model is left as it was."""
    _check_model(model, "inject_clora")
    rank_pattern, alpha_pattern = check_patterns(rank_pattern, alpha_pattern, "inject_clora")
    names = select_targets(model, target_modules, exclude_modules, rank=rank, rank_pattern=rank_pattern)
    # PEFT's own layers: its tuner layers and the wrappers of its modules_to_save / trainable tokens
    peft_types = tuple(getattr(sys.modules.get(module), name) for module, name in (
        ("peft.tuners.tuners_utils", "BaseTunerLayer"), ("peft.utils.other", "AuxiliaryTrainingWrapper"))
        if hasattr(sys.modules.get(module), name))
    peft_layers = [n for n, m in model.named_modules() if peft_types and isinstance(m, peft_types)]
    inside = [n for n in names if any(n.startswith(p + ".") for p in peft_layers)]
    if inside:      # ("all-linear" on a PeftModel adapted PEFT's own base_layer, lora_A and lora_B, without a word,
        # and a save then wrote a file PEFT's loader refused; the PeftModel's other layers are adapted as any)
        why = (f"inject_clora: {inside[:4]} are parts of PEFT's adapter layers (its base_layer, lora_A, lora_B, "
               f"modules_to_save copies); adapt the base model's layers beside them, or merge them first "
               f"(peft_model.merge_and_unload())")
        if not _all_linear(target_modules):
            raise ValueError(why)
        warnings.warn(why + "; they are left out", UserWarning, stacklevel=2)
        names = [n for n in names if n not in inside]
    if not names:
        done = [n for n, m in model.named_modules() if isinstance(m, CLoRALinear)]
        if done:
            raise ValueError(f"inject_clora: the model holds C-LoRA layers already ({done[:8]}) and no other "
                             f"layer matches target_modules={target_modules!r}; inject once per model")
        hint = ""
        if isinstance(target_modules, str) and not _all_linear(target_modules) \
                and select_targets(model, [target_modules], exclude_modules):
            hint = (f" (a string is a regex on the full module name, PEFT's rule; for names ending in "
                    f"{target_modules!r} pass [{target_modules!r}])")
        if target_modules is DEFAULT_TARGETS or _all_linear(target_modules):
            heads = sorted(n for n in _output_heads(model) if _linear_like(model.get_submodule(n)))
            if heads:
                hint += f" (the output head is left out: {heads[:6]})"
        raise ValueError(f"inject_clora: no nn.Linear or Conv1D layer matches target_modules={target_modules!r}"
                         + ("" if exclude_modules is None else f" without exclude_modules={exclude_modules!r}")
                         + f"{hint}; the model's layers by type: {_candidates(model)} (subclasses of nn.Linear "
                         f"are not adapted: their forward may not be nn.Linear's)")
    for option, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [key for key in pattern if not any(_pattern_matches(key, n) for n in names)]
        if unused:
            warnings.warn(f"inject_clora: {option} key(s) {unused} match no adapted layer", UserWarning, stacklevel=2)
    new, flags = [], [(p, p.requires_grad) for p in model.parameters()]
    for name in names:
        try:
            layer = CLoRALinear.from_linear(model.get_submodule(name), pattern_value(rank_pattern, name, rank),
                                            pattern_value(alpha_pattern, name, alpha), **kwargs)
        except BaseException as exc:
            for p, flag in flags:           # from_linear froze the weights it shared
                p.requires_grad_(flag)
            if not isinstance(exc, ValueError):
                raise
            key = _pattern_key(rank_pattern, name)     # (the rank's source)
            given = "" if key is None else f" (its rank from rank_pattern[{key!r}])"
            raise ValueError(f"inject_clora: layer {name!r}: {exc}{given}; the model was not changed") from None
        new.append((name, layer))
    keep = {id(p) for _, m in clora_layers(model) for p in (m.lora_A, m.lora_B, m.routing_delta)}
    for p in model.parameters():
        if id(p) not in keep:       # adapters injected earlier keep their state (and their policy's)
            p.requires_grad_(False)
    for name, layer in new:
        _replace(model, name, layer)
    users = _parameter_users(model)     # (after the replacement: an alias of a replaced Linear, `self.fc2 =
    for _, layer in new:                # self.fc1`, keeps the plain Linear and shares the weight: a tie)
        layer.tied_to = _tied(users, layer.weight, layer)
    # transformers' activation checkpointing, turned on before: in its reentrant form, with the embeddings
    # frozen, no input of a checkpointed block requires a gradient, so none reached an adapter (a ViT's loss
    # required none). PEFT's get_peft_model does the same (text models' own checkpointing already does it).
    # (is_activation_checkpointing in transformers 5; is_gradient_checkpointing, before it, warns there)
    checkpointing = getattr(model, "is_activation_checkpointing", None)     # (a PeftModel forwards it)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing is True and callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
    return model


def _call_qkv(parent: nn.Module, child: str) -> None:
    """timm's BEiT, EVA and SwinV2 attention with q/v biases computes F.linear(x, self.qkv.weight, bias)
    and never calls its qkv module (qkv_bias_separate=False), so an adapter there would never run (its
    lora_B would get no gradient). Their own option to call it, then add the bias, is set: the same
    output to rounding."""
    if child == "qkv" and getattr(parent, "qkv_bias_separate", None) is False \
            and getattr(parent, "q_bias", None) is not None:
        parent.qkv_bias_separate = True


def _runs_its_layers(module, args) -> None:
    """The forward pre-hook that `_fused_paths` puts on an adapted nn.TransformerEncoderLayer: it does
    nothing, but a layer with a hook in its modules does not take torch's fused inference path."""


def _fused_paths(model: nn.Module, name: str) -> None:
    """nn.TransformerEncoderLayer in eval mode, with no gradient to record (no_grad, or only frozen base
    weights, as after inject_clora), runs one fused op on `linear1.weight` and `linear2.weight` and never
    calls those modules, and nn.TransformerEncoder then turns a padded batch into a nested tensor first:
    an adapter there was silently left out of every evaluation (PEFT's LoRA too, peft 0.21). Where the
    module at `name` sits in such a layer, the layer gets `_runs_its_layers` (torch skips the fused path
    for a layer with hooks) and the encoders around it `use_nested_tensor = False`, as long as a layer
    there is not a plain nn.Linear; when merge_and_unload has put plain layers back, both are undone."""
    parts = name.split(".")
    ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]
    layer = ancestors[-1]
    if isinstance(layer, nn.TransformerEncoderLayer):
        adapted = type(layer.linear1) is not nn.Linear or type(layer.linear2) is not nn.Linear
        hooks = layer._forward_pre_hooks
        ours = [k for k, hook in hooks.items() if hook is _runs_its_layers]
        if adapted and not ours:
            layer.register_forward_pre_hook(_runs_its_layers)
        elif not adapted:
            for k in ours:
                del hooks[k]
    for encoder in ancestors:
        if not isinstance(encoder, nn.TransformerEncoder) or not hasattr(encoder, "use_nested_tensor"):
            continue
        state = encoder.__dict__
        adapted = any(_runs_its_layers in getattr(m, "_forward_pre_hooks", {}).values() for m in encoder.modules())
        if adapted and "_clora_use_nested_tensor" not in state:
            state["_clora_use_nested_tensor"] = encoder.use_nested_tensor
            encoder.use_nested_tensor = False
        elif not adapted and "_clora_use_nested_tensor" in state:
            encoder.use_nested_tensor = state.pop("_clora_use_nested_tensor")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` (every adapter's injection, and merge_and_unload's plain layers)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    _call_qkv(parent, child)
    _fused_paths(model, name)


def end_task(model: nn.Module) -> None:
    """end_task() on every C-LoRA layer; checks every layer first, so a model whose adapter
    went non-finite anywhere is left entirely unchanged (ValueError naming the layers)."""
    layers = _require_layers(model, "end_task")
    bad = [f"{name} ({why})" for name, m in layers for why in [m._nonfinite_adapter()] if why]
    if bad:
        raise ValueError(f"end_task: non-finite adapter (NaN/Inf; did training diverge?) in {'; '.join(bad)}; "
                         f"no layer was changed")
    waiting = [(name, why) for name, m in layers for why in [m._refusal("end_task") or m.protection.not_ready(m)]
               if why]
    if waiting:
        raise ValueError(f"end_task: {waiting[0][1]} (layers {[n for n, _ in waiting]}); no layer was changed")
    _end_tasks([m for _, m in layers])
    _warn_if_stuck(layers)


def _warn_if_stuck(layers: list, stacklevel: int = 3) -> None:
    """After end_task of the (name, layer) pairs (the model's helper and the layer's method): the
    layers that no later task can change, or whose next task learns nothing, said once; stacklevel
    names the caller's line (the method's two decorators are two frames more)."""
    full = [name or "<this layer>" for name, m in layers
            if isinstance(m.protection, Project) and getattr(m, "_no_room", False)]
    if full:
        warnings.warn(f"end_task: under protection='project' the earlier tasks of layer(s) {full[:8]} now use every "
                      f"direction of their inputs, routing and outputs, so no later task can change them (a "
                      f"larger rank, or a lower Project(energy=...), leaves room)", RuntimeWarning, stacklevel=stacklevel)
    # hard mode's P = 0 (R_old holds less than protect_energy in fewer than r directions): routing_delta then
    # changes nothing, and the factors learn only where the policy gives them a gradient besides the new route's
    stuck = [name or "<this layer>" for name, m in layers if m.mode == "hard" and not isinstance(m.protection, Project)
             and not (m.grad_through_old_route and m.protection.factors_train(m))
             and float(torch.trace(_full(m.projection).double())) < 0.5]
    # a factor that is all zeros at the boundary (a layer the task never trained: a per-task head, a branch of the
    # model the task does not reach): lora_B = 0 gives routing_delta no gradient and, where the policy trains the
    # factors through the new route alone (R_delta = 0 after end_task), them none either; the layer learnt
    # nothing in any later task, silently (a helper's attack). Under "project" lora_B stays 0 once its output
    # basis holds every routing direction
    dead = [name or "<this layer>" for name, m in layers if (name or "<this layer>") not in stuck + full and (
        (isinstance(m.protection, Project) and m.protect_output_basis.shape[1] >= m.rank and _all_zero(m.lora_B))
        or (not isinstance(m.protection, Project) and not (m.grad_through_old_route and m.protection.factors_train(m))
            and (_all_zero(m.lora_B) or _all_zero(m.lora_A))))]
    if dead:
        warnings.warn(f"end_task: layer(s) {dead[:8]} end the task with lora_B (or lora_A) all zeros (the task never "
                      f"trained them?), so under their protection no later task can train them: they learn nothing "
                      f"more (protection='project' with room, or grad_through_old_route under 'paper', lets them)",
                      RuntimeWarning, stacklevel=stacklevel)
    if stuck:
        warnings.warn(f"end_task: in hard mode the projection P of layer(s) {stuck[:8]} is now 0 (the earlier tasks' "
                      f"routing_old needs every direction to hold protect_energy of its energy), so routing_delta "
                      f"changes nothing there and, under protection 'freeze' (or 'paper' without "
                      f"grad_through_old_route), neither do lora_A and lora_B: these layers learn nothing in the "
                      f"next task (a lower protect_energy, soft mode or protection='project' leaves room)",
                      RuntimeWarning, stacklevel=stacklevel)


def _all_zero(t) -> bool:
    return not bool(_full(t).detach().any())


def _end_tasks(layers: list) -> None:
    """end_task of `layers`, all or none: every layer's new state is made first (a failure there, an eigh
    or an interrupt, undoes what was made and leaves every layer in its task; the memory peak is every
    layer's Gram, old and new bases), then set; an interrupt while setting finishes setting every layer
    (a layer's setting can be redone) and is raised after."""
    plans = []
    try:
        for m in layers:
            plans.append((m, None))
            plans[-1] = (m, m._end_task_plan())
    except BaseException:
        for m, plan in reversed(plans):
            if plan is not None:
                m._end_task_undo(plan[-1])
        raise
    done = 0
    try:
        for m, plan in plans:
            m._end_task_commit(plan)
            done += 1
    except BaseException:
        for m, plan in plans[done:]:
            try:
                m._end_task_commit(plan)
            except BaseException:       # (one that fails again stays as it is; the first error is raised)
                pass
        raise


@contextlib.contextmanager
def observe_task(model: nn.Module, group=None):
    """Record the inputs of every C-LoRA layer whose protection policy needs them (protection=
    'project'), for the next end_task:

        with torch.no_grad(), clora_kernels.observe_task(model):
            for x, _ in task_data:
                model(x)
        clora_kernels.end_task(model)

    Layers of the other policies ignore the pass. What is recorded is a K×K Gram per layer, freed
    by end_task. Every forward of the layers while the block is open counts, from any thread (a
    pass split over threads sums whole; a request served by the same model meanwhile is recorded
    too: serve from a copy; a block of another thread beside an open one is refused). In a multi-process
    job (DDP) every process runs the block on its share of the task's data; at its end the Grams are
    summed over the processes (an all-reduce), so each protects the whole task's inputs. `group`: the
    processes holding replicas of the model, whose inputs are summed (torch.distributed's process group);
    default: a DistributedDataParallel wrapper's own group where `model` is one, else every process of the
    job (models trained apart in one job, an ensemble or seeds side by side, each protected the others'
    inputs: pass their group)."""
    needs = [(n, m) for n, m in _require_layers(model, "observe_task", reshard=False) if m.protection.needs_inputs]
    group = replica_group(model, group)
    me = threading.get_ident()
    with protection_lock():     # (tested and marked at once: two threads' blocks both got in)
        busy = [n or "<the model>" for n, m in needs if m._observing and m.__dict__.get("_observing_thread") != me]
        if busy:    # (the first block to close ended the other's recording, silently: 20 of 160 rows kept)
            raise ValueError(f"observe_task: another thread's observe_task block is open on {busy[:4]}; open one "
                             f"block per model at a time (a pass split over threads runs inside one block)")
        layers = [m for _, m in needs if not m._observing]   # nested: counted once
        why = next((w for w in (getattr(m.protection, "sharded", lambda _: "")(m) for m in layers) if w), "")
        if why:     # (refused by end_task, after the whole pass, and a task trained for nothing)
            raise ValueError(f"observe_task: {why}")
        for m in layers:
            m._observing = True
            m.__dict__["_observing_thread"] = me
    try:
        yield model
    except BaseException:
        for m in layers:              # an interrupted pass is not half-recorded
            m.protection.loaded(m)
        raise
    else:
        for m in layers:
            m.protection.observed(m, group)
        if any(m._observed_rows for m in layers):
            for m in layers:        # a pass that fed other layers but never reached these (a branch the
                if not m._observed_rows:    # task does not use): they have no new inputs to protect
                    m._observed_empty = True
    finally:
        with protection_lock():     # (closed and unmarked at once: another thread's block opening in between
            for m in layers:        # lost its mark)
                m._observing = False
                if m.__dict__.get("_observing_thread") == me:
                    del m.__dict__["_observing_thread"]


def replica_group(model: nn.Module, group=None):
    """The processes holding replicas of `model`, whose observed inputs are summed: `group` where
    given, else a DistributedDataParallel wrapper's own group (under torch.compile's wrapper too:
    torch's DDP + compile recipe), else None (torch.distributed's default: every process of the job)."""
    dist = torch.distributed
    if group is not None and dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER:
        # (torch's new_group on a process it leaves out: taken for a job of one, this process protected its own
        # inputs alone and the replicas differed, silently)
        raise ValueError("group: this process is not in the process group given (torch.distributed.new_group "
                         "returns NON_GROUP_MEMBER on the processes it leaves out); pass the group of the processes "
                         "holding replicas of this model, on each of them")
    if group is None:
        dynamo, inner = sys.modules.get("torch._dynamo.eval_frame"), model
        while dynamo is not None and isinstance(inner, dynamo.OptimizedModule):
            inner = inner._orig_mod
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            group = inner.process_group
    return group


def several_processes(group=None) -> bool:
    """Whether torch.distributed runs with more than one process in `group`."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(group) > 1)


@torch.compiler.disable
def _observe(layer, x) -> None:
    """The forward's input to the policy, inside observe_task (compiled: a graph break, and the flag's
    guard recompiles the forward when observe_task sets it)."""
    layer.protection.observe(layer, x)


def orthogonality_loss(model: nn.Module) -> Tensor:
    """Σ over C-LoRA layers of || Oᵀ (P R_delta) ||_F² (paper Eq. 26), on the first layer's device
    (a model split over devices, e.g. transformers' device_map) in float32 or the layers' wider dtype."""
    losses = [m.orthogonality_loss() for _, m in _require_layers(model, "orthogonality_loss", reshard=False)]
    dtype = torch.float32
    for loss in losses:
        dtype = torch.promote_types(dtype, loss.dtype)
    device = losses[0].device
    return torch.stack([loss.to(device, dtype) for loss in losses]).sum()


def merge(model: nn.Module, keep_original=None) -> None:
    """Merge every C-LoRA layer (CLoRALinear.merge; keep_original as there), or none of them."""
    for _, m in _layers_that_can(model, "merge"):     # (the first layer checks keep_original before any merges)
        m.merge(keep_original)


def unmerge(model: nn.Module) -> None:
    """Unmerge every merged C-LoRA layer (CLoRALinear.unmerge), or none of them."""
    for _, m in _layers_that_can(model, "unmerge"):
        m.unmerge()


def _values_of(p: Tensor):
    """What a parameter's values are, for ties: its memory where it has one (two Parameter objects over the
    same elements are one: `load_state_dict(..., assign=True)` of a tied checkpoint leaves a tie so, and a
    merge wrote into the embedding, silently), the object itself otherwise (meta, empty, a subclass)."""
    try:
        if p.device.type != "meta" and p.numel() and type(p) in (nn.Parameter, Tensor):
            return (p.device, p.dtype, p.untyped_storage().data_ptr(), p.storage_offset(), p.shape, p.stride())
    except (RuntimeError, NotImplementedError):
        pass
    return id(p)


def _parameter_users(model: nn.Module) -> dict:
    """`_values_of(parameter)` -> (name, holding module) for every name under which the model's modules hold
    it: a tied one has several holders; one module reachable under several names (timm's CoaT:
    `self.mlp2 = self.mlp3 = self.mlp4 = Mlp(...)`) is one holder, not a tie."""
    users = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            users.setdefault(_values_of(p), []).append((f"{mod_name}.{p_name}" if mod_name else p_name, mod))
    return users


def _tied(users: dict, weight: Tensor, holder: nn.Module) -> list:
    """The names of `weight` (`_parameter_users`) held by modules other than `holder`."""
    return [name for name, mod in users.get(_values_of(weight), []) if mod is not holder]


def _layers_that_can(model: nn.Module, what: str, caller: str = "") -> list:
    """The model's C-LoRA layers (`_require_layers`, for `caller`, default `what`), after asking each
    one that `what` ("merge", "unmerge") would change whether it can (`CLoRALinear._refusal`): a
    refusal raises before any layer changes, so the model is never left half merged. Before a merge
    each layer's `tied_to` is found again in the model as it is now (an untie since inject_clora
    lifts the refusal; a tie made since adds it)."""
    layers = _require_layers(model, caller or what)
    if what == "merge":
        users = _parameter_users(model)
        for name, m in layers:
            m.tied_to = _tied(users, m.weight, m)
    for name, m in layers:
        why = m._refusal(what) if m.merged == (what == "unmerge") else ""
        if why:
            raise ValueError(("" if not caller or caller == what else f"{caller}: ")     # (disable_adapter unmerges)
                             + f"{why} (layer {name or '<the model>'!r}; no layer was changed)")
    return layers


def tensor_at(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer of `model` at the dotted name `name`."""
    holder, _, attr = name.rpartition(".")
    module = model.get_submodule(holder)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def set_tensors(model: nn.Module, tensors: dict) -> dict:
    """Put each tensor object of `tensors` ({dotted name: Parameter or tensor}) in the model at its name,
    as the parameter or buffer that is there (other modules sharing the one it replaces keep theirs);
    returns the objects replaced, by name."""
    replaced = {}
    for name, value in tensors.items():
        holder, _, attr = name.rpartition(".")
        module = model.get_submodule(holder)
        slots = module._parameters if attr in module._parameters else module._buffers
        replaced[name], slots[attr] = slots[attr], value
    return replaced


def _originals(model: nn.Module) -> list:
    """(module, its base tensors by name) for each module of `model` that load_peft_adapter loaded
    modules_to_save into (`_clora_originals`: the base's tensor objects it replaced)."""
    return [(m, m.__dict__["_clora_originals"]) for m in model.modules() if "_clora_originals" in m.__dict__]


def placed_originals(model: nn.Module) -> dict:
    """`model`'s own `_clora_originals` (none: {}), each on the device and dtype of the tensor now in its place."""
    placed, out = {}, {}
    for n, t in model.__dict__.get("_clora_originals", {}).items():
        if id(t) not in placed:     # (one copy for names that shared the original: tied, as the base's were)
            placed[id(t)] = _placed(t, tensor_at(model, n))
        out[n] = placed[id(t)]
    return out


def _placed(original: Tensor, current: Tensor) -> Tensor:
    """`original` on `current`'s device and dtype (the model may have moved since it was kept)."""
    if original.device == current.device and original.dtype == current.dtype:
        return original
    moved = original.detach().to(device=current.device, dtype=current.dtype)
    return nn.Parameter(moved, requires_grad=False) if isinstance(original, nn.Parameter) else moved


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block every C-LoRA layer computes its base layer alone (PEFT's disable_adapter);
    merged layers are unmerged for the block and merged again after it. The modules that
    load_peft_adapter loaded as modules_to_save compute with the base model's tensors in the block
    (PEFT's original modules): the tensor objects are swapped, never written, so a graph built
    before the block still backpropagates after it. A merged layer's weight is written in place
    (unmerge, then merge), as PEFT's is: a graph through a merged layer that spans the block's
    entry or exit does not backpropagate (torch's "modified by an inplace operation")."""
    layers = [m for _, m in _layers_that_can(model, "unmerge", "disable_adapter")]
    merged = [m for m in layers if m.merged]
    kept = [m._original_weight is not None for m in merged]     # (merged again as they were: keep_original)
    was = [m.adapter_enabled for m in layers]
    for m in merged:
        m.unmerge()
    for m in layers:
        m.adapter_enabled = False
    # (the model a load went into may sit inside a wrapper: torch.compile's, DDP, a trainer's)
    swapped = [(holder, set_tensors(holder, placed_originals(holder))) for holder, _ in _originals(model)]
    try:
        yield model
    finally:
        for holder, replaced in swapped:
            set_tensors(holder, replaced)
        for m, enabled in zip(layers, was):
            m.adapter_enabled = enabled
        if merged:
            _resharded(model)       # (the block's forwards may have left FSDP2's parameters unsharded)
        for m, keep in zip(merged, kept):
            m.merge(keep_original=keep)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every C-LoRA layer and put back a plain layer of the base's type (nn.Linear, or
    transformers' Conv1D) holding the merged weight and the bias; returns the model, which no
    longer holds an adapter (PEFT's merge_and_unload)."""
    layers = _layers_that_can(model, "merge", "merge_and_unload")
    for _, m in layers:
        m.merge(keep_original=False)
    for holder, _ in _originals(model):            # (load_peft_adapter's base tensors: no adapter is left)
        holder.__dict__.pop("_clora_originals")
    for name, m in layers:
        with torch.device("meta"):
            if m.fan_in_fan_out:
                plain = sys.modules["transformers.pytorch_utils"].Conv1D(m.out_features, m.in_features)
            else:
                plain = m.__dict__.get("_base_class", nn.Linear)(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = m.weight
        plain.bias = m.bias
        carry_hooks(m, plain)
        if not name:                    # the model is the layer itself
            return plain
        _replace(model, name, plain)
    return model


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts of the model, each shared parameter counted once."""
    _check_model(model, "trainable_parameters")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: trainable params, all params and the trainable percentage."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


_FORMAT = "clora_kernels.adapter/1"


def save_adapter(model: nn.Module, path) -> None:
    """Write only the adapter tensors, the protection policy's state and the task state of every
    CLoRALinear (safetensors; the configuration in the file's metadata) to the file `path`, its
    folder made where missing.

    A model sharded by FSDP2 (`fully_shard`): every rank calls it (it gathers the shards), rank 0
    writes the file, and it returns on every rank once the file is there. Unsharded models (one
    process, DDP) write wherever it is called."""
    check_path(path, "save_adapter")
    model = unwrapped(model)
    layers = _require_layers(model, "save_adapter")
    refuse_meta(layers, "save_adapter")
    # ("run/", not yet a folder: a file named run was made)
    if os.path.isdir(path) or os.fsdecode(os.fspath(path)).endswith(("/", os.sep)):
        raise ValueError(f"save_adapter: {path} is a folder; save_adapter writes one file (e.g. "
                         f"{os.path.join(path, 'adapter.safetensors')})")
    tensors, meta = {}, {}
    for name, m in layers:
        # enforced where a tensor may have changed since the policy last ran, as before a forward, so a
        # save changes nothing of the run (a forced re-projection is not bit-exact: a run writing
        # checkpoints ended 5e-7 away from one that did not)
        m.protection.enforce(m)
        for t in _ADAPTER_TENSORS + m.protection.buffers:
            tensors[f"{name}.{t}"] = _full(getattr(m, t)).detach().to("cpu").contiguous()
        bad = nonfinite((t, tensors[f"{name}.{t}"]) for t in _ADAPTER_TENSORS + m.protection.buffers)
        if bad:     # (load_adapter refuses such a file: it is refused before it is written)
            raise ValueError(f"save_adapter: {bad} of layer {name!r} holds non-finite values (NaN/Inf; did training "
                             f"diverge?); nothing was written")
        meta[name] = {"rank": m.rank, "alpha": m.alpha, "mode": m.mode, "protect_energy": m.protect_energy,
                      "grad_through_old_route": m.grad_through_old_route, "protection": m.protection.config(),
                      "task_index": m.task_index, "in_features": m.in_features, "out_features": m.out_features,
                      "enforced": m.protection.enforced_fingerprint(m)}
    metadata = {"format": _FORMAT, "layers": json.dumps(meta)}
    _write_once(model, lambda: write_safetensors_atomic(path, tensors, metadata))


def _adapter_entry(path, name: str, m: "CLoRALinear", info: dict, tensors: dict) -> dict:
    """Check one layer's entry of an adapter file against the model's layer; return what to load.
    Raises ValueError naming the layer, the field and the sizes."""
    where = f"{path}: layer {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: malformed metadata {info!r}")
    task_index, alpha = info.get("task_index"), info.get("alpha", m.alpha)
    alpha = m.rank if alpha is None else alpha
    try:
        _check_task_index(task_index)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(info.get("grad_through_old_route", False), bool):
        raise ValueError(f"{where}: grad_through_old_route must be true or false, got "
                         f"{info['grad_through_old_route']!r}")
    try:
        _check_config(m.in_features, m.out_features, m.rank, alpha, info.get("mode", m.mode),
                      info.get("protect_energy", m.protect_energy), m.backend, info.get("protection", "paper"))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    policy = make_protection(info.get("protection", "paper"))
    want = {t: tuple(getattr(m, t).shape) for t in _ADAPTER_TENSORS}      # every tensor is 2-D
    want.update(policy.buffer_shapes(m))                                    # cols None: grows with tasks
    for t, (rows, cols) in want.items():
        key = f"{name}.{t}"
        if key not in tensors:
            raise ValueError(f"{where}: the file has no tensor {key!r}")
        if not tensors[key].is_floating_point():
            raise ValueError(f"{where}: {t} in the adapter is {tensors[key].dtype}, not a floating-point tensor")
        have = tuple(tensors[key].shape)
        if len(have) != 2 or have[0] != rows or (cols is not None and have[1] != cols):
            raise ValueError(f"{where}: {t} in the adapter has shape {have}, the model needs "
                             f"({rows}, {'any' if cols is None else cols}) "
                             f"(adapter rank {info.get('rank')}, model rank {m.rank})")
    bad = nonfinite((t, tensors[f"{name}.{t}"]) for t in want)
    if bad:
        raise ValueError(f"{where}: {bad} in the adapter holds non-finite values (NaN/Inf; was it saved from a "
                         f"diverged run?)")
    bad = policy.check_loaded({t: tensors[f"{name}.{t}"] for t in policy.buffers})
    if bad:
        raise ValueError(f"{where}: {bad}")
    return {"task_index": task_index, "alpha": float(alpha), "mode": info.get("mode", m.mode),
            "protect_energy": float(info.get("protect_energy", m.protect_energy)), "policy": policy,
            "grad_through_old_route": bool(info.get("grad_through_old_route", m.grad_through_old_route)),
            "tensors": {t: tensors[f"{name}.{t}"] for t in want},
            # the fingerprint, None, or True for a file from before it (save_adapter enforced first)
            "enforced": info.get("enforced", True)}


def load_adapter(model: nn.Module, path) -> None:
    """Load an adapter written by save_adapter, with the configuration it was trained with (alpha,
    mode, protect_energy, the protection policy and its state, task_index). The base weights are
    the model's own: load into the model the adapter was trained on. Every CLoRALinear of the
    model must be in the file with the same shapes, and every layer of the file in the model;
    everything is checked first, so on any error nothing is changed and a ValueError names the
    layer and the sizes."""
    check_path(path, "load_adapter")
    model = unwrapped(model)
    layers = _require_layers(model, "load_adapter")

    def check(meta):
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a clora_kernels adapter file (format {meta.get('format')!r})")
    tensors, meta = read_safetensors(path, check)
    try:
        info = json.loads(meta["layers"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: the file's metadata has no readable 'layers' entry") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: the file's 'layers' metadata is not a mapping of layer names")
    names = {n for n, _ in layers}
    strip = wrapper_prefix(info, names)
    if strip:
        info = {k[len(strip):]: v for k, v in info.items()}
        tensors = {k[len(strip):]: v for k, v in tensors.items() if k.startswith(strip)}
    missing, extra = sorted(names - set(info)), sorted(set(info) - names)
    if missing:
        raise ValueError(f"{path}: the adapter has no entry for the model's C-LoRA layer(s) {missing}")
    if extra:
        raise ValueError(f"{path}: the adapter holds layer(s) {extra} that the model has no C-LoRA layer for")
    for name, m in layers:
        if m.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge the model before load_adapter")
        if m.weight.is_meta or m.lora_A.is_meta:
            raise ValueError(f"{path}: the model's tensors are on the meta device, where a load writes nothing: "
                             f"load after to_empty() and the base weights (layer {name!r})")
        why = m._refusal("load_adapter")
        if why:
            raise ValueError(f"{path}: layer {name!r}: {why}")
    entries = [(m, _adapter_entry(path, name, m, info[name], tensors)) for name, m in layers]
    unused = sorted(set(tensors) - {f"{name}.{t}" for (name, _), (_, e) in zip(layers, entries) for t in e["tensors"]})
    if unused:      # (as PEFT's load names its unexpected keys: a hand-edited or foreign file, loaded without a word)
        warnings.warn(f"load_adapter: {path} holds {len(unused)} tensor(s) that no layer reads, not loaded: "
                      f"{unused[:8]}", UserWarning, stacklevel=2)
    for (name, _), (m, e) in zip(layers, entries):      # (a later task's project state: no sharded layer holds it)
        why = e["policy"].sharded(m) if e["task_index"] and isinstance(e["policy"], Project) else ""
        if why:
            raise ValueError(f"{path}: layer {name!r} saved at task {e['task_index']} with {why}; nothing was loaded")
    with torch.no_grad():
        for m, e in entries:
            with _requires_grad_kept(m):
                m.alpha = e["alpha"]                # (and scaling)
                m.mode, m.protect_energy = e["mode"], e["protect_energy"]
                m.grad_through_old_route = e["grad_through_old_route"]
                if e["policy"].config() != m.protection.config():
                    m._set_protection(e["policy"])
                for t, value in e["tensors"].items():
                    mine = getattr(m, t)
                    if mine.shape != value.shape:
                        mine = m._buffers[t] = _resized(mine, value.shape)
                    mine.copy_(_like(mine, value))
                m.task_index = e["task_index"]
                m.protection.loaded(m)
                m.protection.loaded_enforced(m, e["enforced"])
