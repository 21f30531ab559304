"""Block-sparse attention backward (dq, dk, dv) as Triton kernels, and the autograd function of `block_sparse_attn`."""

from __future__ import annotations

import contextlib
import warnings

import torch

from ._triton import _SUM, interpreter, interpreting, jit
from .block_sparse import _LOG2E, _TensorDescriptor, _check, _launch, _tma_ok, tl, triton

__all__ = ["block_sparse_attn_backward", "transpose_selection", "BlockSparseAttnFunction"]


# The kernels are plain functions, wrapped by `_triton.jit` lazily, as in block_sparse.py.
def _bwd_preprocess_kernel(
    O, DO, LSE, DELTA, LSE2,
    sob, soh, sos, sdob, sdoh, sdos,
    H, S,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """delta = rowsum(dO * O) and the log-sum-exp in the exp2 domain (+inf for rows that see no key)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    ok = offs_m < S
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows * sos + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + rows * sdos + offs_d[None, :], mask=ok[:, None],
                 other=0.0)
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _SUM)
    base = pid_bh.to(tl.int64) * S
    lse = tl.load(LSE + base + offs_m, mask=ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + base + offs_m, delta, mask=ok)
    tl.store(LSE2 + base + offs_m, lse2, mask=ok)


def _bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE2, DELTA,
    QD, DOD, KD, VD,  # rank-3 [B*H, S, D] TMA descriptors of the looped-over tiles (USE_TMA), else unused
    O, sob, soh, sos,  # the forward's output: read by the dq programs when DQ_PRE (they compute delta, lse2)
    LSE,  # natural-log LSE, read by the dq programs when DQ_PRE
    KV_IDX, KV_CNT, Q_IDX, Q_CNT, LENS,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
    H, S, N_QB, N_KB, MAX_KV, MAX_Q, sm_scale, qk_scale,
    BLOCK_M: tl.constexpr,  # semantic query block
    BLOCK_N: tl.constexpr,  # semantic key block
    KV_TILE: tl.constexpr,  # keys per dk/dv program (divides BLOCK_N)
    M_STEP: tl.constexpr,  # query rows per dk/dv loop step (divides BLOCK_M)
    Q_TILE: tl.constexpr,  # query rows per dq program (divides BLOCK_M)
    N_STEP: tl.constexpr,  # keys per dq loop step (divides BLOCK_N)
    HEAD_DIM: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,  # False: the dk/dv programs; True: the dq programs (one launch each)
    HAS_LENS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    DQ_PRE: tl.constexpr = False,  # dq programs compute and store delta and lse2 (dq launched before dk/dv)
):
    """Program p computes dk, dv of a KV_TILE slice of one key block, looping over the query blocks that selected
    it; with COMPUTE_DQ, dq of a Q_TILE slice of one query block, looping over its selected key blocks. P is
    recomputed from the saved log-sum-exp (exp2 domain)."""
    KV_SPLIT: tl.constexpr = BLOCK_N // KV_TILE
    Q_SPLIT: tl.constexpr = BLOCK_M // Q_TILE
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    g_base = pid_bh.to(tl.int64) * S * HEAD_DIM  # dq, dk, dv: contiguous [B, H, S, D]
    r_base = pid_bh.to(tl.int64) * S  # lse2, delta: [B, H, S]

    if not COMPUTE_DQ:
        # ------------------------------------------------------------------ dk, dv
        j = pid // KV_SPLIT
        start_n = j * BLOCK_N + (pid % KV_SPLIT) * KV_TILE
        offs_n = start_n + tl.arange(0, KV_TILE)
        kn = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + kn * sks + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
        v = tl.load(v_base + kn * svs + offs_d[None, :], mask=offs_n[:, None] < S, other=0.0)
        dtype = k.dtype
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        n_valid = S - start_n  # valid keys of this slice (may be <= 0)
        if HAS_LENS:
            n_valid = tl.minimum(n_valid, j * BLOCK_N + tl.load(LENS + j) - start_n)
        key_ok = tl.arange(0, KV_TILE) < n_valid
        partial = n_valid < KV_TILE
        dk = tl.full([KV_TILE, HEAD_DIM], 0.0, dtype=tl.float32)
        dv = tl.full([KV_TILE, HEAD_DIM], 0.0, dtype=tl.float32)
        row = pid_bh.to(tl.int64) * N_KB + j
        cnt = tl.load(Q_CNT + row)
        qidx_row = Q_IDX + row * MAX_Q
        SUBM: tl.constexpr = BLOCK_M // M_STEP
        for t in range(0, cnt * SUBM):
            i = tl.load(qidx_row + t // SUBM)
            offs_m = i * BLOCK_M + (t % SUBM) * M_STEP + tl.arange(0, M_STEP)
            if USE_TMA:
                q = QD.load([pid_bh, i * BLOCK_M + (t % SUBM) * M_STEP, 0]).reshape(M_STEP, HEAD_DIM)
                do = DOD.load([pid_bh, i * BLOCK_M + (t % SUBM) * M_STEP, 0]).reshape(M_STEP, HEAD_DIM)
            else:
                qm = offs_m[:, None].to(tl.int64)
                q = tl.load(q_base + qm * sqs + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
                do = tl.load(do_base + qm * sdos + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
            lse2 = tl.load(LSE2 + r_base + offs_m, mask=offs_m < S, other=float("inf"))
            dlt = tl.load(DELTA + r_base + offs_m, mask=offs_m < S, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [KV_TILE, M_STEP]
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
            if partial:
                pT = tl.where(key_ok[:, None], pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            dsT = pT * (dpT - dlt[None, :])
            if DOT_FP32:
                dv = tl.dot(pT, do, dv, input_precision=INPUT_PRECISION)
                dk = tl.dot(dsT, q, dk, input_precision=INPUT_PRECISION)
            else:
                dv = tl.dot(pT.to(dtype), do, dv, input_precision=INPUT_PRECISION)
                dk = tl.dot(dsT.to(dtype), q, dk, input_precision=INPUT_PRECISION)
        dk = dk * sm_scale
        g = g_base + kn * HEAD_DIM + offs_d[None, :]
        tl.store(DK + g, dk.to(dtype), mask=offs_n[:, None] < S)
        tl.store(DV + g, dv.to(dtype), mask=offs_n[:, None] < S)
    else:
        # ------------------------------------------------------------------ dq
        i_q = pid // Q_SPLIT
        offs_m_q = i_q * BLOCK_M + (pid % Q_SPLIT) * Q_TILE + tl.arange(0, Q_TILE)
        qm_q = offs_m_q[:, None].to(tl.int64)
        q_q = tl.load(q_base + qm_q * sqs + offs_d[None, :], mask=offs_m_q[:, None] < S, other=0.0)
        do_q = tl.load(do_base + qm_q * sdos + offs_d[None, :], mask=offs_m_q[:, None] < S, other=0.0)
        if DQ_PRE:
            o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qm_q * sos + offs_d[None, :],
                        mask=offs_m_q[:, None] < S, other=0.0)
            dlt_q = tl.reduce(o.to(tl.float32) * do_q.to(tl.float32), 1, _SUM)
            lse = tl.load(LSE + r_base + offs_m_q, mask=offs_m_q < S, other=0.0)
            lse2_q = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            tl.store(DELTA + r_base + offs_m_q, dlt_q, mask=offs_m_q < S)
            tl.store(LSE2 + r_base + offs_m_q, lse2_q, mask=offs_m_q < S)
            lse2_q = tl.where(offs_m_q < S, lse2_q, float("inf"))
        else:
            lse2_q = tl.load(LSE2 + r_base + offs_m_q, mask=offs_m_q < S, other=float("inf"))
            dlt_q = tl.load(DELTA + r_base + offs_m_q, mask=offs_m_q < S, other=0.0)
        dtype_q = q_q.dtype
        if DOT_FP32:
            q_q = q_q.to(tl.float32)
            do_q = do_q.to(tl.float32)
        dq = tl.full([Q_TILE, HEAD_DIM], 0.0, dtype=tl.float32)
        row_q = pid_bh.to(tl.int64) * N_QB + i_q
        cnt_q = tl.minimum(tl.load(KV_CNT + row_q), MAX_KV)
        idx_row = KV_IDX + row_q * MAX_KV
        SUBN: tl.constexpr = BLOCK_N // N_STEP
        offs_s = tl.arange(0, N_STEP)
        for t_q in range(0, cnt_q * SUBN):
            j_q = tl.load(idx_row + t_q // SUBN)
            start_n_q = j_q * BLOCK_N + (t_q % SUBN) * N_STEP
            offs_n_q = start_n_q + offs_s
            if USE_TMA:
                k_q = KD.load([pid_bh, start_n_q, 0]).reshape(N_STEP, HEAD_DIM)
                v_q = VD.load([pid_bh, start_n_q, 0]).reshape(N_STEP, HEAD_DIM)
            else:
                kn_q = offs_n_q[:, None].to(tl.int64)
                k_q = tl.load(k_base + kn_q * sks + offs_d[None, :], mask=offs_n_q[:, None] < S, other=0.0)
                v_q = tl.load(v_base + kn_q * svs + offs_d[None, :], mask=offs_n_q[:, None] < S, other=0.0)
            if DOT_FP32:
                k_q = k_q.to(tl.float32)
                v_q = v_q.to(tl.float32)
            qk = tl.dot(q_q, tl.trans(k_q), input_precision=INPUT_PRECISION)  # [Q_TILE, N_STEP]
            p = tl.math.exp2(qk * qk_scale - lse2_q[:, None])
            n_valid_q = S - start_n_q
            if HAS_LENS:
                n_valid_q = tl.minimum(n_valid_q, j_q * BLOCK_N + tl.load(LENS + j_q) - start_n_q)
            if n_valid_q < N_STEP:
                p = tl.where(offs_s[None, :] < n_valid_q, p, 0.0)
            dp = tl.dot(do_q, tl.trans(v_q), input_precision=INPUT_PRECISION)
            ds = p * (dp - dlt_q[:, None])
            if DOT_FP32:
                dq = tl.dot(ds, k_q, dq, input_precision=INPUT_PRECISION)
            else:
                dq = tl.dot(ds.to(dtype_q), k_q, dq, input_precision=INPUT_PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + g_base + qm_q * HEAD_DIM + offs_d[None, :], dq.to(dtype_q), mask=offs_m_q[:, None] < S)


def _sel_scatter_kernel(IDX, CNT, SEL, N_QB, N_KB, MAX_KV, BLOCK_E: tl.constexpr):
    """One program per (b, h, query block i): SEL[b, h, j, i] = 1 for each of its live key blocks j."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh.to(tl.int64) * N_QB + i
    cnt = tl.minimum(tl.load(CNT + row), MAX_KV)
    sel = SEL + bh.to(tl.int64) * N_KB * N_QB + i
    for e0 in range(0, cnt, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        ids = tl.load(IDX + row * MAX_KV + offs, mask=offs < cnt, other=0)
        tl.store(sel + ids.to(tl.int64) * N_QB, tl.full([BLOCK_E], 1, tl.int8), mask=offs < cnt)


def _sel_compact_kernel(SEL, Q_IDX, Q_CNT, N_QB, N_KB, BLOCK_Q: tl.constexpr):
    """One program per (b, h, key block j): the ascending list of query blocks with SEL[b, h, j, i] set."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh.to(tl.int64) * N_KB + j) * N_QB
    total = tl.full([], 0, tl.int32)
    for i0 in range(0, N_QB, BLOCK_Q):
        offs = i0 + tl.arange(0, BLOCK_Q)
        hit = tl.load(SEL + base + offs, mask=offs < N_QB, other=0).to(tl.int32)
        pos = tl.associative_scan(hit, 0, _SUM) - 1 + total
        tl.store(Q_IDX + base + pos, offs, mask=hit > 0)
        total += tl.reduce(hit, 0, _SUM)
    tl.store(Q_CNT + bh.to(tl.int64) * N_KB + j, total)


_TMA_BROKEN: set = set()  # launch configurations whose TMA variant failed once


def transpose_selection(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n_kv_blocks: int):
    """The query blocks that selected each key block: the transposed selection, built on the device (no sync).

    Triton kernels (a scatter into a `[B, H, n_kv_blocks, n_q_blocks]` byte map, then one compaction per key block)
    on CUDA or under the interpreter; plain torch otherwise.

    Args:
        kv_indices, kv_counts: the selection, as for `block_sparse_attn`.
        n_kv_blocks: number of key blocks.

    Returns:
        `(q_indices, q_counts)`: int32 `[B, H, n_kv_blocks, n_q_blocks]` (ascending query-block ids, the
        first `q_counts` live, the rest unspecified) and int32 `[B, H, n_kv_blocks]`. Repeated ids in a row
        count once.

    Example:
        >>> idx = torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.int32)  # query block 0: {1, 0}; 1: {1}
        >>> cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
        >>> q_idx, q_cnt = transpose_selection(idx, cnt, 2)
        >>> q_cnt.tolist(), q_idx[0, 0, 0, :1].tolist(), q_idx[0, 0, 1].tolist()
        ([[[1, 2]]], [0], [0, 1])
    """
    B, H, n_qb, max_kv = kv_indices.shape
    dev = kv_indices.device
    if triton is not None and (dev.type == "cuda" or interpreting()):
        idx = kv_indices.to(torch.int32).contiguous()
        cnt = kv_counts.to(torch.int32).contiguous()
        sel = torch.zeros(B, H, n_kv_blocks, n_qb, dtype=torch.int8, device=dev)
        q_idx = torch.empty(B, H, n_kv_blocks, n_qb, dtype=torch.int32, device=dev)
        q_cnt = torch.empty(B, H, n_kv_blocks, dtype=torch.int32, device=dev)
        interpret = dev.type == "cpu"
        scatter, compact = jit(_sel_scatter_kernel, interpret), jit(_sel_compact_kernel, interpret)
        block_q = min(1024, triton.next_power_of_2(max(n_qb, 16)))

        with interpreter(True) if interpret else contextlib.nullcontext():
            scatter[(n_qb, B * H)](idx, cnt, sel, n_qb, n_kv_blocks, max_kv, BLOCK_E=64, num_warps=2)
            compact[(n_kv_blocks, B * H)](sel, q_idx, q_cnt, n_qb, n_kv_blocks, BLOCK_Q=block_q, num_warps=4)
        return q_idx, q_cnt
    live = torch.arange(max_kv, device=dev) < kv_counts.to(torch.int32).unsqueeze(-1)
    rows = torch.where(live, kv_indices.to(torch.int64), n_kv_blocks)  # dead entries go to a spare row
    sel = torch.zeros(B, H, n_kv_blocks + 1, n_qb, dtype=torch.int32, device=dev)
    sel.scatter_(2, rows.transpose(-1, -2), 1)
    sel = sel[:, :, :n_kv_blocks]
    q_counts = sel.sum(-1, dtype=torch.int32)
    pos = torch.where(sel > 0, sel.cumsum(-1) - 1, n_qb)  # slot of each selecting query block
    q_idx = torch.zeros(B, H, n_kv_blocks, n_qb + 1, dtype=torch.int32, device=dev)
    q_idx.scatter_(-1, pos.to(torch.int64), torch.arange(n_qb, dtype=torch.int32, device=dev).expand(B, H, n_kv_blocks, n_qb))
    return q_idx[..., :n_qb].contiguous(), q_counts


_BWD_KEYS = ("kv_tile", "m_step", "q_tile", "n_step", "num_warps", "num_stages", "dq_warps", "dq_stages", "use_tma",
             "dq_pre")


def _default_bwd_launch(q: torch.Tensor, bm: int, bn: int) -> dict:
    """Launch options of the backward on CUDA (docs/kernel-notes.md, "Backward")."""
    D = q.shape[-1]
    # Wan-1.3B and 14B, D 128, bf16: 64-key / 64-row tiles, 4 warps, 2 stages (two programs per SM) fastest at every
    # density; TMA loads of the looped-over tiles -12%; dq launched first, its programs computing delta (no
    # preprocess launch).
    hopper = torch.cuda.get_device_capability(q.device)[0] >= 9 and _TensorDescriptor is not None
    opts = dict(kv_tile=min(bn, 64), m_step=min(bm, 64), q_tile=min(bm, 64), n_step=min(bn, 64),
                num_warps=4, num_stages=2, dq_warps=4, dq_stages=2, use_tma=hopper, dq_pre=True)
    if D == 64:
        opts.update(kv_tile=bn, q_tile=bm, num_warps=8 if bn == 128 else 4, dq_warps=8 if bm == 128 else 4)
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        opts.update(num_stages=2, dq_stages=2)
    if q.dtype == torch.float32:  # exact fp32 products: small tiles to fit
        opts.update(kv_tile=min(bn, 32), m_step=32, q_tile=min(bm, 32), n_step=32, num_stages=1, dq_stages=1)
    return opts


def block_sparse_attn_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, *, block_size: tuple[int, int] = (128, 128),
    scale: float | None = None, kv_block_lens: torch.Tensor | None = None,
    transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `block_sparse_attn` with respect to q, k and v, by Triton kernels.

    dq programs loop over a query block's key blocks (and compute `delta = rowsum(dO * O)` unless `dq_pre=False`
    asks for a preprocess launch), then dk/dv programs over the query blocks that selected a key block
    (`transpose_selection`). Assumes what the forward assumes: ids in a row distinct and in range.

    Args:
        grad_out: `[B, H, S, D]`, the gradient of the forward's output.
        q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens: as given to `block_sparse_attn`.
        out: the forward's output.
        lse: float32 `[B, H, S]`, the forward's row log-sum-exp (`block_sparse_attn(..., return_lse=True)`).
        transposed: `transpose_selection(kv_indices, kv_counts, n_kv_blocks)` if already built.
        grads: optional contiguous `[B, H, S, D]` buffers of q's dtype for `(dq, dk, dv)`, written in place.
        **options: launch options (`_BWD_KEYS`) overriding the defaults (the benchmark sweeps them).

    Returns:
        `(dq, dk, dv)`, contiguous `[B, H, S, D]` in q's dtype. Rows that see no key get zero dq; keys no
        query sees get zero dk and dv.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> idx = torch.tensor([0, 2, 0], dtype=torch.int32, device="cuda").expand(1, 2, 3, 3)
        >>> cnt = torch.full((1, 2, 3), 2, dtype=torch.int32, device="cuda")
        >>> out, lse = block_sparse_attn(q, k, v, idx, cnt, return_lse=True)
        >>> dq, dk, dv = block_sparse_attn_backward(torch.randn_like(out), q, k, v, out, lse, idx, cnt)
    """
    block_size, scale = _check(q, k, v, kv_indices, kv_counts, block_size, kv_block_lens, scale)
    B, H, S, D = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != (B, H, S, D):
            raise ValueError(f"block_sparse_attn_backward: {name} must be [B, H, S, D] = {(B, H, S, D)}; got {tuple(t.shape)}")
    if tuple(lse.shape) != (B, H, S) or lse.dtype != torch.float32:
        raise ValueError(f"block_sparse_attn_backward: lse must be float32 [B, H, S]; got {lse.dtype} {tuple(lse.shape)}")
    bad = set(options) - set(_BWD_KEYS)
    if bad:
        raise TypeError(f"unknown backward launch options {sorted(bad)}; valid: {_BWD_KEYS}")
    bm, bn = block_size
    n_qb, n_kb = -(-S // bm), -(-S // bn)
    interpret = q.device.type == "cpu" or interpreting()

    def fix(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v, grad_out, out = fix(q), fix(k), fix(v), fix(grad_out.to(q.dtype)), fix(out)
    lse = lse.contiguous()
    idx = kv_indices.to(torch.int32).contiguous()
    cnt = kv_counts.to(torch.int32).contiguous()
    lens = kv_block_lens.to(torch.int32).contiguous() if kv_block_lens is not None else cnt
    q_idx, q_cnt = transposed if transposed is not None else transpose_selection(idx, cnt, n_kb)
    q_idx, q_cnt = q_idx.to(torch.int32).contiguous(), q_cnt.to(torch.int32).contiguous()

    if interpret:
        opts = dict(kv_tile=bn, m_step=bm, q_tile=bm, n_step=bn, num_warps=4, num_stages=1, dq_warps=4, dq_stages=1,
                    use_tma=False, dq_pre=True)
    else:
        opts = _default_bwd_launch(q, bm, bn)
    opts.update({key: val for key, val in options.items() if val is not None})
    for key, blk in (("kv_tile", bn), ("m_step", bm), ("q_tile", bm), ("n_step", bn)):
        if opts[key] not in (16, 32, 64, 128) or blk % opts[key]:
            raise ValueError(f"{key} {opts[key]} must be a power of two >= 16 dividing the block ({blk})")

    if grads is None:
        dq, dk, dv = (torch.empty((B, H, S, D), dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = grads
        if any(g.shape != q.shape or g.dtype != q.dtype or not g.is_contiguous() for g in grads):
            raise ValueError("block_sparse_attn_backward: grads must be contiguous [B, H, S, D] tensors of q's dtype")
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    pre, main = jit(_bwd_preprocess_kernel, interpret), jit(_bwd_kernel, interpret)
    n_kv_progs = n_kb * (bn // opts["kv_tile"])
    n_q_progs = n_qb * (bm // opts["q_tile"])

    dq_pre = bool(opts["dq_pre"])
    use_tma = bool(opts["use_tma"]) and _TensorDescriptor is not None
    if use_tma and (interpret or (q.device, q.dtype, D, bm, bn, tuple(opts.values())) not in _TMA_BROKEN):
        # rank-3 [B*H, S, D] descriptors: every tensor must fold (b, h) into one stride
        q, k, v, grad_out = (t if _tma_ok(t) else t.contiguous() for t in (q, k, v, grad_out))
        if not all(t.stride(0) == t.shape[1] * t.stride(1) or t.shape[0] == 1 for t in (q, k, v, grad_out)):
            q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    else:
        use_tma = False

    def launch():
        if use_tma:
            def desc(t, rows):
                return _TensorDescriptor(t, [B * H, S, D], [t.stride(1), t.stride(2), 1], [1, rows, D])

            descs = (desc(q, opts["m_step"]), desc(grad_out, opts["m_step"]), desc(k, opts["n_step"]),
                     desc(v, opts["n_step"]))
        else:
            descs = (q, grad_out, k, v)
        if not dq_pre:
            pre[(-(-S // 64), B * H)](out, grad_out, lse, delta, lse2, *out.stride()[:3], *grad_out.stride()[:3],
                                      H, S, BLOCK=64, HEAD_DIM=D, num_warps=4)
        common = (q, k, v, grad_out, dq, dk, dv, lse2, delta, *descs, out, *out.stride()[:3], lse,
                  idx, cnt, q_idx, q_cnt, lens, *(st for t in (q, k, v, grad_out) for st in t.stride()[:3]),
                  H, S, n_qb, n_kb, idx.shape[-1], q_idx.shape[-1])
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, KV_TILE=int(opts["kv_tile"]), M_STEP=int(opts["m_step"]),
                    Q_TILE=int(opts["q_tile"]), N_STEP=int(opts["n_step"]), HEAD_DIM=D,
                    HAS_LENS=kv_block_lens is not None, DOT_FP32=interpret,
                    INPUT_PRECISION="ieee" if (q.dtype == torch.float32 or interpret) else "tf32", USE_TMA=use_tma)
        # dq first: with dq_pre its programs also write delta and lse2, which the dk/dv programs read
        main[(n_q_progs, B * H)](*common, scale, scale * _LOG2E, COMPUTE_DQ=True, DQ_PRE=dq_pre, **meta,
                                 num_warps=opts["dq_warps"], num_stages=opts["dq_stages"])
        main[(n_kv_progs, B * H)](*common, scale, scale * _LOG2E, COMPUTE_DQ=False, **meta,
                                  num_warps=opts["num_warps"], num_stages=opts["num_stages"])

    if interpret:
        with interpreter(True):
            launch()
    elif use_tma:
        try:
            launch()
        except Exception as e:  # compile or launch failure of the TMA variant: remember, use pointer loads
            _TMA_BROKEN.add((q.device, q.dtype, D, bm, bn, tuple(opts.values())))
            warnings.warn(f"block_sparse_attn_backward: TMA path failed ({type(e).__name__}: {e}); using pointer loads",
                          RuntimeWarning)
            use_tma = False
            launch()
    else:
        launch()
    return dq, dk, dv


class BlockSparseAttnFunction(torch.autograd.Function):
    """`block_sparse_attn` with its Triton backward; `block_sparse_attn` routes here when q, k or v needs a grad.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        >>> idx = torch.tensor([0, 2, 0], dtype=torch.int32, device="cuda").expand(1, 2, 3, 3)
        >>> cnt = torch.full((1, 2, 3), 2, dtype=torch.int32, device="cuda")
        >>> out, lse = BlockSparseAttnFunction.apply(q, k, v, idx, cnt, (128, 128), 0.125, None)
        >>> out.sum().backward()
    """

    @staticmethod
    def forward(ctx, q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens):
        B, H, S, _ = q.shape
        lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
        out = _launch(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, lse=lse)
        ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, kv_block_lens)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, kv_indices, kv_counts, kv_block_lens = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        dq, dk, dv = block_sparse_attn_backward(grad_out, q, k, v, out, lse, kv_indices, kv_counts,
                                                block_size=ctx.block_size, scale=ctx.scale, kv_block_lens=kv_block_lens)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None) + (None,) * 5
