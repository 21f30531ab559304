"""VSA tile selection: mean-pooled q and k per tile (float32), coarse scores, top-k or top-p per query tile."""

from __future__ import annotations

import math

import torch

from ..geometry import TileLayout, pool_tiles
from .base import SelectionMethod
from .registry import register_method
from .select import select_from_scores


def coarse_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Tile-level attention logits `mean(q_tile) . mean(k_tile) / sqrt(D)`, float32 `[B, H, n, n]`."""
    return _scores(pool_tiles(q, layout), pool_tiles(k, layout))


def _scores(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    return torch.matmul(qc * (1.0 / math.sqrt(qc.shape[-1])), kc.transpose(-1, -2))  # scale on the small side


def coarse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """VSA's coarse branch: attention among tile means, broadcast back to every slot of its tile.

    Args:
        q, k, v: `[B, H, n_tiles*volume, D]` in tile order.

    Returns:
        `[B, H, n_tiles*volume, D]` in q's dtype: slot `i` carries the coarse output of its tile. In
        VSA this is added to the sparse output through a learned gate; without a gate it is unused.

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> lay = tile_layout((4, 4, 8), (4, 4, 4)); x = torch.randn(1, 2, 128, 16)
        >>> coarse_attention(*(to_tiles(x, lay),) * 3, lay).shape
        torch.Size([1, 2, 128, 16])
    """
    p = torch.softmax(coarse_scores(q, k, layout), dim=-1)
    out = torch.matmul(p, pool_tiles(v, layout))  # [B, H, n, D]
    return out.repeat_interleave(layout.volume, dim=2).to(q.dtype)


@register_method("vsa")
class VSA(SelectionMethod):
    """Video Sparse Attention's selection: top-k (or top-p) of coarse tile scores per query tile."""

    def select(self, q, k, layout, budgets, stats=None):
        qm = stats.q_means if stats is not None and stats.q_means is not None else pool_tiles(q, layout)
        km = stats.k_means if stats is not None and stats.k_means is not None else pool_tiles(k, layout)
        return select_from_scores(_scores(qm, km), budgets)
