"""Block-sparse attention forward for sm_90 in Gluon, 64x64 blocks: one CTA = two query blocks, ping-pong.

Semantics of `reference.block_sparse_attn_reference(..., block_size=(64, 64))`; the structure of `hopper`, except
that consumer warpgroup w serves query block 2t+w with its own key-block list and its own K/V ring (barriers
indexed w*NUM_STAGES + s, all count 1), and the producer loads, at each step t, K0_t, V0_t (t < c0) then K1_t, V1_t
(t < c1). A consumer with c > 0 key blocks has c + 1 wgmma issue slots (prologue, c - 1 steady, tail); the turn
protocol of `_take_turn`/`_pass_turn` alternates the two while both have slots left. Shared memory: Q 32 KiB +
2 x NUM_STAGES x 32 KiB; HAS_DST takes 16 KiB more, so it needs NUM_STAGES = 2. Notes: docs/kernel-notes.md.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .hopper import _GL_DTYPES, LAUNCH, _launch, _output, _softmax_step, _store_rows, _tma_load, _tma_store

__all__ = ["block_sparse_attn_hopper64", "LAUNCH"]

BLOCK = 64  # query block = key block = 64 (semantic)
HEAD_DIM = 128


@gluon.jit
def _block_row(CNT, pid_bh, qb, N_QB, MAX_KV):
    """(clamped key-block count, row of the selection) of query block qb of (b, h); count 0 if qb >= N_QB (the
    missing second block of the last pair); the row is then clamped to a valid one so that reads stay in bounds."""
    row = pid_bh.to(gl.int64) * N_QB + gl.minimum(qb, N_QB - 1)
    c = gl.load(CNT + row)
    c = gl.maximum(gl.minimum(c, MAX_KV), 0)
    c = gl.where(qb < N_QB, c, 0)
    return c, row


@gluon.jit
def _slots(c):
    """wgmma issue slots of a consumer with c key blocks: prologue + (c - 1) steady + tail, none for c = 0."""
    return gl.where(c > 0, c + 1, 0)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b, ph, pid_bh, j):
    """TMA of key block j of (b, h) = pid_bh (rows j*64.. of the `[B*H, S, D]` descriptors) into stage b."""
    # wait for the stage to be released by its consumer (fresh barrier: parity 1 passes at once)
    mbarrier.wait(k_empty.index(b), ph ^ 1)
    mbarrier.expect(k_ready.index(b), k_desc.block_type.nbytes)
    _tma_load(k_desc, [pid_bh, j * 64, 0], k_ready.index(b), k_smem.index(b))
    mbarrier.wait(v_empty.index(b), ph ^ 1)
    mbarrier.expect(v_ready.index(b), v_desc.block_type.nbytes)
    _tma_load(v_desc, [pid_bh, j * 64, 0], v_ready.index(b), v_smem.index(b))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              IDX, CNT, N_QB, N_PAIRS, MAX_KV,
              NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    tile = gl.program_id(0)
    pid_pair = tile % N_PAIRS
    pid_bh = tile // N_PAIRS
    qb0 = pid_pair * 2
    c0, row0 = _block_row(CNT, pid_bh, qb0, N_QB, MAX_KV)
    c1, row1 = _block_row(CNT, pid_bh, qb0 + 1, N_QB, MAX_KV)
    idx0 = IDX + row0 * MAX_KV
    idx1 = IDX + row1 * MAX_KV

    # Q of each consumer that has work (a consumer with count 0 never waits for Q and stages its zeros in the buffer)
    if c0 > 0:
        mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
        _tma_load(q_desc, [pid_bh, qb0 * 64, 0], q_bar.index(0), q_smem.index(0))
    if c1 > 0:
        mbarrier.expect(q_bar.index(1), q_desc.block_type.nbytes)
        _tma_load(q_desc, [pid_bh, (qb0 + 1) * 64, 0], q_bar.index(1), q_smem.index(1))

    # key-block ids one step ahead (the address is clamped into the row: always readable, unused past the count)
    j0 = gl.load(idx0)
    j1 = gl.load(idx1)
    for t in range(gl.maximum(c0, c1)):
        s = t % NUM_STAGES
        ph = (t // NUM_STAGES) & 1
        nxt = gl.minimum(t + 1, MAX_KV - 1)
        j0n = gl.load(idx0 + nxt)
        j1n = gl.load(idx1 + nxt)
        if t < c0:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, s, ph, pid_bh, j0)
        if t < c1:
            _load_kv(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, NUM_STAGES + s, ph,
                     pid_bh, j1)
        j0 = j0n
        j1 = j1n


@gluon.jit
def _take_turn(turn, k, n_other, WG: gl.constexpr):
    """Before issue slot k: WG0 waits for the k-th arrival on turn[0] iff 1 <= k <= n_other, WG1 for the (k+1)-th on
    turn[1] iff k < n_other. So WG0 s0, WG1 s0, WG0 s1, ... alternate while both have slots, then the longer side runs
    free; each arrival of `_pass_turn` has exactly one wait, and no waiter falls two phases behind."""
    if WG == 0:
        if (k >= 1) & (k <= n_other):
            mbarrier.wait(turn.index(0), (k - 1) & 1)
    else:
        if k < n_other:
            mbarrier.wait(turn.index(1), k & 1)


@gluon.jit
def _pass_turn(turn, k, n_other, WG: gl.constexpr):
    """After issuing slot k: hand the turn over iff the other consumer will wait for it."""
    if WG == 0:
        if k < n_other:
            mbarrier.arrive(turn.index(1), count=1)
    else:
        if k + 1 < n_other:
            mbarrier.arrive(turn.index(0), count=1)


@gluon.jit
def _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN,
              WG: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, HAS_DST: gl.constexpr):
    # one warpgroup = 64 rows along M
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    tile = gl.program_id(0)
    pid_pair = tile % N_PAIRS
    pid_bh = tile // N_PAIRS
    qb = pid_pair * 2 + WG
    cnt, row = _block_row(CNT, pid_bh, qb, N_QB, MAX_KV)
    c_other, row_other = _block_row(CNT, pid_bh, pid_pair * 2 + (1 - WG), N_QB, MAX_KV)
    n_other = _slots(c_other)
    idx_row = IDX + row * MAX_KV
    base = WG * NUM_STAGES  # this consumer's ring

    q_view3 = q_smem.index(WG)  # [1, BLOCK_M, D]; also the O staging buffer
    q_tile = q_view3.reshape([BLOCK_M, HEAD_DIM])
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_layout)

    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    p_op = gl.zeros([BLOCK_M, BLOCK_N], q_desc.dtype, layout=p_layout)

    # ---- prologue (slot 0): S_0 = Q K_0^T, softmax
    if cnt > 0:
        mbarrier.wait(q_bar.index(WG), 0)
        j = gl.load(idx_row)
        mbarrier.wait(k_ready.index(base), 0)
        _take_turn(turn, 0, n_other, WG)
        k_t = k_smem.index(base).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, 0, n_other, WG)
        s_tile = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(base), count=1)
        p, alpha, m_i, l_i = _softmax_step(s_tile, m_i, l_i, S - j * BLOCK_N, qk_scale, mma_layout, BLOCK_N)
        p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)

    # ---- steady state (slot t): issue S_t = Q K_t^T and O += P_{t-1} V_{t-1}, then softmax(S_t) while PV runs
    for t in range(1, cnt):
        s = base + t % NUM_STAGES
        ph = (t // NUM_STAGES) & 1
        sp = base + (t - 1) % NUM_STAGES
        php = ((t - 1) // NUM_STAGES) & 1
        j = gl.load(idx_row + t)
        mbarrier.wait(k_ready.index(s), ph)
        _take_turn(turn, t, n_other, WG)
        k_t = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(sp), php)
        v_t = v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v_t, acc, is_async=True)
        _pass_turn(turn, t, n_other, WG)
        s_tile = warpgroup_mma_wait(1, deps=(s_tok, ))  # the older group (QK^T) is done
        mbarrier.arrive(k_empty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax_step(s_tile, m_i, l_i, S - j * BLOCK_N, qk_scale, mma_layout, BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)

    # ---- tail (slot cnt): O += P_last V_last
    if cnt > 0:
        tl_ = cnt - 1
        sl = base + tl_ % NUM_STAGES
        mbarrier.wait(v_ready.index(sl), (tl_ // NUM_STAGES) & 1)
        _take_turn(turn, cnt, n_other, WG)
        v_t = v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v_t, acc, is_async=True)
        _pass_turn(turn, cnt, n_other, WG)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(sl), count=1)

    # ---- epilogue: O = acc / l (0 for key-less rows) -> the Q buffer (all QK^T done; never loaded if cnt == 0)
    # -> TMA store, clipped at S by the [B*H, S, D] descriptor. Nothing to store for a missing second block.
    if qb < N_QB:
        l_o = gl.convert_layout(l_i, orow_layout)
        l_safe = gl.where(l_o > 0.0, l_o, 1.0)
        out = (acc / gl.expand_dims(l_safe, 1)).to(o_desc.dtype)
        if HAS_DST:
            _store_rows(out, O, DST, pid_bh, qb * BLOCK_M, S, OUT_LEN, BLOCK_M, HEAD_DIM, 4)
        else:
            q_tile.store(out)
            fence_async_shared()
            _tma_store(o_desc, [pid_bh, qb * BLOCK_M, 0], q_view3)
            tma.store_wait(0)


@gluon.jit
def _consumer0(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
               IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN,
               NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               HAS_DST: gl.constexpr):
    _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN, 0, NUM_STAGES, BLOCK_M, BLOCK_N,
              HEAD_DIM, HAS_DST)


@gluon.jit
def _consumer1(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
               IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN,
               NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               HAS_DST: gl.constexpr):
    _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN, 1, NUM_STAGES, BLOCK_M, BLOCK_N,
              HEAD_DIM, HAS_DST)


@gluon.jit
def block_sparse_fwd64_ws(q_desc, k_desc, v_desc, o_desc, IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale,
                          O, DST, OUT_LEN,
                          NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          num_warps: gl.constexpr, HAS_DST: gl.constexpr):
    """Grid (N_PAIRS * B * H,): program p serves the query blocks 2 * (p % N_PAIRS) + {0, 1} of head p // N_PAIRS
    (consecutive programs = consecutive pairs of one head, so a head's K/V stays in L2). q/k/v/o descriptors
    `[B*H, S, D]`, block `[1, 64, D]`."""
    BLOCK_M: gl.constexpr = 64
    HEAD_DIM: gl.constexpr = 128
    BLOCK_N: gl.constexpr = 64

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2 * NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2 * NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [2 * NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [2 * NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [2 * NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [2 * NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(2):
        mbarrier.init(q_bar.index(w), count=1)
        mbarrier.init(turn.index(w), count=1)
    for i in gl.static_range(2 * NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    fence_async_shared()  # barrier inits visible to the async proxy (TMA) before use

    gl.warp_specialize([
        (_consumer0, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                      IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN, NUM_STAGES, BLOCK_M, BLOCK_N,
                      HEAD_DIM, HAS_DST)),
        (_consumer1, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                      IDX, CNT, S, N_QB, N_PAIRS, MAX_KV, qk_scale, O, DST, OUT_LEN, NUM_STAGES, BLOCK_M, BLOCK_N,
                      HEAD_DIM, HAS_DST)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     IDX, CNT, N_QB, N_PAIRS, MAX_KV, NUM_STAGES, BLOCK_M, BLOCK_N)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def block_sparse_attn_hopper64(q, k, v, kv_indices, kv_counts, scale, *, out=None, num_stages=2, out_rows=None,
                               out_len=None):
    """Block-sparse attention forward, 64x64 blocks, with the warp-specialized Gluon kernel (sm_90).

    Arguments and result as `hopper.block_sparse_attn_hopper`, with 64-row query and key blocks (`kv_indices`
    `[B, H, ceil(S/64), max_kv]`) and `num_stages` K/V stages per consumer ring.

    Example:
        >>> q = torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
        >>> idx = torch.zeros(1, 2, 5, 1, dtype=torch.int32, device="cuda")  # every query block sees key block 0
        >>> cnt = torch.ones(1, 2, 5, dtype=torch.int32, device="cuda")
        >>> block_sparse_attn_hopper64(q, q, q, idx, cnt, 128 ** -0.5).shape
        torch.Size([1, 2, 300, 128])
    """
    B, H, S, D = q.shape
    assert D == HEAD_DIM and q.dtype in _GL_DTYPES, (q.shape, q.dtype)  # the rest: `hopper.supports` (caller)
    n_qb = triton.cdiv(S, BLOCK)
    idx, cnt = kv_indices.to(torch.int32).contiguous(), kv_counts.to(torch.int32).contiguous()
    assert tuple(idx.shape[:3]) == (B, H, n_qb) and tuple(cnt.shape) == (B, H, n_qb), (idx.shape, cnt.shape)
    launch_out = _output(q, out, out_rows, out_len)
    if idx.shape[-1] == 0:  # no key anywhere
        if out_rows is None:
            return launch_out[0].zero_()
        idx = torch.zeros(B, H, n_qb, 1, dtype=torch.int32, device=q.device)  # the kernel writes the zero rows
        cnt = torch.zeros(B, H, n_qb, dtype=torch.int32, device=q.device)
    n_pairs = triton.cdiv(n_qb, 2)
    return _launch(block_sparse_fwd64_ws, q, k, v, idx, cnt, scale, launch_out, out_rows, num_stages, BLOCK, BLOCK,
                   n_pairs, n_qb, n_pairs)
