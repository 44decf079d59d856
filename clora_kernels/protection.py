"""Protection policies: what a C-LoRA layer does to keep earlier tasks' outputs (docs/design.md section
2, "Protection policies").

The op's math is the paper's whatever the policy, and so are its gradients for the operands it is
given; a policy decides, per layer, what trains after the first task, which changes of the trainable
tensors are allowed, and (`operands`) the factors and the stop-gradient the op sees: "project" gives
the factors the plain gradient from the second task on, whatever the layer's
grad_through_old_route, since its projection, not the stop-gradient, keeps the old route. One
small object per policy, with the hooks of the lifecycle (as PEFT gives each LoRA variant its
init / merge / forward):

    acts(layer)             does the policy touch this forward (False on the first task)
    operands(layer, A, B, g) the factors the op sees and its grad_through_old_route (freeze: detached
                            factors, so they get no gradient; project: plain gradients)
    enforce(layer, force)   put the trainable tensors back on the allowed set (project)
    observe(layer, x)       accumulate the inputs of a pass over the task's data (project)
    observed(layer, group)  after that pass (project: sums the inputs over the processes holding replicas)
    not_ready(layer)        why end_task cannot run yet ('' when it can), checked before anything changes
    prepare_end_task(layer, routing, P)  the policy's state after the task, made before anything changes
    end_task(layer, prepared)  after the routing fold (routing_delta is 0 then): takes that state
    config()                what travels in state_dict and adapter files

Policies beyond "paper" are this project's variants, not the paper's method:

- "paper":   the paper's semantics: lora_A / lora_B keep learning through the new route in every
             task. Measured on the digits sequence, Adam then rewrites the frozen old route
             (README "Continual learning").
- "freeze":  lora_A / lora_B stop learning from the second task on; routing_delta (and whatever
             else the caller trains) still learns. The old route's output is then exactly fixed;
             the layer's output on old inputs still moves through routing_delta.
- "project": every trainable tensor keeps learning, but only in directions that leave the
             layer's output on earlier tasks' inputs unchanged (gradient projection memory, GPM,
             Saha et al. 2021, applied to the three factors): lora_A moves only orthogonally to
             the earlier tasks' input subspace U (K-space), routing_delta only where the earlier
             tasks' t = x·lora_Aᵀ (after P) has no energy, lora_B only where their
             u = t·R_eff has none. U keeps `energy` of each task's input energy (GPM's
             threshold); the input energy left outside U is what is not protected (measured on
             the digits at 0.99: a whole next task moves the first task's features by 2-3.5 %).
             The r-space subspaces take every direction the old t and u use. Optimizer-agnostic:
             the layer projects the parameters (not only the gradient, which Adam's
             per-coordinate scaling would leak) before each forward that follows a change or an
             optimizer step. An in-place write through `.data` outside an optimizer (a hand-written
             `p.data -= lr * p.grad`) is none of these: write under torch.no_grad() instead, or call
             `layer.protection.enforce(layer, force=True)` after it (which projects the factors
             whose values changed). Under torch.func transforms the
             forward projects its operands out of place instead (their tensors take no in-place
             write), so there the projection is part of the function and its gradients are the
             projected ones. Needs one pass over each task's data before end_task, inside
             `clora_kernels.observe_task(model)`. Memory per layer: U (K×k, k ≤ K) and r×r
             Grams; a K×K Gram only while observing.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

import torch
from torch import Tensor

from .functional import _autocasting, exact_math

_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)    # what autocast casts (float64 it leaves)

_STEPS = [0]          # optimizer steps taken in this process (a global step hook counts them)
_HOOK = []
# enforce's check-and-write and observe's sums, one thread at a time: two threads' forwards projecting
# one layer at once subtracted the step's part twice (each reads a factor twice, the other's write
# between), and recorded the result as enforced (old outputs moved 0.6-0.9 for good); concurrent
# observe passes lost rows of the Gram; and a task's end, whose writes a forward's projection read half
# done (run beside forwards of other threads, 40 end_tasks moved the output by up to 6.3, for good).
# Reentrant: the end of a task projects under it
_LOCK = threading.RLock()


def _new_lock() -> None:        # a child forked while another thread held the lock would wait forever
    global _LOCK
    _LOCK = threading.RLock()


def protection_lock():
    """The lock of the policies' writes (`_LOCK`, made again in a forked child)."""
    return _LOCK


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


