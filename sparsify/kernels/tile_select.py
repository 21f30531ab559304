"""Triton kernels for tile selection: row-wise top-k by bisection, and Veda's exact tile peaks (one fused GEMM)."""

from __future__ import annotations

import torch

from .gather import _MAX, _MIN, _SUM, _jit, device_ints, interpreter  # noqa: F401  (interpreter: for the examples)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


def _topk_kernel(s_ptr, k_ptr, out_ptr, scr_ptr, H, nq, nk, max_kv,
                 RA: tl.constexpr, RB: tl.constexpr, CAND: tl.constexpr, CH: tl.constexpr, FSTEPS: tl.constexpr):
    """One row of s (float32 [B*H*nq, nk]) per program (one warp): the k = k_ptr[head] largest entries,
    sorted by score (ties: lower index first), in out[row, :k]; slots k..max_kv get index 0.

    The row is held as [RA, 32] + [RB, 32] tiles (RA * 32 <= nk, both powers of two: 1182 columns take
    1024 + 256 lanes, not 2048), lanes along the 32 columns, so per-step counts and candidate positions
    (a scan down the columns) stay inside a thread. The floats map to order-preserving int32 keys (-0.0
    and 0.0 tie), and the key range [min, max] is bisected for a threshold t with
    k <= count(key >= t) <= CAND; the first FSTEPS midpoints are taken in float space (halving the value
    range instead of walking the exponents; any midpoint in (lo, hi] keeps the invariants, so the result
    is exact either way). When ties at the k-th key make every such count exceed CAND, t is the k-th key
    and the tied entries kept are the lowest-indexed ones (a second bisection, over an index cutoff). The
    candidates are written to the int64 scratch (CAND slots a row) as `key << 32 | ~index`, reloaded after
    a barrier and each ranked by counting the candidates that beat it (int64 compare: key first, then
    lower index), in chunks of CH; the index is written at its rank when the rank is < k."""
    row = tl.program_id(0)
    kk = tl.load(k_ptr + (row // nq) % H)
    srow = s_ptr + row.to(tl.int64) * nk
    c = tl.arange(0, 32)[None, :]
    ia = tl.arange(0, RA)[:, None] * 32 + c  # RA * 32 <= nk: no mask
    ib = RA * 32 + tl.arange(0, RB)[:, None] * 32 + c
    mb = ib < nk
    ba = tl.load(srow + ia).to(tl.int32, bitcast=True)
    bb = tl.load(srow + ib, mask=mb, other=0.0).to(tl.int32, bitcast=True)
    ka = ((ba & 0x7FFFFFFF) ^ (ba >> 31)) - (ba >> 31)
    kb = ((bb & 0x7FFFFFFF) ^ (bb >> 31)) - (bb >> 31)
    pmin = tl.reduce(ka, 0, _MIN)
    qmin = tl.reduce(tl.where(mb, kb, 2147483647), 0, _MIN)
    lo = tl.reduce(tl.where(pmin < qmin, pmin, qmin), 0, _MIN)
    kb = tl.where(mb, kb, -2147483648)  # padding: below every real key
    pmax = tl.reduce(ka, 0, _MAX)
    qmax = tl.reduce(kb, 0, _MAX)
    hi = tl.reduce(tl.where(pmax > qmax, pmax, qmax), 0, _MAX)
    c_lo = nk  # count(key >= lo)
    step = 0
    while lo < hi:
        bm = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
        lf = (((lo ^ (lo >> 31)) - (lo >> 31)) | (lo & -2147483648)).to(tl.float32, bitcast=True)
        hf = (((hi ^ (hi >> 31)) - (hi >> 31)) | (hi & -2147483648)).to(tl.float32, bitcast=True)
        mbits = (lf * 0.5 + hf * 0.5).to(tl.int32, bitcast=True)
        mk = ((mbits & 0x7FFFFFFF) ^ (mbits >> 31)) - (mbits >> 31)
        mid = tl.where((step < FSTEPS) & (mk > lo) & (mk <= hi), mk, bm)
        cnt = tl.reduce(tl.reduce((ka >= mid).to(tl.int32), 0, _SUM) + tl.reduce((kb >= mid).to(tl.int32), 0, _SUM),
                        0, _SUM)
        ok = cnt >= kk
        lo = tl.where(ok, mid, lo)
        c_lo = tl.where(ok, cnt, c_lo)
        hi = tl.where(ok, tl.where(cnt <= CAND, mid, hi), mid - 1)  # within [kk, CAND] at or above mid: done
        step += 1
    t = lo
    xcut = nk  # ties at t kept only below this index
    if c_lo > CAND:  # t is the kk-th key and too many ties: keep the lowest-indexed ones
        n_gt = tl.reduce(tl.reduce((ka > t).to(tl.int32), 0, _SUM) + tl.reduce((kb > t).to(tl.int32), 0, _SUM),
                         0, _SUM)
        need = kk - n_gt
        xlo = 0
        while xcut - xlo > 1:
            xm = (xlo + xcut) // 2
            ce = tl.reduce(tl.reduce(((ka == t) & (ia < xm)).to(tl.int32), 0, _SUM)
                           + tl.reduce(((kb == t) & (ib < xm)).to(tl.int32), 0, _SUM), 0, _SUM)
            xlo = tl.where(ce >= need, xlo, xm)
            xcut = tl.where(ce >= need, xm, xcut)
    sa = (ka > t) | ((ka == t) & (ia < xcut))
    sb = (kb > t) | ((kb == t) & (ib < xcut))
    sa32 = sa.to(tl.int32)
    sb32 = sb.to(tl.int32)
    ta = tl.reduce(sa32, 0, _SUM)
    tb = tl.reduce(sb32, 0, _SUM)
    na = tl.reduce(ta, 0, _SUM)
    n_c = na + tl.reduce(tb, 0, _SUM)
    pa = tl.associative_scan(sa32, 0, _SUM) - sa32 + (tl.associative_scan(ta, 0, _SUM) - ta)[None, :]
    pb = tl.associative_scan(sb32, 0, _SUM) - sb32 + (tl.associative_scan(tb, 0, _SUM) - tb)[None, :] + na
    srow_c = scr_ptr + row.to(tl.int64) * CAND
    tl.store(srow_c + pa, (ka.to(tl.int64) << 32) | (4294967295 - ia.to(tl.int64)), mask=sa)
    tl.store(srow_c + pb, (kb.to(tl.int64) << 32) | (4294967295 - ib.to(tl.int64)), mask=sb)
    tl.debug_barrier()  # every candidate is in the scratch before any lane reads it back
    i = tl.arange(0, CAND)
    live = i < n_c
    pi = tl.load(srow_c + i, mask=live, other=-9223372036854775807 - 1)
    rank = i * 0
    for c0 in range(0, CAND, CH):
        j = c0 + tl.arange(0, CH)
        pj = tl.load(srow_c + j, mask=j < n_c, other=-9223372036854775807 - 1)
        rank += tl.reduce((pj[:, None] > pi[None, :]).to(tl.int32), 0, _SUM)
    idx = (4294967295 - (pi & 4294967295)).to(tl.int32)
    base = out_ptr + row.to(tl.int64) * max_kv
    tl.store(base + rank, idx, mask=live & (rank < kk))
    tl.store(base + i, i * 0, mask=(i >= kk) & (i < max_kv))


#: Most candidates the top-k kernel ranks (its scratch slots a row); a larger k goes to torch.topk.
_TOPK_MAX_CAND = 256


def topk_indices(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """The `ks[h]` largest key tiles of every row of `scores` `[B, H, n_q, n_k]`, sorted by score.

    Same result as `torch.topk(scores[:, h], ks[h], sorted=True)` up to tied scores, which the kernel
    takes and orders by lower index first (a stable descending sort). One Triton program (one warp) per
    row: the row is read as two power-of-two pieces; a bisection over its order-preserving float bits
    (the first midpoints in float space) stops as soon as the count of entries at or above the threshold
    is within [k, CAND] (CAND = the next power of two >= max(ks), at least 16), ties at the k-th score
    cut by index when they overflow CAND; the <= 256 candidates are then ranked by pairwise comparison
    through an int64 scratch. Where the kernel does not serve (n_k < 32 or max(ks) > 256), the result is
    `torch.topk(sorted=True)`'s, zero-padded the same way.

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
    max_kv = max(ks)
    cand = max(triton.next_power_of_2(max_kv), 16)
    if nk < 32 or cand > _TOPK_MAX_CAND:
        idx = torch.topk(scores, max_kv, dim=-1, sorted=True).indices.to(torch.int32)
        live = torch.arange(max_kv, device=idx.device) < device_ints(ks, idx.device).view(1, H, 1, 1)
        return torch.where(live, idx, torch.zeros_like(idx)).contiguous()
    s = scores.float().contiguous()
    out = torch.empty(B, H, nq, max_kv, dtype=torch.int32, device=s.device)
    scr = torch.empty(B * H * nq * cand, dtype=torch.int64, device=s.device)
    kt = device_ints(ks, s.device)
    ra = 1 << ((nk // 32).bit_length() - 1)  # the row as ra * 32 + rb * 32 columns, both powers of two
    rest = triton.cdiv(nk - ra * 32, 32)
    rb = triton.next_power_of_2(rest) if rest else 1
    _jit(_topk_kernel)[(B * H * nq,)](s, kt, out, scr, H, nq, nk, max_kv, RA=ra, RB=rb, CAND=cand,
                                      CH=max(1, min(cand, 1024 // cand)), FSTEPS=12, num_warps=1)
    return out


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
