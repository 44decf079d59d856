"""Continual learning with C-LoRA: a task loop, the standard metrics, and `clora-continual`, a
real-data experiment on scikit-learn's digits (shipped in clora_kernels/data; nothing is
downloaded).

Task loop (`train_sequence`): for each task, train with the task loss (+ lambda_orth ·
orthogonality_loss for C-LoRA), call `end_task` at the boundary (C-LoRA), then evaluate every task
seen so far. Settings: class-incremental (one shared head; at evaluation the prediction is taken
over every class seen so far, classes of later tasks stay masked) and task-incremental (the task
id is given: prediction over that task's classes). Training uses the current task's logits only,
as prompt- and adapter-based continual learners (L2P, CODA-Prompt, C-LoRA) do, so what is
forgotten is what the shared representation forgets.

Metrics, as the continual-learning literature defines them, from the accuracy matrix a[i][j]
(accuracy on task j after training task i, j <= i):
    Last-Acc   = mean_j a[T-1][j]
    Inc-Acc    = mean_i ( mean_{j<=i} a[i][j] )
    Forgetting = mean_{j<T-1} ( max_{j<=l<T-1} a[l][j] - a[T-1][j] )
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import end_task, inject_clora, orthogonality_loss
from ._io import provenance, write_json_atomic
from .nn import clora_layers

SETTINGS = ("class-il", "task-il")
OPTIMIZERS = ("adam", "sgd")
METHODS = ("clora_soft", "clora_hard", "seq_lora", "full_ft")


@dataclass
class Task:
    classes: tuple
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# ---- metrics ---------------------------------------------------------------------------------
def _check_matrix(acc) -> int:
    t = len(acc)
    if t == 0:
        raise ValueError("accuracy matrix is empty")
    for i, row in enumerate(acc):
        if len(row) < i + 1:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} entries; it needs a[{i}][0..{i}]")
    return t


def last_accuracy(acc) -> float:
    t = _check_matrix(acc)
    return statistics.fmean(acc[t - 1][:t])


def incremental_accuracy(acc) -> float:
    t = _check_matrix(acc)
    return statistics.fmean(statistics.fmean(acc[i][:i + 1]) for i in range(t))


def average_forgetting(acc) -> float:
    t = _check_matrix(acc)
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
        if len(task.classes) == 0 or task.train_x.shape[0] == 0 or task.test_x.shape[0] == 0:
            raise ValueError(f"task {i} is empty (classes {tuple(task.classes)}, {task.train_x.shape[0]} train "
                             f"and {task.test_x.shape[0]} test samples)")
        again = seen & set(task.classes)
        if again:
            raise ValueError(f"task {i} has classes {sorted(again)} that an earlier task already had")
        if max(task.classes) >= num_classes:
            raise ValueError(f"task {i} has class {max(task.classes)} but the head has only {num_classes} outputs")
        labels = set(int(c) for c in task.train_y.unique().tolist()) | set(int(c) for c in task.test_y.unique().tolist())
        if not labels <= set(task.classes):
            raise ValueError(f"task {i} holds labels {sorted(labels - set(task.classes))} outside its classes")
        seen |= set(task.classes)


def _masked(logits, classes):
    mask = torch.full_like(logits, float("-inf"))
    mask[:, list(classes)] = 0.0
    return logits + mask


@torch.no_grad()
def evaluate(model, task: Task, allowed) -> float:
    model.eval()
    pred = _masked(model(task.test_x), allowed).argmax(-1)
    model.train()
    return float((pred == task.test_y).float().mean())


def train_sequence(model: nn.Module, tasks, *, head: str = "head", clora: bool = True, setting: str = "class-il",
                   epochs: int = 10, lr: float = 5e-3, lambda_orth: float = 0.01, batch_size: int = 32,
                   freeze_factors: bool = False, optimizer: str = "adam", seed: int = 0, progress: bool = True,
                   desc: str = "") -> list:
    """Train `model` on the tasks in order; return the accuracy matrix (list of rows, row i
    holding a[i][0..i]). Only parameters that require grad are trained.

    freeze_factors (C-LoRA only): after the first task, stop training lora_A / lora_B, so later
    tasks learn through routing_delta (and the head) alone and the frozen route's output cannot
    drift. Off by default (DESIGN.md's semantics: the factors keep learning through the new
    route). README "Continual learning" shows what each choice does on the digits sequence.

    optimizer: "adam" (torch.optim.Adam) or "sgd" (torch.optim.SGD, momentum 0.9), fresh per task.
    The choice matters to C-LoRA: Adam rescales each coordinate's step to about lr, so the factors
    move at full speed even while their gradient through the small new route is tiny, and the
    frozen old route drifts; with SGD the step is proportional to that gradient."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    head_mod = model.get_submodule(head)
    if not isinstance(head_mod, nn.Linear):
        raise ValueError(f"model.{head} must be an nn.Linear head, got {type(head_mod).__name__}")
    validate_tasks(tasks, head_mod.out_features)
    if clora and not clora_layers(model):
        raise ValueError("train_sequence(clora=True): the model has no CLoRALinear layers (call inject_clora first)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(seed)
    acc = []
    model.train()
    for i, task in enumerate(tasks):
        opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
               else torch.optim.SGD(params, lr=lr, momentum=0.9))
        n = task.train_x.shape[0]
        for _ in tqdm(range(epochs), desc=f"{desc} task {i} {tuple(task.classes)}", leave=False,
                      disable=not progress, file=sys.stderr):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                logits = _masked(model(task.train_x[idx]), task.classes)
                loss = F.cross_entropy(logits, task.train_y[idx])
                if clora and lambda_orth:
                    loss = loss + lambda_orth * orthogonality_loss(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"training diverged on task {i} {tuple(task.classes)}: the loss is "
                                         f"{float(loss.detach())} (lower the learning rate, now {lr:g} with {optimizer})")
        if clora:
            end_task(model)
            if freeze_factors:
                for _, layer in clora_layers(model):
                    layer.lora_A.requires_grad_(False)
                    layer.lora_B.requires_grad_(False)
        seen = [c for t in tasks[:i + 1] for c in t.classes]
        acc.append([evaluate(model, t, seen if setting == "class-il" else t.classes) for t in tasks[:i + 1]])
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
    tasks = []
    for classes in task_classes or [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]:
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


