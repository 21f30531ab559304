"""The tiled sequence: q, k, v permuted into 3-D tiles (text in blocks after them), and sparse attention over it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..geometry import merged_layout, tile_layout
from ..kernels._triton import enabled, needs_grad, use_triton
from ..kernels.gather import gather_rows
from ..kernels.reference import block_sparse_attn_reference
from ..methods.base import TileStats


@functools.lru_cache(maxsize=128)
def _sequence_index(grid, tile, video_start: int, seq_len: int, device: str, kept: int = 0):
    """Index tensors of the padded tile sequence [video tiles | text blocks] (cached per layout and device)."""
    lay = merged_layout(grid[0], tile, kept) if kept else tile_layout(grid, tile)
    vol, n = lay.volume, lay.n_tiles
    vl = lay.scatter.numel()
    text_idx = torch.cat([torch.arange(0, video_start), torch.arange(video_start + vl, seq_len)])
    n_text = text_idx.numel()
    n_tb = -(-n_text // vol)
    slot_src = torch.where(lay.gather >= 0, lay.gather + video_start, torch.zeros_like(lay.gather))
    text_slots = torch.zeros(n_tb * vol, dtype=torch.long)
    text_slots[:n_text] = text_idx
    src = torch.cat([slot_src, text_slots])  # the token feeding each slot (padding repeats token 0)
    valid = torch.cat([lay.gather >= 0, torch.arange(n_tb * vol) < n_text])
    inverse = torch.empty(seq_len, dtype=torch.long)  # the slot of each original token
    inverse[video_start + torch.arange(vl)] = lay.scatter
    inverse[text_idx] = n * vol + torch.arange(n_text)
    lens = torch.cat([lay.tile_lens, (n_text - vol * torch.arange(n_tb)).clamp(0, vol).to(torch.int32)])
    prefix = (len(lens) - 1) * vol + int(lens[-1]) if bool((lens[:-1] == vol).all()) else None
    dev = torch.device(device)
    return (src.to(dev), valid.to(dev), inverse.to(dev), lens.to(dev, torch.int32), n_tb, prefix)


@dataclass
class TiledSequence:
    """q, k, v permuted into `[video tiles | text blocks]` slots, padded to whole blocks.

    Attributes:
        q, k, v: `[B, H, n_slots, D]`; padding slots hold arbitrary tokens (never attended as keys): token
            0 on the PyTorch path, zeros on the Triton one (CUDA without autograd).
        src: long `[n_slots]`, the original token feeding each slot.
        valid: bool `[n_slots]`, False on padding.
        inverse: long `[S]`, the slot of each original token.
        block_lens: int32 `[n_blocks]`, valid (leading) slots per block.
        n_video_slots: slots of the video tiles (`layout.padded_len`); text blocks follow.
        n_text_blocks: number of text blocks.
        prefix_len: when only the last block is short, the slots up to its last valid one (every valid
            slot lies below it): the kernel then runs on that prefix as an ordinary tail, with no per-block
            lengths to test. None otherwise.
        q_means, k_means: float32 `[B, H, n_tiles, D]` tile means of the video tiles when the gather
            computed them on the fly (CUDA), else None (selection pools them itself).
        k_group_means: float32 means of k's groups of `key_group` slots (Veda's `keys/G` peak), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    src: torch.Tensor
    valid: torch.Tensor
    inverse: torch.Tensor
    block_lens: torch.Tensor
    n_video_slots: int
    n_text_blocks: int
    prefix_len: int | None = None
    q_means: torch.Tensor | None = None
    k_means: torch.Tensor | None = None
    k_group_means: torch.Tensor | None = None

    @property
    def stats(self) -> "TileStats":
        """The tile statistics the gather computed, for a method's `select`."""
        return TileStats(self.q_means, self.k_means, self.k_group_means)


