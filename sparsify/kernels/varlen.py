"""Variable-size block-sparse attention: query blocks and key blocks of any length (e.g. SVG2's clusters)."""

from __future__ import annotations

import math

import torch

from ._triton import _MAX, _SUM, interpreting, jit

try:  # triton is optional at import time: `supports_varlen` then says why nothing runs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton on this platform
    triton = None
    tl = None

__all__ = ["varlen_block_attn", "default_block_size", "varlen_block_attn_reference", "varlen_pairs", "supports_varlen",
           "q_tile_table", "kv_key_table"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _check(q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, key_mask):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must be [B, H, Sq, D] and k, v [B, H, Sk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H = q.shape[:2]
    nq = q_starts.shape[-1] if q_starts.dim() == 3 else -1
    nk = k_starts.shape[-1] if k_starts.dim() == 3 else -1
    for name, t, want in (("q_starts", q_starts, (B, H, nq)), ("q_lens", q_lens, (B, H, nq)),
                          ("k_starts", k_starts, (B, H, nk)), ("k_lens", k_lens, (B, H, nk)),
                          ("kv_counts", kv_counts, (B, H, nq))):
        if tuple(t.shape) != want or nq < 1 or nk < 1:
            raise ValueError(f"{name} must be [B, H, n] with B, H = {B}, {H} (n >= 1, equal for the q_* "
                             f"tensors and kv_counts); got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"{name} must be an int32 tensor on {q.device}; got {t.dtype} on {t.device}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, nq) or kv_indices.shape[3] < 1:
        raise ValueError(f"kv_indices must be [B, H, {nq}, max_kv >= 1]; got {tuple(kv_indices.shape)}")
    if key_mask is not None and tuple(key_mask.shape) not in ((B, k.shape[2]), (B, H, k.shape[2])):
        raise ValueError(f"key_mask must be bool [B, Sk] or [B, H, Sk] with B, H, Sk = {B}, {H}, {k.shape[2]}; "
                         f"got {tuple(key_mask.shape)}")


def _token_masks(q_starts, q_lens, k_starts, k_lens, Sq, Sk):
    """Per (b, h): the q block of every query row (-1: none) and the k block of every key (-1: none)."""
    def owner(starts, lens, S):
        pos = torch.arange(S, device=starts.device)
        inside = (pos >= starts[..., None]) & (pos < (starts + lens)[..., None])  # [B, H, n, S]
        blk = torch.where(inside, torch.arange(starts.shape[-1], device=starts.device)[:, None], -1)
        return blk.amax(-2)

    return owner(q_starts.long(), q_lens.long(), Sq), owner(k_starts.long(), k_lens.long(), Sk)


def varlen_block_attn_reference(q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, *,
                                scale: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Variable-size block-sparse attention, computed densely with a token mask (float32, float64 for float64).

    Query block `i` of `(b, h)` (rows `q_starts[b, h, i] .. + q_lens[b, h, i]`) attends to the keys of the
    blocks `kv_indices[b, h, i, :kv_counts[b, h, i]]` (key block `j`: keys `k_starts[b, h, j] .. + k_lens`).
    Blocks are disjoint, inside the sequence, possibly empty. Rows outside every query block, and rows that
    see no key, are zeros.

    Args:
        q: `[B, H, Sq, D]`; k, v: `[B, H, Sk, D]`.
        q_starts, q_lens: int `[B, H, NQ]`; k_starts, k_lens: int `[B, H, NK]`.
        kv_indices: int `[B, H, NQ, max_kv]`; kv_counts: int `[B, H, NQ]`.
        scale: softmax scale, default `1/sqrt(D)`.
        key_mask: optional bool `[B, Sk]` or `[B, H, Sk]`: False keys are never attended.

    Example:
        >>> q = k = v = torch.randn(1, 1, 5, 16)
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32).view(1, 1, -1)
        >>> out = varlen_block_attn_reference(q, k, v, i32(0, 2), i32(2, 3), i32(0, 3), i32(3, 2),
        ...                                   i32(1, 0).view(1, 1, 2, 1), i32(1, 1))
        >>> torch.allclose(out[0, 0, :2], torch.softmax(q[0, 0, :2] @ k[0, 0, 3:].T / 4, -1) @ v[0, 0, 3:])
        True
    """
    _check(q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, key_mask)
    B, H, Sq, D = q.shape
    Sk, nk = k.shape[2], k_starts.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qb, kb = _token_masks(q_starts, q_lens, k_starts, k_lens, Sq, Sk)
    live = torch.arange(kv_indices.shape[-1], device=q.device) < kv_counts[..., None].long()
    sel = torch.zeros(B, H, kv_counts.shape[-1], nk + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where(live, kv_indices.long(), nk), True)
    sel = sel[..., :nk]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, H, Sq, D, dtype=acc, device=q.device)
    for b in range(B):
        for h in range(H):
            rq, rk = qb[b, h], kb[b, h]
            allowed = (rq[:, None] >= 0) & (rk[None, :] >= 0)
            allowed &= sel[b, h][rq.clamp_min(0)][:, rk.clamp_min(0)]
            if key_mask is not None:
                allowed &= (key_mask[b] if key_mask.dim() == 2 else key_mask[b, h]).to(torch.bool)[None, :]
            s = (q[b, h].to(acc) @ k[b, h].to(acc).T * scale).masked_fill(~allowed, float("-inf"))
            m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
            p = torch.exp(s - m)
            den = p.sum(-1, keepdim=True)
            out[b, h] = torch.where(den > 0, (p @ v[b, h].to(acc)) / den.clamp_min(1e-30), 0.0)
    return out.to(q.dtype)


def varlen_pairs(q_lens, k_lens, kv_indices, kv_counts, block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(query, key) pairs a selection computes, per `(b, h)` (float64 `[B, H]`).

    With `block_size=(BLOCK_M, BLOCK_N)`, the kernel's work: query blocks rounded up to `BLOCK_M` rows, each
    block's selected keys (packed) rounded up to `BLOCK_N`. Without it, the exact pairs.

    Example:
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32).view(1, 1, -1)
        >>> idx, cnt = i32(0, 1).view(1, 1, 1, 2), i32(2)
        >>> varlen_pairs(i32(10), i32(3, 20), idx, cnt).item(), varlen_pairs(i32(10), i32(3, 20), idx, cnt, (16, 16)).item()
        (230.0, 512.0)
    """
    ql, kl = q_lens.double(), k_lens.double()
    if block_size is not None:
        ql = torch.ceil(ql / block_size[0]) * block_size[0]
    B, H, nq, w = kv_indices.shape
    live = torch.arange(w, device=kv_indices.device) < kv_counts[..., None].long()
    got = torch.gather(kl, 2, kv_indices.long().clamp(0, kl.shape[-1] - 1).reshape(B, H, nq * w)).view(B, H, nq, w)
    keys = (got * live).sum(-1)
    if block_size is not None:
        keys = torch.ceil(keys / block_size[1]) * block_size[1]
    return (ql * keys).sum(-1)


# One program per query tile (BLOCK_M rows of one query block), looping over the block's selected keys packed
# into BLOCK_N-key chunks through a key table; chunking each block on its own was slower (docs/kernel-notes.md).
def _varlen_kernel(
    Q, K, V, O, KM,
    T_BLK, T_ROW, T_LEN,  # [BH, MT]: query block, first row and rows (0: no tile) of every query tile
    KEYS, KEY_FIRST, N_KEYS,  # the key table (flat int32), [BH, NQ] first entry (int64) and count of every query block
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, skmb, skmh,
    H, NQ, MT, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    trow = pid_bh.to(tl.int64) * MT + pid_t
    m_len = tl.load(T_LEN + trow)
    if m_len > 0:
        qblk = tl.load(T_BLK + trow)
        r0 = tl.load(T_ROW + trow)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = (r0 + offs_m).to(tl.int64)
        row_ok = offs_m < m_len
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None] * sqs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        out_dtype = q.dtype
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
        qrow = pid_bh.to(tl.int64) * NQ + qblk
        key_row = tl.load(KEY_FIRST + qrow)
        n_keys = tl.load(N_KEYS + qrow)
        n_ch = (n_keys + BLOCK_N - 1) // BLOCK_N
        for t in range(n_ch):  # one flat loop over every selected key chunk: software-pipelined like a tile loop
            # (triton's pipeliner reads the key table a stage ahead of the K/V loads it addresses)
            at = t * BLOCK_N + offs_n
            ok = at < n_keys
            kn = tl.load(KEYS + key_row + at, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_base + kn[:, None] * sks + offs_d[None, :], mask=ok[:, None], other=0.0)
            if HAS_MASK:
                ok = ok & (tl.load(KM + b.to(tl.int64) * skmb + h.to(tl.int64) * skmh + kn, mask=ok, other=0) != 0)
            if DOT_FP32:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
            qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            acc = acc * alpha[:, None]
            m_i = m_ij
            v = tl.load(v_base + kn[:, None] * svs + offs_d[None, :], mask=ok[:, None], other=0.0)
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = (acc / l_safe[:, None]).to(out_dtype)
        tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None] * sos + offs_d[None, :], o,
                 mask=row_ok[:, None])


