"""How much K/V a 64x64 kernel CTA could share: overlap of the key tiles VSA selects for query tiles 2t and 2t+1.

    python -m benchmarks.pair_overlap [--sets planted444,testbed,random,wan14b] [--densities 5,10]

The 64x64 Gluon kernel (`sparsify.kernels.hopper64`) serves query tiles 2t and 2t+1 in one CTA, each loading its
own selected K/V tiles; at Wan-14B its K/V loads alone take 0.77 of its time (`benchmarks.l2_floor`). A CTA that
loaded the union of the two key lists once would move `|K(2t) u K(2t+1)| / (|K(2t)| + |K(2t+1)|)` of today's bytes.
This prints that ratio (mean over heads and pairs) for VSA's top-k selection with 4x4x4 tiles on: the planted
heads (`planted444`), the learned test-bed's 32 self-attention heads (`testbed`), Gaussian q, k (`random`), and
Gaussian q, k at the Wan-14B 720p grid with 4 heads (`wan14b`, what `benchmarks.whole_op` selects from). CPU only.
"""

from __future__ import annotations

import argparse

import torch


def union_ratio(idx: torch.Tensor, cnt: torch.Tensor, n_tiles: int) -> float:
    """Mean over (b, h, pair) of `|K(2t) u K(2t+1)| / (|K(2t)| + |K(2t+1)|)` (pairs with a selection only).

    Example:
        >>> idx = torch.tensor([[[[0, 1], [1, 2]]]]); cnt = torch.tensor([[[2, 2]]])
        >>> union_ratio(idx, cnt, 3)  # {0, 1} and {1, 2}: 3 of 4
        0.75
    """
    B, H, n, m = idx.shape
    live = torch.arange(m).view(1, 1, 1, m) < cnt.unsqueeze(-1)
    sel = torch.zeros(B, H, n, n_tiles, dtype=torch.bool)
    sel.scatter_(-1, torch.where(live, idx, 0).long(), live)
    n2 = n // 2 * 2
    a, b = sel[:, :, 0:n2:2], sel[:, :, 1:n2:2]
    total = (a.sum(-1) + b.sum(-1)).float()
    union = (a | b).sum(-1).float()
    ok = total > 0
    return float((union[ok] / total[ok]).mean())


def _sets(names):
    from benchmarks.selection import load_set

    for name in names:
        if name == "wan14b":
            g = torch.Generator().manual_seed(0)
            grid = (21, 45, 80)
            q, k = (torch.randn(1, 4, 21 * 45 * 80, 128, generator=g) for _ in range(2))
            yield name, grid, q, k
        else:
            grid, _, (q, k, _v), _heads = load_set("planted444" if name == "planted444" else name)
            yield name, grid, q, k


def main(argv=None) -> dict:
    from sparsify.geometry import tile_layout, to_tiles
    from sparsify.methods.vsa import VSA
    from sparsify.recipe import Budget

    ap = argparse.ArgumentParser(prog="python -m benchmarks.pair_overlap", description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="planted444,testbed,random,wan14b")
    ap.add_argument("--densities", default="5,10")
    a = ap.parse_args(argv)
    densities = [float(d) for d in a.densities.split(",")]
    out = {}
    for name, grid, q, k in _sets(a.sets.split(",")):
        lay = tile_layout(grid, (4, 4, 4))
        qt, kt = to_tiles(q.float(), lay), to_tiles(k.float(), lay)
        row = {}
        for d in densities:
            idx, cnt = VSA().select(qt, kt, lay, [Budget(density=d / 100)] * q.shape[1])
            row[d] = union_ratio(idx, cnt, lay.n_tiles)
        out[name] = row
        print(f"{name:10s} grid {grid} heads {q.shape[1]:3d} tiles {lay.n_tiles:5d} | union / (c0 + c1) of query "
              f"tiles 2t, 2t+1: " + ", ".join(f"{d:g}%: {r:.3f}" for d, r in row.items()), flush=True)
    return out


if __name__ == "__main__":
    main()
