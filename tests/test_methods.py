"""Tile-selection methods: fast paths against slow references, budgets, padding, Veda's fit, sparsify() end to end."""

import doctest
import math

import pytest
import torch

from sparsify.testing import dits
from sparsify import installed_sites, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.geometry import tile_layout, to_tiles
from sparsify.methods import available_methods, budget_counts, get_method, veda, xattention
from sparsify.methods.veda import (DEFAULT_PEAK, FEATURES, PEAKS, Veda, VedaEstimator, default_estimator,
                                   fit_veda_estimator, tile_stats, veda_features)
from sparsify.methods.xattention import XAttention, xattention_scores
from sparsify.testing.planted import attention_tile_mass, planted_heads, tile_recall
from sparsify.recipe import Budget
from oracles import veda_reference_features, veda_reference_stats, xattention_reference_scores

SPARSE = ("vsa", "veda", "xattention")
IRREGULAR = ((3, 5, 7), (2, 4, 8))  # tile lengths 56, 14, 28, 7: partial tiles, partial strided rows


def tiled(grid, tile, B=1, H=2, D=16, seed=0, garbage=None):
    """Random tiled q, k (and the layout); padded slots hold `garbage` if given (they must be ignored)."""
    lay = tile_layout(grid, tile)
    g = torch.Generator().manual_seed(seed)
    q, k = (to_tiles(torch.randn(B, H, math.prod(grid), D, generator=g), lay) for _ in "qk")
    if garbage is not None:
        pad = (lay.gather < 0).view(1, 1, -1, 1)
        q, k = (torch.where(pad, torch.full_like(x, garbage), x) for x in (q, k))
    return q, k, lay


def test_registry_names():
    assert {"dense", "vsa", "veda", "xattention"} <= set(available_methods())
    assert isinstance(get_method("veda"), Veda) and isinstance(get_method("xattention"), XAttention)
    assert get_method("xattention").stride == 8 and get_method("xattention").diagonal and not get_method("xattention").sink


@pytest.mark.parametrize("module", [veda, xattention])
def test_docstring_examples(module):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


# ----------------------------------------------------------------------------------------------
# fast == reference


@pytest.mark.parametrize("grid,tile,stride", [(*IRREGULAR, 8), (*IRREGULAR, 4), ((2, 4, 8), (1, 4, 16), 8), ((2, 4, 8), (1, 4, 16), 1)])
def test_xattention_fast_matches_reference(grid, tile, stride):
    q, k, lay = tiled(grid, tile, B=2, garbage=1e3)
    ref = xattention_reference_scores(q, k, lay, stride)
    torch.testing.assert_close(xattention_scores(q, k, lay, stride).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xattention_scores(q, k, lay, stride, max_elems=50).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref[..., 0]))