def _key_table_kernel(KEYS, FIRST, COUNT, IDX, CNT, K_START, K_LEN, NQ, NK, W, WRITE: tl.constexpr,
                      JB: tl.constexpr, BK: tl.constexpr):
    """One (b, h, query block) per program: its selected blocks JB at a time; WRITE: store their keys, BK at a time,
    from FIRST on; else store their total length to COUNT."""
    r = tl.program_id(0).to(tl.int64)
    bh = r // NQ
    n_sel = tl.minimum(tl.load(CNT + r), W)
    at = tl.load(FIRST + r) if WRITE else 0
    total = 0
    offs_j = tl.arange(0, JB)
    offs_k = tl.arange(0, BK)
    for j0 in range(0, n_sel, JB):
        jm = j0 + offs_j < n_sel
        blk = tl.minimum(tl.maximum(tl.load(IDX + r * W + j0 + offs_j, mask=jm, other=0), 0), NK - 1)
        n = tl.load(K_LEN + bh * NK + blk, mask=jm, other=0)
        total += tl.reduce(n, 0, _SUM)
        if WRITE:
            s = tl.load(K_START + bh * NK + blk, mask=jm, other=0)
            dst = at + tl.associative_scan(n, 0, _SUM) - n  # each block's first entry
            for o in range(0, tl.reduce(n, 0, _MAX), BK):
                kk = o + offs_k
                tl.store(KEYS + dst[:, None] + kk[None, :], s[:, None] + kk[None, :], mask=kk[None, :] < n[:, None])
            at += tl.reduce(n, 0, _SUM)
    if not WRITE:
        tl.store(COUNT + r, total)