def build_method(base: MLP, method: str, rank: int, protect_energy: float, grad_through_old_route: bool):
    """(model, uses_clora) for one method, from a copy of the pre-trained base."""
    model = copy.deepcopy(base)
    if method == "full_ft":
        return model, False
    mode = "hard" if method == "clora_hard" else "soft"
    inject_clora(model, target_modules=("fc1", "fc2"), rank=rank, mode=mode, protect_energy=protect_energy,
                 grad_through_old_route=grad_through_old_route, backend="torch")
    model.head.requires_grad_(True)
    if method == "seq_lora":        # plain LoRA: routing fixed to I, no regulariser, no end_task folding
        for _, layer in clora_layers(model):
            layer.routing_delta.requires_grad_(False)
        return model, False
    return model, True


def _stats(xs):
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}


def run_experiment(args, progress=True, on_method=None) -> dict:
    pre, tasks = digits_splits()
    methods = {}
    for method in args.methods:
        per_seed = []
        for seed in args.seeds:
            base = pretrain(pre, args.pretrain_epochs, seed)
            model, uses_clora = build_method(base, method, args.rank, args.protect_energy, args.grad_through_old_route)
            torch.manual_seed(seed + 1000)
            acc = train_sequence(model, tasks, clora=uses_clora, setting=args.setting, epochs=args.epochs, lr=args.lr,
                                 lambda_orth=args.lambda_orth if uses_clora else 0.0,
                                 freeze_factors=args.freeze_factors and uses_clora, optimizer=args.optimizer,
                                 seed=seed, progress=progress, desc=f"{method} seed {seed}")
            per_seed.append(acc)
        t = len(tasks)
        mean_matrix = [[statistics.fmean(a[i][j] for a in per_seed) for j in range(i + 1)] for i in range(t)]
        methods[method] = {"last_acc": _stats([last_accuracy(a) for a in per_seed]),
                           "inc_acc": _stats([incremental_accuracy(a) for a in per_seed]),
                           "forgetting": _stats([average_forgetting(a) for a in per_seed]),
                           "acc_matrix": mean_matrix, "acc_matrices": per_seed}
        if on_method:
            on_method(methods)
    return methods


def plot_matrices(methods: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(methods)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():
    ap = argparse.ArgumentParser(prog="clora-continual", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10, help="epochs per task")
    ap.add_argument("--quick", action="store_true", help="reduced run: 4 epochs per task, seeds 0 1")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--setting", choices=SETTINGS, default="class-il")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                    help="adam, or sgd with momentum 0.9 (then pass an SGD-sized --lr, e.g. 0.02)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--lambda-orth", type=float, default=0.01)
    ap.add_argument("--protect-energy", type=float, default=0.9)
    ap.add_argument("--grad-through-old-route", action="store_true")
    ap.add_argument("--freeze-factors", action="store_true",
                    help="C-LoRA: train lora_A/lora_B on the first task only (routing-only afterwards)")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 4, [0, 1]
    if args.epochs <= 0 or args.rank <= 0 or not args.seeds or not args.lr > 0:
        raise SystemExit("clora-continual: --epochs, --rank and --lr must be positive and --seeds non-empty")
    meta = {"data": "scikit-learn digits (UCI optical recognition of handwritten digits), 5 tasks x 2 classes",
            "setting": args.setting, "seeds": args.seeds, "epochs": args.epochs, "rank": args.rank, "lr": args.lr,
            "optimizer": args.optimizer, "lambda_orth": args.lambda_orth, "protect_energy": args.protect_energy,
            "grad_through_old_route": args.grad_through_old_route, "freeze_factors": args.freeze_factors,
            "pretrain_epochs": args.pretrain_epochs, **provenance("clora-continual")}

    def save(methods):
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "methods": methods})   # after every method

    try:
        methods = run_experiment(args, progress=not args.no_progress, on_method=save)
    except FloatingPointError as exc:
        raise SystemExit(f"clora-continual: {exc}") from None
    if args.plot:
        plot_matrices(methods, args.plot)
    print(f"\n{meta['command']}\n{meta['data']}; {args.setting}; seeds {args.seeds}; {args.epochs} epochs/task")
    print(f"{'method':12s} {'Last-Acc':>16s} {'Inc-Acc':>16s} {'Forgetting':>16s}")
    for name, m in methods.items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("last_acc", "inc_acc", "forgetting")]
        print(f"{name:12s} " + " ".join(f"{c:>16s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
