"""Key-side token merging with proportional attention: fewer keys per 3-D tile, every query kept."""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import SparsifyWarning
from ..geometry import tile_layout
from .base import SelectionMethod
from .registry import register_method

_sdpa = torch._C._nn.scaled_dot_product_attention  # never the F.* that sparsify() patches (it would route back here)
_WARNED: set[str] = set()  # reasons already warned of (one warning per reason and process)


def merged_per_tile(density: float, volume: int) -> int:
    """Keys merged per tile of `volume` keys for a budget `density` (the share of keys kept): the nearest whole
    number, at most `volume // 2` (the merged keys are sources, a tile's odd slots).

    Example:
        >>> merged_per_tile(0.75, 64), merged_per_tile(0.5, 64), merged_per_tile(0.1, 64), merged_per_tile(1.0, 64)
        (16, 32, 32, 0)
    """
    return min(max(round((1.0 - density) * volume), 0), volume // 2)


def key_merged_attention(q, k, v, layout, r: int, video_start: int = 0, *, scale=None, proportional: bool = True,
                         features: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Attention of every query over keys and values merged inside each 3-D tile of the video span.

    In each tile, `r` keys are merged into their most similar destination (`sparsify.generation.merge.plan_merge`
    on the head-averaged keys, cosine similarity uncentred: USV's rule); a destination's key and value become the
    mean of the keys and values it stands for. With `proportional`, a kept key that stands for `s` keys gets a
    `+log(s)` bias on its logits, so it weighs as the `s` keys would if they were equal (exact for duplicates).
    Queries and keys outside the video span are not merged, and queries outside it attend every unmerged key.

    Args:
        q, k, v: `[B, H, S, D]`, frame-major video tokens at `[video_start, video_start + layout's tokens)`.
        layout: the video span's `TileLayout` (every tile full).
        r: keys merged per tile, `0 <= r <= volume // 2`.
        scale: softmax scale (None: 1/sqrt(D)).
        proportional: add the `+log(size)` bias.
        features: `[B, N, D']` video features matched instead of the head-averaged keys (None: those).

    Returns:
        `(out [B, H, S, D], keys)`: the output and the number of keys each video query attended.

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> lay = tile_layout((2, 4, 4), (2, 4, 4))
        >>> q, k, v = torch.randn(3, 1, 2, 32, 16).unbind(0)
        >>> k2, v2 = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)  # every even slot duplicated
        >>> out, keys = key_merged_attention(q, k2[:, :, :32], v2[:, :, :32], lay, 16)
        >>> keys, torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k2[:, :, :32], v2[:, :, :32]),
        ...                      atol=1e-5)
        (16, True)
    """
    from ..generation.merge import merge, plan_merge

    B, H, S, D = k.shape
    N = layout.gather.numel()
    vs = video_start
    if r == 0:
        return _sdpa(q, k, v, scale=scale), S
    feat = k[:, :, vs:vs + N].float().mean(1) if features is None else features
    m = plan_merge(feat, layout, r, centre=False)

    def fold(x):  # [B, H, S, D] -> [B, S, H*D] (merge works on token rows)
        return x.transpose(1, 2).reshape(B, S, H * D)

    def unfold(x):
        return x.view(B, -1, H, D).transpose(1, 2)

    km, vm = unfold(merge(fold(k), m, vs)), unfold(merge(fold(v), m, vs))
    Sk = km.shape[2]
    mask = None
    if proportional:
        bias = torch.zeros(B, Sk, device=q.device, dtype=torch.float32)
        bias[:, vs:vs + m.merged_len] = m.size.squeeze(-1).log()
        mask = bias.to(q.dtype)[:, None, None, :]
    out = _sdpa(q, km, vm, attn_mask=mask, scale=scale)
    if S > N:  # queries outside the video span attend every key unmerged
        text = torch.cat([torch.arange(0, vs), torch.arange(vs + N, S)]).to(q.device)
        out = out.clone()
        out[:, :, text] = _sdpa(q[:, :, text], k, v, scale=scale)
    return out, Sk


@register_method("keymerge")
class KeyMerge(SelectionMethod):
    """Key-side token merging (`key_merged_attention`) as a recipe method: `budget.density` is the share of each
    tile's keys kept (at least 0.5), the recipe's tile the 3-D tile keys merge in; attention is dense over the
    merged keys (SDPA with the `+log(size)` bias), so it composes with nothing else inside one head.

    It has no `select` (the calibrator does not measure it); use it in hand-written recipes, e.g.
    `{"version": 1, "defaults": {"method": "keymerge", "tile": [4, 4, 4], "budget": {"density": 0.75}}}`.

    Example:
        >>> from sparsify.geometry import Geometry
        >>> from sparsify.recipe import Budget
        >>> q, k, v = torch.randn(3, 1, 2, 64, 16).unbind(0)
        >>> out, work = KeyMerge().attend(q, k, v, Geometry((4, 4, 4)), [Budget(density=0.75)] * 2, scale=None,
        ...                               key_mask=None, cache={}, block_fn=None, tile=(4, 4, 4))
        >>> out.shape, work
        (torch.Size([1, 2, 64, 16]), 1.5)
    """

    #: add the +log(size) bias (proportional attention); `benchmarks.quality merge` ablates it in a subclass
    proportional: bool = True

    def select(self, q, k, layout, budgets, stats=None):
        raise NotImplementedError("keymerge merges keys instead of selecting tiles; the runtime calls "
                                  "KeyMerge.attend()")

    def attend(self, q, k, v, geometry, budgets, *, scale, key_mask, cache, block_fn, tile=None):
        """Key-merged attention of one head group in the original token order (the runtime's `attend` protocol).

        Returns `(out [B, h, S, D], work)`, `work` the keys attended over dense, summed over `B x h`. Runs dense,
        with one warning per reason, where it cannot merge: no tile, a grid the tile does not divide, a key mask.
        """
        B, H, S, D = q.shape
        grid, vs = geometry.grid, geometry.video_start

        def warn(message):
            if message not in _WARNED:
                _WARNED.add(message)
                warnings.warn(f"sparsify: keymerge: {message}", SparsifyWarning, stacklevel=3)

        def dense(reason):
            warn(f"{reason}; these heads run dense attention")
            from ..runtime import dense_attention

            return dense_attention(q, k, v, scale, key_mask), float(B * H)

        if tile is None:
            return dense("no tile given")
        if any(g % t for g, t in zip(grid, tile)):
            return dense(f"the grid {tuple(grid)} is not divisible by the tile {tuple(tile)}")
        if key_mask is not None:
            return dense("calls with a key mask are not merged")
        if any(b.density is None for b in budgets):
            return dense("a top_p budget does not apply (give budget.density, the share of keys kept)")
        if any(b.density < 0.5 for b in budgets):
            warn("a density below 0.5 keeps half the keys (at most half of a tile's keys merge)")
        lay = tile_layout(grid, tile, q.device)
        vol = math.prod(tile)
        rs = [merged_per_tile(b.density, vol) for b in budgets]
        feat = k[:, :, vs:vs + lay.gather.numel()].float().mean(1)  # the whole group's head average
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        work = 0.0
        for r in sorted(set(rs)):
            heads = [h for h, x in enumerate(rs) if x == r]
            idx = torch.tensor(heads, device=q.device)
            oh, keys = key_merged_attention(*(x.index_select(1, idx) for x in (q, k, v)), lay, r, vs, scale=scale,
                                            proportional=self.proportional, features=feat)
            out.index_copy_(1, idx, oh.to(out.dtype))
            N = lay.gather.numel()
            work += B * len(heads) * (N * keys + (S - N) * S) / (S * S)
        return out, work