def _watch_optimizer_steps() -> None:
    """Fused optimizers write parameters without bumping their version counters, so the project
    policy also re-enforces after every optimizer step of the process (one global post-step hook,
    registered when the first such layer is made or loaded, and at a layer's first enforce: an
    unpickled layer was neither)."""
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _HOOK.append(register_optimizer_step_post_hook(_count_step))

_POLICIES = ("paper", "freeze", "project")


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a policy's sums over observed rows (`Protection.sums`) in a layer of `dtype`."""
    return torch.promote_types(dtype, torch.float32)


_functorch = torch._C._functorch
# the observed sums are the process's, not the transform's: summed into with torch.func off (a grad pass after
# any plain forward failed: "mutate a captured Tensor")
_outside_functorch = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)


def _rows(x: Tensor) -> Tensor:
    """The rows of an observed input (K its last dim) as a plain (rows, K) tensor: out of torch.func's
    wrappers (vmap's batched tensor: every sample's rows, the batch dim first; grad's and jvp's: the
    values). The Gram was summed into in place from inside the transform, which torch.func refuses for
    a tensor made outside it (a grad pass after any plain forward, vmap, per-sample gradients), naming
    aten::addmm_, an op the user never wrote."""
    while _functorch.is_functorch_wrapped_tensor(x):
        if _functorch.is_batchedtensor(x):
            x, dim = _functorch._unwrap_batched(x, _functorch.maybe_get_level(x))
            if dim is not None:
                x = x.movedim(dim, 0)
        else:
            x = _functorch.get_unwrapped(x)
    return x.reshape(-1, x.shape[-1])


def forget_observed(state: dict) -> None:
    """No observed inputs in a layer's __dict__ (or the state a copy of it is made from): none kept ((K, K)
    Gram, a row count), none summed over the processes, and no pass that fed other layers but this one
    nothing (`_observed_empty`)."""
    state.update(_observed=None, _observed_rows=0, _observed_empty=False)
    state.pop("_observed_summed", None)
    state.pop("_observed_shared", None)


class Protection:
    """The paper's semantics: nothing is protected beyond the stop-gradient on the old route."""

    name = "paper"
    needs_inputs = False
    enforces = False            # whether `enforce` does anything (the forward calls it only then)
    buffers = ()                # names of the layer buffers the policy persists
    sums = ()                   # those of them that sum over every observed row: float32 at least
                                # (`sum_dtype`; in an fp16 layer they overflowed 65504 after one task
                                # of 200k N(0,1) rows, and every later end_task failed)

    def attach(self, layer) -> None:
        """Give the layer the policy's state for a fresh first task (buffers, flags)."""
        dt = layer.lora_A.dtype
        for name, (rows, cols) in self.buffer_shapes(layer).items():
            layer.register_buffer(name, torch.zeros(rows, cols or 0, device=layer.lora_A.device,
                                                    dtype=sum_dtype(dt) if name in self.sums else dt))
        self.loaded(layer)

    def buffer_shapes(self, layer) -> dict:
        """name -> (rows, cols) of each persisted buffer; cols None where it grows with the tasks."""
        return {}

    def detach(self, layer) -> None:
        """Remove what attach added (before the layer takes another policy)."""
        for name in self.buffers:
            layer._buffers.pop(name, None)

    def acts(self, layer) -> bool:
        return False

    def factors_train(self, layer) -> bool:
        """Whether the policy trains lora_A / lora_B in the layer's current task."""
        return True

    def operands(self, layer, lora_A: Tensor, lora_B: Tensor, grad_through_old_route: bool):
        return lora_A, lora_B, grad_through_old_route

    def enforce(self, layer, force: bool = False) -> None:
        pass

    def observe(self, layer, x: Tensor) -> None:
        pass

    def observed(self, layer, group=None) -> None:
        """After a pass inside observe_task ends normally (every process of `group`, the processes holding
        replicas of the model, runs it together; None: every process of the job)."""

    def not_ready(self, layer) -> str:
        return ""

    def prepare_end_task(self, layer, routing: Tensor, projection: Tensor):
        """The policy's state after the task's end, computed before anything changes (so that a failure,
        in any layer of a model, leaves every layer in its task): `routing` and `projection` are what
        routing_old and P become. Passed to end_task."""
        return None

    def end_task(self, layer, prepared=None) -> None:
        """After the fold (routing_delta = 0): take the state prepare_end_task made."""

    def mode_changed(self, layer) -> None:
        """After the layer's mode changed past its first task, or its protect_energy in hard mode (an
        assignment, not a load; a switch to hard, or the energy, has made P)."""

    def loaded(self, layer) -> None:
        """After state_dict / adapter loading set the layer's task state."""

    def enforced_fingerprint(self, layer):
        """Saved with the layer (state_dict, save_adapter): a fingerprint of the factors and the
        routing as the policy last enforced them, or None where they may have changed since."""
        return None

    def loaded_enforced(self, layer, fingerprint) -> None:
        """After a load of the adapter and the policy's state (a file `save_adapter` wrote, or a whole
        state_dict) that was saved enforced (`enforced_fingerprint`): where the loaded tensors are
        exactly what was saved so, the next forward need not enforce the policy again (enforcing
        twice is not bit-exact, and a resumed run must equal an uninterrupted one); anything else (a
        state saved between an optimizer step and the forward that projects it, a state_dict that
        shares the live tensors loaded back after a step) is enforced as usual. fingerprint: the
        saved one, None, or True for a file that was enforced when written (older adapter files)."""

    def check_loaded(self, tensors: dict) -> str:
        """Why buffers about to be loaded (name -> tensor) do not fit together ('' when they do)."""
        return ""

    def config(self) -> dict:
        return {"name": self.name}

    def state_numel(self, layer) -> int:
        """Floats the policy stores per layer beyond the adapter (reported by the experiments)."""
        return sum(layer._buffers[n].numel() for n in self.buffers)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class Paper(Protection):
    name = "paper"


