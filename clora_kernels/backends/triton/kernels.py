"""Triton kernels of the C-LoRA engine (docs/design.md section 4).

_clora_gemm_kernel   Y = X·Wᵀ + bias + s·U·B, with U either
                       FUSED:  U = (X·A)·R computed in the same K loop (each X tile loaded once
                               feeds acc += X·Wᵀ and t += X·A; u = t·R and the expand run once
                               after the loop; the program on the first N tile stores t), or
                       split:  U read from a precomputed M×r tensor (the shrink kernel's output),
                               added as one extra K slab after the loop.
                     R = R_old + P·R_delta (optionally transposed) is built in the prologue from
                     the r×r tensors, so a fused C-LoRA forward is one launch.
                     Forward: (x, W, A=lora_Aᵀ, B=lora_Bᵀ, R_eff)          side output t = x·A.
                     dx:      (g, Wᵀ, A=lora_B, B=lora_A, R_effᵀ)          side output v = g·lora_B.
                     Every operand is addressed through its strides (views, non-contiguous inputs).
                     SPLIT_K (small M, FUSED only): the grid's second axis splits K; each program
                     stores fp32 partials of X·Wᵀ and X·A, and _clora_splitk_finish_kernel adds
                     them and runs the epilogue. At small M the N tiles alone are fewer than the
                     SMs (e.g. N = 1024 in 32-wide tiles: 32 programs on 132 SMs), so W streams
                     from a fraction of the machine.
_clora_gemm_tma_kernel  the FUSED form with X, W and A tiles loaded by TMA descriptors (Hopper);
                     needs 16-byte aligned row strides, so the launcher offers it only then.
                     One program per output tile, or (PERSISTENT) one per SM walking the tiles.
_clora_shrink_kernel t = X·A and u = t·R in one pass over X (memory-bound). With SPLIT_K > 1 each
                     program reduces one K chunk into an fp32 partial (no atomics: deterministic);
                     the launcher sums the partials.

Limits: rank 1..128 (padded to BLOCK_R >= 16 inside, tl.dot needs 16); fp16/bf16/fp32 inputs;
fp32 accumulation; M, N, K any size (loads wrap rows/cols modulo M/N, K is masked, stores are
masked); int32 offsets, so every operand must hold < 2**31 elements (the backend refuses otherwise).
"""
import triton
import triton.language as tl