def kv_key_table(k_starts, k_lens, kv_indices, kv_counts):
    """Every query block's selected keys, packed one block after another (one device sync: the table's size).

    Returns `(keys, first, count)`: int32 `[N]` key positions, those of query block `i` of `(b, h)` at
    `keys[first[b * H + h, i] : + count[b * H + h, i]]` in selection order; int64 `[B*H, NQ]` first entries and
    int32 `[B*H, NQ]` counts. Two Triton kernels (the counts, then the keys), on CUDA or the interpreter.

    Example:
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32).view(1, 1, -1)
        >>> keys, first, n = kv_key_table(i32(0, 5), i32(5, 3), i32(1, 0, 1, 9).view(1, 1, 2, 2), i32(2, 1))
        >>> keys.tolist(), first.tolist(), n.tolist()
        ([5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7], [[0, 8]], [[8, 3]])
    """
    B, H, nq, w = kv_indices.shape
    nk = k_starts.shape[-1]
    dev = kv_indices.device
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    idx, cnt, ks, kl = i32(kv_indices), i32(kv_counts), i32(k_starts), i32(k_lens)
    count = torch.empty(B * H, nq, dtype=torch.int32, device=dev)
    interpret = dev.type == "cpu"
    args = (idx, cnt, ks, kl, nq, nk, w)
    kernel = jit(_key_table_kernel, interpret)
    kernel[(B * H * nq,)](count, count, count, *args, WRITE=False, JB=32, BK=64, num_warps=4)
    first = torch.cumsum(count.flatten(), 0, dtype=torch.int64)
    total = int(first[-1]) if first.numel() else 0
    first = (first - count.flatten()).view(B * H, nq)
    keys = torch.empty(max(1, total), dtype=torch.int32, device=dev)
    if total:
        kernel[(B * H * nq,)](keys, first, count, *args, WRITE=True, JB=32, BK=64, num_warps=4)
    return keys, first, count


