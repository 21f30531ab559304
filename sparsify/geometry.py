"""Token geometry and the 3-D tile layout: which tokens form each tile, with partial edge tiles merged."""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """Where the video tokens are in an attention call's sequence.

    Video tokens are frame-major (`t*H*W + h*W + w`) and occupy `[video_start, video_start + T*H*W)`;
    every other token of the sequence (text, registers, ...) is kept dense: it attends to every
    token and every query attends to it.

    Example:
        >>> Geometry(grid=(21, 30, 52)).video_len
        32760
    """

    grid: tuple[int, int, int]
    video_start: int = 0

    @property
    def video_len(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def check(self, seq_len: int, where: str = "") -> None:
        """Raise ValueError unless the video span fits in a sequence of `seq_len` tokens."""
        if min(self.grid) < 1 or self.video_start < 0 or self.video_start + self.video_len > seq_len:
            raise ValueError(
                f"sparsify{': ' + where if where else ''}: the token grid {self.grid} "
                f"({self.video_len} tokens from {self.video_start}) does not fit a sequence of {seq_len} tokens; "
                "check the adapter or the grid= given to sparsify()")


@dataclass(frozen=True)
class TileLayout:
    """The tile permutation of a `(T, H, W)` grid for one tile shape, with partial edge tiles merged.

    The grid is cut into boxes of `tile`, ordered t-major, then h, then w. Where a dimension does not
    divide, the edge boxes are partial; partial boxes of the same extents are merged, in that order,
    into tiles of up to `volume` tokens (e.g. at Wan-14B 720p, 21x45x80 with 4x4x4 tiles, four 1x4x4
    boxes of the last frame form one 1x4x16 tile), so that only the last tile of each kind of edge
    keeps padding: 1,182 tiles for 75,600 tokens instead of 1,440 padded ones (+0.06% padding
    instead of +21.9%, i.e. a third less attention work at equal tile density). A tile sits where its
    first box does; inside a tile, tokens are in frame-major (t, h, w) order, valid tokens first,
    followed by padding slots.

    Attributes:
        gather: long `[n_tiles * volume]`: video-token index of each slot, or -1 for padding.
        scatter: long `[T*H*W]`: slot of each video token (the inverse permutation).
        tile_lens: int32 `[n_tiles]`: valid tokens in each tile.
        kept: 0 for a grid's own tiles; for a merged video span (`merged_layout`), the tokens left in each
            tile (the grid is then `(n_tiles, 1, kept)`).

    Example:
        >>> lay = tile_layout((5, 4, 4), (4, 4, 4))
        >>> lay.n_tiles, lay.tile_lens.tolist()
        (2, [64, 16])
        >>> tile_layout((5, 4, 16), (4, 4, 4)).tile_lens.tolist()  # four 1x4x4 edge boxes -> one tile
        [64, 64, 64, 64, 64]
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    gather: torch.Tensor
    scatter: torch.Tensor
    tile_lens: torch.Tensor
    kept: int = 0

    @property
    def volume(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    @property
    def n_tiles(self) -> int:
        return self.tile_lens.numel()

    @property
    def padded_len(self) -> int:
        return self.n_tiles * self.volume

    @property
    def padding_fraction(self) -> float:
        """Padded slots over real tokens: the extra work partial tiles cost."""
        n = self.grid[0] * self.grid[1] * self.grid[2]
        return self.padded_len / n - 1.0

    def to(self, device) -> "TileLayout":
        return TileLayout(self.grid, self.tile, self.gather.to(device), self.scatter.to(device), self.tile_lens.to(device),
                          self.kept)


def tiles_per_dim(grid, tile) -> tuple[int, int, int]:
    return tuple(-(-g // t) for g, t in zip(grid, tile))


def _merged_tile_ids(grid, tile) -> tuple[torch.Tensor, int]:
    """Tile id of every box of the padded box grid (raster order), partial boxes merged per kind."""
    nt, nh, nw = tiles_per_dim(grid, tile)
    ext = [[min(t, g - i * t) for i in range(n)] for g, t, n in zip(grid, tile, (nt, nh, nw))]
    vol = tile[0] * tile[1] * tile[2]
    ids, open_tile, n = [], {}, 0  # open_tile: extents -> (tile id, tokens so far)
    for a in ext[0]:
        for b in ext[1]:
            for c in ext[2]:
                size = a * b * c
                cur = open_tile.get((a, b, c)) if size < vol else None
                if cur is not None and cur[1] + size <= vol:
                    ids.append(cur[0])
                    open_tile[(a, b, c)] = (cur[0], cur[1] + size)
                    continue
                if size < vol:
                    open_tile[(a, b, c)] = (n, size)
                ids.append(n)
                n += 1
    return torch.tensor(ids, dtype=torch.long), n


@functools.lru_cache(maxsize=64)
def _layout_cpu(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> TileLayout:
    T, H, W = grid
    tt, th, tw = tile
    _, nh, nw = tiles_per_dim(grid, tile)
    vol = tt * th * tw
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W)
    box = ((t // tt) * nh + (h // th)) * nw + (w // tw)
    box_tile, n_tiles = _merged_tile_ids(grid, tile)
    # in-tile order: frame-major among the tile's tokens; a stable sort by tile id of the frame-major
    # token order yields exactly that, valid tokens first.
    flat_tile = box_tile[box.reshape(-1)]
    order = torch.sort(flat_tile, stable=True).indices  # video tokens grouped by tile
    tile_lens = torch.bincount(flat_tile, minlength=n_tiles)
    starts = torch.cumsum(tile_lens, 0) - tile_lens
    sorted_tiles = flat_tile[order]
    rank_in_tile = torch.arange(order.numel()) - starts[sorted_tiles]
    slot_of_sorted = sorted_tiles * vol + rank_in_tile
    gather = torch.full((n_tiles * vol,), -1, dtype=torch.long)
    gather[slot_of_sorted] = order
    scatter = torch.empty(T * H * W, dtype=torch.long)
    scatter[order] = slot_of_sorted
    return TileLayout(grid, tile, gather, scatter, tile_lens.to(torch.int32))


_DEVICE_CACHE: dict = {}


def tile_layout(grid, tile, device=None) -> TileLayout:
    """The (cached) TileLayout of `grid` for `tile`, on `device`.

    Args:
        grid: `(T, H, W)` token grid.
        tile: `(t, h, w)` tile shape; edge tiles may be partial.
        device: where the index tensors live (cached per device).

    Example:
        >>> tile_layout((2, 2, 2), (1, 2, 2)).gather.tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    grid, tile = tuple(int(x) for x in grid), tuple(int(x) for x in tile)
    return _on_device(_layout_cpu(grid, tile), (grid, tile), device)


def _on_device(lay: TileLayout, key: tuple, device) -> TileLayout:
    """`lay` (on the CPU) on `device`, copied once per key and device."""
    if device is None or torch.device(device).type == "cpu":
        return lay
    key = (*key, str(torch.device(device)))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = lay.to(device)
    return _DEVICE_CACHE[key]


def merged_layout(n_tiles: int, tile, kept: int, device=None) -> TileLayout:
    """The (cached) tile layout of a merged video span: tile-major, `kept` valid tokens per tile, the rest padding.

    The block-sparse kernel then sees the same tiles as the unmerged span, each `volume - kept` tokens short:
    tile `i` of the merged sequence holds exactly the surviving tokens of tile `i` of the unmerged layout
    (`sparsify.generation.merge`).

    Example:
        >>> lay = merged_layout(1, (1, 8, 8), 48)
        >>> lay.tile_lens.tolist(), lay.gather[46:50].tolist(), lay.grid
        ([48], [46, 47, -1, -1], (1, 1, 48))
    """
    n, tile, kept = int(n_tiles), tuple(int(x) for x in tile), int(kept)
    return _on_device(_merged_cpu(n, tile, kept), ("merged", n, tile, kept), device)


@functools.lru_cache(maxsize=64)
def _merged_cpu(n: int, tile: tuple[int, int, int], kept: int) -> TileLayout:
    vol = tile[0] * tile[1] * tile[2]
    if not 0 < kept <= vol:
        raise ValueError(f"merged_layout: kept must be in 1..{vol} (the tile's volume); got {kept}")
    slots = torch.arange(n * vol).view(n, vol)
    gather = torch.where(slots % vol < kept, (slots // vol) * kept + slots % vol, -1).reshape(-1)
    scatter = (torch.arange(n).view(n, 1) * vol + torch.arange(kept).view(1, kept)).reshape(-1)
    return TileLayout((n, 1, kept), tile, gather, scatter, torch.full((n,), kept, dtype=torch.int32), kept)


def _fast(name: str, x: torch.Tensor) -> bool:
    from .kernels._triton import use_triton

    return x.dim() == 4 and use_triton(name, x)


def to_tiles(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Gather video tokens `[B, H, T*H*W, D]` into padded tile order `[B, H, n_tiles*vol, D]` (one pass).

    Padding slots hold an arbitrary token (token 0, or zeros on the Triton path): mask them with
    `layout.gather >= 0` (as `pool_tiles` does) and never attend to them as keys. On CUDA without
    autograd the gather is one Triton launch; otherwise `index_select`.
    """
    if _fast("gather", x):
        from .kernels.gather import gather_rows

        return gather_rows([x], layout.gather.to(x.device))[0][0]
    return x.index_select(2, layout.gather.clamp_min(0).to(x.device))


def from_tiles(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Inverse of `to_tiles`: `[B, H, n_tiles*vol, D]` back to frame-major video tokens."""
    if _fast("gather", x):
        from .kernels.gather import gather_rows

        return gather_rows([x], layout.scatter.to(x.device))[0][0]
    return x.index_select(2, layout.scatter.to(x.device))


def pool_tiles(x: torch.Tensor, layout: TileLayout, stat: str = "mean") -> torch.Tensor:
    """Per-tile statistic of tiled tokens `[B, H, n_tiles*vol, D]` over valid slots, in float32.

    Padding slots are excluded whatever they hold. The mean accumulates in float32 without making a
    float32 copy of `x` (one masked pass in x's dtype when the layout has padding, none otherwise).

    Args:
        stat: `mean`, `max` or `min`.

    Example:
        >>> lay = tile_layout((1, 2, 2), (1, 4, 16))  # one tile, 4 valid slots of 64
        >>> x = torch.arange(4.0).view(1, 1, 4, 1)
        >>> pool_tiles(to_tiles(x, lay), lay).flatten().tolist()
        [1.5]
    """
    if _fast("pool", x) and x.shape[2] == layout.padded_len:
        from .kernels.gather import pool_stats

        return pool_stats(x, layout.tile_lens, layout.volume, (stat,))[0]
    B, Hh, _, D = x.shape
    xt = x.view(B, Hh, layout.n_tiles, layout.volume, D)
    has_pad = layout.padded_len != layout.scatter.numel()
    valid = (layout.gather >= 0).to(x.device).view(1, 1, layout.n_tiles, layout.volume, 1)
    if stat == "mean":
        if has_pad:
            xt = torch.where(valid, xt, torch.zeros((), dtype=xt.dtype, device=xt.device))
        return xt.sum(3, dtype=torch.float32) / layout.tile_lens.to(x.device).view(1, 1, -1, 1).float()
    fill = float("-inf") if stat == "max" else float("inf")
    xt = xt.float().masked_fill(~valid, fill)
    return xt.amax(3) if stat == "max" else xt.amin(3)
