"""XAttention tile selection: strided antidiagonal scores, softmax, tile sums, cumulative-mass threshold."""

from __future__ import annotations

import math

import torch

from ..kernels._triton import device_consts
from ..geometry import TileLayout
from .base import SelectionMethod
from .registry import register_method
from .select import select_from_scores

_MAX_ELEMS = 1 << 26  # strided logits held at once (larger chunks: fewer, better-shaped GEMMs on the GPU)


def _strided(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """`[..., N, D] -> [..., N/stride, stride*D]`: row a holds slots `a*S + i` (reverse: `a*S + S-1-i`), i = 0..S-1."""
    *lead, N, D = x.shape
    x = x.reshape(*lead, N // stride, stride, D)
    if reverse:
        x = x.flip(-2)
    return x.reshape(*lead, N // stride, stride * D)


def _check_stride(layout: TileLayout, stride: int) -> None:
    if stride < 1 or layout.volume % stride:
        raise ValueError(f"xattention: the stride {stride} must divide the tile volume {layout.volume} "
                         f"(tile {layout.tile}); use a power of two up to {layout.volume}")


def xattention_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, stride: int = 8,
                      max_elems: int = _MAX_ELEMS) -> torch.Tensor:
    """XAttention's tile masses: the share of each query tile's estimated attention on each key tile.

    The mean q·k logit on the antidiagonal of every `stride x stride` sub-block (ONE GEMM of strided rows,
    `[N/S, S*D] @ [S*D, N/S]`, scaled by 1/sqrt(D)), a softmax per strided query row, then sums per tile pair,
    normalized per query tile. Padded slots never contribute: means run over valid pairs and a strided row
    stands for its valid slots (`+log(count)` on its logit), so with no padding this is exactly XAttention's.

    Args:
        q, k: `[B, H, n_tiles*volume, D]` in tile order; `stride` (8 for video) must divide the volume.
        max_elems: strided logits held at once (query tiles are processed in chunks).

    Returns:
        float32 `[B, H, n_tiles, n_tiles]`, rows summing to 1.

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> lay = tile_layout((2, 8, 8), (1, 8, 8)); x = to_tiles(torch.randn(1, 1, 128, 16), lay)
        >>> s = xattention_scores(x, x, lay); s.shape, bool(torch.allclose(s.sum(-1), torch.ones(1, 1, 2)))
        (torch.Size([1, 1, 2, 2]), True)
    """
    _check_stride(layout, stride)
    B, H, N, D = q.shape
    n, per = layout.n_tiles, layout.volume // stride  # strided rows per tile
    valid = (layout.gather >= 0).to(q.device)
    pad = ~valid.view(1, 1, N, 1)
    qs = _strided(q.masked_fill(pad, 0), stride, reverse=True)  # [B, H, N/S, S*D], in q's dtype (bf16 on GPU)
    ks = _strided(k.masked_fill(pad, 0), stride, reverse=False)
    vq = _strided(valid.float().view(N, 1), stride, reverse=True)  # [N/S, S]
    vk = _strided(valid.float().view(N, 1), stride, reverse=False)
    log_keys = vk.sum(-1).log()  # a strided key row stands for its valid keys
    q_count = vq.sum(-1)
    scale = 1.0 / math.sqrt(D)
    out = torch.empty(B, H, n, n, dtype=torch.float32, device=q.device)
    tiles = max(1, max_elems // max(1, B * H * per * (N // stride)))
    for i0 in range(0, n, tiles):
        i1 = min(n, i0 + tiles)
        rows = slice(i0 * per, i1 * per)
        cnt = vq[rows] @ vk.T  # valid (query, key) pairs on each sub-block's antidiagonal
        logits = torch.matmul(qs[:, :, rows], ks.transpose(-1, -2)).float() * scale / cnt.clamp_min(1) + log_keys
        logits = logits.masked_fill(cnt == 0, float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0) * q_count[rows].view(-1, 1)  # no valid pair: no mass
        out[:, :, i0:i1] = p.view(B, H, i1 - i0, per, n, per).sum((3, 5))
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


@register_method("xattention")
class XAttention(SelectionMethod):
    """XAttention's selection on the layout's tiles: antidiagonal scores, then a cumulative-mass threshold.

    Per query tile, top-p budgets keep the smallest prefix of key tiles by estimated mass reaching `top_p`, top-k
    budgets the `density` share. Forced tiles (`diagonal`: the own tile, `sink`: key tile 0) come first; their
    mass counts towards `top_p`, and under top-k they take the first places.

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> from sparsify.recipe import Budget
        >>> lay = tile_layout((4, 8, 8), (1, 8, 8)); x = to_tiles(torch.randn(1, 1, 256, 16), lay)
        >>> idx, cnt = XAttention().select(x, x, lay, [Budget(density=0.25)])
        >>> idx[0, 0, :, 0].tolist()  # the own tile first
        [0, 1, 2, 3]
    """

    def __init__(self, stride: int = 8, diagonal: bool = True, sink: bool = False):
        self.stride, self.diagonal, self.sink = stride, diagonal, sink

    def scores(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """Estimated tile masses `[B, H, n, n]` (rows sum to 1), see `xattention_scores`."""
        return xattention_scores(q, k, layout, self.stride)

    def select(self, q, k, layout, budgets, stats=None):
        mass = self.scores(q, k, layout)
        n = layout.n_tiles
        if not (self.diagonal or self.sink):  # decided on the host: no sync
            return select_from_scores(mass, budgets, probs=mass)
        forced = torch.zeros(n, n, dtype=torch.bool, device=mass.device)
        if self.diagonal:
            forced.fill_diagonal_(True)
        if self.sink:
            forced[:, 0] = True
        # forced tiles sort first (masses are <= 1); their true mass still counts towards top_p
        scores = mass + 2.0 * forced
        idx, cnt = select_from_scores(scores, budgets, probs=mass)
        n_forced = forced.sum(-1).to(torch.int32)  # [n]
        top_p = device_consts([b.top_p is not None for b in budgets], mass.device, torch.bool).view(1, -1, 1)
        cnt = torch.where(top_p, torch.maximum(cnt, n_forced), cnt)
        if int(cnt.max()) > idx.shape[-1]:
            idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :int(cnt.max())].to(torch.int32)
        return idx.contiguous(), cnt
