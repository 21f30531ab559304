"""Tests of the budget allocation solver: ILP against brute force and the Lagrangian oracle, constraints, speed."""

import itertools
import time

import numpy as np
import pytest

from sparsify.calibrate.solve import (
    DENSITY_TOL,
    InfeasibleBudgetError,
    available_solvers,
    pareto_curve,
    solve_allocation,
    uniform_allocation,
)

ILP_SOLVERS = [s for s in available_solvers() if s in ("highs", "cbc")]
ALL_SOLVERS = ILP_SOLVERS + ["lagrangian"]


def density(cost, choice, weight=None):
    w = np.ones(len(choice)) if weight is None else np.asarray(weight, float)
    return float(np.dot(w, cost[np.arange(len(choice)), choice]) / w.sum())


def layer_densities(cost, choice, layer, weight=None):
    w = np.ones(len(choice)) if weight is None else np.asarray(weight, float)
    c = w * cost[np.arange(len(choice)), choice]
    return {lid: float(c[layer == lid].sum() / w[layer == lid].sum()) for lid in np.unique(layer)}


def brute_force(cost, error, budget, weight=None, forced=None, error_cap=None, layer=None, min_layer=None):
    """Exhaustive optimum (error, choice) or None when nothing is feasible."""
    G, O = cost.shape
    best = None
    for choice in itertools.product(range(O), repeat=G):
        choice = np.array(choice)
        e = error[np.arange(G), choice]
        c = cost[np.arange(G), choice]
        if not (np.isfinite(e).all() and np.isfinite(c).all()):
            continue
        if forced and any(choice[g] != o for g, o in forced.items()):
            continue
        free = np.array([g not in (forced or {}) for g in range(G)])
        if error_cap is not None and (e[free] > error_cap).any():
            continue
        if density(cost, choice, weight) > budget + DENSITY_TOL:
            continue
        if min_layer is not None and any(
            d < min_layer - DENSITY_TOL for d in layer_densities(cost, choice, layer, weight).values()
        ):
            continue
        if best is None or e.sum() < best[0]:
            best = (float(e.sum()), choice)
    return best


def random_instance(rng, G, O, p_nan=0.15):
    cost = rng.uniform(0.02, 1.2, (G, O))
    error = rng.uniform(0.0, 1.0, (G, O)) * rng.lognormal(0, 1, (G, 1))
    holes = rng.random((G, O)) < p_nan
    holes[np.arange(G), rng.integers(0, O, G)] = False  # every group keeps an option
    error[holes] = rng.choice([np.nan, np.inf], holes.sum())
    return cost, error


def realistic_instance(rng, layers, heads, methods=6, levels=8):
    """Options = methods x tile shapes x budget levels; error falls with density, per-head sensitivity."""
    G = layers * heads
    level = np.tile(np.linspace(0.02, 0.5, levels), methods)
    pad = np.repeat(rng.uniform(1.0, 1.22, methods), levels)
    cost = np.broadcast_to(level * pad, (G, level.size)) * rng.uniform(0.97, 1.03, (G, level.size))
    sens = rng.lognormal(0, 1, (G, 1)) * rng.uniform(0.5, 1.5, (G, methods)).repeat(levels, axis=1)
    error = sens * (1 - level) ** 3 * rng.uniform(0.9, 1.1, (G, level.size)) * 1e-3
    return cost, error, np.repeat(np.arange(layers), heads)


