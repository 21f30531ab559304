"""The op without tile-order copies: on sm_90 the 64x64 Gluon kernel reads q, k, v in token order (5-D TMA boxes).

The op's usual path gathers q, k and v into tile order (`tile_sequence`: 4.6 GB moved at Wan-14B 720p), selects,
and runs the kernel on the copies. Here, for 64-token tiles, the kernel loads each whole-box tile of q, k and v
straight from the token-order tensors as one 5-D TMA box (`hopper64.block_sparse_attn_hopper64_direct`); only the
few tiles that are not whole boxes (merged edge tiles) are gathered, into small edge buffers. Selection gets the
tile means from a pass that reads q and k once and writes nothing else (`gather_rows(..., write=False)`), so it
serves methods that select from tile means alone (`select_from_means`: VSA).

Off by default (`sparsify.kernels.gather.FAST["direct"] = True` turns it on): on the H200 the kernel runs 1.13-1.14x
slower from the 5-D boxes than from tile-order copies, which costs more than the 0.5 ms of copying it saves
(benchmarks/NOTES.md, session 8). What it does save is memory: no tile-order copy of q, k and v per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..layout import tile_layout

__all__ = ["DirectTiles", "edge_table", "serves", "prepare", "attention"]


@dataclass
class DirectTiles:
    """What the direct path needs besides q, k, v: the selection's tile means and the kernel's tables.

    Attributes:
        means: float32 `[B, H, n_tiles, D]` tile means of q and of k.
        edges: `(qe, ke, ve)`, `[B, H, n_edge*64, D]`: the slots of the tiles that are not whole boxes.
        table: int32 `[n_tiles, 5]` (`edge_table`).
        out_rows: int32 `[n_tiles*64]`, each slot's token (-1 on padding).
        n_video_slots: `layout.padded_len`.
    """

    means: tuple
    edges: tuple
    table: torch.Tensor
    out_rows: torch.Tensor
    n_video_slots: int


@functools.lru_cache(maxsize=64)
def _edge_table_cpu(grid: tuple, tile: tuple):
    lay = tile_layout(grid, tile)
    T, Hh, W = grid
    tt, th, tw = tile
    vol = lay.volume
    g = lay.gather.view(-1, vol)
    first = g[:, 0]  # valid slots come first, so a tile's first slot is a token
    t0, h0, w0 = first // (Hh * W), (first // W) % Hh, first % W
    offs = (torch.arange(tt).view(-1, 1, 1) * Hh * W + torch.arange(th).view(1, -1, 1) * W
            + torch.arange(tw).view(1, 1, -1)).reshape(-1)  # a box's tokens in frame-major order = slot order
    whole = ((lay.tile_lens == vol) & (t0 + tt <= T) & (h0 + th <= Hh) & (w0 + tw <= W)
             & (g == first[:, None] + offs).all(1))
    e = torch.cumsum((~whole).long(), 0) - 1
    zero = torch.zeros_like(first)
    table = torch.stack([torch.where(whole, t0, zero), torch.where(whole, h0, zero), torch.where(whole, w0, zero),
                         torch.where(whole, -1, e), lay.tile_lens.long()], 1).to(torch.int32)
    edge_src = g[~whole].reshape(-1)
    if edge_src.numel() == 0:  # the kernel still needs a (never read) edge buffer of one tile
        edge_src = torch.full((vol,), -1, dtype=torch.long)
    return table.contiguous(), edge_src.to(torch.int32), lay.gather.to(torch.int32)


_TABLES: dict = {}


def edge_table(layout, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(table, edge_src, slots)` of a layout, cached per device: `table[j] = (t0, h0, w0, -1, 64)` when tile j is the
    whole box with that first corner (its slots in the box's frame-major order), else `(0, 0, 0, e, len)`, tile j
    being the e-th edge tile with `len` valid slots; `edge_src`: int32 token of each edge-tile slot (-1 on padding);
    `slots`: int32 token of every slot (`layout.gather`).

    Example:
        >>> lay = tile_layout((5, 4, 8), (4, 4, 4))  # 2 whole boxes, then 2 1x4x4 edge boxes merged into one tile
        >>> table, src, _ = edge_table(lay, "cpu")
        >>> table.tolist(), src.shape
        ([[0, 0, 0, -1, 64], [0, 0, 4, -1, 64], [0, 0, 0, 0, 32]], torch.Size([64]))
    """
    key = (layout.grid, layout.tile, str(torch.device(device)))
    hit = _TABLES.get(key)
    if hit is None:
        hit = _TABLES[key] = tuple(t.to(device) for t in _edge_table_cpu(layout.grid, layout.tile))
    return hit


def serves(q, k, v, geometry, layout, impl, key_mask=None, gate=None) -> bool:
    """Whether the direct path serves this head group: `FAST["direct"]` (off by default) and `FAST["hopper"]` on,
    an sm_90 GPU with Gluon, q, k, v as `hopper.inputs_ok` asks, 64-token tiles, video tokens only (no text), no
    key mask, no VSA gate, no gradient, and a method that selects from tile means.

    Example:
        >>> from sparsify.layout import Geometry
        >>> x = torch.randn(1, 1, 64, 128)
        >>> serves(x, x, x, Geometry((1, 8, 8)), tile_layout((1, 8, 8), (1, 8, 8)), object())  # on CPU: no
        False
    """
    from .gather import FAST, needs_grad

    if not (FAST["direct"] and FAST["hopper"] and q.is_cuda and layout.volume == 64 and key_mask is None
            and gate is None and hasattr(impl, "select_from_means") and not needs_grad(q, k, v)
            and geometry.video_start == 0 and q.shape[2] == geometry.video_len):
        return False
    try:
        from . import hopper
    except Exception:  # no (or another) Gluon: block_sparse_attn says so once
        return False
    return hopper.supports(q, k, v, (64, 64))[0]


def prepare(q, k, v, layout) -> DirectTiles:
    """The tile means of q and k (one read of each, nothing written) and the edge buffers of q, k, v.

    Example:
        >>> # dt = prepare(q, k, v, tile_layout((21, 45, 80), (4, 4, 4), "cuda"))
    """
    from .gather import gather_rows

    table, edge_src, slots = edge_table(layout, q.device)
    _, means = gather_rows([q, k], slots, pool_tiles=layout.n_tiles, tile_lens=layout.tile_lens, volume=64,
                           write=False)
    edges, _ = gather_rows([q, k, v], edge_src)
    return DirectTiles(tuple(means), tuple(edges), table, slots, layout.padded_len)


def attention(q, k, v, layout, dt: DirectTiles, kv_indices, kv_counts, scale=None) -> torch.Tensor:
    """The op's output in token order from the direct kernel (`serves` must have said yes).

    Example:
        >>> # out = attention(q, k, v, lay, prepare(q, k, v, lay), idx, cnt)
    """
    from .hopper64 import block_sparse_attn_hopper64_direct

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return block_sparse_attn_hopper64_direct(q, k, v, dt.edges, dt.table, layout.grid, layout.tile, kv_indices,
                                             kv_counts, scale, dt.out_rows, q.shape[2])
