"""The denoising-step runtime: step counting, dense first steps and temporal mask reuse, eager and compiled."""

import pytest
import torch

from sparsify.testing import dits
from sparsify import installed_sites, runtime, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.runtime import StepTracker

GRID = (4, 8, 8)


def test_step_tracker_counts_steps_generations_and_cfg():
    t = StepTracker()
    seq = [(999, GRID), (999, GRID), (800, GRID), (800, GRID), (600, GRID), (999, GRID), (800, (2, 8, 8)), (700, (2, 8, 8))]
    assert [t.observe(x, g) for x, g in seq] == [0, 0, 1, 1, 2, 0, 0, 1]
    assert t.generation == 3  # a rising timestep and a new grid each start a generation
    t.reset()
    assert t.observe(500, GRID) == 0 and t.generation == 4


def _wan(recipe):
    m = dits.tiny_wan()
    ad = adapter_for(m)
    kw = ad.example_inputs(m, grid=GRID)
    kw["hidden_states"] = torch.randn_like(kw["hidden_states"])
    runtime.new_generation()
    return m, kw


def _call(m, kw, t):
    with torch.no_grad():
        return m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})[0]


def recipe(**defaults):
    return {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 0.25}, **defaults}}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_dense_first_steps_then_sparse(compiled):
    m, kw = _wan(recipe(dense_steps=2))
    dense = [_call(m, kw, t) for t in (900, 800, 700)]
    sparsify(m, recipe(dense_steps=2))
    eager_sparse_step2 = None
    if compiled:
        runtime.new_generation()
        eager_sparse_step2 = [_call(m, kw, t) for t in (900, 800, 700)][2]
        runtime.new_generation()
        m = torch.compile(m, fullgraph=True)
    out = [_call(m, kw, t) for t in (900, 800, 700)]
    torch.testing.assert_close(out[0], dense[0], atol=1e-6, rtol=0)  # step 0: dense
    torch.testing.assert_close(out[1], dense[1], atol=1e-6, rtol=0)  # step 1: dense
    assert (out[2] - dense[2]).abs().max() > 1e-3  # step 2: sparse
    if compiled:
        torch.testing.assert_close(out[2], eager_sparse_step2, atol=1e-5, rtol=0)
    # a rising timestep starts a new generation: dense again
    torch.testing.assert_close(_call(m, kw, 900), dense[0], atol=1e-6, rtol=0)
    unsparsify(getattr(m, "_orig_mod", m))


def test_mask_reuse_reuses_and_invalidates():
    m, kw = _wan(None)
    sparsify(m, recipe(mask_reuse={"threshold": 2.0, "max_age": 2}))  # drift <= 2 always: reuse by age only
    for t in (900, 800, 700, 600):
        _call(m, kw, t)
    sites = installed_sites(m)
    assert [s.selections for s in sites] == [2, 2] and [s.reused for s in sites] == [2, 2]  # fresh, 2 reuses, fresh
    # a new resolution misses the cache; so does a new generation
    kw2 = adapter_for(m).example_inputs(m, grid=(2, 8, 8))
    _call(m, kw2, 500)
    _call(m, kw, 999)
    assert [s.selections for s in sites] == [4, 4] and [s.reused for s in sites] == [2, 2]
    unsparsify(m)


def test_mask_reuse_threshold_zero_never_reuses_and_output_is_exact():
    m, kw = _wan(None)
    sparsify(m, recipe())
    fresh = [_call(m, kw, t) for t in (900, 800, 700)]
    unsparsify(m)
    runtime.new_generation()
    sparsify(m, recipe(mask_reuse={"threshold": 0.0, "max_age": 5}))
    out = [_call(m, kw, t) for t in (900, 800, 700)]
    assert all(s.reused == 0 for s in installed_sites(m))
    for a, b in zip(out, fresh):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    unsparsify(m)


