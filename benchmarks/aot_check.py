"""Compile the triton backend's kernels for a GPU this machine does not have, and read the binaries.

Triton compiles for a named target without a device: its ptxas is bundled. This script points
Triton's driver at a stand-in that reports the target (sm_90: H100, sm_80: A100), turns every
kernel launch into a compile-only warm-up, and calls the backend's own `forward` and `dx` once per
plan the tuner would offer (`tune.candidates`, library plans left out), so the kernels are built
with the operand views, constexprs and integer specialisations a real call gives them. For each
distinct binary it reports the shared memory against the target's per-block limit (a config over
it fails at launch there and the tuner skips it), registers, spills (local memory), and whether
the mainloop is on wgmma and TMA. What it cannot tell: speed, or whether the results are right.

    python benchmarks/aot_check.py [--arch 90 80] [--suite quick | --shape M K N ...] [--rank 16 64 128]
                                   [--dtype bfloat16 float16 float32] [--kind fwd dx] [--json PATH]

Exit status 1 when a plan fails to compile or needs more shared memory than its target has. Run it
with TRITON_INTERPRET unset; it needs no GPU and no CUDA build of torch (tensors stay on the CPU,
empty: compiling reads no values). fp32 compiles as on a GPU with torch's default (no tf32).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

# arch -> (what it stands for, largest shared memory per block with opt-in, SMs)
TARGETS = {90: ("H100 SXM (sm_90)", 232448, 132), 80: ("A100 (sm_80)", 166912, 108)}


class _OfflineDriver:
    """Enough of a Triton driver for compiling: the target, device 0, stream 0. Anything else
    (loading or launching a binary) raises."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def offline_target(arch: int, record: list):
    """Kernel launches compile for sm_<arch> instead of running; each returned binary is appended to
    `record`. The backend sees CPU tensors, so the launcher's device checks are stood in for:
    the TMA eligibility test runs its alignment checks only (as under the interpreter); the candidates
    are the tuner's for the target's SM count and shared-memory limit (TARGETS, as a tune.Target)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("aot_check compiles real kernels: run it with TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from clora_kernels.backends.triton import launch
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record.append(kernel)
        return kernel

    saved = (launch._INTERPRETING, driver._active)   # _active: None until used
    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    launch._INTERPRETING = arch >= 90          # tma_eligible: alignment only (CPU tensors); precision: ieee
    try:
        yield
    finally:
        JITFunction.run = run
        launch._INTERPRETING, driver._active = saved


@dataclass
class Binary:
    kernel: str
    plans: set = field(default_factory=set)
    dtype: str = ""
    shared: int = 0
    regs: int = 0
    local: int = 0
    wgmma: bool = False
    tma: bool = False
    num_warps: int = 0
    num_stages: int = 0
    block_r: int = 0


def _resources(cubin: bytes) -> tuple:
    """(registers, local memory bytes) of a cubin, from the cuobjdump bundled with Triton."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in text.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"])


def compile_plans(arch: int, shapes, dtypes, kinds=("fwd", "dx"), bias: bool = True) -> tuple:
    """Compile every Triton plan the tuner offers for each (shape, dtype, kind) on sm_<arch>.
    Returns ({binary hash: Binary}, [(shape, dtype, kind, plan label, error line)])."""
    from clora_kernels.backends.triton import TritonBackend, tune
    from clora_kernels.backends.triton.launch import block_r
    backend = TritonBackend()
    _, smem, sms = TARGETS[arch]
    target = tune.Target(sms=sms, max_shared=smem)
    binaries, errors, record = {}, [], []
    with offline_target(arch, record):
        for s in shapes:
            for dtype in dtypes:
                e = lambda *size: torch.empty(*size, dtype=dtype)  # noqa: E731  (compiling reads no values)
                x, g, weight = e(s.m, s.k), e(s.m, s.n), e(s.n, s.k)
                lora_a, lora_b, r_old, r_delta = e(s.r, s.k), e(s.n, s.r), e(s.r, s.r), e(s.r, s.r)
                b = e(s.n) if bias else None
                for kind in kinds:
                    m, n, k = (s.m, s.n, s.k) if kind == "fwd" else (s.m, s.k, s.n)
                    for plan in tune.candidates(m, n, k, s.r, target, auto=False, tma=arch >= 90,
                                                elt=x.element_size()):
                        record.clear()
                        try:
                            with tune.force_plan(plan):
                                if kind == "fwd":
                                    backend.forward(x, weight, b, lora_a, lora_b, r_old, r_delta, None, 2.0)
                                else:
                                    backend.dx(g, weight, lora_a, lora_b, r_old, r_delta, None, 2.0)
                        except Exception as exc:   # a compile error: what this script is for
                            msg = str(exc).strip().splitlines()
                            errors.append((s, str(dtype)[6:], kind, plan.label, f"{type(exc).__name__}: "
                                           + (msg[-1] if msg else "")))
                        for kern in record:
                            _add(binaries, kern, plan, dtype, block_r(s.r))
    return binaries, errors


