"""Cost as tasks grow: one model trained on T short tasks, C-LoRA's recommended recipe against
per_task_lora (a fresh LoRA branch per task, earlier branches frozen) and dual_lora (after DualLoRA:
an orthogonal and a residual adapter and the earlier tasks' input bases; clora_kernels/baselines.py).

    python benchmarks/task_scaling.py --json runs/task_scaling.json --plot runs/task_scaling.png
    python benchmarks/task_scaling.py --quick          # T = 1, 3 in seconds (the test runs this)

The model is a stack of MiniLM-sized encoder layers without attention (per layer the six linears
of a BERT layer: query/key/value/output 384→384, intermediate 384→1536, output 1536→384; attention
does not touch the adapters); the tasks are synthetic (random inputs, a 2-class head per task),
`--steps` Adam steps each. Recorded after the tasks of `--checkpoints`: the training step time of
that task (median, after a warm-up step), the training-state bytes (parameters that train, times 4:
the value, its gradient and Adam's two moments; plus everything the adapter stores), the trainable
and the stored adapter parameters, the adapter file's size, and the inference latency (median of
`--repeats` no-grad forwards) unmerged and merged (dual_lora: its orthogonal adapter merged, the
residual one a branch, since its dynamic memory depends on the input). dual_lora observes each
task's inputs (one no-grad pass over the task's batch) for its bases. Measured as ratios to T = 5
in one process run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import clora_kernels as ck                                      # noqa: E402
from clora_kernels._io import parent_made, provenance, write_json_atomic     # noqa: E402
from clora_kernels import baselines                             # noqa: E402

METHODS = ("clora_freeze", "per_task_lora", "dual_lora")
BASELINES = {"per_task_lora": baselines.inject_per_task_lora, "dual_lora": baselines.inject_dual_lora}
TARGETS = ["query", "key", "value", "attn_out", "intermediate", "output"]


class Layer(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.query, self.key, self.value, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.intermediate, self.output = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn_out(self.query(x) + self.key(x) + self.value(x))
        return x + self.output(F.gelu(self.intermediate(x)))


class Encoder(nn.Module):
    def __init__(self, d: int = 384, ffn: int = 1536, layers: int = 2, classes: int = 2):
        super().__init__()
        self.layers = nn.Sequential(*(Layer(d, ffn) for _ in range(layers)))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layers(x).mean(1))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _adapter_numel(model, method) -> int:
    if method in BASELINES:
        return sum(m.adapter_numel() for _, m in baselines.baseline_layers(model))
    return sum(getattr(m, t).numel() for _, m in ck.nn.clora_layers(model)
               for t in ("lora_A", "lora_B", "routing_old", "routing_delta", "projection") + m.protection.buffers)


def _file_bytes(model, method) -> int:
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        if method in BASELINES:
            save_file({f"{n}.{k}": t.detach().contiguous() for n, m in baselines.baseline_layers(model)
                       for k, t in m.adapter_state().items()}, path)
        else:
            ck.save_adapter(model, path)
        return os.path.getsize(path)


def _merged_latency(model, method, x, repeats) -> float:
    if method in BASELINES:                  # per_task_lora: W + Σ branches; dual_lora: its merged copy
        plain = _merged_baseline(model)
        with torch.no_grad():
            return _median_time(lambda: plain(x), repeats)
    ck.merge(model)
    try:
        with torch.no_grad():
            return _median_time(lambda: model(x), repeats)
    finally:
        ck.unmerge(model)


def _merged_baseline(model):
    import copy
    plain = copy.deepcopy(model)
    for name, m in baselines.baseline_layers(plain):
        if isinstance(m, baselines.DualLoRALinear):
            lin = m.merged()
        else:
            lin = m.base
            with torch.no_grad():
                for a, b in zip(m.lora_A, m.lora_B):
                    lin.weight.add_(m.scaling * b @ a)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, lin)
    return plain


def run(method: str, args) -> list:
    torch.manual_seed(0)
    model = Encoder(args.hidden, 4 * args.hidden, args.layers)
    if method in BASELINES:
        BASELINES[method](model, TARGETS, rank=args.rank)
    else:
        ck.inject_clora(model, target_modules=TARGETS, rank=args.rank, backend="torch")   # protection="freeze"
    model.head.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(1, args.tokens, args.hidden, generator=g)
    rows = []
    for t in range(1, max(args.checkpoints) + 1):
        x = torch.randn(args.batch, args.tokens, args.hidden, generator=g)
        y = torch.randint(0, 2, (args.batch,), generator=g)
        if method == "dual_lora":           # its residual adapter's subspace: the task's inputs, before it trains
            with torch.no_grad(), baselines.observe_new_inputs(model):
                model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            if method == "clora_freeze":
                loss = loss + 0.01 * ck.orthogonality_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:                        # the first step of a task warms up (new optimizer state)
                times.append(time.perf_counter() - start)
        if t in args.checkpoints:
            trainable = sum(p.numel() for p in params)
            stored = _adapter_numel(model, method)
            with torch.no_grad():
                unmerged = _median_time(lambda: model(x_eval), args.repeats)
            rows.append({"tasks": t, "step_s": statistics.median(times), "trainable": trainable,
                         "adapter_stored": stored, "train_state_bytes": 4 * 4 * trainable + 4 * stored,
                         "adapter_file_bytes": _file_bytes(model, method), "infer_unmerged_s": unmerged,
                         "infer_merged_s": _merged_latency(model, method, x_eval, args.repeats)})
            print(f"{method:14s} T={t:3d} step {rows[-1]['step_s'] * 1e3:7.1f} ms  trainable {trainable:8d}  "
                  f"stored {stored:8d}  file {rows[-1]['adapter_file_bytes']:9d} B  infer {unmerged * 1e3:6.2f} / "
                  f"{rows[-1]['infer_merged_s'] * 1e3:6.2f} ms", flush=True)
        if method in BASELINES:
            with torch.no_grad(), baselines.observe_inputs(model):
                model(x)
            baselines.next_task(model)
        else:
            ck.end_task(model)
    return rows


KEYS = ("step_s", "train_state_bytes", "trainable", "adapter_stored", "adapter_file_bytes", "infer_unmerged_s",
        "infer_merged_s")


def growth(rows: list, base_t: int) -> dict:
    """Each metric at the largest T as a ratio to T = base_t."""
    first = next(r for r in rows if r["tasks"] == base_t)
    return {k: rows[-1][k] / first[k] for k in KEYS}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("step_s", "training step (s)"), ("adapter_stored", "adapter parameters stored"),
              ("adapter_file_bytes", "adapter file (bytes)"), ("infer_unmerged_s", "inference, unmerged (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        for method, rows in results.items():
            ax.plot([r["tasks"] for r in rows], [r[key] for r in rows], marker="o", label=method)
        ax.set_xlabel("tasks T")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(parent_made(path), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    ap.add_argument("--steps", type=int, default=6, help="Adam steps per task")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="T = 1, 3, small layers (seconds)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.checkpoints, args.hidden, args.steps, args.repeats, args.tokens = [1, 3], 64, 3, 3, 16
    if min(args.checkpoints) < 1 or min(args.steps, args.hidden, args.layers, args.rank, args.batch, args.tokens,
                                        args.repeats) < 1 or args.steps < 2:
        ap.error("checkpoints, hidden, layers, rank, batch, tokens and repeats must be >= 1, steps >= 2")
    args.checkpoints = sorted(set(args.checkpoints))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {m: run(m, args) for m in METHODS}
    base_t = 5 if 5 in args.checkpoints else args.checkpoints[0]
    table = {m: growth(rows, base_t) for m, rows in results.items()}
    print(f"\ngrowth from T={base_t} to T={args.checkpoints[-1]} (ratio):")
    print(f"{'method':14s} " + " ".join(f"{k:>18s}" for k in KEYS))
    for m, g in table.items():
        print(f"{m:14s} " + " ".join(f"{g[k]:18.2f}" for k in KEYS))
    out = {"meta": {"hidden": args.hidden, "layers": args.layers, "rank": args.rank, "steps": args.steps,
                    "batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(),
                    "growth_from": base_t, **provenance("benchmarks/task_scaling.py")},
           "results": results, "growth": table}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json_atomic(args.json, out)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
