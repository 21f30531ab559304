"""The calibrator: exact candidate errors, the ILP against uniform, resumability, and recipes that load."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsify.testing import dits
from sparsify import installed_sites, load_recipe, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.calibrate import run_calibration
from sparsify.calibrate.measure import measure_site
from sparsify.runtime.tiled import tiled_sparse_attention
from sparsify.geometry import Geometry, tile_layout, to_tiles
from sparsify.methods import get_method
from sparsify.recipe import Budget

GRID = (4, 8, 8)


def test_candidates_are_measured_on_the_same_query_tokens():
    """With sampled query rows, every tile shape is measured on the same tokens: two shapes with the same
    layout ((16, 2, 2) on 8 frames merges into the 8x2x4 columns of (8, 2, 4)) get the same errors."""
    geo = Geometry((8, 8, 8))
    assert torch.equal(tile_layout(geo.grid, (16, 2, 2)).gather, tile_layout(geo.grid, (8, 2, 4)).gather)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, geo.video_len, 16, generator=g) for _ in range(3))
    m = measure_site(q, k, v, geo, [(8, 2, 4), (4, 4, 4), (16, 2, 2)], [0.125, 0.25], query_fraction=0.2)
    assert (m.sq_err[:, 0] > 0).all()
    torch.testing.assert_close(m.sq_err[:, 2], m.sq_err[:, 0], rtol=1e-9, atol=0)
    torch.testing.assert_close(m.energy[:, 2], m.energy[:, 0], rtol=1e-9, atol=0)
    assert not torch.allclose(m.sq_err[:, 1], m.sq_err[:, 0])


@pytest.mark.parametrize("video_start,n_text", [(0, 0), (5, 7)])
def test_measured_error_is_the_real_sparse_error(video_start, n_text):
    """measure_site's prefix-sum errors equal || tiled_sparse_attention(VSA top-k) - dense ||² exactly."""
    geo = Geometry((5, 6, 10), video_start)
    S = geo.video_len + n_text
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 16, generator=g) for _ in range(3))
    tiles, levels = [(4, 4, 4), (1, 8, 8)], [0.1, 0.3, 1.0]
    m = measure_site(q, k, v, geo, tiles, levels, query_fraction=1.0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).double()
    vid = slice(video_start, video_start + geo.video_len)
    for ti, tile in enumerate(tiles):
        lay = tile_layout(geo.grid, tile)
        for li, d in enumerate(levels):
            idx, cnt = get_method("vsa").select(to_tiles(q[:, :, vid], lay), to_tiles(k[:, :, vid], lay), lay,
                                                [Budget(density=d)] * 2)
            out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt).double()
            err = ((out - dense)[:, :, vid] ** 2).sum((0, 2, 3))
            torch.testing.assert_close(m.sq_err[:, ti, li], err, rtol=1e-3, atol=1e-6)
        energy = (dense[:, :, vid] ** 2).sum((0, 2, 3))
        torch.testing.assert_close(m.energy[:, ti], energy, rtol=1e-4, atol=1e-6)
    assert (m.sq_err[:, :, 0] > m.sq_err[:, :, 1]).all()  # more tiles, less error


def _wan_loop(model, n=2):
    ad = adapter_for(model)

    def loop(m):
        for seed in range(n):
            torch.manual_seed(seed)
            kw = ad.example_inputs(m, grid=GRID)
            kw["hidden_states"] = torch.randn_like(kw["hidden_states"])
            m(**kw)

    return loop, ad.example_inputs(model, grid=GRID)


@pytest.fixture(scope="module")
def wan_result():
    torch._dynamo.reset()
    model = dits.tiny_wan(layers=3, heads=4, head_dim=16)
    loop, example = _wan_loop(model)
    res = run_calibration(model, loop, budget=0.3, tiles=[(1, 8, 8), (4, 4, 4), (2, 4, 8)], levels=[0.125, 0.25, 0.5],
                          example_inputs=example, progress=False, query_fraction=1.0)
    return model, loop, example, res


def test_ilp_beats_uniform_and_meets_budget(wan_result):
    from sparsify.calibrate.report import uniform_baseline

    _, _, _, res = wan_result
    a = res.allocation
    assert a.density <= 0.3 + 1e-9
    u = uniform_baseline(res, 0.3)
    assert a.total_error <= u.total_error + 1e-12
    assert res.error.shape == (12, 1 + 3 * 3) and (res.error[:, 0] == 0).all()


def test_calibrated_recipe_loads_and_reproduces_density(wan_result, tmp_path):
    model, loop, example, res = wan_result
    path = res.recipe.save(tmp_path / "wan.yaml")
    recipe = load_recipe(path)
    assert recipe == res.recipe
    assert recipe.calibration["achieved_density"] == pytest.approx(res.allocation.density, rel=1e-5)
    sparsify(model, path, example_inputs=example)
    with torch.no_grad():
        loop(model)
    sites = installed_sites(model)
    work = sum(s.work for s in sites)
    dense_work = sum(s.dense_work for s in sites)
    unsparsify(model)
    assert work / dense_work == pytest.approx(res.allocation.density, rel=0.10)


