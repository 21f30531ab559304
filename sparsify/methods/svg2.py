"""SVG2 (Sparse VideoGen 2): k-means clusters of q and k per head, centroid scores, variable-size block attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels._triton import device_consts
from ..kernels.varlen import (default_block_size, interpreting, run_kernel, supports_varlen, varlen_block_attn,
                              varlen_block_attn_reference, varlen_pairs)
from ..recipe import Budget
from .base import SelectionMethod
from .registry import register_method

try:
    import triton.language as tl
except Exception:  # pragma: no cover
    tl = None

_ROW_MIN = tl.standard._elementwise_min if tl is not None else None
_ROW_SUM = tl.standard._sum_combine if tl is not None else None
_ROW_MAX = tl.standard._elementwise_max if tl is not None else None


# ----------------------------------------------------------------------------------------------
# k-means: assignment (fused Triton distance + argmin on CUDA / the interpreter, chunked torch else)


def _assign_kernel(X, C, CN, L, S, NC, sxb, sxh, sxs, H, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Nearest centroid of BLOCK_S rows: argmin_j |c_j|^2 - 2 x.c_j, never materializing the distances."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_s[:, None].to(tl.int64) * sxs + offs_d[None, :],
                mask=offs_s[:, None] < S, other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    best = tl.full([BLOCK_S], float("inf"), dtype=tl.float32)
    arg = tl.full([BLOCK_S], 0, dtype=tl.int32)
    c_base = C + pid_bh.to(tl.int64) * NC * HEAD_DIM
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < NC
        c = tl.load(c_base + cc[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        cn = tl.load(CN + pid_bh.to(tl.int64) * NC + cc, mask=ok, other=float("inf"))
        d = cn[None, :] - 2.0 * tl.dot(x, tl.trans(c), input_precision=INPUT_PRECISION)
        dmin = tl.reduce(d, 1, _ROW_MIN)
        darg = tl.reduce(tl.where(d == dmin[:, None], cc[None, :], 2147483647), 1, _ROW_MIN)
        better = dmin < best
        best = tl.where(better, dmin, best)
        arg = tl.where(better, darg, arg)
    tl.store(L + pid_bh.to(tl.int64) * S + offs_s, arg, mask=offs_s < S)


def _segment_mean_kernel(X, OUT, ST, LN, NC, sxb, sxh, sxs, H, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Mean of the rows `ST[c] .. ST[c] + LN[c]` of one (b, h): a cluster's centroid after the permutation."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row = pid_bh.to(tl.int64) * NC + pid_c
    s = tl.load(ST + row)
    n = tl.load(LN + row)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    acc = tl.full([BLOCK_R, HEAD_DIM], 0.0, dtype=tl.float32)  # summed across rows once, after the loop
    for r in range(0, n, BLOCK_R):
        ok = r + offs_r < n
        x = tl.load(base + (s + r + offs_r)[:, None].to(tl.int64) * sxs + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += x.to(tl.float32)
    tl.store(OUT + row * HEAD_DIM + offs_d, tl.reduce(acc, 0, _ROW_SUM) / tl.maximum(n, 1).to(tl.float32))


def _use_triton(x: torch.Tensor) -> bool:
    ok, _ = supports_varlen(x)
    return ok and (x.is_cuda or interpreting())


#: The assignment kernel's launch on CUDA (`benchmarks.svg2_cost --assign-configs` times others).
ASSIGN_LAUNCH = {"block_s": 128, "block_c": 64, "num_warps": 8, "num_stages": 3}


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, max_elems: int = 1 << 25) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row.

    Args:
        x: `[B, H, S, D]`.
        centroids: `[B, H, n, D]` (any float dtype; products run in x's dtype with fp32 accumulation).
        max_elems: distance entries held at once on the torch path.

    Returns:
        int32 `[B, H, S]`. Uses a fused Triton kernel on CUDA (and under `TRITON_INTERPRET=1`), else torch.

    Example:
        >>> x = torch.tensor([[[[0.0, 0.0], [5.0, 5.0], [0.2, 0.1]]]])
        >>> kmeans_assign(x, torch.tensor([[[[5.0, 4.0], [0.0, 0.5]]]])).tolist()
        [[[1, 0, 1]]]
    """
    B, H, S, D = x.shape
    n = centroids.shape[2]
    c = centroids.to(x.dtype)
    cn = c.float().square().sum(-1)  # [B, H, n]
    if _use_triton(x):
        labels = torch.empty(B, H, S, dtype=torch.int32, device=x.device)
        x_ = x if x.stride(-1) == 1 else x.contiguous()
        interp = not x.is_cuda
        cfg = {"block_s": 32, "block_c": 16, "num_warps": 4, "num_stages": 1} if interp else ASSIGN_LAUNCH
        bs = cfg["block_s"]
        run_kernel(_assign_kernel, (triton_cdiv(S, bs), B * H), interp,
                   x_, c.contiguous(), cn.contiguous(), labels, S, n, x_.stride(0), x_.stride(1), x_.stride(2), H,
                   BLOCK_S=bs, BLOCK_C=cfg["block_c"], HEAD_DIM=D, DOT_FP32=interp,
                   INPUT_PRECISION="ieee" if (interp or x.dtype == torch.float32) else "tf32",
                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return labels
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    labels = torch.empty(B, H, S, dtype=torch.int32, device=x.device)
    step = max(1, max_elems // max(1, B * H * n))
    for s0 in range(0, S, step):
        d = cn.to(acc)[:, :, None, :] - 2.0 * torch.matmul(x[:, :, s0:s0 + step].to(acc), c.to(acc).transpose(-1, -2))
        labels[:, :, s0:s0 + step] = d.argmin(-1).to(torch.int32)
    return labels


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cluster_sizes(labels: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per cluster, float32 `[B, H, n]` (`weights` `[B, H, S]` counts each token by its weight)."""
    w = torch.ones_like(labels, dtype=torch.float32) if weights is None else weights.float()
    return torch.zeros(*labels.shape[:2], n, device=labels.device).scatter_add_(2, labels.long(), w)


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Cluster means (float32 `[B, H, n, D]`); an empty cluster keeps its old centroid.

    Example:
        >>> x = torch.tensor([[[[1.0], [3.0], [7.0]]]]); old = torch.zeros(1, 1, 3, 1)
        >>> kmeans_update(x, torch.tensor([[[0, 0, 2]]]), old).flatten().tolist()
        [2.0, 0.0, 7.0]
    """
    B, H, S, D = x.shape
    n = old.shape[2]
    flat = (labels.long() + n * torch.arange(B * H, device=x.device).view(B, H, 1)).reshape(-1)
    sums = torch.zeros(B * H * n, D, device=x.device).index_add_(0, flat, x.reshape(-1, D).float())
    cnt = torch.zeros(B * H * n, device=x.device).index_add_(0, flat, torch.ones(flat.numel(), device=x.device))
    means = (sums / cnt.clamp_min(1)[:, None]).view(B, H, n, D)
    return torch.where(cnt.view(B, H, n, 1) > 0, means, old.float())


def segment_means(x_sorted: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Cluster means from rows already grouped by cluster (`starts`, `lens` int32 `[B, H, n]`); float32.

    Equal to `kmeans_update` on the unpermuted rows; a Triton kernel on CUDA (one pass over x), torch else.

    Example:
        >>> x = torch.tensor([[[[1.0], [3.0], [7.0]]]]); i32 = lambda *v: torch.tensor(v, dtype=torch.int32).view(1, 1, -1)
        >>> segment_means(x, i32(0, 2, 3), i32(2, 1, 0), torch.full((1, 1, 3, 1), 9.0)).flatten().tolist()
        [2.0, 7.0, 9.0]
    """
    B, H, S, D = x_sorted.shape
    n = starts.shape[-1]
    if _use_triton(x_sorted):
        out = torch.empty(B, H, n, D, dtype=torch.float32, device=x_sorted.device)
        xs = x_sorted if x_sorted.stride(-1) == 1 else x_sorted.contiguous()
        interp = not x_sorted.is_cuda
        run_kernel(_segment_mean_kernel, (n, B * H), interp, xs, out, starts.to(torch.int32).contiguous(),
                   lens.to(torch.int32).contiguous(), n, xs.stride(0), xs.stride(1), xs.stride(2), H,
                   BLOCK_R=16 if interp else 64, HEAD_DIM=D, num_warps=4)
    else:
        seg = torch.searchsorted((starts.long() + lens.long()).contiguous(), torch.arange(S, device=x_sorted.device)
                                 .expand(B, H, S).contiguous(), right=True).clamp_max(n - 1)
        out = kmeans_update(x_sorted, seg, old)
    return torch.where(lens[..., None] > 0, out, old.float())


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """`x[b, h, perm[b, h, p]]` for every position p: one Triton row gather on CUDA without autograd, else
    `torch.gather`.

    Example:
        >>> permute_rows(torch.arange(3.0).view(1, 1, 3, 1), torch.tensor([[[2, 0, 1]]])).flatten().tolist()
        [2.0, 0.0, 1.0]
    """
    from ..kernels._triton import use_triton
    from ..kernels.gather import gather_rows

    if use_triton("gather", x) and perm.shape[-1] == x.shape[2]:
        return gather_rows([x], perm)[0][0]
    return torch.gather(x, 2, perm[..., None].expand(*perm.shape, x.shape[-1]))


def _update(x: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Cluster means: sort + segment means where the Triton kernels run (deterministic), else a scatter."""
    if _use_triton(x):
        perm, starts, lens = cluster_blocks(labels, old.shape[2])
        return segment_means(permute_rows(x, perm), starts, lens, old)
    return kmeans_update(x, labels, old)


@dataclass
class KMeansResult:
    """Outcome of `kmeans`: float32 centroids `[B, H, n, D]`, int32 labels `[B, H, S]` (from the last
    assignment; the centroids are the means of these clusters), and the iterations run."""

    centroids: torch.Tensor
    labels: torch.Tensor
    iters: int


def init_centroids(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct random rows of x per head as initial centroids (float32 `[B, H, n, D]`), seeded."""
    B, H, S, D = x.shape
    g = torch.Generator(device=x.device).manual_seed(seed)
    pick = torch.rand(B, H, S, generator=g, device=x.device).topk(min(n, S), -1).indices
    c = torch.gather(x, 2, pick[..., None].expand(B, H, pick.shape[-1], D)).float()
    if n > S:  # more clusters than rows: the extra ones stay empty (far away)
        c = torch.cat([c, torch.full((B, H, n - S, D), 1e4, device=x.device)], 2)
    return c


def kmeans(x: torch.Tensor, n: int, *, init: torch.Tensor | None = None, iters: int = 20, tol: float | None = None,
           seed: int = 0) -> KMeansResult:
    """Lloyd's k-means per head (squared L2), batched over `[B, H]`.

    Args:
        x: `[B, H, S, D]`.
        n: clusters per head.
        init: float `[B, H, n, D]` initial centroids (a warm start); default `init_centroids(x, n, seed)`.
        iters: at most this many (assign, update) iterations.
        tol: stop once at most this share of the labels changed in an iteration (costs a device sync per
            iteration); None runs exactly `iters`.
        seed: seed of the random initialization.

    Returns:
        A `KMeansResult`.

    Example:
        >>> x = torch.cat([torch.randn(1, 1, 50, 4) - 5, torch.randn(1, 1, 50, 4) + 5], 2)
        >>> r = kmeans(x, 2, iters=10)
        >>> sorted(torch.bincount(r.labels.flatten().long()).tolist())
        [50, 50]
    """
    if iters < 1:
        raise ValueError(f"kmeans: iters must be >= 1; got {iters}")
    c = init_centroids(x, n, seed) if init is None else init.float()
    if c.shape != (*x.shape[:2], n, x.shape[3]):
        raise ValueError(f"kmeans: init must be [B, H, n, D] = {(*x.shape[:2], n, x.shape[3])}; got {tuple(c.shape)}")
    labels, done = None, 0
    for _ in range(iters):
        new = kmeans_assign(x, c)
        done += 1
        changed = None if (labels is None or tol is None) else float((new != labels).float().mean())
        labels = new
        c = _update(x, labels, c)
        if changed is not None and changed <= tol:
            break
    return KMeansResult(c, labels, done)


def kmeans_reference(x: torch.Tensor, init: torch.Tensor, iters: int) -> KMeansResult:
    """Exact, slow k-means: per head and per token loops in float64 (the oracle of `kmeans`)."""
    B, H, S, D = x.shape
    n = init.shape[2]
    c = init.double().clone()
    labels = torch.zeros(B, H, S, dtype=torch.int32)
    xd = x.double().cpu()
    c = c.cpu()
    for _ in range(iters):
        for b in range(B):
            for h in range(H):
                for s in range(S):
                    labels[b, h, s] = int(((xd[b, h, s] - c[b, h]) ** 2).sum(-1).argmin())
                for j in range(n):
                    members = xd[b, h][labels[b, h] == j]
                    if len(members):
                        c[b, h, j] = members.mean(0)
    return KMeansResult(c.float(), labels, iters)


# ----------------------------------------------------------------------------------------------
# centroid scores and selection


def cluster_blocks(labels: torch.Tensor, n: int):
    """Token order that makes every cluster contiguous, and each cluster's span in it.

    Returns:
        `(perm long [B, H, S], starts int32 [B, H, n], lens int32 [B, H, n])`: position `p` of the
        permuted sequence holds token `perm[..., p]`; cluster `j` occupies `starts[j] .. + lens[j]`.

    Example:
        >>> perm, starts, lens = cluster_blocks(torch.tensor([[[2, 0, 2, 1]]]), 3)
        >>> perm.tolist(), starts.tolist(), lens.tolist()
        ([[[1, 3, 0, 2]]], [[[0, 1, 2]]], [[[1, 1, 2]]])
    """
    key = labels.to(torch.int16) if n <= 32767 else labels  # fewer radix passes: the sort keeps the same order
    perm = torch.sort(key, dim=-1, stable=True).indices
    lens = cluster_sizes(labels, n).to(torch.int32)
    starts = (torch.cumsum(lens, -1) - lens).to(torch.int32)
    return perm, starts, lens


def centroid_logits(cq: torch.Tensor, ck: torch.Tensor, scale: float) -> torch.Tensor:
    """Centroid attention logits `cq . ck * scale`, float32 `[B, H, NQ, NK]`."""
    return torch.matmul(cq.float(), ck.float().transpose(-1, -2)) * scale


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
    e = tl.where(live, tl.exp(wl - tl.reduce(wl, 0, _ROW_MAX)), 0.0)
    prob = e / tl.reduce(e, 0, _ROW_SUM)
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
        hi = tl.reduce(kb, 0, _ROW_MAX)
        lo = tl.where(skip, hi, tl.reduce(kb, 0, _ROW_MIN))
        while lo < hi:  # the largest threshold whose keys at or above it weigh at least the target
            mid = ((lo.to(tl.int64) + hi.to(tl.int64) + 1) >> 1).to(tl.int32)
            ok = tl.reduce(tl.where(kb >= mid, w, 0.0), 0, _ROW_SUM) >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        t = lo
        above = tl.reduce(tl.where(kb > t, w, 0.0), 0, _ROW_SUM)
        xlo = 0
        xhi = tl.where(skip, 0, NKP)
        while xlo < xhi:  # the fewest keys tied at t (lowest indices first) that reach the target
            xm = (xlo + xhi) // 2
            ok = above + tl.reduce(tl.where((kb == t) & (j < xm), w, 0.0), 0, _ROW_SUM) >= target
            xhi = tl.where(ok, xm, xhi)
            xlo = tl.where(ok, xlo, xm + 1)
        x = xlo
        count = tl.reduce(((kb > t) | ((kb == t) & (j < x))).to(tl.int32), 0, _ROW_SUM)
        reached = tl.reduce(w, 0, _ROW_SUM) >= target
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
    pos = tl.associative_scan(k32, 0, _ROW_SUM) - k32
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
        particular order (the Triton kernel, used on CUDA and under the interpreter for rows of at most
        8,192 clusters, writes them in index order and zeros after them; torch writes the rest of its ranking).

    Example:
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
    if tl is not None and (logits.is_cuda or interpreting()) and nk <= _SELECT_MAX_NK:
        idx = torch.empty(B, H, nq, nk, dtype=torch.int32, device=dev)
        cnt = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
        run_kernel(_select_kernel, (B * H * nq,), not logits.is_cuda, logits.float().contiguous(), sizes.contiguous(),
                   total.contiguous(), nonempty.to(torch.int32).contiguous(),
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


def select_clusters_reference(cq, ck, k_sizes, budgets, scale):
    """Exact, slow `select_clusters(centroid_logits(cq, ck, scale), ...)`: loops, float64, sorted Python lists.

    Returns a list (per b, h, query cluster) of the kept key clusters as a set.
    """
    B, H, nq, _ = cq.shape
    nk = ck.shape[2]
    out = []
    for b in range(B):
        for h in range(H):
            bud = budgets[h]
            sizes = [float(k_sizes[b, h, j]) for j in range(nk)]
            total = sum(sizes)
            for i in range(nq):
                lg = [float((cq[b, h, i].double() * ck[b, h, j].double()).sum()) * scale for j in range(nk)]
                live = [j for j in range(nk) if sizes[j] > 0]
                mx = max(lg[j] for j in live)
                w = {j: sizes[j] * math.exp(lg[j] - mx) for j in live}
                z = sum(w.values())
                if bud.density is not None:
                    ranked = sorted(live, key=lambda j: -lg[j])
                    need, floor = 0, bud.density
                else:
                    ranked = sorted(live, key=lambda j: -w[j])
                    acc, need = 0.0, 0
                    for j in ranked:
                        need += 1
                        acc += w[j] / z
                        if acc >= bud.top_p - 1e-6:
                            break
                    floor = bud.min_density
                held, n_floor = 0.0, 0
                for j in ranked:
                    if held >= floor * total - 1e-6:
                        break
                    n_floor += 1
                    held += sizes[j]
                out.append(set(ranked[:max(1, need, n_floor)]))
    return out


@dataclass
class ClusterSelection:
    """SVG2's selection for the video tokens of one call (see `SVG2.cluster_select`).

    Attributes:
        q_labels, k_labels: int32 `[B, H, S_video]` cluster of every video query / key.
        q_perm, k_perm: long `[B, H, S_video]` token order making the clusters contiguous.
        q_starts, q_lens, k_starts, k_lens: int32 `[B, H, n]` cluster spans in that order.
        kv_indices, kv_counts: the kept key clusters of every query cluster (`select_clusters`).
        q_centroids, k_centroids: float32 `[B, H, n, D]` (cached for the next call's warm start).
        k_sizes: float32 `[B, H, NK]` valid keys per key cluster.
        iters: k-means iterations run for q and for k.
    """

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    q_perm: torch.Tensor
    k_perm: torch.Tensor
    q_starts: torch.Tensor
    q_lens: torch.Tensor
    k_starts: torch.Tensor
    k_lens: torch.Tensor
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    q_centroids: torch.Tensor
    k_centroids: torch.Tensor
    k_sizes: torch.Tensor
    iters: tuple[int, int]

    def token_mask(self) -> torch.Tensor:
        """bool `[B, H, S_video, S_video]`: query token i may attend to key token j (for tests and fidelity)."""
        B, H, nq, w = self.kv_indices.shape
        nk = self.k_lens.shape[-1]
        live = torch.arange(w, device=self.kv_indices.device) < self.kv_counts[..., None].long()
        sel = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=live.device)
        sel.scatter_(-1, torch.where(live, self.kv_indices.long(), nk), True)
        rows = torch.gather(sel[..., :nk], 2, self.q_labels.long()[..., None].expand(B, H, -1, nk))
        return torch.gather(rows, 3, self.k_labels.long()[:, :, None, :].expand(B, H, rows.shape[2], -1))


@register_method("svg2")
class SVG2(SelectionMethod):
    """Sparse VideoGen 2: semantic-aware permutation by k-means and centroid-based top-p selection.

    Per head, q and k of the video tokens are clustered by k-means (`init_iters` iterations, stopping
    early at `tol`, on the first call of a generation; then `warm_iters` iterations warm-started from the
    previous call's centroids, kept in the runtime's per-site cache across denoising steps). Tokens are
    permuted so every cluster is contiguous; query cluster i keeps key clusters by the centroid scores
    (`select_clusters`), and the variable-size block kernel computes attention on the permuted tokens.
    Text tokens outside the video span stay dense in both directions.

    Args:
        q_clusters, k_clusters: clusters per head; default `ceil(S_video / q_cluster_size)` and
            `ceil(S_video / k_cluster_size)` (SVG2 uses 300 and 1,000 at 75,600 tokens).
        q_cluster_size, k_cluster_size: average tokens per cluster for the defaults.
        init_iters, warm_iters: k-means iterations on a cold and on a warm start.
        tol: early stop of the cold start (share of labels changed).
        seed: seed of the cold start's random initialization.

    Example:
        >>> from sparsify.geometry import Geometry
        >>> q, k, v = torch.randn(3, 1, 2, 96, 16).unbind(0)
        >>> cache = {}
        >>> out, work = SVG2(q_clusters=4, k_clusters=6).attend(q, k, v, Geometry((2, 4, 8), 32), [Budget(density=0.3)] * 2,
        ...                                                    scale=None, key_mask=None, cache=cache, block_fn=None)
        >>> out.shape, sorted(cache["svg2"])
        (torch.Size([1, 2, 96, 16]), ['k', 'q'])
    """

    def __init__(self, q_clusters: int | None = None, k_clusters: int | None = None, *, q_cluster_size: int = 256,
                 k_cluster_size: int = 128, init_iters: int = 20, warm_iters: int = 1, tol: float = 1e-3, seed: int = 0):
        for name, val in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"SVG2: {name} must be a positive int or None; got {val!r}")
        if min(q_cluster_size, k_cluster_size, init_iters, warm_iters) < 1:
            raise ValueError("SVG2: cluster sizes and iteration counts must be >= 1")
        self.q_clusters, self.k_clusters = q_clusters, k_clusters
        self.q_cluster_size, self.k_cluster_size = q_cluster_size, k_cluster_size
        self.init_iters, self.warm_iters, self.tol, self.seed = init_iters, warm_iters, tol, seed

    def n_clusters(self, n_tokens: int) -> tuple[int, int]:
        """(query clusters, key clusters) for `n_tokens` video tokens.

        Example:
            >>> SVG2().n_clusters(75600)
            (296, 591)
        """
        nq = self.q_clusters or math.ceil(n_tokens / self.q_cluster_size)
        nk = self.k_clusters or math.ceil(n_tokens / self.k_cluster_size)
        return max(1, min(nq, n_tokens)), max(1, min(nk, n_tokens))

    def select(self, q, k, layout, budgets, stats=None):
        raise TypeError("svg2 chooses its own token order (clusters), not tiles of a layout: the runtime calls "
                        "SVG2.attend(); for a selection alone call SVG2.cluster_select(q, k, budgets)")

    def _cluster(self, x, n, prev, weights=None):
        """Labels, centroids, permutation and spans of one of q/k; the last update from the permuted rows."""
        warm = prev is not None and prev.shape == (*x.shape[:2], n, x.shape[3])
        iters = self.warm_iters if warm else self.init_iters
        c, it = (prev.float() if warm else init_centroids(x, n, self.seed)), 0
        if iters > 1:  # all but the last iteration: assign + scatter update (cold: stop early at tol)
            r = kmeans(x, n, init=c, iters=iters - 1, tol=None if warm else self.tol)
            c, it = r.centroids, r.iters
        new = kmeans_assign(x, c)
        it += 1
        perm, starts, lens = cluster_blocks(new, n)
        xp = permute_rows(x, perm)
        c = segment_means(xp, starts, lens, c)
        return new, c, perm, starts, lens, xp, it

    def _run(self, q, k, budgets, scale, cache, k_weights):
        B, H, S, D = q.shape
        nq, nk = self.n_clusters(S)
        state = cache.get("svg2") if cache is not None else None
        ql, cq, qperm, qs, qn, qp, qit = self._cluster(q, nq, state and state.get("q"))
        kl, ck, kperm, ks, kn, kp, kit = self._cluster(k, nk, state and state.get("k"))
        if cache is not None:
            cache["svg2"] = {"q": cq, "k": ck}
            cache["iters"] = (qit, kit)
        sizes = cluster_sizes(kl, nk, k_weights)
        idx, cnt = select_clusters(centroid_logits(cq, ck, scale), sizes, budgets)
        sel = ClusterSelection(ql, kl, qperm, kperm, qs, qn, ks, kn, idx, cnt, cq, ck, sizes, (qit, kit))
        return sel, qp, kp

    def cluster_select(self, q, k, budgets, *, scale: float | None = None, cache: dict | None = None,
                       key_mask: torch.Tensor | None = None) -> ClusterSelection:
        """SVG2's clustering and selection for video-only q, k `[B, H, S, D]` (the plain `select` entry).

        Args:
            q, k: `[B, H, S, D]`, video tokens only.
            budgets: one `Budget` per head (see `select_clusters`).
            scale: softmax scale, default `1/sqrt(D)`.
            cache: dict kept across calls for warm starts (the centroids); None: always a cold start.
            key_mask: optional bool `[B, S]`: masked keys do not count in the cluster sizes.

        Returns:
            A `ClusterSelection`.

        Example:
            >>> q, k = torch.randn(2, 1, 1, 64, 8).unbind(0)
            >>> sel = SVG2(q_clusters=2, k_clusters=4).cluster_select(q, k, [Budget(top_p=0.9, min_density=0.1)])
            >>> sel.kv_counts.shape, int(sel.k_lens.sum())
            (torch.Size([1, 1, 2]), 64)
        """
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        w = None if key_mask is None else key_mask.to(torch.float32)[:, None, :].expand(k.shape[:3])
        return self._run(q, k, budgets, scale, cache, w)[0]

    def attend(self, q, k, v, geometry, budgets, *, scale, key_mask, cache, block_fn):
        """Sparse attention of one head group in the original token order (the runtime's `attend` protocol).

        Returns `(out [B, h, S, D], work)`, `work` the (query, key) pairs computed relative to one dense
        head, summed over `B x h`: text rows dense; with the Triton kernel every cluster rounded up to its
        tiles (`varlen_pairs` with the kernel's block size), on the reference path the exact pairs.
        """
        from ..runtime import dense_attention

        B, H, S, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        vs, nv = geometry.video_start, geometry.video_len
        video = slice(vs, vs + nv)
        qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
        w = None if key_mask is None else key_mask[:, video].to(torch.float32)[:, None, :].expand(B, H, nv)
        sel, qp, kp = self._run(qv, kv, budgets, scale, cache, w)
        vp = permute_rows(vv, sel.k_perm)
        text = torch.cat([torch.arange(0, vs), torch.arange(vs + nv, S)]).to(q.device)
        nt, nk = text.numel(), sel.k_lens.shape[-1]
        idx, cnt = sel.kv_indices, sel.kv_counts
        ks, kl = sel.k_starts, sel.k_lens
        km = None
        if nt:  # the text keys: one more key block, kept by every query cluster
            kp = torch.cat([kp, k.index_select(2, text)], 2)
            vp = torch.cat([vp, v.index_select(2, text)], 2)
            ks = torch.cat([ks, torch.full_like(ks[..., :1], nv)], -1)
            kl = torch.cat([kl, torch.full_like(kl[..., :1], nt)], -1)
            idx = torch.cat([idx, torch.full_like(idx[..., :1], nk)], -1)
            idx = torch.where(torch.arange(idx.shape[-1], device=q.device) == cnt[..., None], nk, idx)
            cnt = cnt + 1
        if key_mask is not None:
            km_v = torch.gather(key_mask[:, video].to(torch.bool)[:, None, :].expand(B, H, nv), 2, sel.k_perm)
            km = torch.cat([km_v, key_mask.index_select(1, text).to(torch.bool)[:, None, :].expand(B, H, nt)], 2)
        args = (qp, kp, vp, sel.q_starts, sel.q_lens, ks, kl, idx, cnt)
        ok, _ = supports_varlen(qp)
        tiles = None
        if ok and (q.is_cuda or interpreting()):
            tiles = default_block_size(qp)
            op = varlen_block_attn(*args, scale=scale, key_mask=km, block_size=tiles)
        else:
            op = varlen_block_attn_reference(*args, scale=scale, key_mask=km)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        pos = torch.arange(nv, device=q.device, dtype=sel.q_perm.dtype).expand(B, H, nv)
        inv = torch.empty_like(sel.q_perm).scatter_(2, sel.q_perm, pos)  # each token's position in cluster order
        out[:, :, video] = permute_rows(op, inv)  # = op scattered back to the original order
        if nt:
            out.index_copy_(2, text, dense_attention(q.index_select(2, text), k, v, scale, key_mask).to(out.dtype))
        pairs = varlen_pairs(sel.q_lens, kl, idx, cnt, tiles).sum() + nt * S * B * H
        return out, float(pairs) / float(S * S)
