"""Turning tile scores and per-head budgets into (kv_indices, kv_counts) selections."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels._triton import device_ints, use_triton
from ..recipe import Budget


def budget_counts(budget: Budget, n_tiles: int) -> int:
    """Key tiles kept per query tile for a top-k budget: `ceil(density * n_tiles)`, at least 1.

    Example:
        >>> budget_counts(Budget(density=0.1), 95)
        10
    """
    return max(1, min(n_tiles, math.ceil(budget.density * n_tiles - 1e-9)))


def select_from_scores(scores: torch.Tensor, budgets: Sequence[Budget], *, probs: torch.Tensor | None = None):
    """Per-head top-k or top-p selection of key tiles from tile scores.

    `scores` `[B, H, n_q, n_k]` (higher: more important) and one Budget per head give `(kv_indices int32
    [B, H, n_q, max_kv], kv_counts int32 [B, H, n_q])`, indices sorted by score. `probs`: tile probabilities
    for top-p budgets (default: softmax of `scores`).

    Example:
        >>> s = torch.tensor([[[[0.1, 0.9, 0.5]]]])
        >>> idx, cnt = select_from_scores(s, [Budget(density=0.5)])
        >>> idx[0, 0, 0, :cnt[0, 0, 0]].tolist()
        [1, 2]
    """
    B, H, nq, nk = scores.shape
    if len(budgets) != H:
        raise ValueError(f"need one budget per head: {H} heads, {len(budgets)} budgets")
    if all(b.density is not None for b in budgets):  # top-k only: no full sort needed
        ks = [budget_counts(b, nk) for b in budgets]
        if scores.shape[-1] <= 4096 and use_triton("topk", scores):  # Triton bisection top-k (one warp per row): same selection, sorted by score
            from ..kernels.tile_select import topk_indices

            idx = topk_indices(scores, ks)
        else:
            idx = torch.topk(scores, max(ks), dim=-1, sorted=True).indices.to(torch.int32).contiguous()
        counts = device_ints(ks, scores.device).view(1, H, 1).expand(B, H, nq).contiguous()
        return idx, counts
    order = torch.argsort(scores, dim=-1, descending=True)
    counts = torch.empty(B, H, nq, dtype=torch.int32, device=scores.device)
    for h, b in enumerate(budgets):
        if b.density is not None:
            counts[:, h] = budget_counts(b, nk)
        else:
            p = torch.softmax(scores[:, h].float(), -1) if probs is None else probs[:, h].float()
            sorted_p = torch.gather(p, -1, order[:, h])
            # smallest prefix whose mass reaches top_p (counting the tile that crosses it)
            need = (torch.cumsum(sorted_p, -1) < b.top_p - 1e-6).sum(-1) + 1
            floor = max(1, math.ceil(b.min_density * nk - 1e-9))
            counts[:, h] = need.clamp(min=floor, max=nk).to(torch.int32)
    max_kv = int(counts.max()) if counts.numel() else 1
    return order[..., :max_kv].to(torch.int32).contiguous(), counts