class Freeze(Protection):
    """lora_A / lora_B train on the first task only."""

    name = "freeze"

    def acts(self, layer) -> bool:
        return layer._after_first_task

    def operands(self, layer, lora_A, lora_B, grad_through_old_route):
        return lora_A.detach(), lora_B.detach(), grad_through_old_route

    def end_task(self, layer, prepared=None) -> None:
        self.apply_requires_grad(layer)

    def factors_train(self, layer) -> bool:
        return layer.task_index == 0

    def loaded(self, layer) -> None:
        self.apply_requires_grad(layer)

    def detach(self, layer) -> None:
        for p in factor_leaves(layer):     # another policy decides about them now
            p.requires_grad_(True)

    def apply_requires_grad(self, layer) -> None:
        """The factors train on the first task only: from the second on requires_grad is off (so an
        optimizer built from `requires_grad` parameters leaves them out) and no stale gradient
        stays (an optimizer built earlier skips a parameter whose .grad is None); the forward
        detaches them as well, so a caller switching requires_grad back on gets no gradient for
        them from the layer's output (a loss on delta_weight() itself would still reach them).
        Under DistributedDataParallel the factors become unused parameters after the first task:
        wrap with find_unused_parameters=True, or wrap again after end_task."""
        first = self.factors_train(layer)
        for p in factor_leaves(layer, strict=not first):
            p.requires_grad_(first)
            if not first:
                p.grad = None


def factor_leaves(layer, strict: bool = False) -> list:
    """The parameters that hold lora_A and lora_B: themselves, or where torch.nn.utils.parametrize, prune or the
    old weight_norm computes one, its original(s) (requires_grad_ on the computed tensor failed halfway through a
    load or a policy switch, the layer left in the new task with its factor still training). A factor computed
    otherwise is left out, or, `strict` (a policy turning its training off), refused by name."""
    out = []
    for name in ("lora_A", "lora_B"):
        plist = getattr(getattr(layer, "parametrizations", None), name, None)
        own = layer._parameters
        if own.get(name) is not None:
            out.append(own[name])
        elif plist is not None:
            out += list(plist.parameters(recurse=False))
        elif own.get(name + "_orig") is not None:       # (prune's)
            out.append(own[name + "_orig"])
        elif own.get(name + "_g") is not None and own.get(name + "_v") is not None:     # (weight_norm's)
            out += [own[name + "_g"], own[name + "_v"]]
        elif strict:
            raise ValueError(f"{name} is computed by something this layer does not know (neither parametrize, "
                             f"prune nor weight_norm), so its training cannot be turned off; remove that first")
    return out


