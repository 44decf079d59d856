"""Strategy and tile selection per GPU and shape bucket (docs/design.md section 4).

Small explicit candidate lists (compile time counts). The first call of a shape bucket times
every candidate with triton.testing.do_bench (median) and keeps the fastest; results are cached
in memory and in a JSON file per GPU (CLORA_CACHE_DIR, default ~/.cache/clora_kernels). Under
backend="auto" the library strategies are candidates too (cuBLAS + shrink, the eager reference's
own ops, and the per-call merged weight), so auto is never slower than any of them. No timing
happens under the interpreter or during CUDA-graph capture: a cached plan or the heuristic
default is used (warm up once before capturing).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from ..._io import cache_dir
from ..auto import merge_allowed
from .launch import (GemmConfig, Plan, ShrinkConfig, block_r, interpreting, max_shared, precision, run, sm_count,
                     tma_eligible, triton_cdiv)


@dataclass(frozen=True)
class Target:
    """What the candidate lists depend on: the GPU's SM count and the shared memory one program may
    use. `target(device)` reads them off a CUDA device; tests and AOT checks pass any GPU's."""
    sms: int
    max_shared: int


H100 = Target(sms=132, max_shared=232448)


def target(device) -> Target:
    return Target(sm_count(device.index), max_shared(device.index))


class PlanKey(NamedTuple):
    """One plan per key: a layer's shape class on one device, in one role."""
    kind: str               # "fwd" or "dx"
    dtype: torch.dtype
    bucket: int             # M rounded up to a power of two (at least 16)
    n: int
    k: int
    rank: int
    has_bias: bool
    has_p: bool
    auto: bool              # library plans allowed (backend="auto")
    tma: bool               # operands TMA-eligible
    device: Optional[int]   # CUDA device index
    need_t: bool            # a gradient reads t


_forced = threading.local()


@contextlib.contextmanager
def force_plan(plan: Plan):
    """Run every Triton call in this thread with `plan` (tests, probes); the cache is not touched."""
    before = getattr(_forced, "plan", None)
    _forced.plan = plan
    try:
        yield plan
    finally:
        _forced.plan = before

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
LARGE_M = [GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 128, 64, 4, 4), GemmConfig(256, 128, 64, 8, 3),
           GemmConfig(64, 256, 64, 4, 4)]
# small M is a stream over W: more, narrower N tiles keep every SM loading
SMALL_M = [GemmConfig(16, 32, 256, 4, 4), GemmConfig(16, 64, 128, 4, 4), GemmConfig(16, 32, 128, 2, 6),
           GemmConfig(32, 64, 128, 4, 4), GemmConfig(64, 128, 64, 4, 4)]
# fp32 inputs without tf32: tl.dot is an FMA loop, no tensor cores. There the tiles above (at half the K depth)
# spilled 0.7-0.8 KiB per thread at r = 16 (12-13 KiB with TMA) and took ~10 s each to compile
# (benchmarks/aot_check.py, triton 3.9, sm_90, r = 16 and 128); these compile without spills at r = 16 in
# ~1 s. TMA is not offered there: 8 of the 9 fp32 TMA tiles tried spilled 2-6 KiB at r = 16.
LARGE_M_FP32 = [GemmConfig(128, 128, 32, 8, 3), GemmConfig(128, 64, 32, 8, 3), GemmConfig(64, 128, 32, 4, 3),
                GemmConfig(64, 64, 32, 4, 3)]
SMALL_M_FP32 = [GemmConfig(16, 32, 64, 2, 3), GemmConfig(16, 64, 64, 4, 3), GemmConfig(32, 32, 64, 4, 3),
                GemmConfig(32, 64, 32, 4, 3)]
INTERPRETER = Plan("fused", GemmConfig(32, 32, 32, 4, 1), ShrinkConfig(32, 32, 1))
LIBRARY = ("cublas", "eager", "merge")   # strategies made of torch/cuBLAS ops: candidates under auto only

_lock = threading.Lock()
_plans: dict = {}    # _key(...) -> Plan
_disk: dict = {}     # "gpu|triton version|..." -> Plan, mirrored in the JSON file
_loaded = False


