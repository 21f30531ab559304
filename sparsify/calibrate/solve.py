"""Budget allocation: one candidate per head under a global density budget (HASTE's multiple-choice knapsack)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import SOLVERS

__all__ = ["Allocation", "InfeasibleBudgetError", "ParetoCurve", "available_solvers", "pareto_curve",
           "solve_allocation", "uniform_allocation"]

Forced = Mapping[int, int] | Sequence[int] | np.ndarray  # {group: option}, or (G,) with -1 = free
LayerIds = Sequence[Any] | np.ndarray  # (G,) layer id of each group
LayerMinimum = float | Mapping[Any, float]  # one density for every layer, or {layer id: density}
DENSITY_TOL = 1e-9  # an allocation meets the budget when density <= budget + DENSITY_TOL
MILP_MAX_VARIABLES = 250_000  # "auto" solves larger problems with the Lagrangian heuristic


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budget or the layer minimums; ``min_density``: the lowest reachable density (or None)."""

    def __init__(self, message: str, min_density: float | None = None):
        super().__init__(message)
        self.min_density = min_density


@dataclass
class Allocation:
    """One option per group, as chosen by :func:`solve_allocation` or :func:`uniform_allocation`.

    Attributes:
        choice: ``(G,)`` int, the chosen option index of every group (indexes the caller's columns).
        total_error: sum of the chosen options' errors.
        density: achieved weighted density ``sum_g w_g c[g, choice_g] / sum_g w_g``.
        budget: the requested density budget.
        status: ``"optimal"`` (within ``gap_rel``), ``"feasible (...)"`` saying why not proven, or ``"feasible"``.
        solver: ``"highs"``, ``"cbc"``, ``"lagrangian"`` or ``"uniform"``.
        bound, gap: a proven lower bound on the optimal total error and ``(total_error - bound) / total_error``.
        solve_seconds: wall time of the call.
        info: solver details (Lagrange multiplier, options kept after pruning, uniform level, ...).
    """

    choice: np.ndarray
    total_error: float
    density: float
    budget: float
    status: str
    solver: str
    bound: float | None = None
    gap: float | None = None
    solve_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def optimal(self) -> bool:
        """True when the solver proved optimality within its relative gap."""
        return self.status == "optimal"


@dataclass
class ParetoCurve:
    """Per budget, achieved density and total error of :func:`solve_allocation` (``ilp_*``) and of
    :func:`uniform_allocation` (``uniform_*``), NaN where infeasible; ``ilp_status``: the solver status."""

    budget: np.ndarray
    ilp_density: np.ndarray
    ilp_error: np.ndarray
    uniform_density: np.ndarray
    uniform_error: np.ndarray
    ilp_status: list[str]

    def rows(self) -> list[dict[str, float | str]]:
        """One dict per budget, ready for JSON or a table."""
        keys = ("budget", "ilp_density", "ilp_error", "uniform_density", "uniform_error")
        cols = zip(self.budget, self.ilp_density, self.ilp_error, self.uniform_density, self.uniform_error)
        return [{**{k: float(x) for k, x in zip(keys, row)}, "ilp_status": s} for row, s in zip(cols, self.ilp_status)]


@dataclass
class _Problem:
    """Validated inputs: ``ok`` marks the allowed options after masks, forced options and the error cap."""

    cost: np.ndarray  # (G, O) float
    error: np.ndarray  # (G, O) float
    ok: np.ndarray  # (G, O) bool
    w: np.ndarray  # (G,) weights normalised to mean 1
    budget: float
    forced: np.ndarray  # (G,) int, -1 where free
    layers: list[tuple[Any, np.ndarray, float]]  # (layer id, group indices, minimum density)
    names: list[str]

    @property
    def n_groups(self) -> int:
        return self.cost.shape[0]

    def density(self, choice: np.ndarray) -> float:
        return float(np.dot(self.w, self.cost[np.arange(self.n_groups), choice]) / self.n_groups)

    def total_error(self, choice: np.ndarray) -> float:
        return float(self.error[np.arange(self.n_groups), choice].sum())

    def layer_shortfall(self, choice: np.ndarray) -> list[tuple[Any, float, float]]:
        """Layers whose density falls below their minimum: (layer id, achieved, minimum)."""
        contrib = self.w * self.cost[np.arange(self.n_groups), choice]
        out = []
        for lid, idx, lo in self.layers:
            got = float(contrib[idx].sum() / self.w[idx].sum())
            if got < lo - DENSITY_TOL:
                out.append((lid, got, lo))
        return out

    def feasible(self, choice: np.ndarray) -> bool:
        rows = np.arange(self.n_groups)
        return bool(
            self.ok[rows, choice].all()
            and self.density(choice) <= self.budget + DENSITY_TOL
            and not self.layer_shortfall(choice)
        )