class Project(Protection):
    """GPM-style projection of lora_A, routing_delta and lora_B away from earlier tasks."""

    name = "project"
    needs_inputs = True
    enforces = True
    buffers = ("protect_input_basis", "protect_input_anchor", "protect_routing_basis", "protect_output_basis",
               "protect_output_anchor", "protect_gram_t", "protect_gram_u")
    sums = ("protect_gram_t", "protect_gram_u")

    def __init__(self, energy: float = 0.99):
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0.0 < energy <= 1.0):
            raise ValueError(f"Project(energy=...) must be in (0, 1], got {energy!r}")
        self.energy = float(energy)

    def config(self) -> dict:
        return {"name": self.name, "energy": self.energy}

    # ---- state ----------------------------------------------------------------------------
    def buffer_shapes(self, layer) -> dict:
        r, k, n = layer.rank, layer.in_features, layer.out_features
        return {"protect_input_basis": (k, None), "protect_input_anchor": (r, None),
                "protect_routing_basis": (r, None), "protect_output_basis": (r, None),
                "protect_output_anchor": (n, None), "protect_gram_t": (r, r), "protect_gram_u": (r, r)}

    # ---- training -------------------------------------------------------------------------
    def acts(self, layer) -> bool:
        return layer._after_first_task

    def operands(self, layer, lora_A, lora_B, grad_through_old_route):
        # The stop-gradient on the old route exists to keep it from moving; the projection keeps
        # it exactly, so the factors take the plain gradient. With the stop-gradient, lora_A would
        # get none once routing_delta's allowed directions run out (after end_task it is 0).
        return lora_A, lora_B, True

    def loaded(self, layer) -> None:
        # no observed inputs ((K, K) Gram, a row count, whether a pass that fed other layers fed this
        # one nothing), nothing enforced yet
        _watch_optimizer_steps()
        forget_observed(layer.__dict__)
        layer._enforced_versions = None
        layer._no_room = False

    @torch.no_grad()
    def mode_changed(self, layer) -> None:
        # routing_delta's allowed set is the complement of the earlier tasks' t·P: made with the old
        # mode's P it left a switched layer's old outputs free to move (0.08 soft to hard, 0.2 hard to soft)
        if layer.task_index > 0:
            layer.protect_routing_basis = self._routing_basis(layer, layer.protect_gram_t.double()).to(
                layer.lora_A.dtype).contiguous()
            layer._enforced_versions = None

    @staticmethod
    def _routing_basis(layer, gram_t: Tensor, projection=None) -> Tensor:
        """Every r-space direction the earlier tasks' t·P uses (P = I in soft mode; `projection`, or the
        layer's), from their t Gram."""
        projection = layer.projection if projection is None else projection
        p = projection.double() if layer.mode == "hard" else torch.eye(layer.rank, dtype=torch.float64,
                                                                      device=gram_t.device)
        return _range_basis(p @ gram_t @ p)

    def enforced_fingerprint(self, layer):
        if layer.task_index == 0 or layer._enforced_versions != self._versions(layer):
            return None
        return self._fingerprint(layer)

    def loaded_enforced(self, layer, fingerprint) -> None:
        if layer.task_index > 0 and (fingerprint is True or (
                isinstance(fingerprint, (list, tuple)) and list(fingerprint) == self._fingerprint(layer))):
            layer._enforced_versions = self._versions(layer)
            _keep_values(layer, (layer.lora_A, layer.routing_delta, layer.lora_B))

    @staticmethod
    @torch.no_grad()
    def _fingerprint(layer) -> list:
        """Three float64 sums (plain, absolute, squared) of lora_A, routing_delta and lora_B: equal
        for the same values in any dtype, and changed by any optimizer step in practice."""
        out = []
        for t in (layer.lora_A, layer.routing_delta, layer.lora_B):
            t = t.detach().double()
            out += [float(t.sum()), float(t.abs().sum()), float(t.square().sum())]
        return out

    def _versions(self, layer):
        _watch_optimizer_steps()      # (a layer unpickled in a new process was never attached there)
        ts = (layer.lora_A, layer.routing_delta, layer.lora_B)
        return tuple(t._version for t in ts) + tuple(t.data_ptr() for t in ts) + (_STEPS[0],)

    @torch.no_grad()
    def enforce(self, layer, force: bool = False) -> None:
        """lora_A·U = anchor, basisᵀ·routing_delta = 0, lora_B·V = anchor: the earlier tasks'
        t, u and output are then what they were at their end_task (U to the energy threshold).
        Runs when one of the three tensors may have changed since it last ran: a new version or
        storage, or an optimizer step anywhere in the process. Writes that are none of these (an
        in-place edit through `.data` outside an optimizer) are not seen: pass force=True after
        them (end_task forces it; merge and the saves do not, so that neither changes a run). Forced, it
        projects every factor whose values are not those it last enforced (a factor still holding them
        stays bit for bit: projected again, it would move by its rounding)."""
        if layer.task_index == 0 or (not force and self._versions(layer) == layer._enforced_versions):
            return
        computed = [n for n in ("lora_A", "routing_delta", "lora_B") if n not in layer._parameters]
        if computed:
            raise ValueError(f"protection='project' writes {computed} in place, but this layer computes them "
                             f"(torch.nn.utils.parametrize or prune), so the projection would be lost and earlier "
                             f"tasks unprotected: remove the parametrization, or use protection='freeze'")
        with _LOCK:
            now, last = self._versions(layer), layer._enforced_versions
            if not force and now == last:
                return      # (another thread's forward enforced it meanwhile)
            tensors = (layer.lora_A, layer.routing_delta, layer.lora_B)
            # Only an optimizer step somewhere in the process since the last enforce (versions and storage
            # as enforced): a fused optimizer's step on these tensors, or another model's. A tensor still
            # holding its enforced values keeps them bit for bit (projected again, it moved by its rounding:
            # a model trained beside another drifted 1e-8 per step of the other's optimizer, and two equal
            # models trained one after the other in a process ended 1.8e-7 apart). Forced too (end_task): a
            # tensor a forward projected since the last step is not projected twice, so DDP ranks whose observe
            # pass fed one of them no batch end the task bit for bit equal (they differed by up to 7e-7); a `.data`
            # edit, what force is for, changes the values, which are then projected. By a tensor comparison, not
            # a branch on it: no device sync; on the CPU, where a branch costs none, a tensor holding its
            # enforced values is not written at all (the write bumped its version, and a graph built before
            # another model's optimizer step failed its backward after this layer's next forward)
            kept = None if last is None or now[:-1] != last[:-1] else layer.__dict__.get("_enforced_values")
            with exact_math(layer.lora_A):          # (not in the caller's autocast: kept across steps)
                for i, (t, projected) in enumerate(zip(tensors, self.projected(layer, *tensors))):
                    if projected is t or kept is not None and t.device.type == "cpu" and torch.equal(t, kept[i]):
                        continue
                    t.copy_(projected if kept is None else torch.where((t == kept[i]).all(), t, projected))
            layer._enforced_versions = self._versions(layer)
            _keep_values(layer, tensors)

    @staticmethod
    def projected(layer, lora_A: Tensor, routing_delta: Tensor, lora_B: Tensor) -> tuple:
        """The three tensors put back on the allowed set (`enforce` writes them into the layer's own):
        lora_A·U = anchor, basisᵀ·routing_delta = 0, lora_B·V = anchor. Out of place, so that under
        torch.func transforms (whose tensors cannot be written in place) the layer's forward projects
        its operands instead, differentiably."""
        u, v, w = layer.protect_input_basis, layer.protect_output_basis, layer.protect_routing_basis
        if u.shape[1]:
            lora_A = lora_A - (lora_A @ u - layer.protect_input_anchor) @ u.t()
        if w.shape[1]:
            routing_delta = routing_delta - w @ (w.t() @ routing_delta)
        if v.shape[1]:
            lora_B = lora_B - (lora_B @ v - layer.protect_output_anchor) @ v.t()
        return lora_A, routing_delta, lora_B

    def observe(self, layer, x: Tensor) -> None:
        if isinstance(x, Tensor) and x.is_nested:   # a nested tensor's rows (the strided layout has no shape)
            parts = [c.reshape(-1, c.shape[-1]) for c in x.unbind() if c.dim()]
            if not parts:
                return
            x = torch.cat(parts)
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != layer.in_features or not (
                x.dtype in (layer.lora_A.dtype, layer.weight.dtype)
                or (x.dtype in _AUTOCAST_CASTS and _autocasting(x))):
            return      # not the layer's input: its forward, which runs next, says why (clora_linear's checks)
        x = _rows(x.detach())
        with _LOCK, _outside_functorch():
            if layer.__dict__.pop("_observed_summed", False):
                # the Gram holds earlier blocks' inputs, summed over the processes already (`observed`): kept
                # apart, and this block's own sum made, so that the next sum over them adds it alone (each
                # block summed the whole Gram again: a second block counted the first one's inputs twice)
                layer._observed_shared = (layer._observed, layer._observed_rows, layer._observed_batches)
                layer._observed, layer._observed_rows = None, 0
            if layer._observed is None:     # fp32 at least, fp64 layers in fp64; a normal tensor (not an
                with torch.inference_mode(False):   # inference one), so that passes in and out of
                    layer._observed = torch.zeros(      # inference_mode all add to it
                        x.shape[1], x.shape[1], device=x.device, dtype=sum_dtype(x.dtype))
                layer._observed_batches = 0     # (the sums' rounding grows with them: `prepare_end_task`)
            x = x.to(layer._observed.dtype)
            layer._observed.addmm_(x.t(), x)
            layer._observed_rows += x.shape[0]
            layer._observed_batches += 1
            layer._observed_empty = False

    def observed(self, layer, group=None) -> None:
        """Several processes (DDP): each observed its share of the task's data; sum the Grams over
        `group` (the replicas' processes; None: the job's), so every process protects the whole task's
        inputs, as one process given all of them would."""
        from .nn import several_processes
        d = layer.__dict__
        # what earlier blocks summed over the processes already: kept apart by `observe` where this block fed
        # the layer, else the Gram itself (this block fed it nothing). Only this block's own inputs are summed
        # (each block summed the whole Gram again: a second block counted the first one's inputs twice); in
        # one process (a run resumed from a multi-process one) the earlier sum is folded back, unsummed
        shared = d.pop("_observed_shared", None)
        if shared is None and d.pop("_observed_summed", False):
            shared, own = (layer._observed, layer._observed_rows, layer._observed_batches), None
        else:
            own = layer._observed
        rows, batches = (layer._observed_rows, getattr(layer, "_observed_batches", 0)) if own is not None else (0, 0)
        several = several_processes(group)
        if several:
            k = layer.in_features
            own = own if own is not None else torch.zeros(k, k, device=layer.lora_A.device, dtype=(
                shared[0].dtype if shared is not None and shared[0] is not None else sum_dtype(layer.lora_A.dtype)))
            counts = torch.tensor([rows, batches], dtype=torch.float64, device=own.device)
            torch.distributed.all_reduce(own, group=group)
            torch.distributed.all_reduce(counts, group=group)
            rows, batches = int(counts[0]), int(counts[1])
        if shared is not None and shared[0] is not None:
            own = shared[0] if own is None else shared[0] + own.to(shared[0].dtype)
            rows, batches = shared[1] + rows, shared[2] + batches
        layer._observed, layer._observed_rows, layer._observed_batches = own, rows, batches
        if several:
            layer._observed_summed = True

    @staticmethod
    def sharded(layer) -> str:
        """Why this policy cannot protect `layer` past its first task ('' when it can)."""
        from .nn import DTensor
        if isinstance(layer.lora_A, DTensor):
            return ("protection='project' does not run on parameters sharded by FSDP2 (fully_shard): its "
                    "projections write the whole factors in place; use 'freeze' or 'paper' there, or DDP")
        return ""

    def not_ready(self, layer) -> str:
        why = self.sharded(layer)
        if why:
            return why
        if layer._observed_rows == 0 and not getattr(layer, "_observed_empty", False):
            return ("protection='project' needs the task's inputs: run a pass over the task's data inside "
                    "`with clora_kernels.observe_task(model):` before end_task")
        if layer._observed is not None and not bool(torch.isfinite(layer._observed).all()):
            dtype = layer._observed.dtype
            # dropped, so that a new pass can replace it (and no earlier empty pass stands in for it)
            forget_observed(layer.__dict__)
            return (f"the inputs observed for protection='project' held NaN/Inf, or values too large for their "
                    f"{dtype} sums of squares "
                    f"(they were dropped); observe the task again inside `with clora_kernels.observe_task(model):` "
                    f"with finite inputs of a size the layer's dtype can square")
        return ""

    def check_loaded(self, tensors: dict) -> str:
        """Why a set of loaded buffers is inconsistent ('' when it is not)."""
        for basis, anchor in (("protect_input_basis", "protect_input_anchor"),
                              ("protect_output_basis", "protect_output_anchor")):
            if tensors[basis].shape[1] != tensors[anchor].shape[1]:
                return (f"{anchor} has {tensors[anchor].shape[1]} columns but {basis} has "
                        f"{tensors[basis].shape[1]}")
        return ""

    # ---- the task boundary ----------------------------------------------------------------
    @torch.no_grad()
    def prepare_end_task(self, layer, routing: Tensor, projection: Tensor) -> dict:
        """Add the task's input directions to U (GPM's rule: new directions of the residual until U
        holds `energy` of the task's input energy), add the task's t and u Grams, and re-derive the
        r-space bases (every direction the earlier tasks' t and u use) and the anchors."""
        dt = layer.lora_A.dtype
        k = layer.in_features     # (a layer the task's pass never reached: no new inputs to protect)
        gram = layer._observed.double() if layer._observed is not None else torch.zeros(
            k, k, dtype=torch.float64, device=layer.lora_A.device)
        # the observed sums' rounding, as a share of the trace: measured about 0.05·√batches·eps (float32,
        # one direction a task: 2.7 eps after 2,000 batches, 11 after 50,000), so max(8, √batches)·eps
        observed = layer._observed is not None
        noise = torch.finfo(layer._observed.dtype if observed else torch.float64).eps * max(
            8.0, math.sqrt(getattr(layer, "_observed_batches", 1) if observed else 1))
        u = grow_input_basis(layer.protect_input_basis.double(), gram, self.energy, noise)
        a = layer.lora_A.double()
        gram_t = a @ gram @ a.t()
        del gram
        r_eff = routing.double()
        # Each task's t and u Grams enter the sums at unit trace, the earlier sums counting as task_index
        # tasks. The r-space bases are the sums' ranges: with raw sums a task whose inputs were small
        # beside an earlier one's (1e-4 of their scale) fell under _range_basis's rtol and lost its
        # protection (a later task moved its outputs 95 %), and float32 sums of large inputs grew to inf
        # over the tasks, committed. (A state saved before holds raw sums: rescaled, or a trace of 1.5e8
        # put every later task under the rtol, 78 %.)
        g_t = _unit_trace(layer.protect_gram_t.double(), layer.task_index) + _unit_trace(gram_t)
        g_u = _unit_trace(layer.protect_gram_u.double(), layer.task_index) + _unit_trace(r_eff.t() @ gram_t @ r_eff)
        w = self._routing_basis(layer, g_t, projection)
        v = _range_basis(g_u)
        # contiguous, as a loaded copy is: the layout changes matmul rounding, and a resumed run
        # must compute what the uninterrupted one does
        u, w, v = u.to(dt).contiguous(), w.to(dt).contiguous(), v.to(dt).contiguous()
        # the anchors as `projected` computes lora_A·U and lora_B·V, with the bases as kept: the factors
        # then meet their new constraints exactly, and the first projection leaves them as they are (the
        # anchors made in float64 and rounded apart moved them by rounding at every end_task, with no
        # training: bf16 0.55 % of the adapter's output after one, 1.4 % after twelve; fp32 1.3e-6)
        with exact_math(layer.lora_A):
            anchors = (layer.lora_A @ u).contiguous(), (layer.lora_B @ v).contiguous()
        return {"protect_input_basis": u, "protect_input_anchor": anchors[0],
                "protect_routing_basis": w, "protect_output_basis": v, "protect_output_anchor": anchors[1],
                "protect_gram_t": g_t.to(sum_dtype(dt)).contiguous(), "protect_gram_u": g_u.to(sum_dtype(dt)).contiguous(),
                # (clora_kernels.end_task(model) warns, naming the layers)
                "no_room": u.shape[1] == u.shape[0] and w.shape[1] == layer.rank and v.shape[1] == layer.rank}

    def end_task(self, layer, prepared=None) -> None:
        for name, value in prepared.items():
            if name != "no_room":
                setattr(layer, name, value)
        forget_observed(layer.__dict__)
        layer._enforced_versions = None
        layer._no_room = prepared["no_room"]