def test_checkpoints_resume_without_remeasuring(tmp_path):
    model = dits.tiny_wan(layers=2, heads=2, head_dim=16)
    loop, example = _wan_loop(model, n=2)
    calls = {"n": 0}

    def interrupted(m):
        orig = m.forward

        def fwd(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return orig(*a, **k)

        m.forward = fwd
        try:
            loop(m)
        finally:
            del m.forward

    kw = dict(budget=0.5, tiles=[(1, 8, 8)], levels=[0.25, 0.5], example_inputs=example, progress=False,
              checkpoint_dir=tmp_path / "ck", inputs_hash="h")
    with pytest.raises(KeyboardInterrupt, match="rerun the same command to resume"):
        run_calibration(model, interrupted, **kw)
    saved = sorted(p.name for p in (tmp_path / "ck").glob("*.pt"))
    assert len(saved) == 2  # both sites of the first forward were kept
    res = run_calibration(model, loop, **kw)
    assert res.extras["loaded_checkpoints"] == 2
    fresh = run_calibration(model, loop, **{**kw, "checkpoint_dir": None})
    np.testing.assert_allclose(res.error, fresh.error, rtol=1e-6)
    other = run_calibration(model, loop, **{**kw, "levels": [0.5]})  # another configuration: set aside, not mixed
    assert other.extras["loaded_checkpoints"] == 0 and (tmp_path / "ck.old1" / "meta.json").exists()


def test_calibrate_errors():
    model = dits.tiny_wan(layers=1, heads=2, head_dim=16)
    loop, example = _wan_loop(model, n=1)
    with pytest.raises(ValueError, match=r"CalibrationConfig.budget=0.0 is invalid"):
        run_calibration(model, loop, budget=0.0, example_inputs=example, progress=False)
    with pytest.raises(ValueError, match=r"lowest density these candidates reach is 0\.5.*budget >= 0\.5"):
        run_calibration(model, loop, budget=0.05, tiles=[(1, 8, 8)], levels=[0.5], example_inputs=example,
                        progress=False)
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no self- or joint-attention"):
        run_calibration(lin, lambda m: None, example_inputs=(torch.randn(1, 4),), grid=(1, 1, 4), progress=False)


def test_readme_recipe_example_is_valid():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    recipe = load_recipe(yaml.safe_load(block))
    assert recipe.model.cls == "WanTransformer3DModel"
    c = recipe.head_configs("blocks.1.attn1", 12, site_index=1)
    assert c[7].tile == (16, 2, 2) and c[7].budget == Budget(density=0.03) and not c[9].enable


def test_predicted_model_output_error_tracks_measured(wan_result):
    """The per-site output scaling makes the ILP's objective predict the recipe's real model-output error."""
    _, _, _, res = wan_result
    predicted = res.allocation.total_error
    measured = res.recipe.calibration["measured_output_error"]
    assert measured > 0 and 0.5 < predicted / measured < 2.0
    assert len(res.extras["alphas"]) == 3 and (res.extras["alphas"] > 0).all()


def test_several_methods_compete_per_head():
    """With vsa and veda as candidates, each head's option carries its method, the measured error of each
    candidate is exact for that method's selection, and the recipe runs."""
    model = dits.tiny_wan(layers=2, heads=2, head_dim=16)
    loop, example = _wan_loop(model, n=1)
    res = run_calibration(model, loop, budget=0.3, tiles=[(1, 8, 8), (4, 4, 4)], levels=[0.25, 0.5],
                          methods=["vsa", "veda"], example_inputs=example, progress=False, query_fraction=1.0,
                          output_error=False)
    assert res.error.shape == (4, 1 + 2 * 2 * 2)
    assert {o[2] for o in res.options[1:]} == {"vsa", "veda"}
    methods = {h.method for e in res.recipe.sites.values() for h in e.heads if h.enable is not False}
    assert methods <= {"vsa", "veda"} and methods
    sparsify(model, res.recipe, example_inputs=example)
    with torch.no_grad():
        loop(model)
    unsparsify(model)


def test_measure_site_other_method_is_exact():
    geo = Geometry((4, 8, 8))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, geo.video_len, 16, generator=g) for _ in range(3))
    m = measure_site(q, k, v, geo, [(1, 8, 8)], [0.25], methods=["vsa", "veda"], query_fraction=1.0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).double()
    lay = tile_layout(geo.grid, (1, 8, 8))
    for c, name in enumerate(["vsa", "veda"]):
        idx, cnt = get_method(name).select(to_tiles(q, lay), to_tiles(k, lay), lay, [Budget(density=0.25)] * 2)
        out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt).double()
        torch.testing.assert_close(m.sq_err[:, c, 0], ((out - dense) ** 2).sum((0, 2, 3)), rtol=1e-3, atol=1e-6)