def supports_varlen(q: torch.Tensor) -> tuple[bool, str]:
    """Whether `varlen_block_attn` can run on a query like `q` (no launch).

    Example:
        >>> supports_varlen(torch.empty(1, 1, 8, 96))
        (False, 'head_dim 96 not supported (one of (16, 32, 64, 128))')
    """
    if triton is None:
        return False, "triton is not installed"
    if q.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} not supported (one of {SUPPORTED_DTYPES})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {q.shape[-1]} not supported (one of {SUPPORTED_HEAD_DIMS})"
    if q.device.type == "cuda" or (q.device.type == "cpu" and interpreting()):
        return True, ""
    return False, f"{q.device} tensors run only on CUDA or under the Triton interpreter (TRITON_INTERPRET=1)"


def q_tile_table(q_starts: torch.Tensor, q_lens: torch.Tensor, block_m: int, seq_len: int):
    """Split every query block into `block_m`-row tiles, without a device sync.

    Returns `(blk, row, len)`, int32 `[B*H, NQ + ceil(seq_len / block_m)]` (enough for disjoint blocks
    inside the sequence): each tile's query block, first row and row count (0 for unused slots).

    Example:
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32).view(1, 1, -1)
        >>> blk, row, ln = q_tile_table(i32(0, 5), i32(5, 3), 4, 8)
        >>> blk[0, :3].tolist(), row[0, :3].tolist(), ln[0].tolist()
        ([0, 0, 1], [0, 4, 5], [4, 1, 3, 0])
    """
    B, H, nq = q_starts.shape
    starts, lens = q_starts.reshape(B * H, nq).long(), q_lens.reshape(B * H, nq).long()
    n_t = (lens + block_m - 1) // block_m
    cum = torch.cumsum(n_t, -1)
    mt = nq + -(-seq_len // block_m)
    t = torch.arange(mt, device=q_starts.device).expand(B * H, mt).contiguous()
    blk = torch.searchsorted(cum, t, right=True)
    ok = blk < nq
    bc = blk.clamp_max(nq - 1)
    within = t - (torch.gather(cum, 1, bc) - torch.gather(n_t, 1, bc))
    row = torch.gather(starts, 1, bc) + within * block_m
    ln = torch.where(ok, (torch.gather(lens, 1, bc) - within * block_m).clamp(0, block_m), 0)
    return bc.to(torch.int32), row.to(torch.int32), ln.to(torch.int32)


def default_block_size(q: torch.Tensor) -> tuple[int, int]:
    """`(BLOCK_M, BLOCK_N)` that `varlen_block_attn` uses for a query like `q` (for `varlen_pairs`).

    Example:
        >>> default_block_size(torch.empty(1, 1, 8, 64))
        (32, 16)
    """
    return _default_blocks(q)[:2]


def _default_blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); head_dim 128 takes 128-key chunks (faster on an H200:
    `python -m benchmarks.op --methods svg2 --kernel-tiles 128x128`)."""
    if q.device.type != "cuda":
        return 32, 16, 4, 1
    D = q.shape[-1]
    if q.dtype == torch.float32:
        return 64, 32, 4, 1
    if D >= 128:
        return 128, 128, 8, 2
    return 128, 64, 4, 3


def varlen_block_attn(q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, *,
                      scale: float | None = None, key_mask: torch.Tensor | None = None,
                      block_size: tuple[int, int] | None = None, num_warps: int | None = None,
                      num_stages: int | None = None) -> torch.Tensor:
    """Variable-size block-sparse attention (forward) with a Triton kernel.

    The semantics of `varlen_block_attn_reference` (e.g. SVG2's clusters after its permutation). One program
    per `BLOCK_M`-row tile of a query block walks the block's selected keys in `BLOCK_N`-key chunks through
    `kv_key_table` (one device sync; 4 bytes per (query block, selected key): about 180 MB at Wan-14B 720p,
    5%). The work done is `varlen_pairs(..., block_size)`. CUDA, or CPU under `TRITON_INTERPRET=1`.

    Args:
        q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, scale, key_mask: as in
            `varlen_block_attn_reference`; the block tensors int32 (int64 is converted).
        block_size: `(BLOCK_M, BLOCK_N)` tile sizes (powers of two >= 16); default by device and dtype.
        num_warps, num_stages: launch options (CUDA); default by head dim.

    Returns:
        `[B, H, Sq, D]`, contiguous, in q's dtype.

    Example:
        >>> q = k = v = torch.randn(1, 1, 300, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda").view(1, 1, -1)  # doctest: +SKIP
        >>> out = varlen_block_attn(q, k, v, i32(0, 100), i32(100, 200), i32(0, 7), i32(7, 293),
        ...                         i32(1, 0).view(1, 1, 2, 1), i32(1, 1))  # doctest: +SKIP
    """
    _check(q, k, v, q_starts, q_lens, k_starts, k_lens, kv_indices, kv_counts, key_mask)
    ok, why = supports_varlen(q)
    if not ok:
        raise ValueError(f"varlen_block_attn: {why}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("varlen_block_attn: q, k, v must share a dtype and a device")
    B, H, Sq, D = q.shape
    bm, bn, nw, ns = _default_blocks(q)
    if block_size is not None:
        bm, bn = (int(x) for x in block_size)
        if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"varlen_block_attn: block_size {block_size} must be powers of two >= 16")
    nw, ns = num_warps or nw, num_stages or ns
    interpret = q.device.type == "cpu"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    blk, row, ln = q_tile_table(q_starts, q_lens, bm, Sq)
    nq = q_starts.shape[-1]
    keys, first, n_keys = kv_key_table(k_starts, k_lens, kv_indices, kv_counts)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else n_keys  # dummy pointer
    out = torch.zeros(B, H, Sq, D, dtype=q.dtype, device=q.device)
    mt = blk.shape[1]
    jit(_varlen_kernel, interpret)[(mt, B * H)](
        q, k, v, out, km, blk, row, ln, keys, first, n_keys,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        km.stride(0) if key_mask is not None else 0,
        km.stride(1) if key_mask is not None and key_mask.dim() == 3 else 0,
        H, nq, mt, float(1.0 / math.sqrt(D) if scale is None else scale) * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, HAS_MASK=key_mask is not None, DOT_FP32=interpret,
        INPUT_PRECISION="ieee" if (q.dtype == torch.float32 or interpret) else "tf32",
        num_warps=nw, num_stages=ns)
    return out