def tile_sequence(q, k, v, geometry, layout, key_group: int = 0) -> TiledSequence:
    """Gather q, k, v `[B, H, S, D]` into the padded tile order used by `tiled_sparse_attention` (one pass each).

    On CUDA without autograd this is one Triton launch for all three, which also computes the tile
    means of q and k (`q_means`, `k_means`: selection then does not read q and k again) and, with
    `key_group` > 1, the means of k's groups of that many slots (`k_group_means`, for Veda's `keys/G`
    peak); otherwise three `index_select`s and no means.

    Example:
        >>> from sparsify.geometry import Geometry, tile_layout
        >>> x = torch.randn(1, 1, 70, 8); g = Geometry((2, 4, 8), video_start=6)
        >>> ts = tile_sequence(x, x, x, g, tile_layout(g.grid, (1, 4, 16)))
        >>> ts.q.shape[2], ts.n_text_blocks, torch.equal(ts.q.index_select(2, ts.inverse), x)
        (128, 1, True)
    """
    S = q.shape[2]
    geometry.check(S)
    src, valid, inverse, lens, n_tb, prefix = _sequence_index(layout.grid, layout.tile, geometry.video_start, S,
                                                              str(q.device), layout.kept)
    means = []
    if _fast_gather(q, k, v):  # one Triton launch for q, k, v; tile means of q and k on the fly
        vol = layout.volume
        fuse = enabled("fuse_pool") and vol <= 128 and not vol & (vol - 1)
        group = key_group if fuse and 1 < key_group <= vol and not vol % key_group and not key_group & (key_group - 1) \
            else 0
        (qt, kt, vt), means = gather_rows([q, k, v], _slot_source(src, valid), pool_tiles=layout.n_tiles if fuse else 0,
                                          tile_lens=layout.tile_lens, volume=vol, group=group)
    else:
        qt, kt, vt = (x.index_select(2, src) for x in (q, k, v))
    means = list(means) + [None] * (3 - len(means))
    return TiledSequence(qt, kt, vt, src=src, valid=valid, inverse=inverse, block_lens=lens,
                         n_video_slots=layout.padded_len, n_text_blocks=n_tb, prefix_len=prefix,
                         q_means=means[0], k_means=means[1], k_group_means=means[2])


def _fast_gather(*xs) -> bool:
    return all(x.shape == xs[0].shape and x.dtype == xs[0].dtype for x in xs) and use_triton("gather", *xs)


_SLOT_SOURCE: dict = {}


def _scatters(block_fn, *xs) -> bool:
    """Whether `block_fn` should store rows straight to token order: it can (`scatters_rows`), the fused inverse
    is on (the `scatter` kernel path) and no gradient is recorded for `xs`."""
    return getattr(block_fn, "scatters_rows", False) and enabled("scatter") and not needs_grad(*xs)


