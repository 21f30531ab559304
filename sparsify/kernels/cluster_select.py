"""SVG2's top-p cluster selection: the key clusters each query cluster keeps, by centroid scores, in one kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ._triton import _MAX, _MIN, _SUM, device_consts, enabled, interpreting, jit, tl, triton, use_triton

if TYPE_CHECKING:
    from ..recipe import Budget

__all__ = ["cluster_probs", "select_clusters"]


def cluster_probs(logits: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
    """SVG2's cluster-size-weighted softmax: `p_ij ∝ |K_j| exp(logit_ij)` (empty clusters get 0).

    Example:
        >>> [round(p, 4) for p in cluster_probs(torch.zeros(1, 1, 1, 3), torch.tensor([[[1.0, 3.0, 0.0]]])).flatten().tolist()]
        [0.25, 0.75, 0.0]
    """
    return torch.softmax(logits + torch.log(k_sizes.float())[:, :, None, :], -1)


def _select_kernel(LG, SZ, TOT, NONEMPTY, DENS, TOPP, FLOOR, IDX, CNT, H, NQ, NK, NKP: tl.constexpr):
    """One query cluster (a row of LG) per program: `select_clusters` without sorting.

    Clusters rank by key (the logit, or for top-p heads the size-weighted probability; empty clusters last),
    ties by lower index. Up to three searches find the shortest ranked prefix whose weight reaches a target:
    the sizes (the key floor), the probabilities (top-p heads only), then unit weights (the final count,
    only when it is not one of the first two prefixes, i.e. clamped to 1 or to the non-empty clusters). Each
    search bisects the order-preserving int32 bits of the key for the threshold, then an index cutoff among
    keys tied at it. The kept clusters are written first in index order, zeros after them. One warp."""
    r = tl.program_id(0).to(tl.int64)
    bh = r // NQ
    h = bh % H
    j = tl.arange(0, NKP)
    inside = j < NK
    sz = tl.load(SZ + bh * NK + j, mask=inside, other=0.0)
    live = inside & (sz > 0)
    lg = tl.where(live, tl.load(LG + r * NK + j, mask=inside, other=0.0), float("-inf"))
    wl = tl.where(live, lg + tl.log(tl.where(live, sz, 1.0)), float("-inf"))
    e = tl.where(live, tl.exp(wl - tl.reduce(wl, 0, _MAX)), 0.0)
    prob = e / tl.reduce(e, 0, _SUM)
    dens = tl.load(DENS + h) != 0
    key = tl.where(dens, lg, tl.where(live, prob, -1.0))
    key = tl.where(inside, key, float("-inf"))
    bits = key.to(tl.int32, bitcast=True)
    kb = ((bits & 0x7FFFFFFF) ^ (bits >> 31)) - (bits >> 31)  # order-preserving (-0.0 and 0.0 tie)
    tot = tl.load(TOT + bh)
    nonempty = tl.load(NONEMPTY + bh)
    targets_0 = tl.load(FLOOR + h) * tot - 1e-6
    targets_1 = tl.where(dens, -1.0, tl.load(TOPP + h) - 1e-6)
    c0 = 0
    c1 = 0
    t = 0
    x = 0
    t0 = 0
    x0 = 0
    t1 = 0
    x1 = 0
    n = 1
    for stage in range(3):
        n = tl.minimum(tl.maximum(tl.maximum(c0, c1), 1), nonempty)
        w = tl.where(stage == 0, sz, tl.where(stage == 1, prob, 1.0))
        target = tl.where(stage == 0, targets_0, tl.where(stage == 1, targets_1, n.to(tl.float32) - 0.5))
        # nothing to search: no target, or the final count is the prefix an earlier search found
        skip = (target <= 0) | ((stage == 2) & ((n == c0) | (n == c1)))
        hi = tl.reduce(kb, 0, _MAX)
        lo = tl.where(skip, hi, tl.reduce(kb, 0, _MIN))
        while lo < hi:  # the largest threshold whose keys at or above it weigh at least the target
            mid = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
            ok = tl.reduce(tl.where(kb >= mid, w, 0.0), 0, _SUM) >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        t = lo
        above = tl.reduce(tl.where(kb > t, w, 0.0), 0, _SUM)
        xlo = 0
        xhi = tl.where(skip, 0, NKP)
        while xlo < xhi:  # the fewest keys tied at t (lowest indices first) that reach the target
            xm = (xlo + xhi) // 2
            ok = above + tl.reduce(tl.where((kb == t) & (j < xm), w, 0.0), 0, _SUM) >= target
            xhi = tl.where(ok, xm, xhi)
            xlo = tl.where(ok, xlo, xm + 1)
        x = xlo
        count = tl.reduce(((kb > t) | ((kb == t) & (j < x))).to(tl.int32), 0, _SUM)
        reached = tl.reduce(w, 0, _SUM) >= target
        count = tl.where(target <= 0, 0, tl.where(reached, count, NK + stage))
        c0 = tl.where(stage == 0, count, c0)
        c1 = tl.where(stage == 1, count, c1)
        t0 = tl.where(stage == 0, t, t0)
        x0 = tl.where(stage == 0, x, x0)
        t1 = tl.where(stage == 1, t, t1)
        x1 = tl.where(stage == 1, x, x1)
    t = tl.where(n == c0, t0, tl.where(n == c1, t1, t))
    x = tl.where(n == c0, x0, tl.where(n == c1, x1, x))
    kept = ((kb > t) | ((kb == t) & (j < x))) & inside
    k32 = kept.to(tl.int32)
    pos = tl.associative_scan(k32, 0, _SUM) - k32
    tl.store(IDX + r * NK + pos, j, mask=kept)
    tl.store(IDX + r * NK + j, j * 0, mask=inside & (j >= n))
    tl.store(CNT + r, n)


#: Widest row of key clusters the selection kernel takes (one program holds a row); wider rows use torch.
_SELECT_MAX_NK = 8192


def select_clusters(logits: torch.Tensor, k_sizes: torch.Tensor, budgets: Sequence[Budget]):
    """Key clusters kept by every query cluster, per head.

    Density budgets keep clusters in decreasing centroid logit (the estimated attention per key token:
    the greedy order for mass per token) until they hold `density` of the (valid) video keys. Top-p
    budgets keep clusters in decreasing size-weighted probability (`cluster_probs`) until their mass
    reaches `top_p`, and at least until they hold `min_density` of the keys (SVG2's minimum share of
    key clusters, measured in tokens). At least one non-empty cluster is kept; empty ones never.

    Args:
        logits: float `[B, H, NQ, NK]` (`centroid_logits`).
        k_sizes: float `[B, H, NK]` valid keys per cluster.
        budgets: one `Budget` per head.

    Returns:
        `(kv_indices int32 [B, H, NQ, NK], kv_counts int32 [B, H, NQ])`, kept clusters first, in no
        particular order (the Triton kernel, used on CUDA (the `kmeans` kernel path) and under the interpreter
        for rows of at most 8,192 clusters, writes them in index order and zeros after them; torch writes the
        rest of its ranking).

    Example:
        >>> from sparsify.recipe import Budget
        >>> idx, cnt = select_clusters(torch.tensor([[[[0.0, 2.0, 1.0]]]]), torch.tensor([[[5.0, 5.0, 5.0]]]),
        ...                            [Budget(density=0.5)])
        >>> idx[0, 0, 0, :cnt[0, 0, 0]].tolist()
        [1, 2]
    """
    B, H, nq, nk = logits.shape
    if len(budgets) != H:
        raise ValueError(f"need one budget per head: {H} heads, {len(budgets)} budgets")
    sizes = k_sizes.float()
    total = sizes.sum(-1)  # [B, H]
    nonempty = (sizes > 0).sum(-1)  # [B, H]
    dev = logits.device  # cached per-head constants: no host-to-device copy per call
    top_p = device_consts([float(b.top_p or 0.0) for b in budgets], dev, torch.float32).view(1, H, 1)
    floor = device_consts([float(b.density if b.density is not None else b.min_density) for b in budgets], dev,
                          torch.float32).view(1, H, 1)
    interp = triton is not None and enabled("kmeans") and interpreting() and dev.type == "cpu"
    if (use_triton("kmeans", logits) or interp) and nk <= _SELECT_MAX_NK:
        idx = torch.empty(B, H, nq, nk, dtype=torch.int32, device=dev)
        cnt = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
        jit(_select_kernel, interp)[(B * H * nq,)](
            logits.float().contiguous(), sizes.contiguous(), total.contiguous(), nonempty.to(torch.int32).contiguous(),
            device_consts([int(b.density is not None) for b in budgets], dev, torch.int32),
            top_p, floor, idx, cnt, H, nq, nk, NKP=1 << max(4, (nk - 1).bit_length()), num_warps=1)
        return idx, cnt
    empty = (sizes <= 0)[:, :, None, :]
    dens = device_consts([b.density is not None for b in budgets], dev, torch.bool).view(1, H, 1, 1)
    lg = logits.float().masked_fill(empty, float("-inf"))
    probs = cluster_probs(lg, sizes)
    key = torch.where(dens, lg, probs.masked_fill(empty, -1.0))
    order = torch.argsort(key, dim=-1, descending=True)
    sz = torch.gather(sizes[:, :, None, :].expand(B, H, nq, nk), -1, order)
    before = torch.cumsum(sz, -1) - sz  # keys held by the clusters ranked before
    n_floor = (before < (floor * total[..., None] - 1e-6)[..., None]).sum(-1)
    mass = torch.cumsum(torch.gather(probs, -1, order), -1)
    n_p = torch.where(dens[..., 0], 0, (mass < (top_p - 1e-6)[..., None]).sum(-1) + 1)
    cnt = torch.maximum(n_floor, n_p).clamp_min(1)
    cnt = torch.minimum(cnt, nonempty[..., None])
    return order.to(torch.int32), cnt.to(torch.int32)
