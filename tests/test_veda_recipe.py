"""Veda's distilled estimator: fitted by the calibrator, carried per head by the recipe, used by the runtime."""

import pytest
import torch

from sparsify.testing import dits
from sparsify import installed_sites, sparsify, unsparsify
from sparsify.calibrate import run_calibration
from sparsify.calibrate.measure import measure_site
from sparsify.runtime.tiled import tiled_sparse_attention
from sparsify.geometry import Geometry, tile_layout, to_tiles
from sparsify.methods.veda import FEATURES, Veda, VedaEstimator, default_estimator
from sparsify.recipe import Budget, RecipeError, load_recipe

from test_calibrate import _wan_loop


def test_measure_site_uses_the_given_per_head_ranker():
    geo = Geometry((4, 8, 8))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, geo.video_len, 16, generator=g) for _ in range(3))
    w = torch.randn(2, len(FEATURES), generator=g)
    est = VedaEstimator(FEATURES, w)
    rankers = {("veda", (1, 8, 8)): lambda h: Veda(est.subset([h]))}
    m = measure_site(q, k, v, geo, [(1, 8, 8)], [0.25], methods=["veda"], query_fraction=1.0, rankers=rankers)
    lay = tile_layout(geo.grid, (1, 8, 8))
    idx, cnt = Veda(est).select(to_tiles(q, lay), to_tiles(k, lay), lay, [Budget(density=0.25)] * 2)
    out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt).double()
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).double()
    torch.testing.assert_close(m.sq_err[:, 0, 0], ((out - dense) ** 2).sum((0, 2, 3)), rtol=1e-3, atol=1e-6)


def test_calibrated_veda_heads_carry_their_estimator(tmp_path):
    model = dits.tiny_wan(layers=2, heads=2, head_dim=16)
    loop, example = _wan_loop(model, n=1)
    res = run_calibration(model, loop, budget=0.4, tiles=[(1, 8, 8)], levels=[0.25, 0.5], methods=["veda"],
                          example_inputs=example, progress=False, query_fraction=1.0, output_error=False)
    fitted = res.extras["veda"]
    assert set(fitted) == {(p, (1, 8, 8)) for p in res.recipe.sites}
    path = res.recipe.save(tmp_path / "veda.yaml")
    recipe = load_recipe(path)  # params survive YAML and validation
    sparsify(model, recipe, example_inputs=example)
    try:
        with torch.no_grad():
            loop(model)
        for st in installed_sites(model):
            entry = {h.head: h for h in recipe.sites[st.path].heads}
            heads = [h for h in range(st.heads) if entry[h].enable is not False]
            if not heads:
                continue
            impl = st.method(("veda", (1, 8, 8)), heads)
            want = fitted[(st.path, (1, 8, 8))].weights[heads]
            torch.testing.assert_close(impl.estimator.weights, want, atol=1e-5, rtol=0)  # rounded to 6 digits
            assert not torch.allclose(want, default_estimator(len(heads)).weights, atol=1e-3)  # really fitted
    finally:
        unsparsify(model)


@pytest.mark.parametrize("params,words", [
    ({"weights": {"nope": 1.0}}, "unknown feature"),
    ({"weights": {"mix": "x"}}, "finite number"),
    ({"peak": "middle", "weights": {"mix": 1.0}}, "peak must be one of"),
    ({"weights": {"mix": 1.0}, "extra": 1}, "unknown Veda parameter"),
    ({"version": 2, "weights": {"mix": 1.0}}, "params version 2 of method 'veda' is not supported"),
])
def test_bad_veda_params_name_the_key(params, words):
    data = {"version": 1, "sites": {"blocks.0.attn1": {"heads": [{"head": 0, "method": "veda", "params": params}]}}}
    with pytest.raises(RecipeError) as e:
        load_recipe(data)
    assert "sites.blocks.0.attn1.heads[0].params" in str(e.value) and words in str(e.value)


def test_veda_params_of_this_version_load():
    params = {"version": 1, "weights": {"mix": 1.0}}
    data = {"version": 1, "sites": {"blocks.0.attn1": {"heads": [{"head": 0, "method": "veda", "params": params}]}}}
    assert load_recipe(data).sites["blocks.0.attn1"].heads[0].params == params


def test_params_need_a_method_that_takes_them():
    base = {"version": 1, "sites": {"blocks.0.attn1": {"heads": [{"head": 0, "params": {"weights": {"mix": 1.0}}}]}}}
    with pytest.raises(RecipeError, match="needs 'method'"):
        load_recipe(base)
    base["sites"]["blocks.0.attn1"]["heads"][0]["method"] = "vsa"
    with pytest.raises(RecipeError, match="takes no parameters"):
        load_recipe(base)