def check(alloc, cost, error, budget, weight=None):
    """Every allocation: one valid option per group, the stated density and error, within budget."""
    G = cost.shape[0]
    assert alloc.choice.shape == (G,) and alloc.choice.dtype.kind == "i"
    picked_e = error[np.arange(G), alloc.choice]
    assert np.isfinite(picked_e).all()
    assert alloc.density == pytest.approx(density(cost, alloc.choice, weight), abs=1e-12)
    assert alloc.total_error == pytest.approx(picked_e.sum(), rel=1e-12, abs=1e-15)
    assert alloc.density <= budget + DENSITY_TOL
    if alloc.bound is not None:
        assert alloc.bound <= alloc.total_error + 1e-12


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("solver", ILP_SOLVERS)
def test_ilp_matches_brute_force(solver):
    rng = np.random.default_rng(1)
    for trial in range(12):
        G, O = rng.integers(1, 5), rng.integers(1, 5)
        cost, error = random_instance(rng, G, O)
        weight = rng.uniform(0.5, 2.0, G) if trial % 2 else None
        allowed = np.where(np.isfinite(error), cost, np.nan)
        w = np.ones(G) if weight is None else weight
        lo = np.dot(w, np.nanmin(allowed, 1)) / w.sum()
        hi = np.dot(w, np.nanmax(allowed, 1)) / w.sum()
        budget = float(rng.uniform(lo, hi))
        ref = brute_force(cost, error, budget, weight)
        alloc = solve_allocation(cost, error, budget, weight=weight, solver=solver, gap_rel=0.0)
        check(alloc, cost, error, budget, weight)
        assert alloc.status == "optimal"
        assert alloc.total_error == pytest.approx(ref[0], rel=1e-9, abs=1e-12), (trial, G, O)


@pytest.mark.parametrize("solver", ILP_SOLVERS)
def test_ilp_matches_brute_force_with_constraints(solver):
    rng = np.random.default_rng(2)
    solved = 0
    for trial in range(12):
        G, O = 4, int(rng.integers(2, 5))
        cost, error = random_instance(rng, G, O, p_nan=0.1)
        layer = np.array([0, 0, 1, 1])
        g0 = int(rng.integers(0, G))
        forced = {g0: int(np.flatnonzero(np.isfinite(error[g0]))[-1])}
        cap = float(np.nanmax(np.where(np.isfinite(error), error, np.nan)))  # loose; tightened below
        cap = cap * 0.8 if trial % 3 == 0 else None
        min_layer, budget = 0.3, float(rng.uniform(0.3, 0.8))
        ref = brute_force(cost, error, budget, forced=forced, error_cap=cap, layer=layer, min_layer=min_layer)
        kwargs = dict(forced=forced, error_cap=cap, layer=layer, min_layer_density=min_layer)
        try:
            alloc = solve_allocation(cost, error, budget, solver=solver, gap_rel=0.0, **kwargs)
        except ValueError:
            assert ref is None, (trial, ref)  # infeasible budget, empty group under the cap, or layer floor
            continue
        assert ref is not None
        check(alloc, cost, error, budget)
        assert alloc.total_error == pytest.approx(ref[0], rel=1e-9, abs=1e-12), trial
        assert alloc.choice[g0] == forced[g0]
        assert min(layer_densities(cost, alloc.choice, layer).values()) >= min_layer - DENSITY_TOL
        solved += 1
    assert solved >= 4


@pytest.mark.parametrize("solver", ILP_SOLVERS)
def test_ilp_within_lagrangian_bounds(solver):
    """The oracle: ILP <= the Lagrangian heuristic's error, and >= its dual bound."""
    rng = np.random.default_rng(3)
    for trial in range(3):
        cost, error, _ = realistic_instance(rng, layers=8, heads=12, methods=3)
        if trial == 2:  # unstructured options
            cost, error = random_instance(rng, 96, 12)
        budget = [0.1, 0.2, 0.4][trial]
        lag = solve_allocation(cost, error, budget, solver="lagrangian")
        ilp = solve_allocation(cost, error, budget, solver=solver, gap_rel=1e-7)
        check(lag, cost, error, budget)
        check(ilp, cost, error, budget)
        tol = 1e-6 * lag.total_error
        assert ilp.total_error <= lag.total_error + tol
        assert ilp.total_error >= lag.bound - tol
        assert lag.gap < 0.05  # the heuristic is close on knapsacks of this size


def test_lagrangian_exact_when_budget_is_slack():
    cost = np.array([[1.0, 0.2], [1.0, 0.2]])
    error = np.array([[0.0, 3.0], [0.0, 1.0]])
    alloc = solve_allocation(cost, error, 1.0, solver="lagrangian")
    assert alloc.choice.tolist() == [0, 0] and alloc.status == "optimal" and alloc.gap == 0.0


# ------------------------------------------------------------------------------ scale