@triton.jit
def _routing(rold_ptr, rd_ptr, p_ptr, R, stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
             HAS_P: tl.constexpr, TRANS_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """R_eff = R_old + P·R_delta (fp32, zero-padded to BLOCK_R), transposed if TRANS_R."""
    i = tl.arange(0, BLOCK_R)
    mask = (i[:, None] < R) & (i[None, :] < R)
    r_old = tl.load(rold_ptr + i[:, None] * stride_oi + i[None, :] * stride_oj, mask=mask, other=0.0)
    r_delta = tl.load(rd_ptr + i[:, None] * stride_di + i[None, :] * stride_dj, mask=mask, other=0.0)
    if HAS_P:
        p = tl.load(p_ptr + i[:, None] * stride_pi + i[None, :] * stride_pj, mask=mask, other=0.0)
        r = r_old.to(tl.float32) + tl.dot(p, r_delta, input_precision=PRECISION)
    else:
        r = r_old.to(tl.float32) + r_delta.to(tl.float32)
    if TRANS_R:
        r = tl.trans(r)
    return r


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `pid` in grouped order: GROUP_M row tiles walk the N tiles
    together, so neighbouring programs share W tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m


@triton.jit(do_not_specialize=["K_SPLIT_BLOCKS"])   # one compile whatever the K range per split
def _clora_gemm_kernel(
        x_ptr, w_ptr, a_ptr, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, u_ptr, y_ptr, t_ptr,
        M, N, K, R, scale,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ak, stride_ar, stride_br, stride_bn,
        stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
        stride_um, stride_ur, stride_ym, stride_yn, stride_tm, stride_tr, K_SPLIT_BLOCKS,
        HAS_BIAS: tl.constexpr, HAS_P: tl.constexpr, TRANS_R: tl.constexpr, FUSED: tl.constexpr,
        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M                    # wrapped: loads need no M/N mask, stores are masked
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    kb_start = 0
    kb_end = tl.cdiv(K, BLOCK_K)
    if SPLIT_K:                          # this program reduces K blocks [kb_start, kb_end) only
        kb_start = tl.program_id(1) * K_SPLIT_BLOCKS
        kb_end = min(kb_end, kb_start + K_SPLIT_BLOCKS)
        x_ptrs += kb_start * BLOCK_K * stride_xk
        w_ptrs += kb_start * BLOCK_K * stride_wk
        a_ptrs += kb_start * BLOCK_K * stride_ak
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if FUSED:
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            t_acc = tl.dot(x, a, t_acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SPLIT_K:
        # fp32 partial sums of this K range into rows pid_k·M + m of the (splits·M, N) and
        # (splits·M, r) workspaces that y_ptr and t_ptr point to; _clora_splitk_finish_kernel adds them
        prow = tl.program_id(1) * M + offs_m
        mask_m = offs_m < M
        tl.store(y_ptr + prow[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc,
                 mask=mask_m[:, None] & (offs_n[None, :] < N))
        if pid_n == 0:
            tl.store(t_ptr + prow[:, None] * stride_tm + offs_r[None, :] * stride_tr, t_acc,
                     mask=mask_m[:, None] & mask_r[None, :])
    else:
        _lora_epilogue(acc, t_acc, x_ptr.dtype.element_ty, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, u_ptr, y_ptr,
                       t_ptr, offs_m, offs_n, offs_r, rows, cols, pid_n, M, N, R, scale, stride_br, stride_bn,
                       stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                       stride_um, stride_ur, stride_ym, stride_yn, stride_tm, stride_tr,
                       HAS_BIAS, HAS_P, TRANS_R, FUSED, PRECISION, BLOCK_R)


@triton.jit(do_not_specialize=["SPLITS"])
def _clora_splitk_finish_kernel(
        py_ptr, pt_ptr, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, t_ptr,
        M, N, R, scale, SPLITS,
        stride_br, stride_bn, stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
        stride_ym, stride_yn, stride_tm, stride_tr,
        HAS_BIAS: tl.constexpr, HAS_P: tl.constexpr, TRANS_R: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split-K fused form, second launch: add the SPLITS fp32 partials of X·Wᵀ (contiguous
    (SPLITS·M, N)) and of t = X·A (contiguous (SPLITS·M, R)) in a fixed order (deterministic, no
    atomics), then the fused epilogue: u = t·R_eff, acc += s·u·B, bias, store y (and t)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M
    cols = offs_n % N
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, SPLITS):
        prow = s * M + rows
        acc += tl.load(py_ptr + prow[:, None] * N + cols[None, :])
        t_acc += tl.load(pt_ptr + prow[:, None] * R + offs_r[None, :], mask=mask_r[None, :], other=0.0)
    _lora_epilogue(acc, t_acc, y_ptr.dtype.element_ty, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, y_ptr, t_ptr,
                   offs_m, offs_n, offs_r, rows, cols, pid_n, M, N, R, scale, stride_br, stride_bn,
                   stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                   0, 0, stride_ym, stride_yn, stride_tm, stride_tr,
                   HAS_BIAS, HAS_P, TRANS_R, True, PRECISION, BLOCK_R)


@triton.jit
def _clora_gemm_tma_kernel(
        x_desc, w_desc, a_desc, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, t_ptr,
        M, N, K, R, scale, NUM_PROGS,
        stride_br, stride_bn, stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
        stride_ym, stride_yn, stride_tm, stride_tr,
        HAS_BIAS: tl.constexpr, HAS_P: tl.constexpr, TRANS_R: tl.constexpr, W_NK: tl.constexpr,
        PRECISION: tl.constexpr, PERSISTENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr):
    """The fused kernel with every mainloop operand brought in by TMA (Hopper's bulk tensor copy;
    out-of-bounds boxes are zero-filled, so the mainloop needs no masks): X, W and A, whose
    descriptor holds Aᵀ (r, K) so that a (BLOCK_R, BLOCK_K) box past row r reads zeros. W_NK: the
    W descriptor holds (N, K) row-major tiles (forward); else (K, N) row-major tiles (dx through
    weight). PERSISTENT: NUM_PROGS programs walk the output tiles (grid = min(tiles, SMs)), the
    tile loop flattened with the K loop so the next tile's loads overlap this tile's epilogue;
    else one program per tile."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
            _tma_tile(tile, x_desc, w_desc, a_desc, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, t_ptr,
                      M, N, K, R, scale, stride_br, stride_bn, stride_oi, stride_oj, stride_di, stride_dj,
                      stride_pi, stride_pj, stride_ym, stride_yn, stride_tm, stride_tr,
                      HAS_BIAS, HAS_P, TRANS_R, W_NK, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)
    else:
        _tma_tile(tl.program_id(0), x_desc, w_desc, a_desc, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, t_ptr,
                  M, N, K, R, scale, stride_br, stride_bn, stride_oi, stride_oj, stride_di, stride_dj,
                  stride_pi, stride_pj, stride_ym, stride_yn, stride_tm, stride_tr,
                  HAS_BIAS, HAS_P, TRANS_R, W_NK, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M)


@triton.jit
def _tma_tile(tile, x_desc, w_desc, a_desc, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, t_ptr,
              M, N, K, R, scale, stride_br, stride_bn, stride_oi, stride_oj, stride_di, stride_dj,
              stride_pi, stride_pj, stride_ym, stride_yn, stride_tm, stride_tr,
              HAS_BIAS: tl.constexpr, HAS_P: tl.constexpr, TRANS_R: tl.constexpr, W_NK: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """One output tile of _clora_gemm_tma_kernel: the K loop, then the shared epilogue."""
    pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        off_k = kb * BLOCK_K
        x = x_desc.load([pid_m * BLOCK_M, off_k])
        if W_NK:
            w = w_desc.load([pid_n * BLOCK_N, off_k]).T
        else:
            w = w_desc.load([off_k, pid_n * BLOCK_N])
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        t_acc = tl.dot(x, a_desc.load([0, off_k]).T, t_acc, input_precision=PRECISION)
    _lora_epilogue(acc, t_acc, y_ptr.dtype.element_ty, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, y_ptr, y_ptr, t_ptr,
                   offs_m, offs_n, offs_r, offs_m % M, offs_n % N, pid_n, M, N, R, scale, stride_br, stride_bn,
                   stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                   0, 0, stride_ym, stride_yn, stride_tm, stride_tr,
                   HAS_BIAS, HAS_P, TRANS_R, True, PRECISION, BLOCK_R)


@triton.jit
def _lora_epilogue(acc, t_acc, cdt: tl.constexpr, b_ptr, rold_ptr, rd_ptr, p_ptr, bias_ptr, u_ptr, y_ptr, t_ptr,
                   offs_m, offs_n, offs_r, rows, cols, pid_n, M, N, R, scale, stride_br, stride_bn,
                   stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                   stride_um, stride_ur, stride_ym, stride_yn, stride_tm, stride_tr,
                   HAS_BIAS: tl.constexpr, HAS_P: tl.constexpr, TRANS_R: tl.constexpr, FUSED: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """After the K loop: u = t·R (fused; the first N tile stores t) or u read back (split), then
    acc += s·u·B, bias, cast, masked store of y."""
    mask_m = offs_m < M
    mask_r = offs_r < R
    if FUSED:
        r = _routing(rold_ptr, rd_ptr, p_ptr, R, stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                     HAS_P, TRANS_R, PRECISION, BLOCK_R)
        u = tl.dot(t_acc.to(cdt), r.to(cdt), input_precision=PRECISION)
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, t_acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    else:
        u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur, mask=mask_r[None, :], other=0.0)
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + cols[None, :] * stride_bn, mask=mask_r[:, None], other=0.0)
    acc = tl.dot((u * scale).to(cdt), b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


@triton.jit
def _clora_shrink_kernel(
        x_ptr, a_ptr, rold_ptr, rd_ptr, p_ptr, t_ptr, u_ptr, part_ptr,
        M, K, R, K_CHUNK,
        stride_xm, stride_xk, stride_ak, stride_ar,
        stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
        stride_tm, stride_tr, stride_um, stride_ur, stride_ps, stride_pm,
        HAS_P: tl.constexpr, TRANS_R: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m % M
    mask_r = offs_r < R
    k_start = pid_k * K_CHUNK
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    a_ptrs = a_ptr + (k_start + offs_k)[:, None] * stride_ak + offs_r[None, :] * stride_ar
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_end = min(K, k_start + K_CHUNK)
    for k0 in range(k_start, k_end, BLOCK_K):
        kmask = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=kmask[:, None] & mask_r[None, :], other=0.0)
        t_acc = tl.dot(x, a, t_acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    mask = (offs_m < M)[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        cdt = x_ptr.dtype.element_ty
        r = _routing(rold_ptr, rd_ptr, p_ptr, R, stride_oi, stride_oj, stride_di, stride_dj, stride_pi, stride_pj,
                     HAS_P, TRANS_R, PRECISION, BLOCK_R)
        u = tl.dot(t_acc.to(cdt), r.to(cdt), input_precision=PRECISION)
        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                 t_acc.to(t_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u, mask=mask)
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_r[None, :], t_acc, mask=mask)
