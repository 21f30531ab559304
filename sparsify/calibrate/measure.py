"""Exact per-head error and cost of every (tile shape, density) candidate from one dense pass per tile shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..geometry import Geometry, tile_layout, to_tiles
from ..methods import get_method
from ..methods.select import budget_counts
from ..recipe import Budget


@dataclass
class SiteMeasurement:
    """One site's sums over calibration calls: `sq_err` float64 `[H, n_candidates, n_levels]` of
    ‖o_sparse − o_dense‖² and `energy` `[H, n_candidates]` of ‖o_dense‖² over sampled rows; `cost`
    `[n_candidates, n_levels]` relative to dense, padding counted."""

    sq_err: torch.Tensor
    energy: torch.Tensor
    cost: torch.Tensor
    calls: int = 0

    def relative_error(self) -> torch.Tensor:
        """`[H, n_candidates, n_levels]`: relative squared error of each head's attention output."""
        return self.sq_err / self.energy.clamp_min(1e-30)[..., None]

    def head_share(self) -> torch.Tensor:
        """`[H]`: each head's share of the site's dense attention-output energy (sums to 1)."""
        e = self.energy.mean(1)
        return e / e.sum().clamp_min(1e-30)

    def add(self, other: "SiteMeasurement") -> None:
        self.sq_err += other.sq_err
        self.energy += other.energy
        self.cost = other.cost
        self.calls += other.calls


def candidate_cost(geom: Geometry, tile, density: float, seq_len: int) -> float:
    """Attention work of keeping `density` of the key tiles (top-k) relative to dense, padding counted."""
    lay = tile_layout(geom.grid, tile)
    k = budget_counts(Budget(density=density), lay.n_tiles)
    n_text = seq_len - geom.video_len
    video = lay.n_tiles * k * lay.volume ** 2
    text = n_text * (lay.padded_len + n_text) + lay.padded_len * n_text
    return (video + text) / float(seq_len * seq_len)