@pytest.mark.parametrize("solver", ILP_SOLVERS)
def test_40_layers_40_heads_48_options_under_10s(solver):
    cost, error, _ = realistic_instance(np.random.default_rng(0), layers=40, heads=40)
    assert cost.shape == (1600, 48)
    t = time.perf_counter()
    alloc = solve_allocation(cost, error, 0.1, solver=solver, gap_rel=1e-4)
    elapsed = time.perf_counter() - t
    check(alloc, cost, error, 0.1)
    assert alloc.status == "optimal" and alloc.solver == solver
    assert alloc.gap <= 1e-4
    assert elapsed <= 10.0, f"{solver}: {elapsed:.1f} s"
    lag = solve_allocation(cost, error, 0.1, solver="lagrangian")
    assert lag.solve_seconds < 1.0
    assert alloc.total_error <= lag.total_error * (1 + 1e-9)


# ------------------------------------------------------------------------------ constraints


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_forced_groups_take_their_option(solver):
    cost, error, layer = realistic_instance(np.random.default_rng(4), layers=6, heads=8, methods=2)
    dense = int(np.argmax(cost[0]))
    forced = {g: dense for g in np.flatnonzero(layer == 0)}  # dense first layer
    alloc = solve_allocation(cost, error, 0.15, forced=forced, solver=solver)
    check(alloc, cost, error, 0.15)
    assert (alloc.choice[layer == 0] == dense).all()
    as_array = np.where(layer == 0, dense, -1)
    again = solve_allocation(cost, error, 0.15, forced=as_array, solver=solver)
    assert again.choice.tolist() == alloc.choice.tolist()


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_layer_minimum_density(solver):
    rng = np.random.default_rng(5)
    cost, error, layer = realistic_instance(rng, layers=3, heads=4, methods=1)
    error[layer == 0] *= 1e-3  # layer 0 barely matters: unconstrained, it is starved
    free = solve_allocation(cost, error, 0.12, solver=solver)
    assert layer_densities(cost, free.choice, layer)[0] < 0.08
    alloc = solve_allocation(cost, error, 0.12, layer=layer, min_layer_density={0: 0.1}, solver=solver)
    check(alloc, cost, error, 0.12)
    assert layer_densities(cost, alloc.choice, layer)[0] >= 0.1 - DENSITY_TOL
    assert alloc.total_error >= free.total_error - 1e-12
    every = solve_allocation(cost, error, 0.12, layer=layer, min_layer_density=0.1, solver=solver)
    assert min(layer_densities(cost, every.choice, layer).values()) >= 0.1 - DENSITY_TOL


def test_layer_minimum_infeasible():
    cost = np.array([[0.5, 0.1], [0.5, 0.1]])
    error = np.zeros((2, 2))
    with pytest.raises(InfeasibleBudgetError, match="layer 0"):
        solve_allocation(cost, error, 0.5, layer=[0, 1], min_layer_density={0: 0.6})
    with pytest.raises(ValueError, match="needs layer="):
        solve_allocation(cost, error, 0.5, min_layer_density=0.2)
    for solver in ILP_SOLVERS:  # each floor is reachable, but not both under this budget
        with pytest.raises(InfeasibleBudgetError, match="per-layer minimum"):
            solve_allocation(cost, error, 0.3, layer=[0, 1], min_layer_density=0.5, solver=solver)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_error_cap(solver):
    cost = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [1.0, 0.5, 0.1]])
    error = np.array([[0.0, 1.0, 9.0], [0.01, 0.1, 0.2], [0.0, 0.2, 5.0]])
    plain = solve_allocation(cost, error, 0.4, solver=solver)
    assert plain.choice.tolist() == [1, 2, 1]  # errors 1.0 + 0.2 + 0.2
    capped = solve_allocation(cost, error, 0.6, error_cap=0.5, solver=solver)
    check(capped, cost, error, 0.6)
    assert capped.choice.tolist() == [0, 2, 1]
    with pytest.raises(InfeasibleBudgetError, match=r"minimum achievable density is 0\.533333"):
        solve_allocation(cost, error, 0.5, error_cap=0.5, solver=solver)
    # a forced option is kept above the cap
    assert solve_allocation(cost, error, 1.0, error_cap=0.5, forced={0: 2}).choice[0] == 2
    names = ["b0", "blocks.1 head 0", "b2"]
    match = r"blocks\.1 head 0: no option within error_cap=0\.005 .*smallest error is 0\.01"
    with pytest.raises(ValueError, match=match):
        solve_allocation(cost, error, 0.9, error_cap=[2.0, 0.005, 2.0], names=names, solver=solver)