def _slot_source(src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int32 `src` with -1 on padding slots (the Triton gather writes zeros there), cached per index tensor."""
    key = id(src)
    hit = _SLOT_SOURCE.get(key)
    if hit is None or hit[0] is not src:
        hit = _SLOT_SOURCE[key] = (src, torch.where(valid, src, -1).to(torch.int32))
    return hit[1]


def tiled_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry,
    layout,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    block_fn=None,
    tiled: "TiledSequence | None" = None,
) -> torch.Tensor:
    """Sparse attention over a video sequence in its original token order: the op's reference semantics.

    The video span of `geometry` is permuted into the tiles of `layout` (partial edge tiles padded;
    padded keys never attended); query tile `i` attends to the video key tiles
    `kv_indices[b, h, i, :kv_counts[b, h, i]]`. Every other token (text) is dense: text queries attend
    to all tokens and every query attends to all text keys. The output is back in the original order.

    Args:
        q, k, v: `[B, H, S, D]`, original token order.
        geometry: a `Geometry` (grid and video start).
        layout: the `TileLayout` of `geometry.grid`.
        kv_indices, kv_counts: the selection among the `layout.n_tiles` video tiles.
        scale: softmax scale; default `1/sqrt(D)`.
        key_mask: optional bool `[B, S]`; False keys are excluded (e.g. padded text).
        block_fn: the block-sparse kernel to run (default: `block_sparse_attn_reference`); it is
            called as `block_fn(q, k, v, idx, cnt, block_size=..., scale=..., kv_block_lens=...)`, or
            with `key_mask=` (bool `[B, n_slots]`) instead when a key mask is given. A `block_fn` whose
            attribute `scatters_rows` is true is instead given `out_rows=` (int32 `[n_slots]`: each slot's
            token, -1 on padding) and `out_len=S` when there is no key mask and no gradient to record, and
            returns the output in token order itself (the inverse layout fused into its store; off with
            `SPARSIFY_KERNELS=-scatter`).
        tiled: the `tile_sequence` of q, k, v if already computed (the runtime shares it with selection).

    Returns:
        `[B, H, S, D]` in q's dtype.

    Example:
        >>> from sparsify.geometry import Geometry, tile_layout
        >>> g = Geometry((2, 4, 8)); lay = tile_layout(g.grid, (1, 4, 16))
        >>> q = torch.randn(1, 1, 64, 16); n = lay.n_tiles
        >>> idx = torch.arange(n, dtype=torch.int32).expand(1, 1, n, n); cnt = torch.full((1, 1, n), n)
        >>> out = tiled_sparse_attention(q, q, q, g, lay, idx, cnt)
    """
    block_fn = block_sparse_attn_reference if block_fn is None else block_fn
    B, H, S, D = q.shape
    ts = tiled if tiled is not None else tile_sequence(q, k, v, geometry, layout)
    vol, n, n_tb = layout.volume, layout.n_tiles, ts.n_text_blocks
    dev = q.device
    if n_tb == 0:
        idx, cnt = kv_indices, kv_counts
    else:  # video query tiles also see every text block; text query blocks see every block
        n_blocks = n + n_tb
        width = max(kv_indices.shape[-1] + n_tb, n_blocks)
        idx = torch.zeros(B, H, n_blocks, width, dtype=torch.int32, device=dev)
        cnt = torch.empty(B, H, n_blocks, dtype=torch.int32, device=dev)
        idx[:, :, :n, : kv_indices.shape[-1]] = kv_indices.to(dev, torch.int32)
        cnt[:, :, :n] = kv_counts.to(dev, torch.int32)
        pos = kv_counts.to(dev, torch.long).unsqueeze(-1) + torch.arange(n_tb, device=dev)
        text_ids = torch.arange(n, n_blocks, dtype=torch.int32, device=dev)
        idx[:, :, :n].scatter_(-1, pos, text_ids.expand(B, H, n, n_tb).contiguous())
        cnt[:, :, :n] += n_tb
        idx[:, :, n:, :n_blocks] = torch.arange(n_blocks, dtype=torch.int32, device=dev)
        cnt[:, :, n:] = n_blocks
    if key_mask is None:  # when only the last block is short, the slot prefix with an ordinary tail and no lengths
        L, lens = (ts.prefix_len, None) if ts.prefix_len is not None else (ts.q.shape[2], ts.block_lens)
        args = (ts.q[:, :, :L], ts.k[:, :, :L], ts.v[:, :, :L], idx, cnt)
        if _scatters(block_fn, q, k, v):
            # the kernel stores each slot's row straight to its token's row: no inverse pass
            return block_fn(*args, block_size=(vol, vol), scale=scale, kv_block_lens=lens,
                            out_rows=_slot_source(ts.src, ts.valid)[:L], out_len=S)
        out_slots = block_fn(*args, block_size=(vol, vol), scale=scale, kv_block_lens=lens)
    else:
        kmask = ts.valid.unsqueeze(0) & key_mask.to(torch.bool).index_select(1, ts.src)
        out_slots = block_fn(ts.q, ts.k, ts.v, idx, cnt, block_size=(vol, vol), scale=scale, key_mask=kmask)
    if _fast_gather(out_slots):
        return gather_rows([out_slots], ts.inverse)[0][0]
    return out_slots.index_select(2, ts.inverse)
