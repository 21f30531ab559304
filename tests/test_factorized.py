"""Factorized attention: spatial sites (one frame per sequence) run with 2-D tiles, temporal ones dense unless long."""

import warnings

import pytest
import torch

from sparsify import find_sites, installed_sites, sparsify, unsparsify
from sparsify.errors import SparsifyWarning
from sparsify.inspect import site_table
from sparsify.testing import dits

pytestmark = pytest.mark.usefixtures("one_thread")

AXES = {"spatial.0.attn": "spatial", "spatial.1.attn": "spatial", "temporal.0.attn": "temporal",
        "temporal.1.attn": "temporal"}


def recipe(density, tile=(1, 8, 8)):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}}}


def latent(grid, batch=2):
    return torch.randn(batch, 4, *grid, generator=torch.Generator().manual_seed(0))


def run(m, x):
    with torch.no_grad():
        return m(x)


def test_sites_are_self_attention_with_their_axis_and_inspect_shows_it():
    m, x = dits.factorized_dit(), latent((4, 16, 16))
    sites, adapter = find_sites(m, (x,))  # no grid=: inferred from the Linear patch embedding
    assert adapter.name == "inferred" and adapter.geometry(m, (x,), {}).grid == (4, 16, 16)
    assert {s.path: (s.kind, s.axis) for s in sites} == {p: ("self", a) for p, a in AXES.items()}
    assert {s.path: (s.q_len, s.impl) for s in sites if s.axis == "temporal"} == {
        "temporal.0.attn": (4, "manual"), "temporal.1.attn": (4, "manual")}
    table = site_table(sites).splitlines()
    assert table[0].split()[:3] == ["path", "kind", "axis"]
    assert {tuple(r.split()[:3]) for r in table[2:]} == {(p, "self", a) for p, a in AXES.items()}


@pytest.mark.parametrize("given_grid", [False, True])
def test_spatial_sites_run_sparse_and_short_temporal_sites_dense(given_grid):
    m, x = dits.factorized_dit(), latent((4, 16, 16))
    kw = {"example_inputs": (x,), **({"grid": (4, 16, 16)} if given_grid else {})}
    ref = run(m, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsifyWarning)  # factorized sequences are not "tokens outside the grid"
        sparsify(m, recipe(1.0), **kw)
        torch.testing.assert_close(run(m, x), ref, atol=1e-5, rtol=0)
        unsparsify(m)
        sparsify(m, recipe(0.25), **kw)
        out = run(m, x)
    density = {s.path: s.density for s in installed_sites(m)}
    assert all(s.calls == 1 for s in installed_sites(m))
    unsparsify(m)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    assert density["spatial.0.attn"] < 0.5 and density["spatial.1.attn"] < 0.5, density  # 1 of 4 tiles per frame
    assert density["temporal.0.attn"] == density["temporal.1.attn"] == 1.0  # 4 frames: short, dense
    torch.testing.assert_close(run(m, x), ref, atol=0, rtol=0)


def test_long_temporal_sites_run_sparse():
    """With 64-token tiles, 256 frames hold 4 tiles: long enough (`sparsify.factorized.temporal_is_long`)."""
    m, x = dits.factorized_dit(), latent((256, 2, 2), batch=1)
    ref = run(m, x)
    sparsify(m, recipe(0.25), example_inputs=(x,))
    out = run(m, x)
    density = {s.path: s.density for s in installed_sites(m) if s.axis == "temporal"}
    unsparsify(m)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    assert len(density) == 2 and all(d < 0.5 for d in density.values()), density


def test_frame_size_equal_to_frame_count_is_read_as_temporal_with_a_warning():
    m, x = dits.factorized_dit(), latent((4, 2, 2))
    with pytest.warns(UserWarning, match="read as temporal"):
        sites, _ = find_sites(m, (x,))
    assert {s.axis for s in sites} == {"temporal"}


@pytest.mark.slow
def test_factorized_dit_under_full_graph_compile():
    m, x = dits.factorized_dit(), latent((4, 16, 16))
    sparsify(m, recipe(0.25), example_inputs=(x,))
    try:
        eager = run(m, x)
        torch.testing.assert_close(run(torch.compile(m, fullgraph=True), x), eager, atol=1e-5, rtol=0)
    finally:
        unsparsify(m)