def _add(binaries: dict, kern, plan, dtype, block_r) -> None:
    meta = kern.metadata
    h = meta.hash
    if h not in binaries:
        regs, local = _resources(kern.asm["cubin"])
        ptx = kern.asm["ptx"]
        binaries[h] = Binary(meta.name, set(), str(dtype)[6:], meta.shared, regs, local, "wgmma.mma_async" in ptx,
                             "cp.async.bulk.tensor" in ptx, meta.num_warps, meta.num_stages, block_r)
    cfg = plan.gemm
    tiles = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}" if cfg else ""
    binaries[h].plans.add(f"{plan.label} {tiles}".strip())


def _grouped(rows):
    """Binaries that differ only in integer specialisation (M, N, K, strides), one line each."""
    groups = {}
    for b in rows:
        key = (b.kernel, b.dtype, b.block_r, b.num_warps, b.num_stages, b.wgmma, b.tma, ", ".join(sorted(b.plans)))
        groups.setdefault(key, []).append(b)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][7]))


def main(argv=None) -> int:
    from clora_kernels.bench.shapes import Shape, suite_shapes
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(TARGETS))
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--shape", type=int, nargs=3, action="append", metavar=("M", "K", "N"),
                    help="a layer shape instead of the suite's (repeatable)")
    ap.add_argument("--kind", nargs="+", default=["fwd", "dx"], choices=["fwd", "dx"])
    ap.add_argument("--rank", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import triton
    if args.shape:
        shapes = [Shape("cli", "cli", m, k, n, r) for m, k, n in args.shape for r in args.rank if r <= min(k, n)]
    else:
        shapes = suite_shapes(args.suite, ranks=args.rank)
    dtypes = [getattr(torch, d) for d in args.dtype]
    print(f"triton {triton.__version__}, torch {torch.__version__}; {'given shapes' if args.shape else args.suite}, "
          f"ranks {args.rank}, dtypes {args.dtype}: {len(shapes)} shapes x {'/'.join(args.kind)} x every Triton plan "
          f"the tuner offers")
    failed = 0
    out = {"triton": triton.__version__, "torch": torch.__version__, "targets": {}}
    for arch in args.arch:
        name, smem_max, _ = TARGETS[arch]
        t0 = time.time()
        binaries, errors = compile_plans(arch, shapes, dtypes, kinds=args.kind)
        failed += len(errors) + len([b for b in binaries.values() if b.shared > smem_max])
        rows = list(binaries.values())
        over = [b for b in rows if b.shared > smem_max]
        spill = [b for b in rows if b.local]
        print(f"\n== {name}: {len(rows)} binaries in {time.time() - t0:.0f} s; {len(errors)} compile errors, "
              f"{len(over)} over the {smem_max // 1024} KiB shared-memory limit, {len(spill)} with spills ==")
        print(f"{'kernel':20} {'dtype':8} {'R':>3} {'warps':>5} {'stg':>3} {'smem KiB':>8} {'regs':>7} {'spill B':>7} "
              f"{'wgmma':>5} {'tma':>3} {'n':>3}  plans")
        for key, group in _grouped(rows):
            kernel, dtype, block_r, warps, stages, wgmma, tma, plans = key
            smem = max(b.shared for b in group)
            regs = sorted({b.regs for b in group})
            flag = "  OVER THE LIMIT" if smem > smem_max else ""
            print(f"{kernel.replace('_clora_', ''):20} {dtype:8} {block_r:3} {warps:5} {stages:3} {smem / 1024:8.1f} "
                  f"{regs[0]:3}-{regs[-1]:3} {max(b.local for b in group):7} {str(wgmma)[0]:>5} {str(tma)[0]:>3} "
                  f"{len(group):3}  {plans}{flag}")
        for s, dt, kind, label, err in errors:
            print(f"COMPILE ERROR {kind} {dt} M={s.m} K={s.k} N={s.n} r={s.r} {label}: {err}")
        out["targets"][f"sm_{arch}"] = {
            "binaries": [{**b.__dict__, "plans": sorted(b.plans)} for b in rows],
            "errors": [[kind, dt, s.m, s.k, s.n, s.r, label, err] for s, dt, kind, label, err in errors]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
