"""SVG2 (Sparse VideoGen 2): k-means clusters of q and k per head, centroid scores, variable-size block attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels._triton import interpreting
from ..kernels.cluster_select import select_clusters
from ..kernels.kmeans import kmeans_assign, kmeans_update, segment_means, uses_triton
from ..kernels.varlen import (default_block_size, supports_varlen, varlen_block_attn, varlen_block_attn_reference,
                              varlen_pairs)
from ..recipe import Budget  # noqa: F401  (the examples use it)
from .base import SelectionMethod
from .registry import register_method


def cluster_sizes(labels: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per cluster, float32 `[B, H, n]` (`weights` `[B, H, S]` counts each token by its weight)."""
    w = torch.ones_like(labels, dtype=torch.float32) if weights is None else weights.float()
    return torch.zeros(*labels.shape[:2], n, device=labels.device).scatter_add_(2, labels.long(), w)


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """`x[b, h, perm[b, h, p]]` for every position p (a Triton row gather where it serves).

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
    if uses_triton(x):
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
        x: `[B, H, S, D]`; n: clusters per head.
        init: float `[B, H, n, D]` initial centroids (a warm start); default `init_centroids(x, n, seed)`.
        iters: at most this many (assign, update) iterations.
        tol: stop once at most this share of the labels changed (a device sync per iteration); None: `iters`.

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


def cluster_blocks(labels: torch.Tensor, n: int):
    """`(perm long [B, H, S], starts, lens int32 [B, H, n])`: position `p` of the permuted sequence holds token
    `perm[..., p]`, and cluster `j` occupies `starts[j] .. + lens[j]`.

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


@dataclass
class ClusterSelection:
    """SVG2's selection for the video tokens of one call: cluster labels, `cluster_blocks` permutations and spans
    of q and k, the kept key clusters of every query cluster, the centroids, valid keys per key cluster
    (`k_sizes`) and the k-means iterations run for q and k."""

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

    Per head, the video tokens' q and k are clustered by k-means (`init_iters` iterations on a generation's first
    call, then `warm_iters` from the cached centroids), permuted so every cluster is contiguous; query clusters
    keep key clusters by centroid scores (`select_clusters`) and the variable-size block kernel attends. Text
    tokens stay dense in both directions.

    Args:
        q_clusters, k_clusters: clusters per head; default `ceil(S_video / q_cluster_size)` and
            `ceil(S_video / k_cluster_size)` (SVG2 uses 300 and 1,000 at 75,600 tokens).
        q_cluster_size, k_cluster_size: average tokens per cluster for the defaults.
        tol, seed: early stop (share of labels changed) and random seed of the cold start.

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

        `cache` keeps the centroids across calls (warm starts); `key_mask` (bool `[B, S]`) drops keys from the
        cluster sizes.

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

        Returns `(out [B, h, S, D], work)`, `work` the (query, key) pairs computed (`varlen_pairs`, text rows
        dense) relative to one dense head."""
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
        idx, cnt, ks, kl, km = sel.kv_indices, sel.kv_counts, sel.k_starts, sel.k_lens, None
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
