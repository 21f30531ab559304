"""Probe: can a cheaper tile peak keep Veda's recall? Sampled keys and two-stage candidates against the exact peak (CPU).

    python -m benchmarks.veda_cheap_peak                 # keys sampled from slot 0 of each tile
    python -m benchmarks.veda_cheap_peak --offset 5      # the same strides from slot 5

Veda's default score needs the exact peak `max_y q̄_i · k_y` over every key of tile j, a `[n_tiles, S]` GEMM per head
(1/volume of the attention FLOPs), which alone exceeds the 10%-of-kernel selection budget at Wan-14B 720p.
Three cheaper peaks are compared by tile recall on the held-out inputs of `benchmarks.selection`'s planted,
planted444 and testbed sets:

- `groups/G`: the peak over the means of the tile's groups of G consecutive key slots (Veda's `keys/G` peak
  modes; `keys/4` is the default since session 6): 1/G of the GEMM;
- `sampled/s`: the peak over every s-th key slot of the tile (from `--offset`): 1/s of the GEMM;
- `two-stage xc`: the exact peak for only the c·k key tiles of largest mean score, the others never chosen:
  c·k·volume/S of the GEMM.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks.selection import load_set, tile_masses
from sparsify.geometry import pool_tiles, tile_layout, to_tiles
from sparsify.methods import budget_counts
from sparsify.methods.select import select_from_scores
from sparsify.methods.veda import _key_peak, mix_logit, veda_features
from sparsify.testing.planted import oracle_selection, tile_recall
from sparsify.recipe import Budget


def sampled_peak(q, k, layout, scale: float, stride: int, offset: int) -> torch.Tensor:
    """max over the key slots `offset, offset + stride, ...` of tile j of `q̄_i · k_y * scale`, `[B, H, n, n]`."""
    B, H, _, D = k.shape
    n, vol = layout.n_tiles, layout.volume
    ks = k.view(B, H, n, vol, D)[:, :, :, offset::stride]
    valid = (layout.gather >= 0).view(n, vol)[:, offset::stride]
    lg = torch.einsum("bhid,bhjsd->bhijs", pool_tiles(q, layout), ks) * scale
    return lg.masked_fill(~valid.view(1, 1, 1, n, -1), float("-inf")).amax(-1)


def probe(sets=("planted", "planted444", "testbed"), densities=(0.05, 0.10), strides=(2, 4, 8, 16),
          candidates=(2, 4), offset: int = 0, group_sizes=(2, 4, 8, 16)) -> dict:
    """Mean tile recall per set, density and estimate: `{set: {(estimate, density): recall}}`."""
    out = {}
    for name in sets:
        grid, _cal, ev, heads = load_set(name)
        groups: dict = {}
        for h, (_, tile) in enumerate(heads):
            groups.setdefault(tuple(tile), []).append(h)
        acc: dict = {}
        for tile, hs in groups.items():
            lay = tile_layout(grid, tile)
            q, k = (to_tiles(x[:, hs], lay) for x in ev[:2])
            scale = 1 / math.sqrt(q.shape[-1])
            mass = tile_masses(q, k, lay)
            feats = veda_features(q, k, lay, peak="keys", features=("mean", "mix"))
            mean, exact = feats[..., 0], feats[..., 1]
            scores = {"vsa (mean)": mean, "veda (exact peak)": exact}
            for g in group_sizes:
                scores[f"groups/{g}"] = mix_logit(mean, _key_peak(k, pool_tiles(q, lay), lay, scale, g), lay, g)
            for s in strides:
                scores[f"sampled/{s}"] = mix_logit(mean, sampled_peak(q, k, lay, scale, s, offset), lay)
            for d in densities:
                kk = budget_counts(Budget(density=d), lay.n_tiles)
                budgets = [Budget(density=d)] * len(hs)
                rows = {"oracle": oracle_selection(mass, kk)}
                rows.update({key: select_from_scores(sc, budgets) for key, sc in scores.items()})
                for c in candidates:
                    cand = mean.topk(min(lay.n_tiles, c * kk), -1).indices
                    sc = torch.full_like(mean, float("-inf")).scatter(-1, cand, exact.gather(-1, cand))
                    rows[f"two-stage x{c}"] = select_from_scores(sc, budgets)
                for key, sel in rows.items():
                    acc.setdefault((key, d), []).append(tile_recall(mass, *sel).flatten())
        out[name] = {key: float(torch.cat(v).mean()) for key, v in acc.items()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.veda_cheap_peak", description=__doc__.splitlines()[0])
    ap.add_argument("--offset", type=int, default=0, help="first sampled key slot of each tile")
    args = ap.parse_args(argv)
    res = probe(offset=args.offset)
    densities = sorted({d for r in res.values() for _, d in r})
    keys = list(dict.fromkeys(k for r in res.values() for k, _ in r))
    print(f"tile recall, held-out inputs; sampled keys from slot {args.offset}")
    print("| estimate | " + " | ".join(f"{s} @{round(100 * d)}%" for s in res for d in densities) + " |")
    print("|---|" + "---|" * (len(res) * len(densities)))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{res[s][(key, d)]:.4f}" for s in res for d in densities) + " |")
    return res


if __name__ == "__main__":
    main()
