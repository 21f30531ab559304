"""Planted heads and PlantedDiT: every head has its kind's geometry and best tile; sparsify runs on the model."""

import doctest
import math

import pytest
import torch

import sparsify.testing.planted as planted
from sparsify import find_sites, sparsify, unsparsify
from sparsify.geometry import tile_layout, to_tiles
from sparsify.methods import get_method
from sparsify.testing.planted import (BEST_TILE, CANDIDATE_TILES, GOOD_TILES, KINDS, PLANTED_GRID, PLANTED_LAYERS,
                              REFERENCE_DENSITY, TIE_TOLERANCE, attention_tile_mass, build_planted_dit,
                              equal_cost_count, good_tiles, oracle_selection, planted_heads, planted_inputs,
                              planted_logit_features, planted_recipe, tile_recall, tile_recall_table)
from sparsify.recipe import Budget
from tools.testbed_heads import region_masks

# ----------------------------------------------------------------------------------------------
# helpers


def probs(q, k, h):
    """Full attention probabilities `[S, S]` of head h of batch item 0."""
    return torch.softmax(q[0, h].float() @ k[0, h].float().T / math.sqrt(q.shape[-1]), -1)


def geometry_stats(q, k, grid):
    """Per head: attention mass in regions that tell the kinds apart, and normalized entropy."""
    T, H, W = grid
    S = T * H * W
    reg = region_masks(grid, (1, 2, 2))
    line = region_masks(grid, (T, 0, 1))["local"]  # same row, |dw| <= 1, any frame
    i = torch.arange(S)
    band = ((i[:, None] - i[None, :]).abs() <= 48).float()
    sink = torch.zeros(S)
    sink[:planted.N_SINK] = 1
    frame_or_sink = torch.maximum(reg["frame"], sink)
    out = []
    for h in range(q.shape[1]):
        p = probs(q, k, h)
        m = {name: float((p * mask).sum(-1).mean()) for name, mask in
             [("frame", reg["frame"]), ("temporal", reg["temporal"]), ("local", reg["local"]), ("line", line),
              ("band", band), ("frame_or_sink", frame_or_sink)]}
        m["sink"] = float(p[:, :planted.N_SINK].sum(-1).mean())
        m["entropy"] = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(S))
        out.append(m)
    return out


# what each kind's attention looks like (and no other kind's does)
SIGNATURES = {
    "spatial": lambda m: m["frame"] > 0.99 and m["local"] > 0.7,
    "temporal": lambda m: m["frame"] < 0.25 and m["temporal"] > 0.4 and m["line"] > 0.9,
    "local3d": lambda m: 0.3 < m["frame"] < 0.6 and m["local"] > 0.6,
    "global": lambda m: m["entropy"] > 0.9,
    "sink": lambda m: 0.6 < m["sink"] < 0.8,
    "band": lambda m: m["band"] > 0.95 and m["line"] < 0.2,
    "mixed": lambda m: 0.3 < m["sink"] < 0.5 and m["frame_or_sink"] > 0.99,
}


def check_signatures(stats, kinds):
    for h, (m, kind) in enumerate(zip(stats, kinds)):
        matched = [name for name, sig in SIGNATURES.items() if sig(m)]
        assert matched == [kind], f"head {h} planted as {kind} looks like {matched}: {m}"


def check_best_tiles(recalls, kinds):
    for h, kind in enumerate(kinds):
        good = set(good_tiles(recalls, h))
        row = {t: round(float(r[h]), 3) for t, r in recalls.items()}
        assert good == set(GOOD_TILES[kind]), f"head {h} ({kind}): tiles within {TIE_TOLERANCE} of the best {good}; {row}"
        assert BEST_TILE[kind] in good
        if len(good) == 1:  # a unique best beats every other candidate by more than the tolerance
            others = [float(r[h]) for t, r in recalls.items() if t != BEST_TILE[kind]]
            assert float(recalls[BEST_TILE[kind]][h]) > max(others) + TIE_TOLERANCE


@pytest.fixture(scope="module")
def heads():
    return planted_heads()


@pytest.fixture(scope="module")
def model():
    return build_planted_dit()


@pytest.fixture(scope="module")
def model_qkv(model):
    return model.attention_qkv(*planted_inputs())


# ----------------------------------------------------------------------------------------------
# synthetic heads


def test_planted_heads_shapes_and_determinism(heads):
    S = math.prod(PLANTED_GRID)
    assert heads.q.shape == heads.k.shape == heads.v.shape == (1, len(KINDS), S, 64)
    assert heads.q.dtype == torch.float32 and heads.kinds == list(KINDS) and heads.grid == PLANTED_GRID
    assert heads.best_tile == [BEST_TILE[k] for k in KINDS]
    again = planted_heads()
    assert torch.equal(again.q, heads.q) and torch.equal(again.v, heads.v)
    other = planted_heads(seed=1)
    assert not torch.equal(other.q, heads.q)
    with pytest.raises(ValueError, match="unknown planted kind"):
        planted_heads(kinds=("diagonal",))
    with pytest.raises(ValueError, match="head_dim 32 is too small"):
        planted_heads(kinds=("spatial",), head_dim=32)


