"""`auto`: which backend, and which plan of it, runs a call (docs/design.md, "Backends").

Resolution (`run`): an explicit name (argument, else env CLORA_BACKEND) must be usable or raises
one BackendUnavailableError that says why. "auto" takes the first usable of triton, cuda, torch;
a kernel backend that fails to compile or launch under auto is warned about once and skipped for
the rest of the process (`broken`). A backend lists the device types auto may give it
(`auto_devices`): the kernel backends "cuda" only (the Triton interpreter runs on CPU for tests,
by name only), torch every device, so a CPU call under auto goes to torch without asking the others.
`plain` is the first stage of `run`, and what the eager forward asks first: the torch backend where
no kernel backend is tried (backend="torch"; auto on a device no kernel backend serves, every CPU
call), called directly, without run's callback and fallback (measured with benchmarks/host_ab.py,
one thread, M=1, K=N=64, r=4: 1-2 % of a small layer's call, in training and in inference).

Plans under auto:
  GPU, triton   the tuner (`triton/tune.py`) times its fused / split / TMA tile plans beside the
                library plans (cuBLAS + shrink, the eager ops, the per-call merged weight) per shape
                bucket and keeps the fastest: auto is then never slower than any of them.
  CPU (and a GPU without triton or cuda), torch   `torch_plan`: the unmerged ops ("eager") or a
                per-call merged weight ("merge"), by the cost model below (on a GPU: eager). It is a formula, not a
                timing, so a seeded CPU run computes the same numbers every time (a timed choice
                would follow the machine's load).

The cost model (`merge_pays`) counts where the two plans differ (the M×N×K GEMM is in both), in
operand terms (x (M,K) against an (N,K) weight; the dx call has g (M,N) against Wᵀ), in FLOPs:
    eager: t = x·A  M·K·r,  u = t·R  M·r·r,  expand  M·r·N
    merge: A·R  K·r·r,  W_eff  N·K·r  plus 3r per element for writing W_eff and reading W
           (measured, below),  and t = x·A  M·K·r  where a gradient reads it (always in dx: v)
so merge pays at M > K(r + 4N)/(N + r) ≈ 4K with t, and from about 2K without it (inference,
K ≈ N). The 3r was read off the crossover on shapes outside the benchmark suites (K, N in
{64, 200, 640}, M/K from 1.25 to 6, fp32, 2 threads, merged_gemm against lora_gemm): with t,
merge/eager 1.03-1.17 at M/K = 1.25, 1.00-1.14 at 2, 0.90-1.02 at 4, 0.83-0.98 at 6 (one outlier
1.35); without t, 0.96-0.98 at 2, 0.83-0.91 at 4. FLOPs alone (no 3r) would merge from M > K,
where it measured up to 17 % slower. Re-measured after W_eff was built in the base weight's own
layout (`reference.merged_weight`; same grid, K, N in {64, 200, 640}, M/K 1.25 to 4): with t
1.04-1.21 at 1.25K, 0.91-1.12 at 2K, 0.87-1.05 at 3K and 0.88-1.05 at 4K; without t 0.97-1.11,
0.87-1.01, 0.82-0.96 and 0.84-0.96. Where the model merges there, merging measured 0.82-1.05 of
the unmerged time; where it does not, 0.87-1.21, so it leaves up to 13 % (with t, K=64, N=640 at
3K) and 18 % (without t, the same shape at 3K) on the table where N is large against K: the cost of
writing W_eff is not proportional to N·K·r alone. Not refitted: the VM's noise (10-30 % between
runs) is the size of the effect.

Memory and range (`merge_allowed`, the one rule for CPU and GPU, forward and dx): the merge plan is
never a candidate in float16 (W_eff can overflow where the output does not), and only at M > K,
where its transient W_eff (N×K) is smaller than the call's own output (M×N); on CPU the cost model
asks for more anyway. W_eff is recomputed in dx, never kept from the
forward (that would hold one weight per layer across the step). What remains is one transient
weight at a time: benchmarks/peak_memory.py (a ViT-S/16 training step on CPU, rank 16, peak
resident memory above the step's start, two runs each) measures 112.3-113.2 MiB with torch and
112.9-113.1 with auto at batch 2 (no layer merges there); with the current merged-weight layout
914.1-914.4 against 916.4-917.1 at batch 16 (+2.3-2.7 MiB, +0.3 %: about one layer's W_eff) and
3662.4-3662.5 against 3663.8-3664.1 at batch 64 (+0.04 %).
"""
from __future__ import annotations

