"""Host launchers for the Triton kernels: one `gemm` serving forward and dx through operand
views, one `shrink`, and `run`, which runs any strategy the tuner chooses from:

  fused   one launch: _clora_gemm_kernel(FUSED)            (t recomputed per N tile: r/BLOCK_N extra MMA);
          with GemmConfig.split_k > 1 (small M) two: fp32 partials over K splits + the finish kernel
  fused_tma  the same with TMA-loaded X, W and A tiles      (Hopper+; 16-byte aligned row strides only);
          GemmConfig.persistent: one program per SM walks the output tiles
  split   shrink (u = x·A·R once) + _clora_gemm_kernel(split: u·B as one extra K slab)
  cublas  F.linear (cuBLAS) + shrink + addmm_(beta=1)       (only under backend="auto")
  eager, merge  the torch backend's two plans (`torch_ref.run_plan`: the unmerged ops, or a per-call
          merged weight then one cuBLAS GEMM), only under backend="auto": auto is then never slower
          than either by the tuner's measurement

Operand views (all strides honoured, nothing is copied):
  forward  x (M,K),  W = weight (N,K),    A = lora_Aᵀ (K,r), B = lora_Bᵀ (r,N), R = R_eff
  dx       g (M,N),  W = weightᵀ (K,N),   A = lora_B (N,r),  B = lora_A (r,K),  R = R_effᵀ
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ...reference import expand_, routing_eff
from ..torch_ref import run_plan
from . import kernels

# triton.jit reads TRITON_INTERPRET when it decorates a kernel, so the mode is fixed once kernels.py is
# imported (just above): read once here too
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own switch: tf32 only where torch would use it."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def block_r(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1           # > 1: the fused form splits K over this many programs (small M)
    persistent: bool = False   # fused_tma only: one program per SM walks the output tiles


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class Plan:
    strategy: str                  # "fused" | "fused_tma" | "split" | "cublas" | "eager" | "merge"
    gemm: GemmConfig | None = None
    shrink: ShrinkConfig | None = None

    @property
    def label(self) -> str:
        """The strategy with the variant the tile config selects, as reports show it:
        e.g. "fused+splitk4", "fused_tma+persistent"."""
        if self.gemm is None or self.strategy not in ("fused", "fused_tma"):
            return self.strategy
        if self.gemm.split_k > 1:
            return f"{self.strategy}+splitk{self.gemm.split_k}"
        return self.strategy + ("+persistent" if self.gemm.persistent and self.strategy == "fused_tma" else "")


def _routing_args(r_old, r_delta, proj):
    p = proj if proj is not None else r_delta
    return (r_old, r_delta, p), (*r_old.stride(), *r_delta.stride(), *p.stride())


def column_major(a):
    """The (K, r) down-projection operand in column-major layout (stride(0) == 1).

    Measured on an H100 with triton 3.6: with a row-major A of small odd rank (e.g. r = 5, strides
    (5, 1)), tiles with BLOCK_M = 128 and BLOCK_K = 64 compute x·A wrongly (relative error ~1) for
    every num_warps/num_stages tried, while column-major A is right in every config
    (benchmarks/triton_diag.py). The forward's lora_Aᵀ is already column-major; dx's lora_B and
    transposed user views are copied (r·K elements, negligible next to the GEMM)."""
    return a if a.stride(0) == 1 else a.t().contiguous().t()


FINISH_BLOCK_N = 64     # the split-K finish kernel streams splits·M·N fp32 partials: small tiles, many programs


def k_splits(k: int, cfg: GemmConfig) -> tuple:
    """(splits, K blocks per split) of the split-K fused form: no split is left empty."""
    blocks = triton_cdiv(k, cfg.block_k)
    per = triton_cdiv(blocks, max(1, min(cfg.split_k, blocks)))
    return triton_cdiv(blocks, per), per


def gemm(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, cfg: GemmConfig, *, u=None, y=None, t=None):
    """y = x·wᵀ + bias + scale·U·b with U = (x·a)·R (fused, writes t = x·a) or the given u.
    The fused form with cfg.split_k > 1 is two launches: fp32 partials over K splits, then
    _clora_splitk_finish_kernel."""
    a = column_major(a)
    m, k = x.shape
    n = w.shape[0]
    rank = a.shape[1]
    fused = u is None
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if y is None else y
    if fused and t is None:
        t = torch.empty(m, rank, device=x.device, dtype=x.dtype)
    if m == 0:
        return y, t
    if n == 0 or k == 0:
        return _empty_tiles(x, a, y, t, u, b, bias, scale)
    (ro, rd, p), rstrides = _routing_args(r_old, r_delta, proj)
    splits, per_split = k_splits(k, cfg) if fused else (1, 1)
    if splits > 1:    # the first launch writes fp32 partials; the finish kernel writes y and t
        y_out = torch.empty(splits * m, n, device=x.device, dtype=torch.float32)
        t_out = torch.empty(splits * m, rank, device=x.device, dtype=torch.float32)
    else:
        y_out, t_out = y, t
    uu = u if u is not None else y_out
    tt = t_out if t_out is not None else y_out
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n), splits)
    kernels._clora_gemm_kernel[grid](
        x, w, a, b, ro, rd, p, bias if bias is not None else y, uu, y_out, tt,
        m, n, k, rank, float(scale),
        *x.stride(), *w.stride(), *a.stride(), *b.stride(), *rstrides, *uu.stride(), *y_out.stride(), *tt.stride(),
        per_split,
        HAS_BIAS=bias is not None, HAS_P=proj is not None, TRANS_R=trans_r, FUSED=fused,
        EVEN_K=(k % cfg.block_k == 0), PRECISION=precision(x.dtype), SPLIT_K=splits > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r(rank), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, FINISH_BLOCK_N),)
        kernels._clora_splitk_finish_kernel[grid](
            y_out, t_out, b, ro, rd, p, bias if bias is not None else y, y, t,
            m, n, rank, float(scale), splits, b.stride(0), b.stride(1), *rstrides,
            y.stride(0), y.stride(1), t.stride(0), t.stride(1),
            HAS_BIAS=bias is not None, HAS_P=proj is not None, TRANS_R=trans_r, PRECISION=precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=FINISH_BLOCK_N, BLOCK_R=block_r(rank), num_warps=4)
    return y, t


@functools.lru_cache(maxsize=None)
def _has_tma(device_index) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=None)
def sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def max_shared(device_index) -> int:
    """Shared memory one program may use on this GPU (opt-in maximum): the bound Triton checks at launch."""
    from triton.runtime.driver import driver
    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


INTERPRETER_PROGRAMS = 3   # a persistent grid under the interpreter: few programs, several tiles each


def tma_eligible(x, w) -> bool:
    """TMA descriptors need unit inner strides and 16-byte aligned outer strides and bases."""
    if (x.device.type != "cuda" and not interpreting()) or x.shape[1] == 0:
        return False
    if x.device.type == "cuda" and not _has_tma(x.device.index):
        return False
    elt = x.element_size()
    (xs0, xs1), (ws0, ws1) = x.stride(), w.stride()
    if ws1 == 1:          # W's row stride, (N, K) or (K, N) row-major
        w_row = ws0
    elif ws0 == 1:
        w_row = ws1
    else:
        return False
    return (xs1 == 1 and (xs0 * elt) % 16 == 0 and (w_row * elt) % 16 == 0
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def tma_rows(a):
    """The (K, r) down-projection operand as Aᵀ (r, K) with unit inner stride and 16-byte aligned
    rows and base, for a TMA descriptor: a view when it already is, else a copy into a buffer whose
    rows are padded to 16 bytes (r·K elements, negligible next to the GEMM)."""
    at = a.t()
    elt = at.element_size()
    if at.stride(1) == 1 and (at.stride(0) * elt) % 16 == 0 and at.data_ptr() % 16 == 0:
        return at
    r, k = at.shape
    padded = at.new_empty(r, triton_cdiv(k * elt, 16) * 16 // elt)[:, :k]
    return padded.copy_(at)


def _empty_tiles(x, a, y, t, u, b, bias, scale):
    """gemm's result when N = 0 or K = 0, where no kernel launches (no output tiles, or an empty
    reduction; the dx of a layer without outputs has K = 0): t = x·a still (0 when K = 0, and
    routing_delta's gradient reads it), y = bias + scale·u·b with u = t·R = 0 in the fused form."""
    if t is not None:
        t.copy_(x @ a)
    y.zero_()
    if u is not None and y.numel():
        y.add_((scale * (u.float() @ b.float())).to(y.dtype))
    if bias is not None:
        y.add_(bias)
    return y, t


def gemm_tma(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, cfg: GemmConfig, *, y=None, t=None):
    """The fused form with TMA tiles of X, W and A (call only when tma_eligible(x, w)); with
    cfg.persistent, min(tiles, SMs) programs walk the output tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, k = x.shape
    n = w.shape[0]
    rank = a.shape[1]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if y is None else y
    t = torch.empty(m, rank, device=x.device, dtype=x.dtype) if t is None else t
    if m == 0:
        return y, t
    if n == 0:
        return _empty_tiles(x, a, y, t, None, b, bias, scale)
    w_nk = w.stride(1) == 1
    x_desc = TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(w if w_nk else w.t(),
                                          [cfg.block_n, cfg.block_k] if w_nk else [cfg.block_k, cfg.block_n])
    a_desc = TensorDescriptor.from_tensor(tma_rows(a), [block_r(rank), cfg.block_k])
    (ro, rd, p), rstrides = _routing_args(r_old, r_delta, proj)
    tiles = triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n)
    progs = tiles
    if cfg.persistent:
        progs = min(tiles, INTERPRETER_PROGRAMS if x.device.type == "cpu" else sm_count(x.device.index))
    kernels._clora_gemm_tma_kernel[(progs,)](
        x_desc, w_desc, a_desc, b, ro, rd, p, bias if bias is not None else y, y, t,
        m, n, k, rank, float(scale), progs, b.stride(0), b.stride(1), *rstrides,
        y.stride(0), y.stride(1), t.stride(0), t.stride(1),
        HAS_BIAS=bias is not None, HAS_P=proj is not None, TRANS_R=trans_r, W_NK=w_nk, PRECISION=precision(x.dtype),
        PERSISTENT=cfg.persistent,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r(rank), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y, t


def shrink(x, a, r_old, r_delta, proj, trans_r, cfg: ShrinkConfig, *, t=None):
    """t = x·a (x's dtype) and u = t·R (fp32), one pass over x; split-K without atomics."""
    a = column_major(a)
    m, k = x.shape
    rank = a.shape[1]
    t = torch.empty(m, rank, device=x.device, dtype=x.dtype) if t is None else t
    u = torch.empty(m, rank, device=x.device, dtype=torch.float32)
    if m == 0 or k == 0:
        return t.zero_(), u.zero_()
    split = max(1, min(cfg.split_k, triton_cdiv(k, cfg.block_k)))
    chunk = triton_cdiv(triton_cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton_cdiv(k, chunk)
    part = torch.empty(split, m, rank, device=x.device, dtype=torch.float32) if split > 1 else u
    (ro, rd, p), rstrides = _routing_args(r_old, r_delta, proj)
    grid = (triton_cdiv(m, cfg.block_m), split)
    kernels._clora_shrink_kernel[grid](
        x, a, ro, rd, p, t, u, part, m, k, rank, chunk,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), *rstrides,
        t.stride(0), t.stride(1), u.stride(0), u.stride(1), part.stride(0), part.stride(1),
        HAS_P=proj is not None, TRANS_R=trans_r, SPLIT_K=split, PRECISION=precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r(rank),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        r = routing_eff(r_old, r_delta, proj).float()
        t.copy_(part.sum(0))
        torch.matmul(t.float(), r.t() if trans_r else r, out=u)
    return t, u


def run(plan: Plan, x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, *, y=None, t=None, need_t=True):
    """Run one strategy; returns (y, side output t), written into y / t when given. With need_t
    False the `merge` plan skips t (returns None): it is the one plan where t is extra work."""
    if plan.strategy == "fused":
        return gemm(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, plan.gemm, y=y, t=t)
    if plan.strategy == "fused_tma":
        if tma_eligible(x, w):
            return gemm_tma(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, plan.gemm, y=y, t=t)
        # only a forced plan (tests) gets here: tuned keys include TMA eligibility. Same tiles, pointer loads
        return gemm(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, plan.gemm, y=y, t=t)
    if plan.strategy in ("eager", "merge"):
        r = routing_eff(r_old, r_delta, proj)
        out, t_out = run_plan(plan.strategy, x, w, a, b, r.t() if trans_r else r, bias, scale,
                              need_t or t is not None)
        if t is not None:
            t.copy_(t_out)
            t_out = t
    else:
        t_out, u = shrink(x, a, r_old, r_delta, proj, trans_r, plan.shrink, t=t)
        if plan.strategy == "split":
            return gemm(x, w, a, b, r_old, r_delta, proj, bias, scale, trans_r, plan.gemm, u=u, y=y)[0], t_out
        out = torch.nn.functional.linear(x, w, bias)          # cublas: cuBLAS GEMM, expand with beta = 1
        out = expand_(out, u.to(x.dtype), b, scale)
    if y is not None:
        y.copy_(out)
        out = y
    return out, t_out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