@torch.no_grad()
def _keep_values(layer, tensors) -> None:
    """The enforced values of lora_A, routing_delta and lora_B, kept for `Project.enforce` (one more copy
    of the adapter per project layer; not pickled, dropped by a move or cast), written into the last
    copy's buffers (2.3 µs for the three against 7.2 for new clones, CPU machine, r = 8, K = N = 64)."""
    try:
        torch._foreach_copy_(layer.__dict__["_enforced_values"], list(tensors))
    except (KeyError, TypeError, RuntimeError):     # none yet, another shape, or inference tensors
        layer._enforced_values = [t.detach().clone() for t in tensors]


def _unit_trace(gram: Tensor, trace: float = 1.0) -> Tensor:
    """`gram` scaled to the given trace (unchanged when its own is 0)."""
    total = float(torch.trace(gram))
    return gram * (trace / total) if total > 0 and trace > 0 else gram


def grow_input_basis(u: Tensor, gram: Tensor, energy: float, noise: float = 8 * torch.finfo(torch.float64).eps
                     ) -> Tensor:
    """GPM's rule (Saha et al. 2021): the orthonormal basis `u` (K, k) grown by the leading
    eigenvectors of the part of a task's input Gram (K, K) outside it, until `u` holds `energy`
    of the task's input energy; `u` unchanged when it holds enough (or the Gram is 0). Directions
    whose energy is below `noise` of the trace, the rounding level of the Gram's sums, are none of
    the inputs' and are never added: at energy 1.0 a float32 layer whose every task fed one
    direction protected noise (5.6e-8 of the trace), a full basis after 20 of its 32 tasks. (K·eps, a
    matrix rank's usual cut, dropped real directions of wide layers: at K = 2048 U missed 15 % of a
    1/i spectrum at energy 0.99.)"""
    total = float(torch.trace(gram))
    if total <= 0:
        return u
    if u.shape[1]:
        pu = u @ (u.t() @ gram)
        resid = gram - pu - pu.t() + u @ (u.t() @ gram @ u) @ u.t()
    else:
        resid = gram
    ev, vec = torch.linalg.eigh((resid + resid.t()) / 2)
    ev, vec = ev.flip(0).clamp(min=0), vec.flip(1)
    need = energy * total * (1 - 1e-12)
    held = total - float(torch.trace(resid))         # what u already holds of this task
    new = 0 if held >= need else int((held + torch.cumsum(ev, 0) < need).sum().item()) + 1
    new = min(new, gram.shape[0] - u.shape[1], int((ev > noise * total).sum().item()))
    return _signed(torch.linalg.qr(torch.cat([u, vec[:, :new]], 1))[0]) if new else u


