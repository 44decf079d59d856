"""Host cost of the working tree's CLoRALinear against an earlier commit's, in one process.

On the 2-core CPU machine the speed drifts 10-30 % between processes, so a change of a few µs per
call cannot be seen by running overhead_probe.py before and after it. This script imports the
package of a git revision (default HEAD) beside the working tree's, as `clora_ab_<rev>` with its
ops registered under that namespace, builds both layers on the same frozen base beside the
hand-written LoRA of overhead_probe.py, and times all three interleaved (the order alternating
by round). It prints min / median µs per call, each layer's ratio to the hand-written one, and
the median of new/old paired by round: the figure to quote for a change.
Usage: python benchmarks/host_ab.py [--rev REV] [--shape M K N R] [--rounds N] [--threads N]
"""
import argparse
import atexit
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# this checkout's package before anything imports one (overhead_probe does): from a second checkout
# sharing an editable venv, the installed one was timed as "the working tree"
sys.path.insert(0, ROOT)
import clora_kernels as new  # noqa: E402
from clora_kernels._cli import positive_int  # noqa: E402


def import_revision(rev: str):
    """The package as it was at `rev`, imported under another name (ops in their own namespace)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    name = f"clora_ab_{sha}"
    blob = subprocess.run(["git", "archive", sha, "clora_kernels"], cwd=ROOT, check=True, capture_output=True).stdout
    where = tempfile.mkdtemp(prefix="clora_ab_")
    atexit.register(shutil.rmtree, where, True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(where, filter="data")
    pkg = os.path.join(where, name)
    os.rename(os.path.join(where, "clora_kernels"), pkg)
    for folder, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    text = fh.read()
                text = (text.replace("clora::", f"{name}::").replace("torch.ops.clora.", f"torch.ops.{name}.")
                        .replace("import clora_kernels._C", f"import {name}._C"))
                with open(path, "w") as fh:
                    fh.write(text)
    sys.path.insert(0, where)
    return importlib.import_module(name), sha


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="HEAD", help="the revision to compare the working tree against")
    ap.add_argument("--shape", type=positive_int, nargs=4, default=(1, 64, 64, 4), metavar=("M", "K", "N", "R"))
    ap.add_argument("--rounds", type=positive_int, default=15)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args()
    m, k, n, r = args.shape
    if r > min(k, n):
        ap.error(f"argument --shape: R = {r} must be <= min(K, N) = {min(k, n)}")
    torch.set_num_threads(args.threads)
    if os.path.dirname(os.path.abspath(new.__file__)) != os.path.join(ROOT, "clora_kernels"):
        ap.error(f"the clora_kernels imported is {new.__file__}, not this checkout's ({ROOT})")
    sys.path.insert(0, HERE)
    import overhead_probe as probe          # its hand-written LoRA, on the CPU in fp32
    probe.dev, probe.dt = "cpu", torch.float32
    try:
        old, sha = import_revision(args.rev)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        ap.error(f"argument --rev: git could not read {args.rev!r} ({err.strip()})")
    base = torch.nn.Linear(k, n).requires_grad_(False)
    layers = {"hand": probe.HandLoRA(base, r)}
    for name, lib in ((sha, old), ("tree", new)):
        layer = lib.CLoRALinear.from_linear(base, rank=r)     # first task: lora_A, lora_B, routing_delta train
        with torch.no_grad():
            layer.lora_B.normal_()
        layers[name] = layer
    x = torch.randn(m, k)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(m, n)
    modes = {"inference": lambda f: lambda: f(x), "fwd with grad": lambda f: lambda: f(xg),
             "fwd+bwd": lambda f: probe.train_step(f, xg, g)}

    def per_call(fn, calls):
        fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - start) / calls

    times = {}
    for rnd in range(args.rounds):
        order = list(layers.items()) if rnd % 2 == 0 else list(layers.items())[::-1]
        for name, layer in order:
            for mode, make in modes.items():
                calls = 300 if mode == "fwd+bwd" else 800
                with torch.set_grad_enabled(mode != "inference"):
                    times.setdefault((name, mode), []).append(per_call(make(layer), calls))
    print(f"host us per call, CPU, M={m} K={k} N={n} r={r} fp32, {args.threads} thread(s), {args.rounds} "
          f"interleaved rounds, torch {torch.__version__}; {sha} against the working tree")
    print(f"  {'mode':14s} {'hand min/med':>14s} {sha + ' min/med':>16s} {'tree min/med':>14s}"
          f" {sha + '/hand':>12s} {'tree/hand':>10s} {'tree/' + sha + ' paired':>20s}")
    for mode in modes:
        h, o, t = (times[name, mode] for name in ("hand", sha, "tree"))
        paired = statistics.median(a / b for a, b in zip(t, o))
        print(f"  {mode:14s} {min(h):6.1f}/{statistics.median(h):6.1f} {min(o):8.1f}/{statistics.median(o):6.1f}"
              f" {min(t):6.1f}/{statistics.median(t):6.1f} {min(o) / min(h):12.3f} {min(t) / min(h):10.3f}"
              f" {paired:20.3f}")


if __name__ == "__main__":
    main()
