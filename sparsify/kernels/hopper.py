"""Block-sparse attention forward for sm_90 in Gluon, 128x128 blocks: a TMA producer warp, two consumer warpgroups in ping-pong.

Semantics of `reference.block_sparse_attn_reference(..., block_size=(128, 128))`. One program = one 128-row query
block of one (b, h): consumer warpgroup w (4 warps; the default partition is w = 0) takes rows 64w .. 64w+63, the
producer (1 warp) TMA-loads Q and the block's K/V tiles into a ring of NUM_STAGES stages that both consumers read.
The consumers alternate their wgmma issues (one's softmax runs under the other's tensor-core work), and issue QK^T
of step t with PV of step t-1 (P from registers). Barriers: q_bar[w] (Q half landed), k_ready/v_ready[s] (stage
landed), k_empty/v_empty[s] (count 2: both consumers done with it), turn[w] (consumer w may issue). Shared memory:
Q 32 KiB (reused for O) + NUM_STAGES x 64 KiB. Design and measurements: docs/kernel-notes.md.
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
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# triton 3.6 names these async_copy_global_to_shared / async_copy_shared_to_global; later versions async_load /
# async_store (the old names then raise)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

__all__ = ["supports", "block_sparse_attn_hopper", "LAUNCH"]

LOG2E = 1.4426950408889634
BLOCK = 128  # query block = key block = 128 (semantic)
ROWS = 64  # query rows per consumer warpgroup (the q/o descriptors' block)
# 12 warps (4 + 4 + 1 padded to 4); maxnreg 168 * 384 = 64512 regs; workers 240 * 128 + 24 * 128, default gets 240
LAUNCH = dict(num_warps=4, maxnreg=168, consumer_regs=240, producer_regs=24)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              IDX, CNT, N_QB, MAX_KV, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]  # query rows per consumer
    tile = gl.program_id(0)
    pid_m = tile % N_QB  # consecutive programs = consecutive query blocks of one head
    pid_bh = tile // N_QB
    row = pid_bh.to(gl.int64) * N_QB + pid_m
    cnt = gl.minimum(gl.load(CNT + row), MAX_KV)
    idx_row = IDX + row * MAX_KV

    # Q: one TMA per consumer half
    for w in gl.static_range(2):
        mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
        _tma_load(q_desc, [pid_bh, pid_m * (2 * ROWS) + w * ROWS, 0], q_bar.index(w), q_smem.index(w))

    for t in range(cnt):
        s = t % NUM_STAGES
        ph = (t // NUM_STAGES) & 1
        j = gl.load(idx_row + t)
        start_n = j * BLOCK_N
        # wait for the stage to be released by both consumers (fresh barrier: parity 1 passes at once)
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [pid_bh, start_n, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [pid_bh, start_n, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _softmax_step(s_tile, m_i, l_i, n_valid, qk_scale, mma_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    if n_valid < BLOCK_N:  # the partial tail key block (keys >= S): -inf
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        s_tile = gl.where(gl.expand_dims(cols, 0) < n_valid, s_tile, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s_tile, 1) * qk_scale)
    p = gl.exp2(s_tile * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _store_rows(out, O, DST, pid_bh, row0, S, OUT_LEN, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                NW: gl.constexpr):
    """The fused inverse layout: query row r = row0 + i (< S) of `out` ([ROWS, D], any layout) goes to row DST[r]
    of (b, h) = pid_bh of the [B*H, OUT_LEN, D] output O (DST[r] < 0: dropped), 16-byte vector stores."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
    vals = gl.convert_layout(out, layout)
    r = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    dst = gl.load(DST + r, mask=r < S, other=-1)
    base = O + pid_bh.to(gl.int64) * OUT_LEN * HEAD_DIM
    ptrs = base + gl.expand_dims(dst.to(gl.int64) * HEAD_DIM, 1) + gl.expand_dims(c, 0)
    gl.store(ptrs, vals, mask=gl.expand_dims(dst >= 0, 1))