def test_infeasible_budget_message():
    cost = np.array([[1.0, 0.25], [1.0, 0.5]])
    error = np.array([[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"budget 0\.2 is infeasible: the minimum achievable density is 0\.375"):
        solve_allocation(cost, error, 0.2)
    with pytest.raises(InfeasibleBudgetError, match=r"minimum achievable density is 0\.75"):
        solve_allocation(cost, error, 0.5, forced={0: 0})
    with pytest.raises(InfeasibleBudgetError, match=r"lowest density a shared level reaches is 0\.375"):
        uniform_allocation(cost, error, 0.2)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_missing_options_are_skipped(solver):
    cost = np.array([[1.0, 0.5, 0.1, 0.1], [1.0, 0.5, 0.1, np.nan]])
    error = np.array([[0.0, 0.1, np.nan, 0.3], [0.0, np.inf, 0.2, 0.0]])
    alloc = solve_allocation(cost, error, 0.1, solver=solver)
    assert alloc.choice.tolist() == [3, 2]
    check(alloc, cost, error, 0.1)
    mask = np.ones((2, 4), bool)
    mask[0, 3] = False  # the only cheap option of group 0 is now hidden
    with pytest.raises(InfeasibleBudgetError):
        solve_allocation(cost, error, 0.1, mask=mask, solver=solver)
    assert solve_allocation(cost, error, 0.3, mask=mask, solver=solver).choice.tolist() == [1, 2]
    with pytest.raises(ValueError, match="group 1: no available option"):
        solve_allocation(cost, np.where([[True] * 4, [False] * 4], error, np.nan), 1.0, solver=solver)
    with pytest.raises(ValueError, match="forced option 2 is unavailable"):
        solve_allocation(cost, error, 1.0, forced={0: 2}, solver=solver)


def test_bad_inputs():
    cost, error = np.ones((2, 3)), np.zeros((2, 3))
    with pytest.raises(ValueError, match="solver='gurobi'"):
        solve_allocation(cost, error, 1.0, solver="gurobi")
    with pytest.raises(ValueError, match="one shape"):
        solve_allocation(cost, np.zeros((3, 2)), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        solve_allocation(cost, -np.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        solve_allocation(cost, error, 1.0, forced={5: 0})


@pytest.mark.parametrize("solver", ILP_SOLVERS)
def test_time_limit_is_reported_honestly(solver):
    """A solve stopped by the time limit must not say "optimal", and its answer still meets every row."""
    rng = np.random.default_rng(0)
    cost = np.sort(rng.uniform(0.02, 1, (400, 16)), 1)
    error = np.sort(rng.uniform(0, 1, (400, 16)), 1)[:, ::-1] * rng.lognormal(0, 1, (400, 1))
    layer = np.arange(400) // 20
    alloc = solve_allocation(
        cost, error, 0.2, solver=solver, time_limit=1e-3, gap_rel=0.0, layer=layer, min_layer_density=0.19
    )
    assert alloc.status.startswith("feasible (") and not alloc.optimal
    check(alloc, cost, error, 0.2)
    assert min(layer_densities(cost, alloc.choice, layer).values()) >= 0.19 - DENSITY_TOL


def test_milp_prints_nothing_unless_asked(capfd):
    """msg=False silences the solvers entirely, HiGHS' C++ banner included."""
    cost, error, _ = realistic_instance(np.random.default_rng(8), layers=2, heads=4, methods=2)
    for solver in ILP_SOLVERS:
        solve_allocation(cost, error, 0.2, solver=solver)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_cbc_is_the_fallback_without_highs(monkeypatch):
    pulp = pytest.importorskip("pulp")
    if "cbc" not in ILP_SOLVERS:
        pytest.skip("pulp's bundled CBC is missing")
    monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
    available_solvers.cache_clear()
    try:
        assert available_solvers() == ("cbc", "lagrangian")
        cost, error, _ = realistic_instance(np.random.default_rng(9), layers=3, heads=4, methods=2)
        alloc = solve_allocation(cost, error, 0.2)
        assert alloc.solver == "cbc" and alloc.status == "optimal"
        check(alloc, cost, error, 0.2)
    finally:
        available_solvers.cache_clear()


def test_auto_uses_the_lagrangian_beyond_milp_size(monkeypatch):
    import sparsify.calibrate.solve as solve

    cost, error, _ = realistic_instance(np.random.default_rng(10), layers=3, heads=4, methods=2)
    monkeypatch.setattr(solve, "MILP_MAX_VARIABLES", 5)
    alloc = solve_allocation(cost, error, 0.2)
    assert alloc.solver == "lagrangian"
    check(alloc, cost, error, 0.2)


def test_infeasible_budget_carries_the_minimum_density():
    cost = np.array([[1.0, 0.5, 0.25]] * 2)
    with pytest.raises(InfeasibleBudgetError) as e:
        solve_allocation(cost, np.zeros((2, 3)), 0.1)
    assert e.value.min_density == pytest.approx(0.25)


def test_weights_change_the_budget_row():
    cost = np.array([[1.0, 0.1], [1.0, 0.1]])
    error = np.array([[0.0, 1.0], [0.0, 2.0]])
    # equal weights: one head can stay dense at budget 0.55, the one with the larger error
    assert solve_allocation(cost, error, 0.55).choice.tolist() == [1, 0]
    # head 1 carries 90 % of the FLOPs: keeping it dense would cost 0.91 > 0.55
    alloc = solve_allocation(cost, error, 0.55, weight=[1.0, 9.0])
    assert alloc.choice.tolist() == [0, 1]
    check(alloc, cost, error, 0.55, weight=[1.0, 9.0])


# ------------------------------------------------------------------------------ baseline and curve


def test_uniform_allocation_shares_one_level():
    cost, error, _ = realistic_instance(np.random.default_rng(6), layers=4, heads=8, methods=3)
    level = np.tile(np.arange(8), 3)
    u = uniform_allocation(cost, error, 0.2, level=level)
    check(u, cost, error, 0.2)
    assert len(set(level[u.choice].tolist())) == 1 and u.solver == "uniform"
    assert u.info["level"] == level[u.choice[0]]
    denser = level > u.info["level"]
    assert all(  # every denser level would break the budget
        density(cost, np.array([np.flatnonzero(level == v)[0]] * 32)) > 0.2 * 0.95
        for v in np.unique(level[denser])
    )
    ilp = solve_allocation(cost, error, 0.2)
    assert ilp.total_error <= u.total_error
    same_index = uniform_allocation(cost, error, 0.2)  # default: one option index for all heads
    assert len(set(same_index.choice.tolist())) == 1


def test_uniform_keeps_forced_groups():
    cost = np.array([[1.0, 0.5, 0.1]] * 4)
    error = np.array([[0.0, 1.0, 2.0]] * 4)
    u = uniform_allocation(cost, error, 0.5, forced={0: 0})
    assert u.choice.tolist() == [0, 2, 2, 2] and u.density == pytest.approx(0.325)


def test_pareto_curve():
    cost, error, _ = realistic_instance(np.random.default_rng(7), layers=4, heads=8, methods=2)
    budgets = [0.001, 0.05, 0.1, 0.2, 0.4]
    curve = pareto_curve(cost, error, budgets, level=np.tile(np.arange(8), 2), solver="auto")
    assert np.isnan(curve.ilp_error[0]) and np.isnan(curve.uniform_error[0])
    assert curve.ilp_status[0] == "infeasible"
    ok = ~np.isnan(curve.uniform_error)
    assert (curve.ilp_error[ok] <= curve.uniform_error[ok] + 1e-12).all()
    assert (np.diff(curve.ilp_error[1:]) <= 1e-12).all()  # more budget never hurts
    assert (curve.ilp_density[1:] <= np.array(budgets[1:]) + DENSITY_TOL).all()
    assert len(curve.rows()) == len(budgets)