def test_positional_logits_are_exact():
    grid = (3, 4, 5)
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    xyz = torch.stack([t, h, w], -1).reshape(-1, 3).double()
    d2 = (xyz[:, None, :] - xyz[None, :, :]) ** 2  # [S, S, 3]
    for kind in ("spatial", "temporal", "local3d"):
        fq, fk, mask = planted_logit_features(kind, grid, 64, random_content=False)
        want = 0
        for axis, s in enumerate(planted.KIND_SPECS[kind]["sigma"]):
            ax = torch.where(d2[..., axis] == 0, 0.0, -planted.LOGIT_FLOOR) if s == 0 else \
                -(d2[..., axis] / (2 * s * s)).clamp(max=planted.LOGIT_FLOOR)
            want = want + ax
        torch.testing.assert_close(fq @ fk.T, want, rtol=0, atol=1e-9)
        assert not fq[:, mask].any() and int(mask.sum()) == 64 - (T + H + W)
    # band: Gaussian in 1-D token order near the diagonal, far below elsewhere
    S = 2048
    fq, fk, _ = planted_logit_features("band", PLANTED_GRID, 64, random_content=False)
    row = fq[1000] @ fk.T
    d = torch.arange(S) - 1000
    sigma = planted.KIND_SPECS["band"]["band_sigma"]
    near = d.abs() <= 16
    torch.testing.assert_close(row[near], -(d[near].double() ** 2) / (2 * sigma ** 2), rtol=0.05, atol=0.05)
    assert float(row[d.abs() > 100].max()) < -15
    # sinks: one logit for every query, the content dims left empty
    fq, fk, mask = planted_logit_features("mixed", PLANTED_GRID, 64, random_content=False)
    sink_logits = fq @ fk[: planted.N_SINK].T
    assert float(sink_logits.std()) < 1e-9 and float(sink_logits.mean()) > 0


def test_heads_have_their_kinds_geometry(heads):
    check_signatures(geometry_stats(heads.q, heads.k, heads.grid), heads.kinds)


def test_best_tile_maximizes_oracle_recall(heads):
    # Ties: every candidate within TIE_TOLERANCE of the best recall is a good tile; GOOD_TILES lists
    # them per kind, BEST_TILE is one of them (the unique best for spatial, temporal, local3d, mixed).
    recalls = tile_recall_table(heads.q, heads.k, heads.grid, density=REFERENCE_DENSITY)
    check_best_tiles(recalls, heads.kinds)
    # at 10% density (one more tile pair per query tile) the recorded tile is still best or tied best,
    # and uniquely so where the geometry is not the whole frame (spatial/mixed tie (1, 4, 16) there)
    recalls = tile_recall_table(heads.q, heads.k, heads.grid, density=0.1)
    for h, kind in enumerate(heads.kinds):
        good = good_tiles(recalls, h)
        assert BEST_TILE[kind] in good, (kind, good)
        if kind in ("temporal", "local3d", "band"):  # on 8 frames (16, 2, 2) is the same 8x2x4 column tiling
            assert good == ([(8, 2, 4), (16, 2, 2)] if kind == "temporal" else [BEST_TILE[kind]]), (kind, good)


# ----------------------------------------------------------------------------------------------
# the harness: tile mass and recall


def brute_tile_mass(q, k, layout, video_start):
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    vl = math.prod(layout.grid)
    p = p[:, :, video_start: video_start + vl, video_start: video_start + vl]
    tile = layout.scatter // layout.volume
    n = layout.n_tiles
    mass = torch.zeros(*q.shape[:2], n, n, dtype=torch.float64)
    for i in range(vl):
        for j in range(vl):
            mass[:, :, tile[i], tile[j]] += p[:, :, i, j]
    return mass


def test_attention_tile_mass_matches_brute_force():
    torch.manual_seed(0)
    grid, vs = (3, 4, 4), 5  # 48 video tokens after 5 text tokens, 3 more text tokens after them
    q, k = torch.randn(2, 2, 56, 16), torch.randn(2, 2, 56, 16)
    lay = tile_layout(grid, (2, 2, 4))  # partial tiles along t
    want = brute_tile_mass(q, k, lay, vs)
    torch.testing.assert_close(attention_tile_mass(q, k, lay, video_start=vs), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_tile_mass(q, k, lay, video_start=vs, max_elems=100), want, rtol=1e-5, atol=1e-6)
    # without text, each query tile's row sums to its token count
    mass = attention_tile_mass(q[:, :, :48], k[:, :, :48], lay)
    torch.testing.assert_close(mass.sum(-1), lay.tile_lens.double().expand(2, 2, -1))
    with pytest.raises(ValueError, match="video tokens"):
        attention_tile_mass(q[:, :, :40], k[:, :, :40], lay)


