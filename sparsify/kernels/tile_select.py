"""Triton kernels for tile selection: row-wise top-k by bisection, and Veda's exact tile peaks (one fused GEMM)."""

from __future__ import annotations

import torch

from .gather import _MAX, _MIN, _SUM, _jit, interpreter  # noqa: F401  (interpreter: for the examples)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


def _topk_kernel(s_ptr, k_ptr, out_ptr, H, nq, nk, max_kv, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SORT: tl.constexpr):
    """One row of s (float32 [B*H*nq, nk]) per program (one warp): the k = k_ptr[head] largest entries,
    sorted by score (ties: lower index first), in out[row, :k]; slots k..max_kv get index 0.

    The k-th largest is found by bisection on the order-preserving int32 image of the floats, between
    the row's min and max, stopping as soon as a midpoint has exactly k keys at or above it (about half
    of the 32 steps on Gaussian scores). The kept entries are written in index order; with SORT they are
    then reloaded (BLOCK_K >= max_kv of them), ranked by pairwise comparison of `key << 32 | ~index` in
    chunks of 32, and written at their rank."""
    row = tl.program_id(0)
    kk = tl.load(k_ptr + (row // nq) % H)
    cols = tl.arange(0, BLOCK_N)
    m = cols < nk
    srow = s_ptr + row.to(tl.int64) * nk
    x = tl.load(srow + cols, mask=m, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    lo = tl.reduce(tl.where(m, key, 2147483647), 0, _MIN).to(tl.int64)  # count(key >= lo) = nk >= kk
    hi = tl.reduce(tl.where(m, key, -2147483648), 0, _MAX).to(tl.int64)  # the k-th largest is <= hi
    key = tl.where(m, key, -2147483648)  # padding: at or below every real key
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        c = tl.reduce((key >= mid.to(tl.int32)).to(tl.int32), 0, _SUM)
        lo = tl.where(c >= kk, mid, lo)
        hi = tl.where(c == kk, mid, tl.where(c > kk, hi, mid - 1))  # exactly kk at or above mid: done
    t = lo.to(tl.int32)  # kk keys >= t, and fewer than kk keys > t
    gt = key > t
    eq = (key == t) & m
    n_gt = tl.reduce(gt.to(tl.int32), 0, _SUM)
    eq_rank = tl.associative_scan(eq.to(tl.int32), 0, _SUM)  # inclusive
    sel = gt | (eq & (eq_rank <= kk - n_gt))
    pos = tl.associative_scan(sel.to(tl.int32), 0, _SUM) - 1
    base = out_ptr + row.to(tl.int64) * max_kv
    tl.store(base + pos, cols, mask=sel)
    if SORT:
        tl.debug_barrier()
        j = tl.arange(0, BLOCK_K)
        live = j < kk
        idx = tl.load(base + j, mask=live, other=0)
        xb = tl.load(srow + idx, mask=live, other=0.0).to(tl.int32, bitcast=True)
        packed = tl.where(live, (tl.where(xb < 0, xb ^ 0x7FFFFFFF, xb).to(tl.int64) << 32)
                          | (4294967295 - idx.to(tl.int64)), -9223372036854775807 - 1)
        rank = j * 0
        for c0 in range(0, BLOCK_K, 32):
            jc = c0 + tl.arange(0, 32)
            lc = jc < kk
            ic = tl.load(base + jc, mask=lc, other=0)
            xc = tl.load(srow + ic, mask=lc, other=0.0).to(tl.int32, bitcast=True)
            pc = tl.where(lc, (tl.where(xc < 0, xc ^ 0x7FFFFFFF, xc).to(tl.int64) << 32)
                          | (4294967295 - ic.to(tl.int64)), -9223372036854775807 - 1)
            rank += tl.reduce((pc[None, :] > packed[:, None]).to(tl.int32), 1, _SUM)
        tl.debug_barrier()  # every lane has read the index-order list before it is overwritten
        tl.store(base + rank, idx, mask=live)
        tl.store(base + j, j * 0, mask=(j >= kk) & (j < max_kv))
    else:
        tl.store(base + cols, cols * 0, mask=(cols >= kk) & (cols < max_kv))


#: Largest power-of-two kept count sorted inside the top-k kernel (pairwise ranks); beyond it, torch sorts.
_SORT_IN_KERNEL = 128


def topk_indices(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """The `ks[h]` largest key tiles of every row of `scores` `[B, H, n_q, n_k]`, sorted by score.

    Same result as `torch.topk(scores[:, h], ks[h], sorted=True)` (up to the order of tied scores),
    computed by one Triton program per row: a bisection over the float bits of the row, then a sort of
    the kept entries.

    Returns:
        int32 `[B, H, n_q, max(ks)]`; past `ks[h]` the entries are index 0 (valid, ignored by a count).

    Example:
        >>> s = torch.tensor([[[[0.1, 0.9, 0.5, 0.7]]]])
        >>> with interpreter():
        ...     topk_indices(s, [2])[0, 0, 0].tolist()
        [1, 3]
    """
    B, H, nq, nk = scores.shape
    if len(ks) != H or not all(1 <= k <= nk for k in ks):
        raise ValueError(f"topk_indices: need one k in [1, {nk}] per head ({H}); got {ks}")
    s = scores.float().contiguous()
    max_kv = max(ks)
    out = torch.empty(B, H, nq, max_kv, dtype=torch.int32, device=s.device)
    kt = torch.tensor(ks, dtype=torch.int32, device=s.device)
    block_k = triton.next_power_of_2(max_kv)
    sort_here = block_k <= _SORT_IN_KERNEL
    _jit(_topk_kernel)[(B * H * nq,)](s, kt, out, H, nq, nk, max_kv, BLOCK_N=triton.next_power_of_2(nk),
                                      BLOCK_K=block_k if sort_here else 1, SORT=sort_here, num_warps=1)
    if sort_here:
        return out
    vals = torch.gather(s, -1, out.long())  # many kept entries: sort them by score outside the kernel
    live = torch.arange(max_kv, device=s.device) < kt.view(1, H, 1, 1)
    vals = torch.where(live, vals, torch.full_like(vals, float("-inf")))
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return torch.gather(out, -1, order).contiguous()


def _peak_kernel(qm_ptr, k_ptr, lens_ptr, out_ptr, mean_ptr, mix_ptr, n, n_slots, scale,
                 D: tl.constexpr, VOL: tl.constexpr, BM: tl.constexpr, TN: tl.constexpr,
                 MEAN: tl.constexpr, MIX: tl.constexpr):
    """out[bh, i, j] = max over the valid keys y of tile j of qm[bh, i] . k[bh, y] * scale (float32 acc);
    with MEAN the mean of those logits, with MIX log((L-1)/L exp(mean) + exp(peak)/L)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    qi = pid_m * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    qmask = qi < n
    qm = tl.load(qm_ptr + (bh.to(tl.int64) * n + qi[:, None]) * D + d[None, :], mask=qmask[:, None], other=0.0)
    r = tl.arange(0, TN * VOL)
    kbase = k_ptr + bh.to(tl.int64) * n_slots * D
    for j0 in range(0, n, TN):
        tiles = j0 + r // VOL
        ln = tl.load(lens_ptr + tiles, mask=tiles < n, other=0)
        kv = (r % VOL) < ln
        kk = tl.load(kbase + (j0 * VOL + r[:, None]).to(tl.int64) * D + d[None, :], mask=kv[:, None], other=0.0)
        s = tl.dot(qm, tl.trans(kk))  # [BM, TN*VOL]
        pk = tl.reduce(tl.reshape(tl.where(kv[None, :], s, float("-inf")), (BM, TN, VOL)), 2, _MAX) * scale
        tj = j0 + tl.arange(0, TN)
        o = (bh.to(tl.int64) * n + qi[:, None]) * n + tj[None, :]
        om = qmask[:, None] & (tj[None, :] < n)
        tl.store(out_ptr + o, pk, mask=om)
        if MEAN or MIX:
            L = tl.load(lens_ptr + tj, mask=tj < n, other=1).to(tl.float32)
            sm = tl.reduce(tl.reshape(tl.where(kv[None, :], s, 0.0), (BM, TN, VOL)), 2, _SUM)
            mean = sm * scale / tl.maximum(L, 1.0)[None, :]
            if MEAN:
                tl.store(mean_ptr + o, mean, mask=om)
            if MIX:  # log((L-1) e^mean + e^peak) - log L, stably (peak >= mean)
                mix = pk + tl.log((L[None, :] - 1.0) * tl.exp(mean - pk) + 1.0) - tl.log(L)[None, :]
                tl.store(mix_ptr + o, mix, mask=om)


def tile_peaks(qm: torch.Tensor, k: torch.Tensor, tile_lens: torch.Tensor, volume: int, scale: float, *,
               mean: bool = False, mix: bool = False, config: tuple[int, int, int] | None = None):
    """Veda's exact `peak`: `max_{y in tile j, valid} qm[i] . k[y] * scale`, float32 `[B, H, n, n]`.

    Args:
        qm: `[B, H, n, D]` per-tile query means (cast to k's dtype for the GEMM, as the torch path does).
        k: `[B, H, n*volume, D]` keys in tile order; a tile's valid keys are its leading `tile_lens[j]`.
        volume: a power of two; D a power of two >= 16.
        mean: also return the `mean` feature (the mean logit over the valid keys = q̄_i · k̄_j).
        mix: also return the `mix` feature, `log((L_j - 1)/L_j · exp(mean) + exp(peak)/L_j)`.
        config: `(query tiles per program, key slots per step, warps)`; default `(128, 256, 8)` (the fastest
            of four at Wan-14B 720p 4x4x4 on an H100: 5.9 ms, 231 TFLOP/s).

    Returns:
        The peak tensor, or a tuple `(peak, mean?, mix?)` when `mean` or `mix` is asked for.

    Example:
        >>> k = torch.randn(1, 1, 128, 16); qm = torch.randn(1, 1, 2, 16)
        >>> with interpreter():
        ...     p = tile_peaks(qm, k, torch.tensor([64, 10]), 64, 0.25)
        >>> ref = (qm[0, 0] @ k[0, 0, :74].T * 0.25)
        >>> bool(torch.allclose(p[0, 0, :, 1], ref[:, 64:74].amax(-1), atol=1e-5))
        True
    """
    B, H, n, D = qm.shape
    if k.shape[2] != n * volume or volume & (volume - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"tile_peaks: need k with {n} x {volume} slots, power-of-two volume and D >= 16; "
                         f"got k {tuple(k.shape)}, volume {volume}, D {D}")
    k = k.contiguous()
    qm = qm.to(k.dtype).contiguous()
    outs = [torch.empty(B, H, n, n, dtype=torch.float32, device=k.device) for _ in range(1 + mean + mix)]
    bm, cols, warps = config or (128, 256, 8)
    tn = max(1, cols // volume)
    it = iter(outs[1:])
    mean_t = next(it) if mean else outs[0]
    mix_t = next(it) if mix else outs[0]
    _jit(_peak_kernel)[(triton.cdiv(n, bm), B * H)](qm, k, tile_lens.to(k.device, torch.int32).contiguous(), outs[0],
                                                     mean_t, mix_t, n, n * volume, float(scale), D=D, VOL=volume,
                                                     BM=bm, TN=tn, MEAN=mean, MIX=mix, num_warps=warps)
    return outs[0] if len(outs) == 1 else tuple(outs)