import warnings

import torch

from . import BackendUnavailableError, _registry, device_type, get, requested_backend

AUTO_ORDER = ("triton", "cuda", "torch")
broken: dict = {}  # name -> reason, backends that failed under "auto"


def reasons(backend, x: torch.Tensor, weight: torch.Tensor, rank: int, auto: bool) -> list:
    """Why `backend` cannot run this call ([] when it can)."""
    ok, why = backend.availability()
    return [why] if not ok else list(backend.not_supported_reasons(x, weight, rank, auto))


def plain(name: str, x: torch.Tensor):
    """(torch backend, auto) where `name` resolves to the torch backend for x with no kernel backend
    to try first, so that no fallback can happen: backend="torch", and "auto" on a device that no
    kernel backend serves under auto (every CPU call). Else None, and `run` resolves the call."""
    name = requested_backend(name)
    if name == "torch":
        return _registry.get("torch") or get("torch"), False
    if name != "auto":
        return None
    dev = device_type(x)
    for cand in AUTO_ORDER[:-1]:
        if dev in (_registry.get(cand) or get(cand)).auto_devices:
            return None
    return _registry.get("torch") or get("torch"), True


def run(name: str, x: torch.Tensor, weight: torch.Tensor, rank: int, fn):
    """fn(backend, auto) on the backend that `name` resolves to for this call (x and weight as the
    backend receives them; rank the adapter's): `plain`'s torch backend where it answers, else an
    explicit kernel backend (which must be usable, or this raises), or auto's kernel backends in
    order, each skipped for the rest of the process once it fails, then torch."""
    resolved = plain(name, x)
    return fn(*resolved) if resolved is not None else run_kernels(name, x, weight, rank, fn)


def run_kernels(name: str, x: torch.Tensor, weight: torch.Tensor, rank: int, fn):
    """`run` where `plain` answered None (for a caller that asked it already): an explicit kernel
    backend, or auto's kernel backends with the fallback, then torch."""
    name = requested_backend(name)
    if name != "auto":      # "triton" or "cuda" ("torch" is plain's)
        backend = get(name)
        why = reasons(backend, x, weight, rank, False)
        if why:
            raise BackendUnavailableError(f"backend {name!r} cannot run this call: " + "; ".join(why))
        return fn(backend, False)
    dev = device_type(x)
    for cand in AUTO_ORDER[:-1]:
        backend = _registry.get(cand) or get(cand)
        if dev not in backend.auto_devices or cand in broken or reasons(backend, x, weight, rank, True):
            continue
        try:
            return fn(backend, True)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a compile or launch failure: warn once, never use it again
            text = str(exc).strip()
            cause = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            broken[cand] = cause
            warnings.warn(f"clora_kernels: backend {cand!r} failed ({cause}); falling back for the rest of "
                          f"this process", RuntimeWarning, stacklevel=3)
    return fn(_registry.get("torch") or get("torch"), True)      # the last of AUTO_ORDER runs every call


def merge_allowed(m: int, k: int, dtype=None) -> bool:
    """Whether the per-call merged weight may serve an (M, K) operand (x, or dx's g) of `dtype`: the
    memory rule above (on CPU the cost model, `merge_pays`, asks for more), and never in float16,
    where W_eff = W + s·ΔW can overflow its range (65504) while the unmerged plan's output is finite
    (e.g. a large scaling on small inputs: a helper's attack found 30 % of the outputs inf)."""
    return m > k and dtype is not torch.float16


def merge_pays(m: int, k: int, n: int, r: int, need_t: bool, dtype=None) -> bool:
    """The cost model above: whether the per-call merged weight is the cheaper plan for an (M, K)
    operand of `dtype` against an (N, K) weight at rank r (and allowed by `merge_allowed`)."""
    if not merge_allowed(m, k, dtype):
        return False
    return k * r * r + 4 * r * n * k + (m * k * r if need_t else 0) < m * r * (k + r + n)   # merge < eager


def torch_plan(x: torch.Tensor, n: int, r: int, need_t: bool) -> str:
    """The torch backend's plan under auto for the operand x (the forward's x, or dx's g) against
    n outputs at rank r: on CPU "merge" where `merge_pays`, else "eager"; on a GPU "eager" (there
    the Triton tuner times both)."""
    if not x.is_cpu:
        return "eager"
    m, k = x.shape      # (m > k: merge_allowed's first rule, asked here first: two calls fewer at small M)
    return "merge" if m > k and merge_pays(m, k, n, r, need_t, x.dtype) else "eager"