@gluon.jit
def _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN,
              WG: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              HAS_DST: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]  # query rows of this consumer
    # wgmma accumulator layout: one warpgroup (4 warps stacked along M) = 64 rows
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    tile = gl.program_id(0)
    pid_m = tile % N_QB
    pid_bh = tile // N_QB
    row = pid_bh.to(gl.int64) * N_QB + pid_m
    cnt = gl.minimum(gl.load(CNT + row), MAX_KV)
    idx_row = IDX + row * MAX_KV

    q_view3 = q_smem.index(WG)  # [1, ROWS, D]; also the O staging buffer
    q_tile = q_view3.reshape([ROWS, HEAD_DIM])
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma_layout)

    mbarrier.wait(q_bar.index(WG), 0)

    m_i = gl.full([ROWS], -1.0e30, gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    p_op = gl.zeros([ROWS, BLOCK_N], q_desc.dtype, layout=p_layout)

    # wgmma issue slot u (0 = prologue, t = steady step t, cnt = tail) waits for its turn with parity
    # (u & 1) ^ (1 - WG): consumer 0 goes first, then the two alternate (both have cnt + 1 slots)
    # ---- prologue: S_0 = Q K_0^T, softmax
    if cnt > 0:
        j = gl.load(idx_row)
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(turn.index(WG), 1 - WG)
        k_t = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        s_tile = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i = _softmax_step(s_tile, m_i, l_i, S - j * BLOCK_N, qk_scale, mma_layout, BLOCK_N)
        p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)

    # ---- steady state: issue S_t = Q K_t^T and O += P_{t-1} V_{t-1}, then softmax(S_t) while PV runs
    for t in range(1, cnt):
        s = t % NUM_STAGES
        ph = (t // NUM_STAGES) & 1
        sp = (t - 1) % NUM_STAGES
        php = ((t - 1) // NUM_STAGES) & 1
        j = gl.load(idx_row + t)
        mbarrier.wait(k_ready.index(s), ph)
        mbarrier.wait(turn.index(WG), (t & 1) ^ (1 - WG))
        k_t = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q_tile, k_t, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(sp), php)
        v_t = v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v_t, acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        s_tile = warpgroup_mma_wait(1, deps=(s_tok, ))  # the older group (QK^T) is done
        mbarrier.arrive(k_empty.index(s), count=1)
        p, alpha, m_i, l_i = _softmax_step(s_tile, m_i, l_i, S - j * BLOCK_N, qk_scale, mma_layout, BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        p_op = gl.convert_layout(p.to(q_desc.dtype), p_layout)

    # ---- tail: O += P_last V_last
    if cnt > 0:
        sl = (cnt - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(sl), ((cnt - 1) // NUM_STAGES) & 1)
        mbarrier.wait(turn.index(WG), (cnt & 1) ^ (1 - WG))
        v_t = v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v_t, acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(sl), count=1)

    # ---- epilogue: O = acc / l (0 for key-less rows) -> the Q buffer (every QK^T done) -> TMA store (clips rows
    # >= S: the descriptor is [B*H, S, D])
    l_o = gl.convert_layout(l_i, orow_layout)
    l_safe = gl.where(l_o > 0.0, l_o, 1.0)
    out = (acc / gl.expand_dims(l_safe, 1)).to(o_desc.dtype)
    row0 = pid_m * (2 * ROWS) + WG * ROWS
    if HAS_DST:
        _store_rows(out, O, DST, pid_bh, row0, S, OUT_LEN, ROWS, HEAD_DIM, 4)
    else:
        q_tile.store(out)
        fence_async_shared()
        _tma_store(o_desc, [pid_bh, row0, 0], q_view3)
        tma.store_wait(0)


@gluon.jit
def _consumer0(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
               IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN,
               NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_DST: gl.constexpr):
    _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN, 0, NUM_STAGES, BLOCK_N, HEAD_DIM, HAS_DST)


@gluon.jit
def _consumer1(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
               IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN,
               NUM_STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_DST: gl.constexpr):
    _consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
              IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN, 1, NUM_STAGES, BLOCK_N, HEAD_DIM, HAS_DST)


@gluon.jit
def block_sparse_fwd_ws(q_desc, k_desc, v_desc, o_desc, IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN,
                        NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                        num_warps: gl.constexpr, HAS_DST: gl.constexpr):
    """Grid (N_QB * B * H,): program p serves query block p % N_QB of head p // N_QB (consecutive programs =
    consecutive blocks of one head, so a head's K/V stays in L2). q/o descriptors `[B*H, S, D]` with blocks of
    `[1, ROWS, D]`, k/v blocks `[1, BLOCK, D]`."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)  # also O
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(2):
        mbarrier.init(q_bar.index(w), count=1)
        mbarrier.init(turn.index(w), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()  # barrier inits visible to the async proxy (TMA) before use

    gl.warp_specialize([
        (_consumer0, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                      IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN, NUM_STAGES, BLOCK_N, HEAD_DIM, HAS_DST)),
        (_consumer1, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn,
                      IDX, CNT, S, N_QB, MAX_KV, qk_scale, O, DST, OUT_LEN, NUM_STAGES, BLOCK_N, HEAD_DIM, HAS_DST)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     IDX, CNT, N_QB, MAX_KV, NUM_STAGES, BLOCK_N)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _bh3(t: torch.Tensor):
    """`[B, H, S, D]` `t` as a `[B*H, S, D]` view without a copy (a slot prefix `t[:, :, :L]` qualifies), or None
    when its strides do not allow one."""
    B, H, S, D = t.shape
    if t.stride(3) != 1 or (B > 1 and t.stride(0) != H * t.stride(1)):
        return None
    return t.as_strided((B * H, S, D), (t.stride(1), t.stride(2), 1))


def _descs(q, k, v, o, rows: int, block_n: int):
    """Rank-3 `[B*H, S, D]` TMA descriptors, blocks of `rows` query / `block_n` key rows (loads past S read zeros,
    stores past S are clipped)."""
    D = q.shape[-1]
    descs = []
    for t, blk in ((q, [1, rows, D]), (k, [1, block_n, D]), (v, [1, block_n, D]), (o, [1, rows, D])):
        t3 = _bh3(t)
        layout = gl.NVMMASharedLayout.get_default_for(blk, _GL_DTYPES[t.dtype])
        descs.append(TensorDescriptor(t3, list(t3.shape), list(t3.stride()), blk, layout))
    return descs


def _output(q, out, out_rows, out_len):
    """(output tensor, row map, its length) of a launch: q's shape, or `[B, H, out_len, D]` with `out_rows`; the
    row map is a dummy int32 tensor without `out_rows`."""
    B, H, S, D = q.shape
    shape = (B, H, S if out_rows is None else int(out_len), D)
    o = torch.empty(shape, device=q.device, dtype=q.dtype) if out is None else out
    if not (o.is_contiguous() and tuple(o.shape) == shape and o.dtype == q.dtype):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {shape}, got {o.dtype} "
                         f"{tuple(o.shape)}")
    if out_rows is None:
        return o, torch.empty(1, device=q.device, dtype=torch.int32), S
    rows = out_rows.to(q.device, torch.int32).contiguous()
    if rows.numel() < S:
        raise ValueError(f"out_rows has {rows.numel()} entries for {S} query rows")
    return o, rows, shape[2]


def _launch(kernel, q, k, v, idx, cnt, scale, launch_out, out_rows, num_stages, rows, block, n_prog, *sizes):
    """Launch a ping-pong kernel, `n_prog` programs per head; `launch_out` is `_output`'s, `sizes` follow S."""
    B, H, S, _ = q.shape
    o, dst, out_len = launch_out
    qd, kd, vd, od = _descs(q, k, v, q if out_rows is not None else o, rows, block)
    kernel[(n_prog * B * H, )](
        qd, kd, vd, od, idx, cnt, S, *sizes, idx.shape[-1], float(scale) * LOG2E, o, dst, out_len,
        NUM_STAGES=num_stages, CONSUMER_REGS=LAUNCH["consumer_regs"], PRODUCER_REGS=LAUNCH["producer_regs"],
        num_warps=LAUNCH["num_warps"], maxnreg=LAUNCH["maxnreg"], HAS_DST=out_rows is not None)
    return o


def supports(q, k, v, block_size, kv_block_lens=None) -> tuple[bool, str]:
    """Whether a Gluon kernel serves this call (cheap, no launch); else `(False, reason)`.

    `block_sparse_attn_hopper` serves 128x128 blocks and `hopper64.block_sparse_attn_hopper64` 64x64 blocks; both
    need an sm_90 GPU (wgmma; H100/H200), q, k, v as `inputs_ok` asks and no `kv_block_lens`.

    Example:
        >>> supports(*(torch.empty(1, 1, 300, 128) for _ in range(3)), (128, 128))
        (False, 'not a CUDA tensor')
    """
    if tuple(block_size) not in ((BLOCK, BLOCK), (64, 64)):
        return False, f"block size {tuple(block_size)} (the Gluon kernels have 64x64 or 128x128 blocks)"
    if kv_block_lens is not None:
        return False, "kv_block_lens"
    return inputs_ok(q, k, v)


def inputs_ok(q, k, v) -> tuple[bool, str]:
    """The Gluon kernels' input conditions: q, k, v 16-byte aligned `[B, H, S, 128]` tensors of one 16-bit dtype on
    an sm_90 GPU, each viewable as `[B*H, S, 128]` without a copy (contiguous, a slot prefix of a contiguous tensor,
    or any layout with unit last stride when B = 1); else `(False, reason)`.

    Example:
        >>> inputs_ok(*(torch.empty(1, 1, 300, 128) for _ in range(3)))
        (False, 'not a CUDA tensor')
    """
    if not (isinstance(q, torch.Tensor) and q.is_cuda):
        return False, "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False, "not an sm_90 GPU"
    if q.dtype not in _GL_DTYPES or q.dim() != 4 or q.shape[-1] != 128:
        return False, f"dtype {q.dtype} / shape {tuple(q.shape)} (needs 16-bit, head_dim 128)"
    for t in (q, k, v):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or _bh3(t) is None \
                or t.data_ptr() % 16 or t.stride(1) % 8 or t.stride(2) % 8:
            return False, "q, k, v not 16-byte aligned [B*H, S, D] views of one shape and dtype"
    return True, ""


def block_sparse_attn_hopper(q, k, v, kv_indices, kv_counts, scale, *, out=None, num_stages=2, out_rows=None,
                             out_len=None):
    """Block-sparse attention forward with the warp-specialized Gluon kernel (call `supports` first).

    Semantics of `sparsify.kernels.block_sparse_attn` with 128x128 blocks (rows with no key are zeros).
    One program per 128-row query block of one (b, h); its two 64-row halves go to the two consumer warpgroups,
    which share its K/V stages and take turns issuing their wgmma's.

    Args:
        q, k, v: `[B, H, S, 128]`, bfloat16 or float16, on an sm_90 GPU, as `inputs_ok` asks.
        kv_indices, kv_counts: the selection, as for `block_sparse_attn` with block_size (128, 128).
        scale: softmax scale.
        out: optional contiguous output (of the result's shape and q's dtype), written in place.
        num_stages: K/V stages (2: 160 KiB of shared memory, 3: 224 KiB).
        out_rows, out_len: the fused inverse layout of `block_sparse_attn_scattered`: query row r goes to row
            `out_rows[r]` (< 0: dropped) of a `[B, H, out_len, 128]` result; rows nobody names stay unwritten.

    Returns:
        `[B, H, S, 128]` (or `[B, H, out_len, 128]`) in q's dtype.

    Example:
        >>> q = torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
        >>> idx = torch.tensor([0, 2, 0], dtype=torch.int32, device="cuda").expand(1, 2, 3, 3)
        >>> cnt = torch.full((1, 2, 3), 2, dtype=torch.int32, device="cuda")
        >>> block_sparse_attn_hopper(q, q, q, idx, cnt, 128 ** -0.5).shape
        torch.Size([1, 2, 300, 128])
    """
    n_qb = triton.cdiv(q.shape[2], BLOCK)
    idx, cnt = kv_indices.to(torch.int32).contiguous(), kv_counts.to(torch.int32).contiguous()
    return _launch(block_sparse_fwd_ws, q, k, v, idx, cnt, scale, _output(q, out, out_rows, out_len), out_rows,
                   num_stages, ROWS, BLOCK, n_qb, n_qb)