def fit(cfg: GemmConfig, elt: int, rank: int, smem: int, loads_a: bool = True) -> GemmConfig:
    """`cfg` with as many of its pipeline stages (at least 2) as fit in `smem` bytes of shared memory,
    1 KiB kept for barriers. A stage holds an X, a W and (fused: loads_a) an A tile of `elt`-byte
    elements, (BLOCK_M + BLOCK_N + BLOCK_R)·BLOCK_K of them: compiled by benchmarks/aot_check.py
    (triton 3.9), Triton's wgmma mainloops allocate exactly that per stage, its mma.sync ones at most
    that. Unfitted, the tile lists need up to 264 KiB (rank 128; the H100 allows 227 KiB per program,
    the A100 163) and with fp32 every large-M config 256-368 KiB: each would fail at launch, leaving
    an fp32 layer at M > 64 with no Triton candidate at all."""
    stage = (cfg.block_m + cfg.block_n + (block_r(rank) if loads_a else 0)) * cfg.block_k * elt
    return replace(cfg, num_stages=max(2, min(cfg.num_stages, (smem - 1024) // stage)))


def shrink_config(m: int, k: int, tgt: Target, elt: int = 2) -> ShrinkConfig:
    bm, bk = (16, 256 * 2 // elt) if m <= 64 else (64, 128 * 2 // elt)    # the same bytes per K step at fp32
    blocks = triton_cdiv(m, bm)
    split = max(1, min(triton_cdiv(2 * tgt.sms, blocks), triton_cdiv(k, bk)))
    return ShrinkConfig(bm, bk, split)


def split_k(m: int, n: int, k: int, cfg: GemmConfig, tgt: Target) -> int:
    """K splits for the fused form at small M: enough programs for ~2 per SM where the output
    tiles alone leave SMs idle (at most 16 splits, at least one K block each); 1 = no split."""
    tiles = triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n)
    if tiles >= tgt.sms:
        return 1
    return max(1, min(16, triton_cdiv(2 * tgt.sms, tiles), triton_cdiv(k, cfg.block_k)))


def candidates(m: int, n: int, k: int, rank: int, tgt: Target, auto: bool, tma: bool = False,
               elt: int = 2, dtype=None) -> list:
    """Fused (and fused_tma, also persistent, where the operands allow TMA) and split plans over the tile
    list for the element size `elt` (fp32 without tf32: its own list, no TMA), each fitted to the GPU's
    shared memory (`fit`); with auto, the LIBRARY plans too, `merge` only where `auto.merge_allowed`
    (its transient weight is smaller than the call's output, and x's `dtype` is not float16)."""
    if elt == 4 and precision(torch.float32) == "ieee":
        gemms, tma = (SMALL_M_FP32 if m <= 64 else LARGE_M_FP32), False
    else:    # 2-byte inputs, or tf32 ones at half the K depth: the same bytes per stage
        gemms = [replace(g, block_k=g.block_k * 2 // elt) for g in (SMALL_M if m <= 64 else LARGE_M)]
    if rank > 64:   # a 128-wide t accumulator next to a 128x256 tile spills
        gemms = [g for g in gemms if g.block_n * g.block_m <= 128 * 128] or gemms
    fused = [fit(g, elt, rank, tgt.max_shared) for g in gemms]
    split = [fit(g, elt, rank, tgt.max_shared, loads_a=False) for g in gemms]
    sh = shrink_config(m, k, tgt, elt)
    plans = [Plan("fused", g) for g in fused] + [Plan("split", g, sh) for g in split]
    if m <= 64:   # split-K versions of the narrowest small-M tiles
        plans += [Plan("fused", replace(g, split_k=s)) for g in fused[:3] if (s := split_k(m, n, k, g, tgt)) > 1]
    if tma:
        plans += [Plan("fused_tma", g) for g in fused]
        # persistent where there are more output tiles than SMs (else it is the same grid), and not at
        # rank > 64: its epilogue buffers then need 352-480 KiB (aot_check, sm_90)
        if m > 64 and rank <= 64:
            plans += [Plan("fused_tma", replace(g, persistent=True)) for g in fused
                      if triton_cdiv(m, g.block_m) * triton_cdiv(n, g.block_n) > tgt.sms]
    if auto:
        plans += [Plan("cublas", None, sh), Plan("eager")] + ([Plan("merge")] if merge_allowed(m, k, dtype) else [])
    return plans


def _bucket(m: int) -> int:
    return 1 << max(4, (m - 1).bit_length())


def _cache_path() -> str:
    return cache_dir("triton-plans.json")


def _encode(p: Plan) -> dict:
    return {"strategy": p.strategy, "gemm": p.gemm and p.gemm.__dict__, "shrink": p.shrink and p.shrink.__dict__}


_NEEDS = {"fused": ("gemm",), "fused_tma": ("gemm",), "split": ("gemm", "shrink"), "cublas": ("shrink",),
          "eager": (), "merge": ()}


def _pow2(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi and v & (v - 1) == 0


def _decode(d: dict) -> Plan:
    """A plan read from the cache file, checked field by field: a ValueError names what is wrong
    (an edited, truncated or foreign entry must never reach a kernel launch)."""
    if not isinstance(d, dict) or d.get("strategy") not in _NEEDS:
        raise ValueError(f"unknown strategy {d.get('strategy') if isinstance(d, dict) else d!r}")
    need = _NEEDS[d["strategy"]]
    for part in ("gemm", "shrink"):
        if (d.get(part) is not None) != (part in need):
            raise ValueError(f"strategy {d['strategy']!r} {'needs' if part in need else 'takes no'} {part}")
    gemm = GemmConfig(**d["gemm"]) if d.get("gemm") is not None else None
    shrink = ShrinkConfig(**d["shrink"]) if d.get("shrink") is not None else None
    if gemm is not None and not (all(_pow2(getattr(gemm, f), 8, 512) for f in ("block_m", "block_n", "block_k"))
                                 and _pow2(gemm.num_warps, 1, 32) and type(gemm.num_stages) is int
                                 and 1 <= gemm.num_stages <= 8 and _pow2(gemm.group_m, 1, 64)
                                 and type(gemm.split_k) is int and 1 <= gemm.split_k <= 64
                                 and type(gemm.persistent) is bool):
        raise ValueError(f"bad gemm config {d['gemm']}")
    if shrink is not None and not (_pow2(shrink.block_m, 8, 512) and _pow2(shrink.block_k, 8, 512)
                                   and type(shrink.split_k) is int and 1 <= shrink.split_k <= 1024
                                   and _pow2(shrink.num_warps, 1, 32) and type(shrink.num_stages) is int
                                   and 1 <= shrink.num_stages <= 8):
        raise ValueError(f"bad shrink config {d['shrink']}")
    return Plan(d["strategy"], gemm, shrink)


_warned = set()


def _warn_once(what: str, text: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"clora_kernels: {text}", stacklevel=3)


def _read_file(path: str) -> dict:
    """The valid entries of a plan file ({} when it is missing); bad entries are dropped with one
    warning, an unreadable file gives one warning."""
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn_once("read", f"the Triton plan cache {path} cannot be read ({type(exc).__name__}: {exc}); "
                           f"plans will be tuned again")
        return {}
    good, bad = {}, []
    for k, v in raw.items():
        try:
            good[k] = _decode(v)
        except (ValueError, TypeError) as exc:
            bad.append(f"{k}: {exc}")
    if bad:
        _warn_once("entries", f"dropped {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} of the Triton plan "
                              f"cache {path} (first: {bad[0]}); they will be tuned again")
    return good


def _load() -> None:
    global _loaded
    _loaded = True
    _disk.update(_read_file(_cache_path()))


def _save() -> None:
    """Write the plans under a lock on a sibling file, merged with what other processes wrote
    since (their entries kept, ours added); leftovers of a killed save are removed; the file gets
    the user's umask. A cache that cannot be written gives one warning."""
    path = _cache_path()
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            try:
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:          # not POSIX: no lock, the last writer wins
                pass
            merged = _read_file(path)
            merged.update(_disk)
            _disk.update(merged)
            base = os.path.basename(path)
            for f in os.listdir(folder):      # a killed save's temp file (under the lock no save is live)
                if f.startswith(base + ".") and f.endswith(".tmp"):
                    os.remove(os.path.join(folder, f))
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({k: _encode(v) for k, v in merged.items()}, f, indent=0)
            os.replace(tmp, path)
    except OSError as exc:
        _warn_once("write", f"the Triton plan cache {path} cannot be written ({exc.strerror or exc}); plans are "
                            f"kept in memory only")


def _disk_key(key: PlanKey, device) -> str:
    import triton
    return (f"{torch.cuda.get_device_name(device)}|triton{triton.__version__}|{key.kind}|{str(key.dtype)[6:]}|"
            f"M{key.bucket}|N{key.n}|K{key.k}|r{key.rank}|b{int(key.has_bias)}|p{int(key.has_p)}|"
            f"auto{int(key.auto)}|tma{int(key.tma)}|t{int(key.need_t)}")


def still_allowed(plan: Plan, x) -> bool:
    """Whether a plan read from the file may serve the operand x now: a `merge` plan tuned before
    float16 lost it (`auto.merge_allowed`) is timed again, not served."""
    return plan.strategy != "merge" or merge_allowed(x.shape[0], x.shape[1], x.dtype)


def _key(kind: str, auto: bool, x, w, a, bias, proj, need_t: bool = True) -> PlanKey:
    m, k = x.shape
    return PlanKey(kind, x.dtype, _bucket(m), w.shape[0], k, a.shape[1], bias is not None, proj is not None, auto,
                   tma_eligible(x, w), x.device.index, need_t)


def plan_for(kind: str, auto: bool, x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, need_t=True) -> Plan:
    """The plan for this call: cached per key, else every candidate timed once. need_t=False (no
    gradient will read t) is its own key: the `merge` plan then skips t, so it may win elsewhere."""
    forced = getattr(_forced, "plan", None)
    if forced is not None:
        return forced
    if interpreting():
        return INTERPRETER
    key = _key(kind, auto, x, w, a, bias, proj, need_t)
    plan = _plans.get(key)          # hot path: one dict lookup
    if plan is not None:
        return plan
    with _lock:
        if not _loaded:
            _load()
        plan = _disk.get(_disk_key(key, x.device))
    if plan is not None and not still_allowed(plan, x):     # (a plan file written under an older rule)
        plan = None
    if plan is not None:
        _plans[key] = plan
        return plan
    cands = candidates(x.shape[0], w.shape[0], x.shape[1], a.shape[1], target(x.device), auto=True, tma=key.tma,
                       elt=x.element_size(), dtype=x.dtype)
    if torch.cuda.is_current_stream_capturing():
        return cands[0]
    import triton.testing
    timed, errors = [], []
    for cand in cands:     # one pass serves both plans: triton (Triton kernels only) and auto (all)
        try:
            fn = lambda: run(cand, x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, need_t=need_t)  # noqa: E731
            fn()
            timed.append((triton.testing.do_bench(fn, warmup=3, rep=12, return_mode="median"), cand))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:   # e.g. a config that needs more shared memory than this GPU has
            errors.append(f"{cand}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    own = [tc for tc in timed if tc[1].strategy not in LIBRARY]
    if not own:
        raise RuntimeError("every Triton candidate failed to compile or launch: " + " | ".join(errors))
    if errors and os.environ.get("CLORA_TUNE_VERBOSE"):
        warnings.warn("clora_kernels: skipped candidates: " + " | ".join(errors))
    best = {False: min(own, key=lambda tc: tc[0])[1], True: min(timed, key=lambda tc: tc[0])[1]}
    with _lock:
        for flag, plan in best.items():
            kk = key._replace(auto=flag)
            _plans[kk] = plan
            _disk[_disk_key(kk, x.device)] = plan
        _save()
    return best[auto]


def chosen_strategies(m: int, n: int, k: int, rank: int, dtype, auto: bool, training: bool) -> dict:
    """{"fwd": label, "dx": label} (Plan.label) of the plans this process has settled on for a layer
    (x (m, k), weight (n, k)) in training or in inference (where no gradient reads t); what the
    benchmark reports beside its timings."""
    want = {"fwd": (n, k), "dx": (k, n)}      # dx runs on g (m, n) against weightᵀ (k, n)
    return {key.kind: plan.label for key, plan in list(_plans.items())
            if key.dtype == dtype and key.bucket == _bucket(m) and (key.n, key.k) == want[key.kind]
            and key.rank == rank and key.auto == auto and key.need_t == (training or key.kind == "dx")}


def clear_cache() -> None:
    """Forget every plan: in memory and in the cache file (removed; other processes' later saves
    write theirs again)."""
    global _loaded
    with _lock:
        _plans.clear()
        _disk.clear()
        _loaded = True
        try:
            os.remove(_cache_path())
        except FileNotFoundError:
            pass
        except OSError as exc:
            _warn_once("write", f"the Triton plan cache {_cache_path()} cannot be removed ({exc.strerror or exc})")
