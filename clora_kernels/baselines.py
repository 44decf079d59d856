"""Baselines that C-LoRA's claim is measured against (docs/design.md section 10).

`per_task_lora`: this project's name for the separate-adapter design that InfLoRA and SD-LoRA build
on, without their extra machinery: each task gets a fresh LoRA branch (lora_A_t, lora_B_t, same
rank and scaling), the branches of earlier tasks are frozen, and the layer adds all of them:

    y = x Wᵀ + b + s · Σ_t (x lora_A_tᵀ) lora_B_tᵀ

With a known task id (task-incremental evaluation, `task_branches`) task j's inputs take the
branches of tasks 0..j alone: the layer as it was when task j trained (one adapter per task, routed
by the task id, as the separate-adapter methods do when the task is given).

k stacked branches are one rank-k·r adapter with a block-diagonal routing matrix: lora_A =
[A_1; …; A_k], lora_B = [B_1 … B_k], R_old = blockdiag(I, …, I, 0) over the frozen branches and
R_delta = blockdiag(0, …, 0, I) over the current one, which is how the tests check it against
the engine's op. Its parameters, adapter storage and compute grow with the number of tasks;
C-LoRA's do not.

`dual_lora`: after DualLoRA (Chen et al., arXiv 2411.00623, "Replay-Free Continual Low-Rank
Adaptation with Dynamic Memory"). What its public abstracts state (the two subspaces v1's, the
calibration v4's): an orthogonal LoRA adapter updated in the subspace orthogonal to earlier
tasks, a residual LoRA adapter updated in the subspace spanned by the tasks' bases, a dynamic memory
that balances them, and a calibration by predicted task identity. What this project chose where the text we could read is silent (its method
section was not available to us; docs/design-notes.md lists the choices):

    y = x Wᵀ + b + s·(x A_oᵀ) B_oᵀ + s·g(x)·(x A_rᵀ) B_rᵀ,      g(x) = ‖x [M, M_t]‖² / ‖x‖²

- M (K, k): the earlier tasks' input bases, grown at each task boundary by GPM's rule
  (`protection.grow_input_basis`, the same energy threshold as protection='project') from the
  task's inputs after training.
- M_t: the current task's own bases, its input directions outside M by the same rule, taken from a
  pass over its data before it trains (`begin_task`, as InfLoRA takes its subspace).
- Orthogonal adapter: A_o = A_o,old + ΔA (I − M Mᵀ) with ΔA trained and A_o,old frozen (folded at
  each boundary); B_o trains on the first task only. The projection is a parametrisation, not a
  gradient filter, so it holds under Adam: an input x in span(M) gets the same orthogonal
  output after every later task (tested).
- Residual adapter ("updated in the residual subspace spanned by task-specific bases without
  interaction across tasks"): A_r = A_r,old + ΔA_r M_t M_tᵀ, folded at each boundary; B_r trains
  on the first task only. An earlier task's inputs, inside M, see neither adapter move (tested).
  (A first version trained it in M, the earlier tasks' bases, with B_r trained from the second
  task on: every later task rewrote the earlier tasks' outputs, and it forgot as much as
  sequential LoRA: digits class-IL Last-Acc 0.775, forgetting 0.219.)
- Dynamic memory: g(x), per row of the input, the share of the input's energy inside the tasks'
  bases; the residual adapter speaks for inputs like the tasks' and fades for others.
- Not implemented: the calibration of the outputs by predicted task identity; every method of
  a table gets the same head (docs/design.md §10).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import exact_math
from .nn import (_check_energy, _finite_real, _lifecycle_step, _replace, replica_group, select_targets,
                 several_processes)
from .protection import grow_input_basis


class _BaselineLinear(nn.Module):
    """What both baselines' layers share: a frozen nn.Linear (shared, not copied), a rank and the
    LoRA scaling alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        most = min(base.in_features, base.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= most:
            raise ValueError(f"rank must be an int in [1, {most}], got {rank!r}")
        if alpha is not None and not _finite_real(alpha):     # (CLoRALinear's rule: inf gave NaN at once)
            raise ValueError(f"alpha must be a finite number or None (None means alpha = rank), got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scaling = float(rank if alpha is None else alpha) / rank

    def _kept_state(self):      # what `_lifecycle_step` reads: the task boundaries run as CLoRALinear's do
        return (self.base.weight,)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class PerTaskLoRALinear(_BaselineLinear):
    """A frozen nn.Linear plus one LoRA branch per task seen so far; only the newest branch
    trains. `next_task()` freezes it and opens a fresh one (lora_B = 0: the output is unchanged)."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha=None):
        super().__init__(base, rank, alpha)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.branches = None        # how many branches the forward adds (None: all; `task_branches`)
        self.next_task()

    @_lifecycle_step
    @torch.no_grad()
    def next_task(self) -> None:
        w = self.base.weight
        for p in list(self.lora_A) + list(self.lora_B):
            p.requires_grad_(False)
            p.grad = None
        a = torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype)))

    def stacked(self):
        """(lora_A (k·r, K), lora_B (N, k·r), R_old, R_delta): the branches as one adapter with a
        block-diagonal routing (frozen branches in R_old, the newest in R_delta)."""
        k, r = len(self.lora_A), self.rank
        a, b = torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B), 1)
        r_old = torch.zeros(k * r, k * r, device=a.device, dtype=a.dtype)
        r_old[:(k - 1) * r, :(k - 1) * r] = torch.eye((k - 1) * r)
        r_delta = torch.zeros_like(r_old)
        r_delta[(k - 1) * r:, (k - 1) * r:] = torch.eye(r)
        return a, b, r_old, r_delta

    def forward(self, input: Tensor) -> Tensor:
        y = self.base(input)
        for a, b in itertools.islice(zip(self.lora_A, self.lora_B), self.branches):
            y = y + self.scaling * F.linear(F.linear(input, a), b)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a state saved after another number of tasks holds that many branches: the layer takes their count
        # first (as DualLoRALinear takes the saved bases' width), the newest training. Before, a fresh model
        # refused a state saved after two tasks (unexpected keys), and a non-strict load dropped the branches
        saved = 0
        while prefix + f"lora_A.{saved}" in state_dict and prefix + f"lora_B.{saved}" in state_dict:
            saved += 1
        if saved and saved != len(self.lora_A):
            # zeros the load overwrites (not next_task's draw from torch's generator), the newest branch training
            # as the newest did before (a frozen layer stays frozen)
            trains = self.lora_A[-1].requires_grad
            a, b = list(self.lora_A)[:saved], list(self.lora_B)[:saved]
            while len(a) < saved:
                a.append(nn.Parameter(torch.zeros_like(self.lora_A[0])))
                b.append(nn.Parameter(torch.zeros_like(self.lora_B[0])))
            for i, (pa, pb) in enumerate(zip(a, b)):
                pa.requires_grad_(trains and i == saved - 1)
                pb.requires_grad_(trains and i == saved - 1)
            self.lora_A, self.lora_B = nn.ParameterList(a), nn.ParameterList(b)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def adapter_state(self) -> dict:
        """What the adapter stores: every branch."""
        return {f"{n}.{i}": t for n, ts in (("lora_A", self.lora_A), ("lora_B", self.lora_B)) for i, t in enumerate(ts)}

    def adapter_numel(self) -> int:
        return sum(t.numel() for t in self.adapter_state().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"branches={len(self.lora_A)}"


class DualLoRALinear(_BaselineLinear):
    """A frozen nn.Linear with DualLoRA's orthogonal and residual adapters (module docstring).
    `begin_task()` before a task trains takes the task's own input directions outside the earlier
    tasks' bases (the residual adapter's subspace, from a pass inside `observe_new_inputs`);
    `next_task()` at its end folds both adapters' trained deltas (the factors keep their values), grows
    the bases from the inputs observed after training and freezes B_o and B_r after the first task.
    The fold alone changes no output, but the gate then reads the grown M instead of [M, M_t], which
    differ where a layer's inputs moved while it trained (one after an adapted layer): on the digits
    MLP the boundary moved fc2's outputs by up to 0.08 and the logits by up to 0.15 (a helper's
    measurement, task-IL, 10 epochs; no prediction changed). The harness's accuracy row for a task
    is taken before its boundary, so that move is counted as forgetting."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha=None, energy: float = 0.99):
        super().__init__(base, rank, alpha)
        _check_energy(energy, "energy")
        self.energy = float(energy)
        w = base.weight
        k, n = base.in_features, base.out_features
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, k, **kw), a=math.sqrt(5)))
        self.lora_B = nn.Parameter(torch.zeros(n, rank, **kw))
        self.res_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, k, **kw), a=math.sqrt(5)))
        self.res_B = nn.Parameter(torch.zeros(n, rank, **kw))
        self.register_buffer("lora_A_old", torch.zeros(rank, k, **kw))
        self.register_buffer("res_A_old", torch.zeros(rank, k, **kw))
        self.register_buffer("bases", torch.zeros(k, 0, **kw))
        self.register_buffer("task_bases", torch.zeros(k, 0, **kw))     # M_t: the current task's own directions
        self.tasks_done = 0
        self.begun = False          # begin_task ran for the task now training
        self._gram, self._observing = None, False

    def _kept_state(self):
        return self.lora_A_old, self.base.weight

    def _outside(self, t: Tensor) -> Tensor:     # t (I − M Mᵀ), rows of t in input space
        m = self.bases
        return t - (t @ m) @ m.t() if m.shape[1] else t

    def orthogonal_A(self) -> Tensor:
        return self.lora_A_old + self._outside(self.lora_A)

    def residual_A(self) -> Tensor:
        m = self.task_bases
        return self.res_A_old + (self.res_A @ m) @ m.t() if m.shape[1] else self.res_A_old

    def gate(self, input: Tensor) -> Tensor:
        """The dynamic memory: ‖x [M, M_t]‖² / ‖x‖² per row, the share of the input's energy in the
        tasks' bases (the earlier ones and the current task's own; 0 before any exist). In float32 at
        least, without autocast (‖x‖² of an ordinary float16 row, K = 1024 and |x| ~ 10, overflows
        65504: the layer gave NaN where nn.Linear does not), each row scaled by its largest entry
        first (the share does not depend on it: a float32 row of 1e19s, K = 16, overflowed to
        inf / inf = NaN, and one of 1e-20s underflowed to a wrong share); returned in x's dtype."""
        dt = torch.promote_types(input.dtype, torch.float32)
        with exact_math(input):
            x = input.to(dt)
            # (the scale detached: the share does not depend on it, and autograd kept 3 more copies of x for it)
            x = x / x.detach().abs().amax(-1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
            inside = None
            for m in (self.bases, self.task_bases):
                if m.shape[1]:
                    e = (x @ m.to(dt)).square().sum(-1, keepdim=True)
                    inside = e if inside is None else inside + e
            if inside is None:
                return input.new_zeros(input.shape[:-1] + (1,))
            return (inside / x.square().sum(-1, keepdim=True).clamp(min=torch.finfo(dt).tiny)).to(input.dtype)

    def forward(self, input: Tensor) -> Tensor:
        if self._observing:
            x = input.detach().reshape(-1, input.shape[-1]).double()
            if self._gram is None:      # a normal tensor (not an inference one), so that batches in and out of
                with torch.inference_mode(False):   # inference_mode all add to it (an in-place add failed)
                    self._gram = x.new_zeros(x.shape[1], x.shape[1])
            self._gram.addmm_(x.t(), x)
        return self.base(input) + self.scaling * F.linear(F.linear(input, self.orthogonal_A()), self.lora_B) \
            + self.residual(input)

    def residual(self, input: Tensor):
        """The residual adapter's output, gated by the dynamic memory (0 before any bases exist)."""
        if not (self.bases.shape[1] or self.task_bases.shape[1]):
            return 0.0
        branch = F.linear(F.linear(input, self.residual_A()), self.res_B)
        return self.scaling * self.gate(input).to(branch.dtype) * branch

    @_lifecycle_step
    @torch.no_grad()
    def begin_task(self) -> None:
        """Before a task trains: M_t, the directions of its inputs (observed in a pass inside
        `observe_inputs`) outside the earlier tasks' bases, by GPM's rule at the layer's energy;
        the residual adapter's new directions stay inside it for the task."""
        why = self.not_ready(begin=True)
        if why:
            raise ValueError(why)
        k = self.bases.shape[1]
        grown = grow_input_basis(self.bases.double(), self._gram, self.energy)
        self.task_bases = grown[:, k:].to(self.bases.dtype).contiguous()
        self._gram = None
        self.begun = True

    def not_ready(self, begin: bool = False) -> str:
        """Why next_task (begin_task with `begin`) cannot run ('' when it can)."""
        if begin and self.begun:
            # a second begin re-projected the trained residual delta into the new task's directions: the
            # earlier task's outputs moved (by up to 2.7 in a helper's attack), silently
            return ("DualLoRALinear.begin_task: the task that began has not ended; run a pass over its data inside "
                    "`with observe_inputs(model):` and next_task(model) before the next task begins")
        if self._gram is None:
            return (f"DualLoRALinear.{'begin_task' if begin else 'next_task'}: no inputs were observed for the task "
                    f"that {'begins' if begin else 'ended'}; run a pass over its data inside `with "
                    f"{'observe_new_inputs' if begin else 'observe_inputs'}(model):` first")
        if not bool(torch.isfinite(self._gram).all()):
            # (the bases' eigendecomposition failed on it, after some layers had moved to the next task)
            return (f"DualLoRALinear.{'begin_task' if begin else 'next_task'}: the inputs observed for the task "
                    f"hold NaN or Inf (did training diverge?); no bases can be taken from them")
        if not begin and not self.begun:
            return ("DualLoRALinear.next_task: begin_task did not run before the task trained, so its residual "
                    "adapter had no subspace and did not train; run a pass over the task's data inside `with "
                    "observe_new_inputs(model):` before training it")
        return ""

    @_lifecycle_step
    @torch.no_grad()
    def next_task(self) -> None:
        why = self.not_ready()
        if why:
            raise ValueError(why)
        self.lora_A_old.copy_(self.orthogonal_A())
        self.lora_A.zero_()
        self.res_A_old.copy_(self.residual_A())
        self.res_A.zero_()
        self.bases = grow_input_basis(self.bases.double(), self._gram, self.energy).to(self.bases.dtype).contiguous()
        self.task_bases = self.bases.new_zeros(self.bases.shape[0], 0)
        self._gram = None
        self.begun = False
        self.tasks_done += 1
        self.lora_B.requires_grad_(False)         # from the second task on, only the A factors' new directions move
        self.res_B.requires_grad_(False)
        for p in self.parameters():
            p.grad = None

    def task_state(self) -> dict:
        """Everything a resumed run needs (`load_task_state`), on CPU."""
        names = ("lora_A", "lora_B", "res_A", "res_B", "lora_A_old", "res_A_old", "bases", "task_bases")
        return {"tasks_done": self.tasks_done, "begun": self.begun,
                **{n: getattr(self, n).detach().cpu().clone() for n in names}}

    @_lifecycle_step
    @torch.no_grad()
    def load_task_state(self, state: dict) -> None:
        if "task_bases" not in state:
            raise ValueError("DualLoRALinear.load_task_state: a state saved before the residual adapter took the "
                             "task's own bases (no 'task_bases'); it cannot be resumed with this version")
        for n in ("lora_A", "lora_B", "res_A", "res_B", "lora_A_old", "res_A_old"):
            getattr(self, n).copy_(state[n])
        self.bases = state["bases"].to(self.bases).contiguous()
        self.task_bases = state["task_bases"].to(self.bases).contiguous()
        self.tasks_done = int(state["tasks_done"])
        self.begun = bool(state.get("begun", False))
        first = self.tasks_done == 0
        self.lora_B.requires_grad_(first)
        self.res_B.requires_grad_(first)
        self._gram = None

    def get_extra_state(self) -> Tensor:
        """A state_dict carries the task count and whether the task now training began (`begun`), so a
        freshly built model loads it to the same task: which B factors train, what next_task does. A
        tensor, (tasks_done, begun), as CLoRALinear's: safetensors takes no dict."""
        return torch.tensor([self.tasks_done, int(self.begun)], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        if not (isinstance(state, Tensor) and state.shape == (2,) and not state.is_floating_point()):
            raise ValueError(f"DualLoRALinear's task state is a tensor (tasks_done, begun), got {state!r}")
        self.tasks_done, self.begun = int(state[0]), bool(state[1])
        self.lora_B.requires_grad_(self.tasks_done == 0)
        self.res_B.requires_grad_(self.tasks_done == 0)
        self._gram = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the bases grow with the tasks from (K, 0): a fresh layer takes the saved ones' width (size mismatch
        # before); a saved tensor of another height still meets the size check
        for name in ("bases", "task_bases"):
            saved = state_dict.get(prefix + name)
            mine = self._buffers[name]
            if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[0] == mine.shape[0] \
                    and saved.shape[1] != mine.shape[1]:
                self._buffers[name] = mine.new_zeros(saved.shape)
        missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a state_dict of an earlier version has no task state: it loads as it did (the layer's own kept)
        if prefix + "_extra_state" in missing_keys[missing:]:
            missing_keys.remove(prefix + "_extra_state")

    def adapter_state(self) -> dict:
        """What the adapter stores at a task boundary (the trained deltas are folded then): both
        adapters and the bases, which grow with the tasks until they span the input space."""
        return {"lora_A": self.orthogonal_A(), "lora_B": self.lora_B, "res_A": self.residual_A(), "res_B": self.res_B,
                "bases": self.bases}

    def adapter_numel(self) -> int:
        return sum(t.numel() for t in self.adapter_state().values())

    @_lifecycle_step
    def merged(self) -> nn.Module:
        """An inference copy with the orthogonal adapter merged into the weight; the residual one
        stays a branch (the dynamic memory g(x) depends on the input, so it cannot be merged)."""
        return _DualMerged(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bases={self.bases.shape[1]}, energy={self.energy}"


class _DualMerged(nn.Module):
    def __init__(self, layer: DualLoRALinear):
        super().__init__()
        with torch.no_grad():
            w = layer.base.weight + layer.scaling * layer.lora_B @ layer.orthogonal_A()
        self.linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None,
                                device=w.device, dtype=w.dtype).requires_grad_(False)
        with torch.no_grad():
            self.linear.weight.copy_(w)
            if layer.base.bias is not None:
                self.linear.bias.copy_(layer.base.bias)
        # the residual adapter as it is now, a frozen copy (it moved with a layer that trained on), sharing
        # only the frozen base
        self.layer = copy.deepcopy(layer, {id(layer.base): layer.base}).requires_grad_(False)
        self.layer._gram, self.layer._observing = None, False

    def forward(self, input: Tensor) -> Tensor:
        return self.linear(input) + self.layer.residual(input)


@contextlib.contextmanager
def observe_inputs(model: nn.Module, group=None):
    """The baselines' counterpart of `observe_task`: DualLoRALinear layers record their inputs'
    Gram during the pass (for the next `next_task`). In a multi-process job (DDP) the Grams are
    summed over the processes at the block's end, as observe_task sums them (`group`: its meaning
    there), so every replica takes the same bases, those of the whole task. As there, without a DDP
    wrapper or `group` every process of the job takes part: models trained apart in one job (a sweep
    under torchrun) pass their own group."""
    layers = [m for _, m in baseline_layers(model) if isinstance(m, DualLoRALinear)]
    group = replica_group(model, group)
    for m in layers:
        m._observing, m._gram = True, None
    try:
        yield model
    except BaseException:
        for m in layers:
            m._gram = None
        raise
    else:
        if several_processes(group):
            _sum_grams(layers, group)
    finally:
        for m in layers:
            m._observing = False


def _sum_grams(layers, group) -> None:
    """Each process observed its share of the task: every layer's Gram summed over `group` (a process
    that fed a layer no batch adds zeros; a layer no process fed keeps none)."""
    for m in layers:
        k, w = m.in_features, m.base.weight
        gram = m._gram if m._gram is not None else torch.zeros(k, k, device=w.device, dtype=torch.float64)
        fed = torch.tensor([float(m._gram is not None)], dtype=torch.float64, device=gram.device)
        torch.distributed.all_reduce(gram, group=group)
        torch.distributed.all_reduce(fed, group=group)
        m._gram = gram if fed.item() else None


@contextlib.contextmanager
def observe_new_inputs(model: nn.Module, group=None):
    """Entered for a pass over a task's training data before it trains: each DualLoRALinear then
    takes the task's own input directions (`begin_task`) for its residual adapter (`group`: as
    observe_inputs). A task that began and has not ended (next_task) is refused before the pass.
    A layer left without room (its earlier tasks' bases span its inputs, and the task brings no
    direction outside them: neither adapter can move) is named in a warning."""
    layers = [(n, m) for n, m in baseline_layers(model) if isinstance(m, DualLoRALinear)]
    for name, m in layers:
        if m.begun:
            raise ValueError(f"{m.not_ready(begin=True)} (layer {name!r}; no layer was changed)")
    with observe_inputs(model, group):
        yield model
    for name, m in layers:          # every layer checked first: on an error none has begun
        why = m.not_ready(begin=True)
        if why:
            raise ValueError(f"{why} (layer {name!r}; no layer was changed)")
    for _, m in layers:
        m.begin_task()
    full = [name for name, m in layers if m.bases.shape[1] == m.in_features]
    if full:
        warnings.warn(f"dual_lora: {len(full)} layer(s) have no input direction left outside the earlier tasks' "
                      f"bases, so neither adapter can move there for this task: {full[:8]}", UserWarning,
                      stacklevel=3)


@contextlib.contextmanager
def task_branches(model: nn.Module, task: int):
    """Inside the block every PerTaskLoRALinear adds the branches of tasks 0..task alone: the model
    as it was when `task` trained (task-incremental evaluation, where the task id is given; the
    later branches were trained on other tasks). Other layers are untouched."""
    layers = [m for _, m in per_task_layers(model)]
    count = min((len(m.lora_A) for m in layers), default=0)
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < count:
        raise ValueError(f"task_branches: task must be an int in [0, {count}) (the branches opened), got {task!r}")
    saved = [m.branches for m in layers]
    for m in layers:
        m.branches = task + 1
    try:
        yield model
    finally:
        for m, b in zip(layers, saved):
            m.branches = b


def inject_per_task_lora(model: nn.Module, target_modules, rank: int = 16, alpha=None) -> nn.Module:
    """Wrap the targeted nn.Linear layers (inject_clora's forms) in PerTaskLoRALinear; freeze the rest."""
    return _inject(model, target_modules, lambda m: PerTaskLoRALinear(m, rank, alpha), "inject_per_task_lora", rank)


def inject_dual_lora(model: nn.Module, target_modules, rank: int = 16, alpha=None, energy: float = 0.99) -> nn.Module:
    """Wrap the targeted nn.Linear layers (inject_clora's forms) in DualLoRALinear; freeze the rest."""
    return _inject(model, target_modules, lambda m: DualLoRALinear(m, rank, alpha, energy), "inject_dual_lora",
                   rank)


def _inject(model, target_modules, make, what: str, rank: int) -> nn.Module:
    """Layers injected by an earlier call keep their adapters trainable, and their own frozen `base`
    is no target; a layer that is not a plain nn.Linear (transformers' Conv1D, which inject_clora
    adapts) is refused by name rather than skipped: a comparison with C-LoRA ran on other layers. On
    a refusal the model is as it was (a layer built before it had frozen its base)."""
    held = [n for n, _ in baseline_layers(model)]
    inside = tuple(n + "." for n in held)
    names = [n for n in select_targets(model, target_modules, rank=rank) if not n.startswith(inside)]
    if not names:
        already = f"the model holds baseline layers already ({held[:8]}) and " if held else ""
        raise ValueError(f"{what}: {already}no nn.Linear matches target_modules={target_modules!r}")
    other = {n: type(model.get_submodule(n)).__name__ for n in names if type(model.get_submodule(n)) is not nn.Linear}
    if other:
        raise ValueError(f"{what}: the baselines wrap plain nn.Linear layers only, and target_modules="
                         f"{target_modules!r} names {len(other)} other(s): {list(other.items())[:8]}; leave them out "
                         f"(exclude them from the targets) to compare on the same layers")
    trainable = {id(p) for _, m in baseline_layers(model) for p in m.parameters() if p.requires_grad}
    before = [(p, p.requires_grad) for p in model.parameters()]
    new = []
    for n in names:     # every layer built before any is replaced
        try:
            new.append((n, make(model.get_submodule(n))))
        except (TypeError, ValueError) as exc:
            for p, flag in before:
                p.requires_grad_(flag)
            raise type(exc)(f"{what}: layer {n!r}: {exc}; the model was not changed") from None
    trainable |= {id(p) for _, layer in new for p in layer.parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in new:
        _replace(model, n, layer)
    for _, m in baseline_layers(model):     # (the new layers and those of an earlier call)
        for p in m.parameters():
            p.requires_grad_(id(p) in trainable)
    return model


def baseline_layers(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (PerTaskLoRALinear, DualLoRALinear))]


def per_task_layers(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PerTaskLoRALinear)]


def next_task(model: nn.Module) -> None:
    """The task boundary of the baselines' layers: per_task_lora freezes every layer's current
    branch and opens a fresh one; dual_lora folds and grows its bases. Every layer is checked
    first: on an error no layer has changed."""
    layers = baseline_layers(model)
    if not layers:
        raise ValueError("next_task: the model has no PerTaskLoRALinear or DualLoRALinear layers (call "
                         "inject_per_task_lora or inject_dual_lora first)")
    for name, m in layers:
        why = m.not_ready() if isinstance(m, DualLoRALinear) else ""
        if why:
            raise ValueError(f"{why} (layer {name!r}; no layer was changed)")
    for _, m in layers:
        m.next_task()


def task_position(model: nn.Module):
    """The task the baselines' layers are set up to train (per_task_lora: its newest branch's;
    dual_lora: the number of tasks folded), or None when the model has none; a ValueError when
    the layers disagree."""
    at = {name: len(m.lora_A) - 1 if isinstance(m, PerTaskLoRALinear) else m.tasks_done
          for name, m in baseline_layers(model)}
    if len(set(at.values())) > 1:
        raise ValueError(f"the baselines' layers are at different tasks: {at}")
    return next(iter(at.values()), None)
