"""The op's direct path on the CPU box: its tile tables rebuild the layout exactly, VSA selects the same from the
means alone, and the gate keeps CPU tensors out (the kernel itself: tests/gpu/test_direct_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from sparsify.kernels.direct import edge_table, serves
from sparsify.layout import Geometry, pool_tiles, tile_layout, to_tiles
from sparsify.methods.vsa import VSA
from sparsify.recipe import Budget


@pytest.mark.parametrize("tile", [(4, 4, 4), (1, 8, 8), (2, 4, 8), (8, 2, 4), (16, 2, 2), (1, 4, 16)])
@pytest.mark.parametrize("grid", [(21, 45, 80), (5, 9, 20), (3, 10, 17), (16, 8, 8)])
def test_edge_table_rebuilds_the_layout(grid, tile):
    """Every tile's slots, read the way the kernel reads them (a whole box from its corner in frame-major order, or
    the edge buffer's next 64 slots), are exactly the layout's slots; lengths are the tile lengths."""
    lay = tile_layout(grid, tile)
    table, edge_src, slots = edge_table(lay, "cpu")
    T, Hh, W = grid
    tt, th, tw = tile
    offs = (torch.arange(tt).view(-1, 1, 1) * Hh * W + torch.arange(th).view(1, -1, 1) * W
            + torch.arange(tw).view(1, 1, -1)).reshape(-1)
    rebuilt = []
    for t0, h0, w0, e, n in table.tolist():
        if e < 0:
            assert n == 64 and t0 + tt <= T and h0 + th <= Hh and w0 + tw <= W
            rebuilt.append(t0 * Hh * W + h0 * W + w0 + offs)
        else:
            rebuilt.append(edge_src[e * 64:(e + 1) * 64].long())
    assert torch.equal(torch.cat(rebuilt), lay.gather)
    assert torch.equal(table[:, 4], lay.tile_lens) and torch.equal(slots.long(), lay.gather)
    n_edge = int((table[:, 3] >= 0).sum())
    assert edge_src.numel() == max(n_edge, 1) * 64
    if grid == (16, 8, 8) and tile in ((4, 4, 4), (1, 8, 8)):
        assert n_edge == 0  # the grid divides: every tile is a box


def test_vsa_selects_the_same_from_the_means():
    g = torch.Generator().manual_seed(3)
    grid, tile = (5, 9, 20), (4, 4, 4)
    lay = tile_layout(grid, tile)
    q, k = (to_tiles(torch.randn(1, 2, 900, 16, generator=g), lay) for _ in range(2))
    budgets = [Budget(density=0.3)] * 2
    a = VSA().select(q, k, lay, budgets)
    b = VSA().select_from_means(pool_tiles(q, lay), pool_tiles(k, lay), lay, budgets)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_serves_keeps_cpu_and_unsuited_calls_out():
    x = torch.randn(1, 1, 64, 128)
    geo, lay = Geometry((1, 8, 8)), tile_layout((1, 8, 8), (1, 8, 8))
    assert not serves(x, x, x, geo, lay, VSA())  # CPU tensors
    assert not serves(x, x, x, geo, lay, object())  # a method that needs more than the tile means


def test_run_site_plumbing_of_the_direct_path(monkeypatch):
    """run_site's direct branch on CPU, the kernel stood in by the reference: VSA selects from the means, mask reuse
    reads the means, and the output equals the tile-order path's (the GPU kernel: tests/gpu/test_direct_gpu.py)."""
    import dits
    from sparsify import installed_sites, runtime, sparsify, unsparsify
    from sparsify.adapters import adapter_for
    from sparsify.kernels import direct
    from sparsify.kernels.reference import tiled_sparse_attention

    def prepare(q, k, v, layout):
        means = tuple(pool_tiles(to_tiles(x, layout), layout) for x in (q, k))
        return direct.DirectTiles(means, (), None, None, layout.padded_len)

    def attention(q, k, v, layout, dt, idx, cnt, scale=None):
        calls.append(1)
        return tiled_sparse_attention(q, k, v, Geometry(layout.grid), layout, idx, cnt, scale=scale)

    m = dits.tiny_wan()
    kw = adapter_for(m).example_inputs(m, grid=(4, 8, 8))
    kw["hidden_states"] = torch.randn_like(kw["hidden_states"])
    recipe = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 0.25},
                                         "mask_reuse": {"threshold": 2.0, "max_age": 2}}}

    def run():
        runtime.new_generation()
        sparsify(m, recipe)
        with torch.no_grad():
            out = [m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})[0] for t in (900, 800, 700)]
        counts = [(s.selections, s.reused) for s in installed_sites(m)]
        unsparsify(m)
        return out, counts

    tiled, tiled_counts = run()
    calls = []
    monkeypatch.setattr(direct, "serves", lambda *a, **kw: True)
    monkeypatch.setattr(direct, "prepare", prepare)
    monkeypatch.setattr(direct, "attention", attention)
    direct_out, direct_counts = run()
    assert calls and direct_counts == tiled_counts and all(r > 0 for _, r in direct_counts)  # reuse happened
    for a, b in zip(direct_out, tiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