def test_tile_recall_oracle_beats_vsa(heads):
    lay = tile_layout(heads.grid, (4, 4, 4))
    mass = attention_tile_mass(heads.q, heads.k, lay)
    n = lay.n_tiles
    full = tile_recall(mass, torch.arange(n, dtype=torch.int32).expand(1, 7, n, n), torch.full((1, 7, n), n))
    torch.testing.assert_close(full, torch.ones(1, 7, dtype=torch.float64))
    count = equal_cost_count(lay, REFERENCE_DENSITY)
    oracle = tile_recall(mass, *oracle_selection(mass, count))
    vsa = tile_recall(mass, *get_method("vsa").select(to_tiles(heads.q, lay), to_tiles(heads.k, lay), lay,
                                                      [Budget(density=REFERENCE_DENSITY)] * 7))
    assert (oracle >= vsa - 1e-9).all()
    assert (oracle > 0).all() and (oracle <= 1 + 1e-9).all()
    # VSA's mean-pooled scores find the planted local geometry almost as well as the oracle
    local = [heads.kinds.index(k) for k in ("spatial", "temporal", "local3d")]
    assert (vsa[0, local] > oracle[0, local] - 0.05).all()


def test_equal_cost_count():
    counts = {t: equal_cost_count(tile_layout(PLANTED_GRID, t), REFERENCE_DENSITY) for t in CANDIDATE_TILES}
    assert counts == {(4, 4, 4): 2, (1, 8, 8): 2, (2, 4, 8): 2, (8, 2, 4): 2, (16, 2, 2): 2, (1, 4, 16): 2,
                      (2, 8, 8): 1, (8, 4, 4): 1}
    assert equal_cost_count(tile_layout(PLANTED_GRID, (4, 4, 4)), 0.1) == 4
    assert equal_cost_count(tile_layout(PLANTED_GRID, (4, 4, 4)), 1.0) == 32


# ----------------------------------------------------------------------------------------------
# PlantedDiT


def test_model_is_deterministic_and_checks_its_grid(model):
    x, = planted_inputs()
    assert x.shape == (1, 4, *PLANTED_GRID) and torch.equal(x, planted_inputs()[0])
    other = build_planted_dit()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    assert [[pk.kind for pk in layer] for layer in model.planted_kinds] == [list(k) for k in PLANTED_LAYERS]
    assert model.planted_kinds[2][1].best_tile == BEST_TILE["mixed"]
    with pytest.raises(ValueError, match="not the planted grid"):
        model(torch.randn(1, 4, 4, 16, 16))
    with pytest.raises(ValueError, match="every layer needs 4 kinds"):
        planted.PlantedDiT(heads_per_layer=4, kinds_per_layer=[("spatial",) * 3])


def test_model_heads_have_planted_geometry_and_best_tiles(model, model_qkv):
    for layer, (q, k, _) in enumerate(model_qkv):
        kinds = [pk.kind for pk in model.planted_kinds[layer]]
        check_signatures(geometry_stats(q, k, model.grid), kinds)
        check_best_tiles(tile_recall_table(q, k, model.grid), kinds)


def test_sparsify_finds_one_self_site_per_layer_and_changes_output(model):
    x = planted_inputs()
    sites, _ = find_sites(model, example_inputs=x, grid=PLANTED_GRID)
    assert [(s.path, s.kind, s.heads, s.head_dim) for s in sites] == [
        (f"blocks.{i}.attn", "self", 4, 64) for i in range(len(PLANTED_LAYERS))]
    with torch.no_grad():
        dense = model(*x)
    recipe = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.25}}}
    sparsify(model, recipe, example_inputs=x, grid=PLANTED_GRID)
    try:
        with torch.no_grad():
            sparse = model(*x)
    finally:
        unsparsify(model)
    err = float((sparse - dense).norm() / dense.norm())
    assert torch.isfinite(sparse).all() and 1e-3 < err < 0.5
    with torch.no_grad():
        assert torch.equal(model(*x), dense)


def test_planted_tiles_beat_uniform_and_mismatched_tiles(model):
    # layer 0 (spatial, temporal, local3d, band) made sparse with VSA at 1/16: giving every head its
    # planted tile is closer to dense than one tile for all, which is closer than mismatched tiles
    wrong = {"spatial": (8, 2, 4), "temporal": (1, 8, 8), "local3d": (1, 4, 16), "band": (8, 4, 4)}
    x = planted_inputs()
    with torch.no_grad():
        dense = model(*x)
    errs = {}
    for name, tile_for in (("planted", None), ("uniform", lambda pk: (4, 4, 4)), ("wrong", lambda pk: wrong[pk.kind])):
        recipe = planted_recipe(model, REFERENCE_DENSITY, tile_for=tile_for, layers=[0])
        sparsify(model, recipe, example_inputs=x, grid=PLANTED_GRID)
        try:
            with torch.no_grad():
                errs[name] = float((model(*x) - dense).norm() / dense.norm())
        finally:
            unsparsify(model)
    assert 0 < errs["planted"] < 0.6 * errs["uniform"] and errs["uniform"] < errs["wrong"], errs


def test_docstring_examples():
    assert doctest.testmod(planted, optionflags=doctest.ELLIPSIS).failed == 0