def test_xattention_reference_is_xattention_without_padding():
    """Without padding the strided GEMM is XAttention's own estimate: antidiagonal sums / sqrt(D) / S."""
    q, k, lay = tiled((1, 8, 16), (1, 8, 8), H=1, D=8)
    S, vol = 8, lay.volume
    logits = (q[0, 0] @ k[0, 0].T).view(128 // S, S, 128 // S, S)
    anti = torch.stack([logits[:, S - 1 - i, :, i] for i in range(S)]).sum(0) / math.sqrt(8) / S
    p = torch.softmax(anti, -1).view(2, vol // S, 2, vol // S).sum((1, 3))
    torch.testing.assert_close(xattention_scores(q, k, lay)[0, 0], p / p.sum(-1, keepdim=True))


def test_xattention_rejects_a_stride_that_does_not_divide_the_tile():
    q, k, lay = tiled((2, 4, 8), (1, 4, 16))
    with pytest.raises(ValueError, match="stride 48 must divide the tile volume 64"):
        XAttention(stride=48).select(q, k, lay, [Budget(density=0.5)] * 2)


@pytest.mark.parametrize("peak", PEAKS)
def test_veda_fast_matches_reference(peak):
    q, k, lay = tiled(*IRREGULAR, B=2, garbage=-1e3)
    st, ref = tile_stats(q, lay), veda_reference_stats(q, lay)
    for name in ("mean", "max", "min"):
        torch.testing.assert_close(getattr(st, name).double(), getattr(ref, name), rtol=1e-5, atol=1e-6)
    want = veda_reference_features(q, k, lay, peak=peak)
    torch.testing.assert_close(veda_features(q, k, lay, peak=peak).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(veda_features(q, k, lay, peak=peak, max_elems=100).double(), want, rtol=1e-5, atol=1e-5)
    sub = veda_features(q, k, lay, peak=peak, features=("min_max", "mix"))
    torch.testing.assert_close(sub.double(), want[..., [FEATURES.index("min_max"), FEATURES.index("mix")]], rtol=1e-5, atol=1e-5)
    if peak == "stats":  # the bound is an upper bound of the exact peak
        exact = veda_reference_features(q, k, lay, peak="keys")[..., FEATURES.index("peak")]
        assert (want[..., FEATURES.index("peak")] >= exact - 1e-9).all()


# ----------------------------------------------------------------------------------------------
# budgets and padding


def _probs(method, q, k, lay):
    return method.scores(q, k, lay) if isinstance(method, XAttention) else torch.softmax(method.scores(q, k, lay), -1)


@pytest.mark.parametrize("name", SPARSE)
def test_density_budget_counts(name):
    q, k, lay = tiled((4, 8, 8), (1, 8, 8), H=3)
    budgets = [Budget(density=0.25), Budget(density=0.5), Budget(density=1.0)]
    idx, cnt = get_method(name).select(q, k, lay, budgets)
    assert cnt.dtype == torch.int32 and idx.dtype == torch.int32
    for h, b in enumerate(budgets):
        assert (cnt[:, h] == budget_counts(b, lay.n_tiles)).all()
    full = idx[0, 2].sort(-1).values  # density 1: every key tile exactly once
    assert torch.equal(full, torch.arange(lay.n_tiles, dtype=torch.int32).expand_as(full))


@pytest.mark.parametrize("name", ["veda", "xattention"])
def test_top_p_budget_is_the_smallest_prefix_with_a_floor(name):
    q, k, lay = tiled((8, 8, 8), (1, 8, 8), H=2, D=32, seed=3)
    q = q * 3  # peaky attention: prefixes of different lengths
    method = get_method(name)
    budgets = [Budget(top_p=0.6), Budget(top_p=0.6, min_density=0.875)]
    idx, cnt = method.select(q, k, lay, budgets)
    probs = _probs(method, q, k, lay)
    kept = torch.gather(probs, -1, idx.long())
    for b in range(idx.shape[0]):
        for i in range(lay.n_tiles):
            c = int(cnt[b, 0, i])
            assert float(kept[b, 0, i, :c].sum()) >= 0.6 - 1e-5
            assert c == 1 or float(kept[b, 0, i, :c - 1].sum()) < 0.6 or (name == "xattention" and c == 1)
    assert (cnt[:, 0] < 7).all() and (cnt[:, 1] >= 7).all()  # the floor: ceil(0.875 * 8) tiles


def test_xattention_forced_tiles_come_first_and_count_towards_top_p():
    q, k, lay = tiled((4, 8, 8), (1, 8, 8), H=1, seed=1)
    n = lay.n_tiles
    idx, cnt = XAttention(sink=True).select(q, k, lay, [Budget(top_p=1e-3)])
    assert cnt[0, 0, 0] == 1 and (cnt[0, 0, 1:] == 2).all()  # the sink is the diagonal of tile 0
    for i in range(n):  # the forced tiles are the first entries, whatever their mass
        assert set(idx[0, 0, i, :cnt[0, 0, i]].tolist()) == {0, i}
    idx, cnt = XAttention(diagonal=False).select(q, k, lay, [Budget(density=0.25)])
    mass = xattention_scores(q, k, lay)
    assert torch.equal(idx[0, 0, :, 0].long(), mass[0, 0].argmax(-1))


@pytest.mark.parametrize("name", SPARSE)
def test_padded_slots_never_count(name):
    """Garbage in padded slots changes nothing: selections are made from the valid tokens only."""
    q, k, lay = tiled(*IRREGULAR, H=2)
    qg, kg, _ = tiled(*IRREGULAR, H=2, garbage=1e4)
    for budget in (Budget(density=0.5), Budget(top_p=0.7)):
        a, b = (get_method(name).select(x, y, lay, [budget] * 2) for x, y in ((q, k), (qg, kg)))
        assert torch.equal(a[1], b[1])
        assert all(set(a[0][0, h, i, :c].tolist()) == set(b[0][0, h, i, :c].tolist())
                   for h in range(2) for i, c in enumerate(a[1][0, h].tolist()))


@pytest.mark.parametrize("name", SPARSE)
def test_half_precision_inputs_select_like_float32(name):
    q, k, lay = tiled(*IRREGULAR, H=2, D=32)
    a = get_method(name).select(q, k, lay, [Budget(density=0.25)] * 2)
    b = get_method(name).select(q.bfloat16(), k.bfloat16(), lay, [Budget(density=0.25)] * 2)
    assert torch.equal(a[1], b[1]) and (a[0][..., 0] == b[0][..., 0]).float().mean() > 0.7


@pytest.mark.parametrize("name", ["veda", "xattention"])
def test_partial_tiles_get_the_mass_of_their_valid_tokens(name):
    """Uniform attention (q = 0): the estimated mass of a tile is its share of valid tokens, so a
    partial tile is never preferred to a full one."""
    grid, tile = (3, 5, 8), (2, 4, 8)  # tile lengths 64, 8, 32, 4 (multiples of 4)
    q, k, lay = tiled(grid, tile, H=1, garbage=7.0)
    q = torch.where((lay.gather < 0).view(1, 1, -1, 1), q, torch.zeros_like(q))
    method = XAttention(stride=4, diagonal=False) if name == "xattention" else Veda()
    share = lay.tile_lens.double() / lay.tile_lens.sum()
    probs = _probs(method, q, k, lay)[0, 0].double()
    torch.testing.assert_close(probs, share.expand_as(probs), rtol=1e-5, atol=1e-6)
    idx, cnt = method.select(q, k, lay, [Budget(density=0.5)])
    assert (idx[0, 0, :, :2].sort(-1).values == torch.tensor([0, 2], dtype=torch.int32)).all()


# ----------------------------------------------------------------------------------------------
# Veda's estimator


def test_veda_estimator_round_trip_and_subset():
    q, k, lay = tiled((4, 8, 8), (1, 8, 8), H=3)
    est = fit_veda_estimator(q, k, lay, iters=5)
    d = est.to_dict()
    assert d["peak"] == DEFAULT_PEAK == "keys/4" and len(d["heads"]) == 3 and all(isinstance(w, float) for w in d["heads"][1].values())
    again = VedaEstimator.from_dict(d)
    torch.testing.assert_close(again.scores(q, k, lay), est.scores(q, k, lay))
    torch.testing.assert_close(est.subset([2]).scores(q[:, 2:], k[:, 2:], lay), est.scores(q, k, lay)[:, 2:])
    with pytest.raises(ValueError, match="weights for 3 heads, q has 1"):
        Veda(est).select(q[:, :1], k[:, :1], lay, [Budget(density=0.5)])
    with pytest.raises(ValueError, match="unknown feature"):
        VedaEstimator(("mean", "nope"), torch.zeros(1, 2))
    # the default estimator is Veda() without one
    torch.testing.assert_close(Veda(default_estimator(3)).scores(q, k, lay), Veda().scores(q, k, lay))


def test_veda_fit_beats_mean_pooling_on_held_out_planted_heads():
    """Fitted on one draw of planted heads, evaluated on another (other content noise)."""
    kinds = ("mixed", "local3d", "spatial")
    cal, ev = planted_heads(kinds=kinds, seed=0), planted_heads(kinds=kinds, seed=1)
    lay = tile_layout(ev.grid, (1, 8, 8))
    qc, kc, q, k = (to_tiles(x, lay) for x in (cal.q, cal.k, ev.q, ev.k))
    est = fit_veda_estimator(qc, kc, lay)
    mass = attention_tile_mass(ev.q, ev.k, lay)
    budgets = [Budget(density=1 / 16)] * len(kinds)

    def recall(method):
        return tile_recall(mass, *method.select(q, k, lay, budgets))[0]

    vsa, stats, fitted = recall(get_method("vsa")), recall(Veda()), recall(Veda(est))
    assert fitted[0] > vsa[0] + 0.2 and stats[0] > vsa[0] + 0.2  # the sink of the mixed head
    assert (fitted >= vsa - 0.01).all() and (stats >= vsa - 0.01).all()
    assert fitted.mean() > vsa.mean() + 0.05


# ----------------------------------------------------------------------------------------------
# end to end


def _wan():
    m = dits.tiny_wan()
    return m, adapter_for(m).example_inputs(m, grid=(5, 4, 8))


@pytest.mark.parametrize("method,tile", [("veda", (1, 4, 16)), ("xattention", (4, 4, 4))])  # partial along w / t
def test_sparsify_end_to_end_on_tiny_wan(method, tile):
    m, kw = _wan()
    with torch.no_grad():
        ref = m(**kw)[0]
    sparsify(m, {"version": 1, "defaults": {"method": method, "tile": list(tile), "budget": {"density": 1.0}}})
    try:
        with torch.no_grad():
            torch.testing.assert_close(m(**kw)[0], ref, atol=1e-5, rtol=0)
    finally:
        unsparsify(m)
    recipe = {"version": 1, "defaults": {"method": method, "tile": list(tile), "budget": {"top_p": 0.5, "min_density": 0.25}},
              "rules": [{"match": "blocks.1.*", "density": 0.25}]}
    sparsify(m, recipe)
    try:
        with torch.no_grad():
            out = m(**kw)[0]
        sites = installed_sites(m)
    finally:
        unsparsify(m)
    lay = tile_layout((5, 4, 8), tile)
    every_tile = (lay.padded_len / 160) ** 2  # work of keeping all tiles, padding counted
    assert len(sites) == 2 and all(s.calls == 1 and s.density < every_tile for s in sites)
    kept = budget_counts(Budget(density=0.25), lay.n_tiles) / lay.n_tiles
    assert sites[1].density == pytest.approx(every_tile * kept)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