@torch.no_grad()
def measure_site(q, k, v, geom: Geometry, tiles, levels, *, methods=("vsa",), scale=None, key_mask=None,
                 query_fraction: float = 0.25, seed: int = 0, chunk_elems: int | None = None,
                 rankers: dict | None = None) -> SiteMeasurement:
    """Measure one attention call: per head, the exact top-k error of each method, tile shape and density.

    Full attention of a query row is `sum_j num[r, j] / sum_j den[r, j]` over key tiles j; a method's ranking
    of key tiles (its selection at density 1) makes every density a prefix of it, so cumulative sums along the
    ranking give the exact sparse output for every level at once. Candidates are `(method, tile)` pairs,
    method-major (index `m * len(tiles) + t`). Heads run one at a time, rows in chunks of `chunk_elems`.

    Args:
        q, k, v: `[B, H, S, D]` of the call; `geom`: where the video tokens are.
        tiles, levels: candidate tile shapes and densities (fractions of key tiles kept per query tile).
        methods: registered selection methods to measure.
        key_mask: optional bool `[B, S]`.
        query_fraction: share of the video query tokens sampled (the same rows for every candidate).
        chunk_elems: bound on the partial sums held at once (default 2^25 on CPU, 2^27 on CUDA).
        rankers: optional `{(method, tile): f}`, `f(head)` the method instance ranking that head's key tiles
            (e.g. Veda with the head's fitted estimator); others use `get_method(method)`.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 16)
        >>> m = measure_site(q, k, v, Geometry((4, 8, 8)), [(1, 8, 8)], [0.25, 0.5, 1.0])
        >>> bool(m.sq_err[:, 0, -1].abs().max() < 1e-6)  # keeping everything is exact
        True
    """
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    chunk_elems = chunk_elems or (1 << 27 if q.is_cuda else 1 << 25)
    gen = torch.Generator().manual_seed(seed)
    vs, vl = geom.video_start, geom.video_len
    dev = q.device
    text = torch.cat([torch.arange(0, vs), torch.arange(vs + vl, S)]).to(dev)
    methods = list(methods)
    n_c = len(methods) * len(tiles)
    sq_err = torch.zeros(H, n_c, len(levels), dtype=torch.float64)
    energy = torch.zeros(H, n_c, dtype=torch.float64)
    cost = torch.tensor([[candidate_cost(geom, t, d, S) for d in levels] for _ in methods for t in tiles],
                        dtype=torch.float64)
    default_rankers = [get_method(m) for m in methods]
    all_tiles = [Budget(density=1.0)]
    km_text = None if key_mask is None else key_mask.to(torch.bool).index_select(1, text)[:, None, :]
    n_rows = max(1, min(vl, math.ceil(query_fraction * vl)))
    tokens = torch.randperm(vl, generator=gen)[:n_rows].sort().values.to(dev)
    for ti, tile in enumerate(tiles):
        lay = tile_layout(geom.grid, tile, dev)
        n, vol = lay.n_tiles, lay.volume
        ks = [budget_counts(Budget(density=d), n) for d in levels]
        key_ok = (lay.gather >= 0).view(1, 1, -1)
        if key_mask is not None:
            kmv = to_tiles(key_mask[:, None, vs:vs + vl, None].float(), lay)[:, 0, :, 0] > 0.5  # [B, P]
            key_ok = key_ok & kmv[:, None, :]
        slots = lay.scatter[tokens]  # the sampled query tokens' slots in this layout
        per_chunk = max(1, chunk_elems // max(1, B * n * (D + 1)))
        for h in range(H):
            qv, kv, vv = (to_tiles(x[:, h:h + 1, vs:vs + vl], lay)[:, 0].float() for x in (q, k, v))  # [B, P, D]
            kt, vt = k[:, h, text].float(), v[:, h, text].float()
            rank_by = [(rankers or {}).get((m, tuple(tile))) for m in methods]
            orders = [(f(h) if f else default_rankers[mi]).select(qv[:, None], kv[:, None], lay, all_tiles)
                      [0][:, 0].long() for mi, f in enumerate(rank_by)]
            for c0 in range(0, slots.numel(), per_chunk):
                rows = slots[c0:c0 + per_chunk]
                R = rows.numel()
                qr = qv[:, rows]
                s_vid = (torch.matmul(qr, kv.transpose(-1, -2)) * scale).masked_fill(~key_ok[:, 0][:, None, :], float("-inf"))
                s_txt = torch.matmul(qr, kt.transpose(-1, -2)) * scale
                if km_text is not None:
                    s_txt = s_txt.masked_fill(~km_text, float("-inf"))
                m = s_vid.amax(-1, keepdim=True)
                if text.numel():
                    m = torch.maximum(m, s_txt.amax(-1, keepdim=True))
                p_vid, p_txt = torch.exp(s_vid - m), torch.exp(s_txt - m)
                den = p_vid.view(B, R, n, vol).sum(-1)  # [B, R, n]
                num = torch.einsum("brnk,bnkd->brnd", p_vid.view(B, R, n, vol), vv.view(B, n, vol, D))
                num0, den0 = torch.matmul(p_txt, vt), p_txt.sum(-1)
                full = (num0 + num.sum(2)) / (den0 + den.sum(2)).unsqueeze(-1)
                for mi, order in enumerate(orders):
                    c = mi * len(tiles) + ti
                    rank = order[:, rows // vol]  # [B, R, n]: key tiles of each row's query tile, best first
                    cum_den = torch.cumsum(torch.gather(den, 2, rank), 2)
                    cum_num = torch.cumsum(torch.gather(num, 2, rank[..., None].expand(-1, -1, -1, D)), 2)
                    energy[h, c] += float((full ** 2).sum())
                    for li, kk in enumerate(ks):
                        out = (num0 + cum_num[:, :, kk - 1]) / (den0 + cum_den[:, :, kk - 1]).clamp_min(1e-30).unsqueeze(-1)
                        sq_err[h, c, li] += float(((out - full) ** 2).sum())
    return SiteMeasurement(sq_err=sq_err, energy=energy, cost=cost, calls=1)
