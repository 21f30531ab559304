"""Factorized attention: sites that attend within one frame (spatial) or along one pixel's frames (temporal)."""

from __future__ import annotations

from .geometry import Geometry

#: How a site's sequence covers the video grid `(T, H, W)`: `full` (all T·H·W tokens, possibly with text),
#: `spatial` (the H·W tokens of one frame; the batch folds the frames, B·T) or `temporal` (the T tokens of one
#: pixel; the batch folds the pixels, B·H·W).
AXES = ("full", "spatial", "temporal")

#: A temporal site runs sparse only when its sequence holds at least this many tiles (see `temporal_is_long`).
LONG_TEMPORAL_TILES = 4


def site_axis(q_len: int, kv_len: int, batch: int, grid: tuple[int, int, int]) -> str | None:
    """The factorized axis of a self-attention call with `batch` sequences of `q_len` tokens over a video of
    token grid `(T, H, W)`: `spatial` when it attends over one frame (`q_len == H·W`, `batch` a multiple of T),
    `temporal` when it attends over one pixel's frames (`q_len == T`, `batch` a multiple of H·W), else None
    (the call covers the whole grid, or is not video attention).

    When `T == H·W` the two readings have the same shapes; the call is read as `temporal`, which keeps it dense
    unless long (the safe reading: a spatial site read as temporal only loses speed). Discover at inputs where
    `T != H·W` to tell them apart.

    Example:
        >>> site_axis(64, 64, 2 * 4, (4, 8, 8)), site_axis(4, 4, 2 * 64, (4, 8, 8)), site_axis(256, 256, 2, (4, 8, 8))
        ('spatial', 'temporal', None)
    """
    T, H, W = grid
    if q_len != kv_len or T * H * W == q_len or batch < 1:
        return None
    if q_len == T and batch % (H * W) == 0:
        return "temporal"
    if q_len == H * W and batch % T == 0:
        return "spatial"
    return None


def axis_geometry(geom: Geometry, axis: str) -> Geometry:
    """The geometry of one sequence of a site on `axis`: the whole video (`full`), one frame `(1, H, W)`
    (`spatial`) or one pixel's frames `(T, 1, 1)` (`temporal`); factorized sequences hold only video tokens.

    Example:
        >>> axis_geometry(Geometry((4, 8, 8), 6), "spatial"), axis_geometry(Geometry((4, 8, 8)), "temporal").grid
        (Geometry(grid=(1, 8, 8), video_start=0), (4, 1, 1))
    """
    T, H, W = geom.grid
    if axis == "spatial":
        return Geometry((1, H, W), 0)
    if axis == "temporal":
        return Geometry((T, 1, 1), 0)
    return geom


def axis_tile(tile: tuple[int, int, int], axis: str) -> tuple[int, int, int]:
    """The tile a site on `axis` uses for the recipe's `tile` `(t, h, w)`, keeping its volume (the kernel's
    block size): spatial sites tile the frame with `(1, h, t·w)`, temporal sites their frames with `(t·h·w, 1, 1)`.

    Example:
        >>> axis_tile((1, 8, 8), "spatial"), axis_tile((4, 4, 4), "spatial"), axis_tile((4, 4, 4), "temporal")
        ((1, 8, 8), (1, 4, 16), (64, 1, 1))
    """
    t, h, w = tile
    if axis == "spatial":
        return (1, h, t * w)
    if axis == "temporal":
        return (t * h * w, 1, 1)
    return tuple(tile)


def temporal_is_long(seq_len: int, tile: tuple[int, int, int]) -> bool:
    """Whether a temporal sequence of `seq_len` frames is long enough to run sparse with `tile`: at least
    `LONG_TEMPORAL_TILES` tiles of its volume (with 64-token tiles, 256 frames). Shorter temporal attention runs
    dense: a selection among fewer tiles saves little, and temporal attention over a few dozen frames is a small
    share of a factorized model's attention work next to its spatial sites.

    Example:
        >>> temporal_is_long(16, (1, 8, 8)), temporal_is_long(256, (1, 8, 8))
        (False, True)
    """
    t, h, w = tile
    return seq_len >= LONG_TEMPORAL_TILES * t * h * w