def _forced_array(forced: Forced | None, G: int, O: int) -> np.ndarray:
    out = np.full(G, -1, dtype=np.int64)
    if forced is None:
        return out
    if isinstance(forced, Mapping):
        for g, o in forced.items():
            if not 0 <= int(g) < G:
                raise ValueError(f"forced: group {g} out of range [0, {G})")
            out[int(g)] = int(o)
    else:
        arr = np.asarray(forced, dtype=np.int64)
        if arr.shape != (G,):
            raise ValueError(f"forced: expected {{group: option}} or an int array of shape ({G},), got {arr.shape}")
        out[:] = np.where(arr < 0, -1, arr)
    bad = np.flatnonzero(out >= O)
    if bad.size:
        raise ValueError(f"forced: option {out[bad[0]]} of group {bad[0]} out of range [0, {O})")
    return out


def _layer_constraints(
    layer: LayerIds | None, min_layer_density: LayerMinimum | None, G: int
) -> list[tuple[Any, np.ndarray, float]]:
    if min_layer_density is None:
        return []
    if layer is None:
        raise ValueError("min_layer_density needs layer= (the layer id of every group)")
    layer = np.asarray(layer)
    if layer.shape != (G,):
        raise ValueError(f"layer: expected shape ({G},), got {layer.shape}")
    ids = list(dict.fromkeys(layer.tolist()))
    if isinstance(min_layer_density, Mapping):
        unknown = [k for k in min_layer_density if k not in ids]
        if unknown:
            raise ValueError(f"min_layer_density: unknown layer ids {unknown[:5]}; layers are {ids[:10]}...")
        wanted = {k: float(v) for k, v in min_layer_density.items()}
    else:
        wanted = {k: float(min_layer_density) for k in ids}
    return [(lid, np.flatnonzero(layer == lid), lo) for lid, lo in wanted.items() if lo > 0]


