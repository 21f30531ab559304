"""Token merging inside 3-D tiles around whole transformer blocks: fewer tokens through norm1, QKV, attention and FFN."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import SparsifyArgumentError, SparsifyWarning
from ..geometry import Geometry, TileLayout, merged_layout, tile_layout
from ..recipe import check_tile
from ..runtime.state import STATE


def forward_geometry(model: torch.nn.Module, args, kwargs, fallback=None) -> Geometry | None:
    """The token grid of one forward of `model` (its top-level arguments): from the adapter `sparsify()` installed
    on it, else from `fallback` (the model's family adapter); None when neither is known. Read from the model's own
    arguments, never from the runtime's process-wide geometry, which another model's forward may have left.

    Example:
        >>> from sparsify.adapters import GridAdapter
        >>> forward_geometry(torch.nn.Identity(), (), {}, GridAdapter((4, 8, 8))).grid
        (4, 8, 8)
    """
    inst = getattr(model, "_sparsify", None)
    adapter = getattr(inst, "adapter", None) or fallback
    return adapter.geometry(model, args, kwargs) if adapter is not None else None


@dataclass
class TileMerge:
    """Which tokens of a tiled video span a merge keeps, and where each merged one went (one call).

    Every tile of `volume` tokens keeps `kept = volume - r`: its destinations (even slots, in the tile's
    frame-major order) and the sources not merged; the `r` merged sources of a tile are those most similar to
    their best destination. The merged sequence is tile-major, `kept` tokens per tile, in slot order.

    Attributes:
        keep: long `[B, n_tiles * kept]`: the tile-order slot of each kept token, tile-major.
        src: long `[B, n_tiles * r]`: tile-order slots of the merged sources.
        dst: long `[B, n_tiles * r]`: the position in the merged sequence of each source's destination.
        size: float `[B, n_tiles * kept, 1]`: tokens each kept token stands for (1 + merged sources).
    """

    layout: TileLayout
    r: int
    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    size: torch.Tensor

    @property
    def kept(self) -> int:
        return self.layout.volume - self.r

    @property
    def n_tiles(self) -> int:
        return self.layout.n_tiles

    @property
    def merged_len(self) -> int:
        return self.n_tiles * self.kept


def plan_merge(video: torch.Tensor, layout: TileLayout, r: int) -> TileMerge:
    """Choose, per tile, the `r` tokens to merge and their destinations (bipartite matching inside the tile).

    Similarity rule: cosine similarity of the block's input hidden states after centring each token (what
    norm1, a LayerNorm, does before its per-channel scale and shift). USV matches head-averaged keys; merging
    happens before the QKV projection, so the keys are not there yet, and centred hidden states cost no GEMM.
    Destinations are the even slots of each tile; every odd slot (source) picks its most similar destination,
    and the `r` sources with the highest similarity are merged into theirs.

    Args:
        video: `[B, N, D]` the video tokens in frame-major order (N = T*H*W).
        layout: the tile layout; every tile must be full (the grid divisible by the tile).
        r: tokens merged per tile, 0 <= r <= volume // 2.

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> m = plan_merge(torch.randn(1, 64, 8), tile_layout((1, 8, 8), (1, 8, 8)), 16)
        >>> m.keep.shape, m.src.shape, float(m.size.sum())
        (torch.Size([1, 48]), torch.Size([1, 16]), 64.0)
    """
    vol, n = layout.volume, layout.n_tiles
    B, _, D = video.shape
    g = layout.gather.to(video.device)
    tiles = video.index_select(1, g).view(B, n, vol, D).float()
    tiles = tiles - tiles.mean(-1, keepdim=True)
    tiles = tiles / tiles.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dst_slots = torch.arange(0, vol, 2, device=video.device)
    src_slots = torch.arange(1, vol, 2, device=video.device)
    sim = tiles[:, :, src_slots] @ tiles[:, :, dst_slots].transpose(-1, -2)  # [B, n, n_src, n_dst]
    best, best_dst = sim.max(-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # sources, most similar first
    merged_src = order[..., :r]  # indices into src_slots
    is_merged = torch.zeros(B, n, src_slots.numel(), dtype=torch.bool, device=video.device)
    is_merged.scatter_(-1, merged_src, True)
    slot_kept = torch.ones(B, n, vol, dtype=torch.bool, device=video.device)
    slot_kept[:, :, src_slots] = ~is_merged
    kept = vol - r
    keep_in_tile = torch.sort(torch.where(slot_kept, torch.arange(vol, device=video.device), vol), dim=-1).values
    keep_in_tile = keep_in_tile[..., :kept]  # [B, n, kept] slots in increasing order
    # position of each slot in the merged sequence (kept slots only)
    pos = torch.full((B, n, vol), -1, dtype=torch.long, device=video.device)
    pos.scatter_(-1, keep_in_tile, torch.arange(kept, device=video.device).expand(B, n, kept).contiguous())
    base = torch.arange(n, device=video.device).view(1, n, 1)
    src = src_slots[merged_src]  # [B, n, r] slots
    dst_slot = dst_slots[best_dst.gather(-1, merged_src)]  # [B, n, r]
    dst = pos.gather(-1, dst_slot) + base * kept
    size = torch.ones(B, n * kept, device=video.device)
    size.scatter_add_(1, dst.reshape(B, -1), torch.ones(B, n * r, device=video.device))
    return TileMerge(layout, r, (keep_in_tile + base * vol).reshape(B, -1), (src + base * vol).reshape(B, -1),
                     dst.reshape(B, -1), size.unsqueeze(-1))


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`x[b, idx[b]]` for `x` `[B|1, S, ...]` and `idx` `[B, K]`."""
    B = idx.shape[0]
    x = x.expand(B, *x.shape[1:])
    return x.gather(1, idx.view(B, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def merge(x: torch.Tensor, m: TileMerge, video_start: int = 0) -> torch.Tensor:
    """Merge `x` `[B, S, D]`: the video span becomes `m.merged_len` tokens (tile-major; a destination is the
    mean of itself and its merged sources); tokens outside the span (text) are kept as they are.

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> lay = tile_layout((1, 8, 8), (1, 8, 8)); x = torch.randn(1, 70, 8)
        >>> merge(x, plan_merge(x[:, :64], lay, 16), 0).shape
        torch.Size([1, 54, 8])
    """
    N = m.layout.grid[0] * m.layout.grid[1] * m.layout.grid[2]
    before, video, after = x[:, :video_start], x[:, video_start:video_start + N], x[:, video_start + N:]
    tiled = video.index_select(1, m.layout.gather.to(x.device))
    out = _rows(tiled, m.keep).float()
    if m.r:
        out = out.scatter_add(1, m.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), _rows(tiled, m.src).float())
        out = out / m.size
    return torch.cat([before, out.to(x.dtype), after], dim=1)


def unmerge(y: torch.Tensor, x: torch.Tensor, x_merged: torch.Tensor, m: TileMerge, video_start: int = 0) -> torch.Tensor:
    """Restore a block's output `y` (merged, `[B, S', D]`) to the full sequence of its input `x`.

    Kept tokens take their output; a merged source takes its own input plus its destination's update
    (`x_src + y_dst - x_merged_dst`): the block's change is shared, the token's own residual stream is not
    overwritten. Text tokens pass through.

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> lay = tile_layout((1, 8, 8), (1, 8, 8)); x = torch.randn(1, 64, 8); m = plan_merge(x, lay, 16)
        >>> xm = merge(x, m); torch.equal(unmerge(xm, x, xm, m), x)
        False
        >>> m0 = plan_merge(x, lay, 0); torch.equal(unmerge(merge(x, m0), x, merge(x, m0), m0), x)
        True
    """
    N = m.layout.grid[0] * m.layout.grid[1] * m.layout.grid[2]
    L = m.merged_len
    yv, xmv = y[:, video_start:video_start + L], x_merged[:, video_start:video_start + L]
    B, D = y.shape[0], y.shape[-1]
    lay = m.layout
    tiled = x[:, video_start:video_start + N].index_select(1, lay.gather.to(x.device)).clone()
    tiled = tiled.expand(B, *tiled.shape[1:]).clone() if tiled.shape[0] != B else tiled
    tiled.scatter_(1, m.keep.unsqueeze(-1).expand(-1, -1, D), yv.to(tiled.dtype))
    if m.r:
        delta = _rows(yv - xmv, m.dst)
        tiled.scatter_add_(1, m.src.unsqueeze(-1).expand(-1, -1, D), delta.to(tiled.dtype))
    video = tiled.index_select(1, lay.scatter.to(x.device))
    return torch.cat([y[:, :video_start], video, y[:, video_start + L:]], dim=1)


@dataclass
class MergedTokens:
    """What the sparse runtime must know while a merged block runs: the merged span's geometry and tiles."""

    geometry: Geometry  # pseudo-grid (n_tiles, 1, kept) at the span's start
    layout: TileLayout  # merged_layout(): kernel tile i = merged tile i
    seq_len: int  # the merged sequence length the block's attention calls see

    def applies(self, seq_len: int) -> bool:
        return seq_len == self.seq_len


class BlockMerger:
    """Forward hooks merging tokens around one diffusers Wan block (`hidden_states, encoder_hidden_states, temb,
    rotary_emb`): merged before the block (so before norm1, the QKV projections, attention and the FFN) and
    restored after it. RoPE and per-token modulation are gathered at the kept tokens (a destination keeps its
    own position); tokens outside the video span are never merged.

    Args:
        block: the block module (e.g. `model.blocks[3]`).
        ratio: fraction of each tile's tokens merged, in [0, 0.5]; `r = floor(ratio * volume)`.
        tile: the 3-D tile `(t, h, w)` merging happens in; the recipe's tile keeps merged tiles aligned with
            the block-sparse kernel's.

    Its owner (`TokenMerging`, `PlanRunner`) sets `geometry` at every forward of the model from that model's own
    arguments (`forward_geometry`); the block runs unmerged while it is None.
    """

    def __init__(self, block: torch.nn.Module, ratio: float, tile=(4, 4, 4)):
        self.block, self.ratio, self.tile = block, float(ratio), check_tile(tile, "tile")
        self.r = int(self.ratio * self.tile[0] * self.tile[1] * self.tile[2])
        self.tokens_in: list[int] = []  # sequence length through the block per call (for tests and reports)
        self.geometry: Geometry | None = None  # the model's current token grid (set by the owner's model hook)
        self._ctx: list = []
        self._handles = [block.register_forward_pre_hook(self._pre, with_kwargs=True),
                         block.register_forward_hook(self._post, with_kwargs=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")
        bound = dict(zip(names, args), **kwargs)
        x = bound["hidden_states"]
        geo = self.geometry
        if self.r == 0 or geo is None:
            self._ctx.append(None)
            self.tokens_in.append(x.shape[1])
            return None
        grid, vs = geo.grid, geo.video_start
        if vs < 0:
            vs = x.shape[1] - grid[0] * grid[1] * grid[2]
        if any(g % t for g, t in zip(grid, self.tile)):
            warnings.warn(f"sparsify: token merging needs the grid {grid} divisible by the tile {self.tile}; "
                          "this block runs unmerged", SparsifyWarning, stacklevel=2)
            self._ctx.append(None)
            self.tokens_in.append(x.shape[1])
            return None
        lay = tile_layout(grid, self.tile, x.device)
        N = lay.gather.numel()
        m = plan_merge(x[:, vs:vs + N], lay, self.r)
        xm = merge(x, m, vs)
        keep_seq = self._positions(m, vs, x.shape[1])
        rot = bound.get("rotary_emb")
        if rot is not None:
            bound["rotary_emb"] = tuple(_rows(f, keep_seq) for f in rot) if isinstance(rot, (tuple, list)) \
                else _rows(rot, keep_seq)
        temb = bound.get("temb")
        if temb is not None and temb.dim() == 4:  # per-token modulation [B, S, 6, D]
            bound["temb"] = _rows(temb, keep_seq)
        bound["hidden_states"] = xm
        self._ctx.append((x, xm, m, vs, STATE.merged))
        STATE.merged = MergedTokens(Geometry((m.n_tiles, 1, m.kept), vs), merged_layout(m.n_tiles, lay.tile, m.kept),
                                    xm.shape[1])
        self.tokens_in.append(xm.shape[1])
        return (), bound

    @staticmethod
    def _positions(m: TileMerge, vs: int, S: int) -> torch.Tensor:
        """Sequence index of each token of the merged sequence (`[B, S']`): text as is, kept video tokens at
        their own frame-major position."""
        B = m.keep.shape[0]
        video = m.layout.gather.to(m.keep.device)[m.keep] + vs
        N = m.layout.gather.numel()
        before = torch.arange(vs, device=m.keep.device).expand(B, vs)
        after = torch.arange(vs + N, S, device=m.keep.device).expand(B, S - vs - N)
        return torch.cat([before, video, after], dim=1)

    def _post(self, module, args, kwargs, output):
        ctx = self._ctx.pop()
        if ctx is None:
            return None
        x, xm, m, vs, previous = ctx
        STATE.merged = previous
        return unmerge(output, x, xm, m, vs)


class TokenMerging:
    """The block mergers `merge_blocks` installed on a model, and the model hook that gives them the grid of each
    forward (`forward_geometry`: sparsify's adapter on the model, else its family adapter)."""

    def __init__(self, model: torch.nn.Module, mergers: list[BlockMerger]):
        from ..adapters import adapter_for

        self.mergers = mergers
        family = adapter_for(model)

        def grid_hook(mod, args, kwargs):
            self.set_geometry(forward_geometry(mod, args, kwargs, family))

        self._hook = model.register_forward_pre_hook(grid_hook, with_kwargs=True)

    def set_geometry(self, geometry: Geometry | None) -> None:
        """Give every merger the token grid; for blocks called on their own, outside a forward of the model (whose
        hook sets the grid of each forward).

        Example:
            >>> # merging.set_geometry(adapter_for(model).geometry(model, (), inputs)); model.blocks[0](*block_args)
        """
        for mg in self.mergers:
            mg.geometry = geometry

    def remove(self) -> None:
        """Undo the merging: every block computes exactly what it computed before."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for mg in self.mergers:
            mg.remove()


def merge_blocks(model: torch.nn.Module, ratios, tile=(4, 4, 4)) -> TokenMerging:
    """Merge tokens around blocks of a diffusers Wan transformer (`model.blocks`).

    The token grid of each forward comes from the model's own arguments: through the adapter `sparsify()` installed
    on it when sparsified, else through its family adapter (`TokenMerging.set_geometry` for blocks called alone).

    Args:
        model: the transformer (sparsified or not).
        ratios: one ratio for every block, or `{block_index: ratio}`; a ratio is the fraction of each tile's
            tokens merged, in [0, 0.5].
        tile: the tile merging happens in (use the recipe's tile so merged tiles stay kernel tiles).

    Returns:
        A `TokenMerging`: `.mergers` (one BlockMerger per block), `.remove()` undoes it.

    Raises:
        SparsifyArgumentError: a ratio outside [0, 0.5], a block index the model does not have.

    Example:
        >>> # merging = merge_blocks(pipe.transformer, {10: 0.25, 11: 0.25}, tile=(4, 4, 4))
        >>> # ...; merging.remove()
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise SparsifyArgumentError("model", model, "must have a ModuleList `blocks` (a diffusers Wan transformer)",
                                    shown=f"<{type(model).__name__}>")
    per = ratios if isinstance(ratios, dict) else {i: ratios for i in range(len(blocks))}
    for i, ratio in per.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks):
            raise SparsifyArgumentError("ratios", ratios, f"block index {i!r} does not exist: the model has "
                                        f"{len(blocks)} blocks (0..{len(blocks) - 1})")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 0.5:
            raise SparsifyArgumentError("ratios", ratios, f"block {i}: ratio must be a number in [0, 0.5] (the "
                                        f"fraction of each tile's tokens merged); got {ratio!r}")
    return TokenMerging(model, [BlockMerger(blocks[i], ratio, tile) for i, ratio in per.items()])
