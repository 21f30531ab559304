"""The `dense` method: every query tile keeps every key tile (full attention through the sparse path)."""

from __future__ import annotations

import torch

from .base import SelectionMethod
from .registry import register_method


@register_method("dense")
class Dense(SelectionMethod):
    """Selects all key tiles; the budget is ignored. Useful as a baseline and for dense heads."""

    def select(self, q, k, layout, budgets, stats=None):
        B, H = q.shape[:2]
        n = layout.n_tiles
        idx = torch.arange(n, dtype=torch.int32, device=q.device).expand(B, H, n, n).contiguous()
        cnt = torch.full((B, H, n), n, dtype=torch.int32, device=q.device)
        return idx, cnt