def _prepare(cost, error, budget, weight, layer, forced, min_layer_density, error_cap, mask, names) -> _Problem:
    cost = np.asarray(cost, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    if cost.ndim != 2 or cost.shape != error.shape:
        raise ValueError(f"cost and error must be (groups, options) arrays of one shape, got {cost.shape} and "
                         f"{error.shape}")
    G, O = cost.shape
    if G == 0 or O == 0:
        raise ValueError(f"empty problem: {G} groups x {O} options")
    budget = float(budget)
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite density >= 0, got {budget}")
    names = [f"group {g}" for g in range(G)] if names is None else [str(n) for n in names]
    if len(names) != G:
        raise ValueError(f"names has {len(names)} entries, expected one per group ({G})")
    ok = np.isfinite(cost) & np.isfinite(error)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (G, O):
            raise ValueError(f"mask: expected shape {(G, O)}, got {mask.shape}")
        ok &= mask
    if (cost[ok] < 0).any() or (error[ok] < 0).any():
        g = int(np.argwhere(ok & ((cost < 0) | (error < 0)))[0, 0])
        raise ValueError(f"{names[g]}: costs and errors must be >= 0")
    forced_arr = _forced_array(forced, G, O)
    capped = ok.copy()
    if error_cap is not None:
        cap = np.broadcast_to(np.asarray(error_cap, dtype=np.float64), (G,))
        capped &= error <= cap[:, None]
    rows = np.flatnonzero(forced_arr >= 0)
    for g in rows:
        o = forced_arr[g]
        if not ok[g, o]:
            raise ValueError(f"{names[g]}: forced option {o} is unavailable (missing, NaN/inf or masked)")
    capped[rows] = False
    capped[rows, forced_arr[rows]] = True  # a forced option is kept even above the error cap
    for g in np.flatnonzero(~capped.any(axis=1)):
        if ok[g].any() and error_cap is not None:
            raise ValueError(f"{names[g]}: no option within error_cap={float(cap[g]):.4g} (its smallest error is "
                             f"{float(error[g][ok[g]].min()):.4g}); raise the cap for this head")
        raise ValueError(f"{names[g]}: no available option (all missing, NaN/inf or masked)")
    if weight is None:
        w = np.ones(G)
    else:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != (G,) or not np.isfinite(w).all() or (w <= 0).any():
            raise ValueError(f"weight must be a ({G},) array of finite values > 0")
        w = w * (G / w.sum())
    cost = np.where(capped, cost, 0.0)
    error = np.where(capped, error, np.inf)
    p = _Problem(cost, error, capped, w, budget, forced_arr, _layer_constraints(layer, min_layer_density, G), names)
    for lid, idx, lo in p.layers:
        top = float(np.dot(p.w[idx], np.where(capped[idx], cost[idx], -np.inf).max(axis=1)) / p.w[idx].sum())
        if top < lo - DENSITY_TOL:
            raise InfeasibleBudgetError(f"layer {lid!r}: minimum density {lo:.4g} is above its maximum achievable "
                                        f"density {top:.4g}")
    return p


def _min_density(p: _Problem) -> float:
    return float(np.dot(p.w, np.where(p.ok, p.cost, np.inf).min(axis=1)) / p.n_groups)


def _check_budget(p: _Problem) -> None:
    lo = _min_density(p)
    if lo > p.budget + DENSITY_TOL:
        raise InfeasibleBudgetError(
            f"budget {p.budget:.6g} is infeasible: the minimum achievable density is {lo:.6g} (every head on its "
            "cheapest allowed option, after forced options, masks and error_cap)", min_density=lo)


@dataclass
class _Compact:
    """Per group, the allowed options sorted by cost (then error), padded with error=inf."""

    opt: np.ndarray  # (G, K) original option index, -1 padding
    cost: np.ndarray  # (G, K)
    error: np.ndarray  # (G, K), inf padding
    a: np.ndarray  # (G, K) density contribution w_g * c / G
    count: np.ndarray  # (G,) options kept per group
    lay: np.ndarray  # (G,) index into lo of the group's constrained layer, -1 if none
    lo: np.ndarray  # (L,) layer minimums in units of a: min_density * sum_{g in L} w_g / G

    def expand(self, k: np.ndarray) -> np.ndarray:
        return self.opt[np.arange(len(k)), k]

    def layer_room(self, k: np.ndarray) -> np.ndarray:
        """(G,) how much the group's layer load may drop before its minimum (inf if unconstrained)."""
        inl = self.lay >= 0
        load = np.bincount(self.lay[inl], weights=self.a[np.flatnonzero(inl), k[inl]], minlength=len(self.lo))
        return np.where(inl, (load - self.lo)[self.lay], np.inf)


def _compact(p: _Problem, pareto: bool) -> _Compact:
    """Sort each group's allowed options by cost; drop dominated ones (with layer minimums, only equal-cost ones)."""
    G, _ = p.cost.shape
    ckey = np.where(p.ok, p.cost, np.inf)
    order = np.lexsort((p.error, ckey), axis=1)
    c = np.take_along_axis(ckey, order, 1)
    e = np.take_along_axis(p.error, order, 1)
    okk = np.isfinite(c)
    if pareto:
        best = np.minimum.accumulate(e, axis=1)
        prev = np.concatenate([np.full((G, 1), np.inf), best[:, :-1]], axis=1)
        keep = okk & (e < prev)
    else:
        prev_c = np.concatenate([np.full((G, 1), -np.inf), c[:, :-1]], axis=1)
        keep = okk & (c != prev_c)
    count = keep.sum(axis=1)
    K = int(count.max())
    pos = np.argsort(~keep, axis=1, kind="stable")[:, :K]  # kept columns first, order preserved
    valid = np.arange(K)[None, :] < count[:, None]
    opt = np.where(valid, np.take_along_axis(order, pos, 1), -1)
    cost = np.where(valid, np.take_along_axis(c, pos, 1), 0.0)
    err = np.where(valid, np.take_along_axis(e, pos, 1), np.inf)
    lay = np.full(G, -1, dtype=np.int64)
    lo = np.zeros(len(p.layers))
    for i, (_, idx, m) in enumerate(p.layers):
        lay[idx] = i
        lo[i] = m * float(p.w[idx].sum()) / G
    return _Compact(opt, cost, err, p.w[:, None] * cost / G, count, lay, lo)


def _lagrangian(cp: _Compact, budget: float, iters: int = 100) -> tuple[np.ndarray, float, float]:
    """Relax the budget row (layer rows dropped), bisect the multiplier: (choice meeting the budget at the smallest
    multiplier found, best dual value = a lower bound on the optimum, that multiplier)."""
    G = cp.a.shape[0]
    rows = np.arange(G)

    def relax(lam: float) -> tuple[np.ndarray, float, float]:
        val = cp.error + lam * cp.a
        k = np.argmin(val, axis=1)  # ties go to the cheaper option (columns are sorted by cost)
        return k, float(val[rows, k].sum() - lam * budget), float(cp.a[rows, k].sum())

    k, bound, dens = relax(0.0)
    if dens <= budget:
        return k, bound, 0.0
    # above lam_max every group takes its cheapest option: an upper end that is surely feasible
    da = cp.a - cp.a[:, :1]
    de = cp.error[:, :1] - cp.error
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((da > 0) & np.isfinite(cp.error), de / da, 0.0)
    lo, hi = 0.0, max(float(ratio.max()), 1e-300) * 2.0
    k, dual, _ = relax(hi)
    bound = max(bound, dual)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        km, dual, dm = relax(mid)
        bound = max(bound, dual)
        if dm <= budget:
            hi, k = mid, km
        else:
            lo = mid
    return k, bound, hi


def _best_switch(score: np.ndarray) -> tuple[int, int] | None:
    """The (group, option) of the largest finite score, or None."""
    g, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return (int(g), int(j)) if np.isfinite(score[g, j]) else None


def _switch_deltas(cp: _Compact, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(error change, density change) of switching each group to each of its options."""
    rows = np.arange(len(k))
    with np.errstate(invalid="ignore"):
        return cp.error - cp.error[rows, k][:, None], cp.a - cp.a[rows, k][:, None]


def _repair_layers(cp: _Compact, k: np.ndarray, budget: float) -> np.ndarray | None:
    """Raise short layers by their cheapest switches, then win back budget where layers have room (None: failed)."""
    k = k.copy()
    for _ in range(4 * len(k)):
        short = (cp.lay >= 0) & (cp.layer_room(k) < 0)
        if not short.any():
            break
        de, da = _switch_deltas(cp, k)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(short[:, None] & (da > 0) & np.isfinite(de), -de / da, -np.inf)
        if (best := _best_switch(score)) is None:
            return None
        k[best[0]] = best[1]
    else:
        return None
    rows = np.arange(len(k))
    for _ in range(4 * len(k)):
        excess = float(cp.a[rows, k].sum()) - budget
        if excess <= 0:
            return k
        de, da = _switch_deltas(cp, k)
        room = cp.layer_room(k)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where((da < 0) & (-da <= room[:, None]) & np.isfinite(de), de / da, -np.inf)
        if (best := _best_switch(score)) is None:
            return None
        k[best[0]] = best[1]
    return None


def _greedy_fill(cp: _Compact, k: np.ndarray, budget: float) -> np.ndarray:
    """Spend the budget slack: repeatedly take the single switch with the largest error drop that fits."""
    k = k.copy()
    rows = np.arange(len(k))
    for _ in range(4 * len(k)):
        slack = budget - float(cp.a[rows, k].sum())
        de, da = _switch_deltas(cp, k)
        room = cp.layer_room(k) if cp.lo.size else np.inf
        fits = (de < 0) & (da <= slack) & (-da <= np.broadcast_to(room, k.shape)[:, None])
        if (best := _best_switch(np.where(fits, -de, -np.inf))) is None:
            break
        k[best[0]] = best[1]
    return k


@functools.lru_cache(maxsize=1)
def available_solvers() -> tuple[str, ...]:
    """The solver names usable here, best first: ``"highs"`` and ``"cbc"`` (through pulp, from
    ``pip install "sparsify[calibrate]"``), then ``"lagrangian"`` (numpy only, always available).

    Example:
        >>> available_solvers()[-1]
        'lagrangian'
    """
    try:
        import pulp
    except ImportError:
        return ("lagrangian",)
    out = [name for name in ("highs", "cbc") if _pulp_solver(name, msg=False).available()]
    return (*out, "lagrangian")


def _pulp_solver(name: str, *, msg: bool, gap_rel: float = 1e-4, time_limit: float | None = None):
    """pulp's own solver object: ``pulp.HiGHS`` (highspy) or ``pulp.PULP_CBC_CMD``."""
    import pulp

    if name == "highs":
        return pulp.HiGHS(msg=msg, gapRel=gap_rel, gapAbs=0.0, timeLimit=time_limit)
    with warnings.catch_warnings():  # pulp 3.3 warns that pulp 4 stops bundling the CBC binary
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=msg, gapRel=gap_rel, timeLimit=time_limit)


@contextlib.contextmanager
def _silenced(on: bool):
    """Send the process's stdout and stderr file descriptors to /dev/null (HiGHS prints its banner from C++)."""
    if not on:
        yield
        return
    for f in (sys.stdout, sys.stderr):
        f.flush()
    saved, null = [os.dup(1), os.dup(2)], os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
        for fd in (*saved, null):
            os.close(fd)


def _solve_milp(
    p: _Problem, cp: _Compact, backend: str, gap_rel: float, time_limit: float, msg: bool
) -> tuple[np.ndarray | None, str, dict[str, Any]]:
    """The knapsack as a pulp MILP, one binary per kept option of each group with several: (choice, status, info)."""
    import pulp

    G = p.n_groups
    free = np.flatnonzero(cp.count > 1)
    fixed = np.flatnonzero(cp.count == 1)
    choice = np.zeros(G, dtype=np.int64)
    info: dict[str, Any] = {"variables": int(cp.count[free].sum()), "fixed_groups": int(fixed.size)}
    if free.size == 0:
        return choice, "optimal", info
    wc = p.w[:, None] * cp.cost  # mean-1 weights: the budget row reads density * G
    finite = cp.error[free][np.isfinite(cp.error[free])]
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0  # objective coefficients in [0, 1]

    prob = pulp.LpProblem("sparsify_allocation", pulp.LpMinimize)
    x = {int(g): [prob.add_variable(f"x_{g}_{j}", cat=pulp.LpBinary) for j in range(int(cp.count[g]))] for g in free}

    def load(g):
        return pulp.lpSum(c * v for c, v in zip(wc[g].tolist(), x[g]))

    prob += pulp.lpSum(e / scale * v for g in x for e, v in zip(cp.error[g].tolist(), x[g]))
    for g in x:
        prob += pulp.lpSum(x[g]) == 1, f"one_{g}"
    prob += pulp.lpSum(load(g) for g in x) <= p.budget * G - float(wc[fixed, 0].sum()), "budget"
    for i, (_, idx, lo) in enumerate(p.layers):
        rhs = lo * float(p.w[idx].sum()) - float(sum(wc[g, 0] for g in idx if cp.count[g] == 1))
        prob += pulp.lpSum(load(int(g)) for g in idx if int(g) in x) >= rhs, f"layer_{i}"

    with _silenced(not msg):
        prob.solve(_pulp_solver(backend, msg=msg, gap_rel=gap_rel, time_limit=time_limit))
    info.update(pulp_status=pulp.LpStatus[prob.status], pulp_sol_status=pulp.LpSolution[prob.sol_status])
    if prob.sol_status == pulp.LpSolutionInfeasible:
        raise InfeasibleBudgetError(
            f"no allocation meets budget {p.budget:.6g} together with the per-layer minimum densities",
            min_density=_min_density(p))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, f"no solution ({pulp.LpSolution[prob.sol_status]})", info  # varValue is not a solution then
    for g, xs in x.items():
        choice[g] = int(np.argmax([v.varValue or 0.0 for v in xs]))
    if prob.sol_status == pulp.LpSolutionOptimal:
        return choice, "optimal", info
    return choice, "feasible (stopped before proving optimality: time limit)", info


def _gap(total: float, bound: float | None) -> float | None:
    return None if bound is None else 0.0 if total <= 0 else max(0.0, (total - bound) / total)


def _resolve_solver(solver: str, n_variables: int) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    if solver == "auto":
        return "lagrangian" if n_variables > MILP_MAX_VARIABLES else available_solvers()[0]
    if solver != "lagrangian" and solver not in available_solvers():
        raise RuntimeError(f"solver {solver!r} is not available here (pip install \"sparsify[calibrate]\" brings "
                           f"pulp and highspy); available: {', '.join(available_solvers())}")
    return solver


def solve_allocation(
    cost: np.ndarray, error: np.ndarray, budget: float, *, weight: np.ndarray | None = None,
    layer: LayerIds | None = None, forced: Forced | None = None, min_layer_density: LayerMinimum | None = None,
    error_cap: float | np.ndarray | None = None, mask: np.ndarray | None = None, solver: str = "auto",
    gap_rel: float = 1e-4, time_limit: float = 60.0, names: Sequence[str] | None = None, msg: bool = False
) -> Allocation:
    """Choose one option per group that minimises the total error under a global density budget.

    The multiple-choice knapsack of HASTE's error-guided budgeted calibration::

        minimise    sum_g error[g, o_g]
        subject to  sum_g weight[g] * cost[g, o_g] <= budget * sum_g weight[g]
                    sum_{g in L} weight[g] * cost[g, o_g] >= min_layer_density[L] * sum_{g in L} weight[g]

    A group is one head of one layer, an option one candidate (method x tile x budget level). Options with a
    NaN/inf cost or error, hidden by ``mask`` or above ``error_cap`` are never chosen. The Lagrangian heuristic
    always runs: its dual bound, and its answer where the MILP returns none or a worse one. Every returned
    solution is re-checked here, whatever the solver says.

    Args:
        cost: ``(G, O)`` cost of each option as a fraction of the head's dense cost (padding included).
        error: ``(G, O)`` measured error of each option, >= 0, additive over groups.
        budget: the global weighted density to meet (e.g. 0.1 for 90 % sparsity).
        weight: ``(G,)`` each group's share of the dense attention cost (default: uniform).
        layer: ``(G,)`` layer id of each group (needed by ``min_layer_density``).
        forced: ``{group: option}`` or a ``(G,)`` int array, -1 for free groups; kept even above ``error_cap``.
        min_layer_density: minimum weighted density per layer: one float, or ``{layer id: density}``.
        error_cap: a float or ``(G,)`` array; options with a larger error are excluded.
        mask: ``(G, O)`` bool, True where the option may be used.
        solver: ``"highs"`` or ``"cbc"`` (the MILP through pulp), ``"lagrangian"`` (numpy only, with a dual
            bound) or ``"auto"`` (the first available; the Lagrangian above ``MILP_MAX_VARIABLES`` binaries).
        gap_rel: relative optimality gap at which the MILP may stop (0 to prove exact optimality).
        time_limit: seconds the MILP may run; on expiry its best solution is returned as ``"feasible (...)"``.
        names: ``(G,)`` group names used in error messages (e.g. ``"blocks.3.attn1 head 5"``).
        msg: let the MILP solver print its log (otherwise nothing, not even HiGHS' banner, is printed).

    Returns:
        An :class:`Allocation`; ``choice[g]`` indexes ``cost``'s columns.

    Raises:
        InfeasibleBudgetError: (a ``ValueError``) no allocation meets the budget and the layer minimums.
        ValueError: malformed inputs, or a group left with no option (the message names it).
        RuntimeError: no allocation found although none was proven impossible (MILP time limit, or the
            Lagrangian heuristic failing the layer minimums).

    Example:
        >>> import numpy as np
        >>> cost = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [1.0, 0.5, 0.1]])
        >>> error = np.array([[0.0, 1.0, 9.0], [0.0, 0.1, 0.2], [0.0, 0.2, 5.0]])
        >>> alloc = solve_allocation(cost, error, budget=0.4, forced={0: 0})
        >>> alloc.choice.tolist(), round(alloc.density, 3), alloc.status
        ([0, 2, 2], 0.4, 'optimal')
    """
    t0 = time.perf_counter()
    p = _prepare(cost, error, budget, weight, layer, forced, min_layer_density, error_cap, mask, names)
    _check_budget(p)
    cp = _compact(p, pareto=not p.layers)
    name = _resolve_solver(solver, int(cp.count[cp.count > 1].sum()))
    info: dict[str, Any] = {"options": int(p.ok.sum()), "options_kept": int(cp.count.sum())}
    k_lag, bound, info["lagrange_multiplier"] = _lagrangian(cp, p.budget)  # bound valid with layer rows too
    if p.layers:
        k_lag = _repair_layers(cp, k_lag, p.budget)
    lag_choice = None
    if k_lag is not None:
        lag_choice = cp.expand(_greedy_fill(cp, k_lag, p.budget))
        if not p.feasible(lag_choice):  # never expected: the heuristic keeps every row
            lag_choice = None
    info["lagrangian_error"] = None if lag_choice is None else p.total_error(lag_choice)
    if name == "lagrangian":
        if lag_choice is None:
            raise RuntimeError("solver='lagrangian': the heuristic found no allocation meeting both the budget and "
                               "the per-layer minimum densities; use solver='highs' or 'cbc'")
        choice = lag_choice
        gap = _gap(p.total_error(choice), bound)
        status = "optimal" if gap is not None and gap <= gap_rel else f"feasible (gap {gap:.1e})"
    else:
        k, status, milp_info = _solve_milp(p, cp, name, gap_rel, time_limit, msg)
        info.update(milp_info)
        choice = None if k is None else cp.expand(k)
        if choice is not None and not p.feasible(choice):  # re-checked here, whatever the solver says
            status, choice = f"{status}; its solution failed the feasibility re-check", None
        if choice is None:
            if lag_choice is None:
                raise RuntimeError(f"{name} returned no usable allocation ({status}; time_limit={time_limit:g} s) "
                                   "and the Lagrangian heuristic found none meeting the per-layer minimum densities: "
                                   "raise time_limit")
            choice, status = lag_choice, f"feasible (lagrangian fallback; {name}: {status})"
        else:
            if status == "optimal":  # proven within gap_rel: the optimum is at least (1 - gap_rel) x this
                bound = max(bound, p.total_error(choice) * (1.0 - gap_rel))
            if lag_choice is not None and p.total_error(lag_choice) < p.total_error(choice):
                choice, info["kept"] = lag_choice, "lagrangian (lower error than the MILP's answer within gap_rel)"
    total = p.total_error(choice)
    return Allocation(
        choice=choice.astype(np.int64), total_error=total, density=p.density(choice), budget=p.budget,
        status=status, solver=name, bound=min(bound, total), gap=_gap(total, min(bound, total)),
        solve_seconds=time.perf_counter() - t0, info=info
    )


def uniform_allocation(
    cost: np.ndarray, error: np.ndarray, budget: float, *, level: np.ndarray | Sequence[float] | None = None,
    weight: np.ndarray | None = None, layer: LayerIds | None = None, forced: Forced | None = None,
    min_layer_density: LayerMinimum | None = None, error_cap: float | np.ndarray | None = None,
    mask: np.ndarray | None = None, names: Sequence[str] | None = None
) -> Allocation:
    """The baseline without per-head allocation: every free head runs at one shared level.

    ``level[o]`` is the budget level of option ``o`` (e.g. the density a candidate targets). At a level each free
    group takes its least-error option of that level; forced groups keep theirs. Of the levels meeting the budget
    (and the layer minimums) the one of least total error is returned.

    Args:
        cost, error, budget, weight, layer, forced, min_layer_density, error_cap, mask, names: as in
            :func:`solve_allocation`.
        level: ``(O,)`` level of each option (default: each option is its own level).

    Returns:
        An :class:`Allocation` with ``solver="uniform"`` and ``info["level"]`` the chosen level.

    Raises:
        InfeasibleBudgetError: no level meets the budget.

    Example:
        >>> import numpy as np
        >>> cost = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [1.0, 0.5, 0.1]])
        >>> error = np.array([[0.0, 1.0, 9.0], [0.0, 0.1, 0.2], [0.0, 0.2, 5.0]])
        >>> alloc = uniform_allocation(cost, error, budget=0.5)
        >>> alloc.choice.tolist(), alloc.info["level"]
        ([1, 1, 1], 1)
    """
    t0 = time.perf_counter()
    p = _prepare(cost, error, budget, weight, layer, forced, min_layer_density, error_cap, mask, names)
    G, O = p.cost.shape
    lv = np.arange(O) if level is None else np.asarray(level)
    if lv.shape != (O,):
        raise ValueError(f"level: expected shape ({O},), got {lv.shape}")
    fixed = p.forced >= 0
    best: tuple[float, float, Any, np.ndarray] | None = None
    lowest = np.inf
    for v in np.unique(lv):
        sel = p.ok & (lv == v)[None, :]
        sel[fixed] = p.ok[fixed]
        if not sel.any(axis=1).all():
            continue
        # least error at this level, the cheaper on ties
        choice = np.lexsort((np.where(sel, p.cost, np.inf), np.where(sel, p.error, np.inf)), axis=1)[:, 0]
        dens = p.density(choice)
        lowest = min(lowest, dens)
        if dens > p.budget + DENSITY_TOL or p.layer_shortfall(choice):
            continue
        total = p.total_error(choice)
        if best is None or (total, dens) < (best[0], best[1]):
            best = (total, dens, v, choice)
    if best is None:
        raise InfeasibleBudgetError(
            f"uniform allocation: no shared level meets budget {p.budget:.6g}; the lowest density a "
            f"shared level reaches is {lowest:.6g}"
            + (" (and the layer minimums)" if p.layers else "")
        )
    total, dens, v, choice = best
    return Allocation(
        choice=choice.astype(np.int64), total_error=total, density=dens, budget=p.budget, status="feasible",
        solver="uniform", solve_seconds=time.perf_counter() - t0,
        info={"level": v.item() if hasattr(v, "item") else v}
    )


def pareto_curve(
    cost: np.ndarray, error: np.ndarray, budgets: Sequence[float] | np.ndarray, *,
    level: np.ndarray | Sequence[float] | None = None, **kwargs: Any
) -> ParetoCurve:
    """Total error versus budget for :func:`solve_allocation` and :func:`uniform_allocation`.

    ``level`` goes to :func:`uniform_allocation`, ``kwargs`` to both (``solver``, ``gap_rel``, ``time_limit``,
    ``msg`` to :func:`solve_allocation` only). Budgets a method cannot meet give NaN.

    Example:
        >>> import numpy as np
        >>> cost = np.array([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1]])
        >>> error = np.array([[0.0, 1.0, 9.0], [0.0, 0.1, 0.2]])
        >>> curve = pareto_curve(cost, error, [0.05, 0.3, 1.0])
        >>> curve.ilp_error.tolist(), curve.uniform_error.tolist()
        ([nan, 1.2, 0.0], [nan, 9.2, 0.0])
    """
    solver_only = {"solver", "gap_rel", "time_limit", "msg"}
    ukw = {k: v for k, v in kwargs.items() if k not in solver_only}
    budgets = np.asarray(budgets, dtype=np.float64)
    out = np.full((4, len(budgets)), np.nan)
    status = []
    for i, b in enumerate(budgets):
        try:
            a = solve_allocation(cost, error, b, **kwargs)
            out[0, i], out[1, i] = a.density, a.total_error
            status.append(a.status)
        except InfeasibleBudgetError:
            status.append("infeasible")
        try:
            u = uniform_allocation(cost, error, b, level=level, **ukw)
            out[2, i], out[3, i] = u.density, u.total_error
        except InfeasibleBudgetError:
            pass
    return ParetoCurve(budgets, out[0], out[1], out[2], out[3], status)
