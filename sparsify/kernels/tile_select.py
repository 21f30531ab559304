"""Triton kernels for tile selection: row-wise top-k by bisection, Veda's tile peaks in one fused GEMM."""

from __future__ import annotations

import torch

from ._triton import _MAX, _MIN, _SUM, device_ints, interpreter, jit  # noqa: F401  (interpreter: for the examples)

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

    `torch.topk(scores[:, h], ks[h], sorted=True)` with ties taken lower index first, by one warp per row
    (bisection for a threshold, then ranking of the <= 256 candidates; see `_topk_kernel`); `torch.topk`
    where the kernel does not serve (n_k < 32 or max(ks) > 256).

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
    jit(_topk_kernel)[(B * H * nq,)](s, kt, out, scr, H, nq, nk, max_kv, RA=ra, RB=rb, CAND=cand,
                                      CH=max(1, min(cand, 1024 // cand)), FSTEPS=12, num_warps=1)
    return out


def _peak_kernel(qm_ptr, k_ptr, lens_ptr, peak_ptr, mean_ptr, mix_ptr, mass_ptr, n, scale,
                 D: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, TN: tl.constexpr,
                 PEAK: tl.constexpr, MEAN: tl.constexpr, MIX: tl.constexpr, MASS: tl.constexpr,
                 PREC: tl.constexpr):
    """Key row r of tile j stands for `cnt = clamp(L_j - r*G, 0, G)` key slots (its mean, or the key when
    G = 1). For BM query tiles and TN key tiles a program loops over the ROWS rows of the key tiles: each
    step is one `[BM, D] x [D, TN]` dot of the query means against row r of every key tile, folded into a
    running max (and a count-weighted sum) element by element, so no logit leaves the accumulator layout.
    Outputs (float32 [bh, n, n]): peak = max over rows with cnt > 0 of the logit * scale; mean = the
    count-weighted mean logit; mix = log((L - c)/L exp(mean) + c/L exp(peak)) with c = min(G, L);
    mass = mix + log L."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    qi = pid_m * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    qmask = qi < n
    qm = tl.load(qm_ptr + (bh.to(tl.int64) * n + qi[:, None]) * D + d[None, :], mask=qmask[:, None], other=0.0)
    kbase = k_ptr + bh.to(tl.int64) * n * ROWS * D  # offsets within a head fit in int32 (S * D < 2^31)
    for j0 in range(0, n, TN):
        tj = j0 + tl.arange(0, TN)
        tmask = tj < n
        L = tl.load(lens_ptr + tj, mask=tmask, other=0)
        koff = tj[:, None] * (ROWS * D) + d[None, :]
        pk = tl.full((BM, TN), float("-inf"), tl.float32)
        sm = tl.full((BM, TN), 0.0, tl.float32)
        for r in range(ROWS):
            cnt = tl.minimum(tl.maximum(L - r * G, 0), G)
            live = cnt > 0
            kk = tl.load(kbase + r * D + koff, mask=live[:, None], other=0.0)
            x = tl.dot(qm, tl.trans(kk.to(qm.dtype)), input_precision=PREC)  # [BM, TN]
            pk = tl.maximum(pk, tl.where(live[None, :], x, float("-inf")))
            if MEAN or MIX or MASS:
                sm += x * cnt.to(tl.float32)[None, :]
        pk = pk * scale
        o = (bh.to(tl.int64) * n + qi[:, None]) * n + tj[None, :]
        om = qmask[:, None] & tmask[None, :]
        if PEAK:
            tl.store(peak_ptr + o, pk, mask=om)
        if MEAN or MIX or MASS:
            Lf = L.to(tl.float32)
            mean = sm * scale / tl.maximum(Lf, 1.0)[None, :]
            if MEAN:
                tl.store(mean_ptr + o, mean, mask=om)
            if MIX or MASS:  # log((L - c) e^mean + c e^peak), stably (peak >= mean); -inf for an empty tile
                c = tl.minimum(Lf, G * 1.0)
                full = (L > 0)[None, :]
                pks = tl.where(full, pk, 0.0)
                arg = tl.where(full, (Lf - c)[None, :] * tl.exp(mean - pks) + c[None, :], 1.0)
                lm = tl.where(full, pks + tl.log(arg), float("-inf"))
                if MIX:
                    tl.store(mix_ptr + o, lm - tl.log(tl.maximum(Lf, 1.0))[None, :], mask=om)
                if MASS:
                    tl.store(mass_ptr + o, lm, mask=om)


def _group_mean_kernel(x_ptr, lens_ptr, out_ptr, n_rows, H, sxb, sxh, sxs,
                       D: tl.constexpr, VOL: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr):
    """Means of consecutive groups of G slots over their valid (slot in tile < lens[tile]) slots, for
    BLOCK_R groups of x[b, h] per program, as G strided row loads summed in registers (no reshape); out is
    [bh, n_rows, D] in its own dtype (zeros for an empty group)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    rmask = rows < n_rows
    ln = tl.load(lens_ptr + (rows * G) // VOL, mask=rmask, other=0)
    cnt = tl.minimum(tl.maximum(ln - (rows * G) % VOL, 0), G)
    base = x_ptr + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh
    ptrs = base + (rows * G)[:, None].to(tl.int64) * sxs + d[None, :]
    acc = tl.full((BLOCK_R, D), 0.0, tl.float32)
    for u in tl.static_range(G):
        acc += tl.load(ptrs + u * sxs, mask=(u < cnt)[:, None], other=0.0).to(tl.float32)
    o = out_ptr + (bh.to(tl.int64) * n_rows + rows[:, None]) * D + d[None, :]
    tl.store(o, (acc / tl.maximum(cnt, 1).to(tl.float32)[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


#: The outputs `tile_peaks` can return, see its docstring.
PEAK_OUTPUTS = ("peak", "mean", "mix", "mass")


def tile_peaks(qm: torch.Tensor, keys: torch.Tensor, tile_lens: torch.Tensor, rows: int, scale: float, *,
               group: int = 1, outputs=("peak",), config: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """Tile-level logits of per-tile query means against the key rows of every key tile, in one fused kernel.

    Key tile j has `rows` rows in `keys`, row r standing for `clamp(tile_lens[j] - r*group, 0, group)` key
    slots: the keys (`group=1`, Veda's exact peak) or the means of groups of `group` slots (`group_means`).

    Args:
        qm: `[B, H, n, D]` per-tile query means (cast to `keys`' dtype; float32 uses 3-pass TF32 on the GPU).
        keys: `[B, H, n*rows, D]`; rows and D powers of two, D >= 16.
        tile_lens: int `[n]` valid key slots per tile.
        scale: the logit scale (1/sqrt(D)).
        outputs: any of `PEAK_OUTPUTS`, in the order wanted, as defined in `_peak_kernel`.
        config: `(query tiles per program, key tiles per step, warps[, stages])`; default `(64, 64, 4, 4)`
            (among the fastest on an H200: docs/kernel-notes.md).

    Returns:
        One float32 `[B, H, n, n]` tensor per output.

    Example:
        >>> k = torch.randn(1, 1, 128, 16); qm = torch.randn(1, 1, 2, 16)
        >>> with interpreter():
        ...     p, = tile_peaks(qm, k, torch.tensor([64, 10]), 64, 0.25)
        >>> ref = (qm[0, 0] @ k[0, 0, :74].T * 0.25)
        >>> bool(torch.allclose(p[0, 0, :, 1], ref[:, 64:74].amax(-1), atol=1e-5))
        True
    """
    B, H, n, D = qm.shape
    bad = [o for o in outputs if o not in PEAK_OUTPUTS]
    if keys.shape[:2] != qm.shape[:2] or keys.shape[2] != n * rows or keys.shape[3] != D or rows & (rows - 1) \
            or D & (D - 1) or D < 16 or group < 1 or bad or not outputs:
        raise ValueError(f"tile_peaks: need keys [{B}, {H}, {n} x {rows}, {D}], power-of-two rows and D >= 16, "
                         f"group >= 1 and outputs from {PEAK_OUTPUTS}; got keys {tuple(keys.shape)}, rows {rows}, "
                         f"group {group}, outputs {tuple(outputs)}")
    keys = keys.contiguous()
    qm = qm.to(keys.dtype).contiguous()
    res = {o: torch.empty(B, H, n, n, dtype=torch.float32, device=keys.device) for o in outputs}
    dummy = next(iter(res.values()))
    bm, tn, warps, *stages = config or (64, 64, 4, 4)
    prec = "tf32x3" if keys.dtype == torch.float32 else "tf32"
    jit(_peak_kernel)[(triton.cdiv(n, bm), B * H)](
        qm, keys, tile_lens.to(keys.device, torch.int32).contiguous(), res.get("peak", dummy), res.get("mean", dummy),
        res.get("mix", dummy), res.get("mass", dummy), n, float(scale), D=D, ROWS=rows, G=group, BM=bm, TN=tn,
        PEAK="peak" in res, MEAN="mean" in res, MIX="mix" in res, MASS="mass" in res, PREC=prec, num_warps=warps,
        **({"num_stages": stages[0]} if stages else {}))
    return [res[o] for o in outputs]


def group_means(x: torch.Tensor, tile_lens: torch.Tensor, volume: int, group: int, out_dtype=None) -> torch.Tensor:
    """Means of consecutive groups of `group` slots of tiled `x` `[B, H, n*volume, D]` over their valid slots.

    A tile's valid slots are its leading `tile_lens[t]`; a group with none is zero. Returns
    `[B, H, n*volume/group, D]` in `out_dtype` (default: x's), `tile_peaks`' `keys` with `rows = volume // group`.

    Example:
        >>> x = torch.arange(8.0).view(1, 1, 8, 1)
        >>> with interpreter():
        ...     m = group_means(x, torch.tensor([3, 4]), 4, 2)
        >>> m.view(-1).tolist()  # tile 0: slots 0-1, slot 2 alone; tile 1: slots 4-5, 6-7
        [0.5, 2.0, 4.5, 6.5]
    """
    B, H, N, D = x.shape
    n = tile_lens.numel()
    if N != n * volume or volume % group or group & (group - 1) or D & (D - 1):
        raise ValueError(f"group_means: need x with {n} tiles x {volume} slots, a power-of-two group dividing the "
                         f"volume and a power-of-two D; got x {tuple(x.shape)}, group {group}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = N // group
    out = torch.empty(B, H, rows, D, dtype=out_dtype or x.dtype, device=x.device)
    jit(_group_mean_kernel)[(triton.cdiv(rows, 32), B * H)](
        x, tile_lens.to(x.device, torch.int32).contiguous(), out, rows, H, x.stride(0), x.stride(1), x.stride(2), D=D,
        VOL=volume, G=group, BLOCK_R=32, num_warps=4)
    return out