def test_reused_selection_is_the_cached_one(monkeypatch):
    """A reused step computes attention with the earlier step's selection (checked against the record)."""
    from sparsify.methods import vsa

    m, kw = _wan(None)
    calls = []
    orig = vsa.VSA.select

    def select(this, q, k, layout, budgets, stats=None):
        out = orig(this, q, k, layout, budgets, stats)
        calls.append(out)
        return out

    monkeypatch.setattr(vsa.VSA, "select", select)
    sparsify(m, recipe(mask_reuse={"threshold": 2.0, "max_age": 1}))
    _call(m, kw, 900)
    n_fresh = len(calls)
    reused = _call(m, kw, 800)
    assert len(calls) == n_fresh  # step 1 selected nothing new
    unsparsify(m)
    # the same step computed with the step-0 selections replayed gives the same output
    replay = iter(calls)
    monkeypatch.setattr(vsa.VSA, "select", lambda this, q, k, layout, budgets, stats=None: next(replay))
    runtime.new_generation()
    sparsify(m, recipe())
    torch.testing.assert_close(_call(m, kw, 800), reused, atol=1e-6, rtol=0)
    unsparsify(m)


@pytest.mark.slow  # compile-heavy
def test_dense_first_steps_under_regional_compile():
    m, kw = _wan(None)
    dense = [_call(m, kw, t) for t in (900, 800)]
    sparsify(m, recipe(dense_steps=1))
    eager = [_call(m, kw, t) for t in (900, 800)]
    runtime.new_generation()
    m.compile_repeated_blocks(fullgraph=True)
    out = [_call(m, kw, t) for t in (900, 800)]
    torch.testing.assert_close(out[0], dense[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], eager[1], atol=1e-5, rtol=0)
    assert (out[1] - dense[1]).abs().max() > 1e-3
    unsparsify(m)


def test_budget_schedule_scales_density_per_step_and_invalidates_reuse():
    m, kw = _wan(None)
    sched = [{"from_step": 0, "scale": 4.0}, {"from_step": 1, "scale": 2.0}, {"from_step": 2, "scale": 1.0}]
    sparsify(m, recipe(schedule=sched, mask_reuse={"threshold": 2.0, "max_age": 10}))
    sites = installed_sites(m)
    work = []
    for t in (900, 800, 700, 600):
        before = sites[0].work
        _call(m, kw, t)
        work.append(sites[0].work - before)
    # grid (4, 8, 8) in (1, 8, 8) tiles: 4 key tiles; density 0.25 x (4, 2, 1, 1) keeps 4, 2, 1, 1 of them
    B, H = kw["hidden_states"].shape[0], sites[0].heads
    assert work == pytest.approx([B * H * 1.0, B * H * 0.5, B * H * 0.25, B * H * 0.25])
    # the budget changed at steps 1 and 2, so those selections are fresh; step 3 reuses step 2's
    assert sites[0].selections == 3 and sites[0].reused == 1
    unsparsify(m)


def test_budget_schedule_top_p_scales_the_floor():
    from sparsify.recipe import Budget, ScheduleStep, scheduled_budget

    b = scheduled_budget(Budget(top_p=0.9, min_density=0.4), (ScheduleStep(3, 5.0),), 3)
    assert b == Budget(top_p=0.9, min_density=1.0)
    assert scheduled_budget(Budget(top_p=0.9, min_density=0.4), (ScheduleStep(3, 5.0),), 2) == Budget(top_p=0.9, min_density=0.4)


def test_graph_mode_follows_denoising_steps():
    """In graph mode the rewritten op gets no timestep argument; the geometry hook's timestep drives the steps."""
    m, kw = _wan(None)
    dense = [_call(m, kw, t) for t in (900, 800)]
    sparsify(m, recipe(dense_steps=1), mode="graph")
    runtime.new_generation()
    cm = torch.compile(m, backend="sparsify")
    out = [_call(cm, kw, t) for t in (900, 800)]
    torch.testing.assert_close(out[0], dense[0], atol=1e-5, rtol=0)  # step 0: dense
    assert (out[1] - dense[1]).abs().max() > 1e-3  # step 1: sparse
    assert all(s.selections == 1 for s in installed_sites(m))
    torch._dynamo.reset()
    unsparsify(m)


def test_timestep_value_is_read_once_per_tensor_and_version():
    from sparsify.runtime import timestep_value

    t = torch.tensor([900.0])
    assert timestep_value(t) == 900.0
    t.fill_(800.0)  # in place: a new version, a new reading
    assert timestep_value(t) == 800.0
    for v in (700.0, 600.0):  # fresh tensors (possibly at a reused address) are read again
        assert timestep_value(torch.tensor([v])) == v
    with torch.inference_mode():
        u = torch.tensor([500.0])
        assert timestep_value(u) == 500.0
        u.fill_(400.0)  # no version counter: read every call
        assert timestep_value(u) == 400.0