def _signed(q: Tensor) -> Tensor:
    """The basis `q` with each column's largest-magnitude entry positive. eigh's and QR's signs are
    arbitrary, and rounding picks them: a DDP job's summed Gram and one process's (the same to 1e-16)
    gave opposite columns, so their saved bases differed though they span the same subspace."""
    if q.shape[1] == 0:
        return q
    sign = torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)


def _range_basis(gram: Tensor, rtol: float = 1e-7) -> Tensor:
    """Orthonormal columns spanning every eigenvector of a PSD r×r Gram matrix whose eigenvalue is
    above rtol × the largest ((r, 0) when the Gram is 0). In r-space no energy share is left out:
    a direction holding 0.75 % of the old u's energy let lora_B move old outputs by 13 % (review,
    inputs in a 5-dimensional subspace at rank 6), and r is small, so protecting it costs little."""
    ev, vec = torch.linalg.eigh((gram + gram.t()) / 2)
    ev, vec = ev.flip(0).clamp(min=0), vec.flip(1)
    if ev.numel() == 0 or float(ev[0]) <= 0:
        return vec[:, :0]
    return _signed(vec[:, :int((ev > rtol * ev[0]).sum().item())])


def make_protection(spec) -> Protection:
    """A fresh policy object from a name ('paper', 'freeze', 'project'), a config dict (what
    `config()` returns), or a policy object (copied, so that layers never share state)."""
    given = spec        # (the error names what the caller gave: a name, not the dict made of it)
    if isinstance(spec, Protection):
        spec = spec.config()
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in _POLICIES:
        raise ValueError(f"protection must be one of {list(_POLICIES)} (or clora_kernels.protection.Project("
                         f"energy=...)), got {given!r}")
    kind = {"paper": Paper, "freeze": Freeze, "project": Project}[spec["name"]]
    args = {k: v for k, v in spec.items() if k != "name"}
    try:
        return kind(**args)
    except TypeError:
        raise ValueError(f"protection {spec['name']!r} takes no options {sorted(args)}") from None

