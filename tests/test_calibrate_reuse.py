"""Calibration of temporal mask reuse: recording, the threshold rule, and the recipe it writes."""

import pytest
import torch

from sparsify.testing import dits
from sparsify import installed_sites, runtime, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.calibrate import calibrate_mask_reuse, with_mask_reuse
from sparsify.calibrate.reuse import choose_threshold, simulate
from sparsify.recipe import load_recipe

GRID = (4, 8, 8)
STEPS = 6


def _setup():
    torch.manual_seed(0)
    m = dits.tiny_wan()
    kw = adapter_for(m).example_inputs(m, grid=GRID)
    kw["hidden_states"] = torch.randn_like(kw["hidden_states"])

    def trajectory(model):
        x = kw["hidden_states"]
        for i in range(STEPS):
            t, t_next = 1.0 - i / STEPS, 1.0 - (i + 1) / STEPS
            v = model(**{**kw, "hidden_states": x, "timestep": torch.full_like(kw["timestep"], t * 1000)})[0]
            x = x + (t_next - t) * v
        return x

    recipe = load_recipe({"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 0.5}}})
    return m, trajectory, recipe


def test_recording_threshold_and_verification():
    m, trajectory, recipe = _setup()
    rc = calibrate_mask_reuse(m, recipe, trajectory, max_age=2, min_overlap=0.0, max_error_growth=None)
    n_sites = 2  # tiny_wan: two self-attention sites, one head group each
    # pairs: each step links to the previous min(step, max_age) steps
    assert len(rc.pairs) == n_sites * sum(min(s, 2) for s in range(STEPS))
    assert all(1 <= age <= 2 and d >= 0 and 0 <= o <= 1 for age, d, o in rc.pairs)
    # min_overlap 0: the largest recorded drift is chosen and the policy reuses whenever age allows
    assert rc.threshold == pytest.approx(max(d for _, d, _ in rc.pairs))
    assert rc.reuse_share == pytest.approx(4 / 6)  # fresh, reuse, reuse, fresh, reuse, reuse per site
    assert rc.output_error_fresh is None and not rc.tried  # no search without max_error_growth
    assert not hasattr(m, "_sparsify") or m._sparsify is None  # the model is restored
    # an impossible overlap demand disables reuse
    strict = calibrate_mask_reuse(m, recipe, trajectory, max_age=2, min_overlap=1.01, max_error_growth=None)
    assert strict.threshold == 0.0 and strict.mask_reuse() is None and strict.reuse_share == 0.0


def test_threshold_search_by_output_error_growth():
    m, trajectory, recipe = _setup()
    loose = calibrate_mask_reuse(m, recipe, trajectory, max_age=2, max_error_growth=10.0, candidates=3)
    # a huge tolerance accepts the largest recorded drift at once: one trajectory tried, reuse as age allows
    assert len(loose.tried) == 1 and loose.threshold == pytest.approx(max(d for _, d, _ in loose.pairs))
    # measured on the reuse trajectory, whose drifts differ from the recording's: at most what age allows
    assert 0 < loose.reuse_share <= 4 / 6 and loose.output_error_reuse > 0
    assert loose.error_growth == pytest.approx(loose.tried[0][2])
    tight = calibrate_mask_reuse(m, recipe, trajectory, max_age=2, max_error_growth=-1.0, candidates=3)
    # an impossible tolerance (the error must shrink by 100%) rejects every candidate: no reuse
    assert tight.threshold == 0.0 and tight.mask_reuse() is None and len(tight.tried) >= 2
    assert all(g > -1.0 for _, _, g in tight.tried) and tight.tried == sorted(tight.tried, reverse=True)


def test_recorded_overlap_matches_runtime_reuse():
    """A threshold above every drift makes the runtime reuse exactly as the simulation says."""
    m, trajectory, recipe = _setup()
    rc = calibrate_mask_reuse(m, recipe, trajectory, max_age=3, min_overlap=0.0, max_error_growth=None)
    r = with_mask_reuse(recipe, rc)
    r2 = load_recipe({**r.to_dict(), "defaults": {**r.to_dict()["defaults"], "mask_reuse": {"threshold": 2.0, "max_age": 3}}})
    sparsify(m, r2)
    runtime.new_generation()
    with torch.no_grad():
        trajectory(m)
    sites = installed_sites(m)
    unsparsify(m)
    got = sum(s.reused for s in sites) / sum(s.reused + s.selections for s in sites)
    assert got == pytest.approx(simulate({"s": [(s, {p: (0.0, 1.0) for p in range(max(0, s - 3), s)}) for s in range(STEPS)]},
                                         2.0, 3)[0])
    assert r.defaults.mask_reuse.max_age == 3 and r.defaults.mask_reuse.threshold == pytest.approx(rc.threshold)


def test_choose_threshold_maximises_reuse_within_the_overlap_floor():
    seqs = {"a": [(0, {}), (1, {0: (0.01, 0.99)}), (2, {0: (0.02, 0.95), 1: (0.01, 0.99)}),
                  (3, {0: (0.05, 0.5), 1: (0.04, 0.7), 2: (0.01, 0.99)})]}
    # 0.01 and 0.02 both reuse 2 of 4 calls: the smaller (safer) one wins; 0.05 would reuse a half-wrong selection
    assert choose_threshold(seqs, 4, 0.9) == (0.01, 0.5, 0.99)
    assert simulate(seqs, 0.02, 4) == (0.5, 0.95, 4)
    assert choose_threshold(seqs, 4, 0.5) == (0.05, 0.75, 0.5)
