"""Calibrating factorized attention: each site is measured as the runtime runs it (axis geometry and tile)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsify import installed_sites, sparsify, unsparsify
from sparsify.calibrate import CalibrationConfig
from sparsify.calibrate.capture import Capture
from sparsify.calibrate.core import run_calibration
from sparsify.runtime import op
from sparsify.runtime.state import site_state
from sparsify.testing import dits

pytestmark = pytest.mark.usefixtures("one_thread")

TILE = (4, 4, 4)  # spatial sites run it as (1, 4, 16) on each 16x16 frame: 4 tiles a frame


def latent(grid=(4, 16, 16)):
    return torch.randn(1, 4, *grid, generator=torch.Generator().manual_seed(0))


def recipe(density):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(TILE), "budget": {"density": density}}}


def test_predicted_density_is_what_the_runtime_achieves_and_short_temporal_sites_are_dense():
    m, x = dits.factorized_dit(), latent()
    cfg = CalibrationConfig(budget=0.6, tiles=[TILE], levels=[0.25, 0.5], progress=False, output_error=False)
    res = run_calibration(m, lambda mod: mod(x), cfg, example_inputs=(x,))
    paths = [s.path for s in res.sites]
    predicted = {p: float(np.mean([res.cost[g, res.choice[g]] for g in np.flatnonzero(res.layer == i)]))
                 for i, p in enumerate(paths)}
    for i, s in enumerate(res.sites):
        if s.axis == "temporal":  # 4 frames hold less than 4 tiles of 64: the runtime runs them dense
            assert (res.choice[res.layer == i] == 0).all()
            assert all(c.is_dense for c in res.recipe.head_configs(s.path, s.heads, kind=s.kind))
    assert min(predicted[p] for p in paths if p.startswith("spatial")) < 1.0, predicted
    sparsify(m, res.recipe, example_inputs=(x,))
    with torch.no_grad():
        m(x)
    achieved = {s.path: s.density for s in installed_sites(m)}
    work = {s.path: s.dense_work for s in installed_sites(m)}
    unsparsify(m)
    for p in paths:
        if p.startswith("temporal"):  # all-dense sites are not installed: one call of 16·16 pixels, 2 heads, dense
            assert p not in achieved
            achieved[p], work[p] = 1.0, 16 * 16 * 2
        assert achieved[p] == pytest.approx(predicted[p], abs=1e-6), (p, achieved, predicted)
    seq = {p: (16 * 16 if p.startswith("spatial") else 4) for p in paths}  # tokens per sequence
    total = sum(work[p] * seq[p] ** 2 * achieved[p] for p in paths) / sum(work[p] * seq[p] ** 2 for p in paths)
    assert total == pytest.approx(float(res.allocation.density), abs=1e-6)
    assert total <= cfg.budget + 1e-9


def test_measured_head_error_of_a_spatial_site_is_the_runtimes_error():
    """Each spatial head's error the capture measures at (TILE, 0.25) is the error of the runtime's output."""
    m, x = dits.factorized_dit(), latent()
    path, levels, li = "spatial.0.attn", [0.25, 0.5], 0
    sparsify(m, recipe(1.0), example_inputs=(x,))
    with Capture([TILE], levels, query_fraction=1.0) as cap, torch.no_grad():
        m(x)
    unsparsify(m)
    rel = cap.results[path].relative_error()[:, 0, li]
    seen = []
    inner = op.run_site

    def record(q, k, v, site, *a, **kw):
        out = inner(q, k, v, site, *a, **kw)
        if site_state(site).path == path and not seen:
            seen.append((q, k, v, out))
        return out

    sparsify(m, recipe(levels[li]), example_inputs=(x,))
    try:
        op.run_site = record
        with torch.no_grad():
            m(x)
    finally:
        op.run_site = inner
        unsparsify(m)
    q, k, v, out = seen[0]
    assert q.shape[0] == 4 and q.shape[2] == 256  # one sequence per frame
    dense = F.scaled_dot_product_attention(q, k, v)
    err = ((out - dense) ** 2).sum((0, 2, 3)) / (dense ** 2).sum((0, 2, 3))
    assert (rel > 1e-6).all()
    torch.testing.assert_close(err.double(), rel, rtol=1e-3, atol=1e-9)
