"""One allocation over (step, block, head): least predicted error under a time budget (an ILP), and USV's entropy policy.

The model (a design choice, kept simple and stated here once):

Time, in ms per generation, from a latency table (`calibrate.latency`)::

    T = calls * sum_s [ T_out + u_s * sum_b ( T_block(r_bs) - kappa(r_bs) * sum_{h in b} saving_h ) ]

`u_s` is 1 when step s computes (0: reuse, the blocks are skipped), `r_bs` the merge ratio of block b at step s,
`T_out` the forward's time outside its blocks, `T_block(r)` one block with dense attention at merge ratio r,
`saving_h` the attention time head h's option saves against dense (one call's saving shared equally by the
site's heads; negative where sparse attention is slower, as on a CPU), and `kappa(r)` the share of dense
attention time left after merging at r (the sparse saving is assumed to shrink in proportion). Dense is
`calls * steps * forward`.

Error, an additive proxy in units of the relative squared error of the model's output at one step::

    E = steps * sum_h e_h(option_h) + sum_{g, k} sum_{s in range k} e_merge(g, s, r_gk) + sum_{s reused} e_reuse(s, age_s)

`e_h` is the per-head model-output error the attention calibration measures (every step carries it: a
reused step repeats the residual of a sparse step); `e_merge(g, s, r)` the output error of merging the
blocks of group g at ratio r at step s alone; `e_reuse(s, a)` that of step s reusing the residual of step
s - a alone, at the better of its two orders (0: that residual as it is; 1: extrapolated from it and the
computed step before; `reuse_order` records which, and the plan emits it). Interactions between options are
ignored: errors add.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .solve import InfeasibleBudgetError, _pulp_solver, _silenced, available_solvers

__all__ = ["InfeasibleTimeBudgetError", "PlanChoice", "PlanProblem", "least_reuse_error", "predict_error",
           "predict_time", "solve_plan", "usv_entropy_plan"]


class InfeasibleTimeBudgetError(InfeasibleBudgetError):
    """No plan meets the time budget; ``fastest``: the fastest predicted time as a fraction of dense."""

    def __init__(self, message: str, fastest: float):
        super().__init__(message)
        self.fastest = fastest


@dataclass
class PlanProblem:
    """The options and their measured errors and costs (shapes: Gh heads, O options, S steps, A ages, Gm merge
    groups, R ratios with 0 first, K step ranges).

    Attributes:
        head_error: `[Gh, O]` output error of each head option at one step (option 0 dense, error 0).
        head_saving: `[Gh, O]` ms one call saves against dense attention with that option (option 0: 0).
        head_block: `[Gh]` the block of each head.
        reuse_error: `[S, A]`: column a - 1 is the error of step s reusing the residual of step s - a (NaN where
            impossible or not measured), at the order `reuse_order` names.
        merge_error: `[Gm, S, R]` error of merging group g at step s at `ratios[r]` (0 for ratio 0).
        groups: the blocks of each merge group.
        ratios: merge ratios, 0 first.
        ranges: `[from, to)` step ranges, each with one merge ratio per group.
        block_ms, kappa: `[R]` one block's time, and the share of dense attention time left, per ratio.
        outside_ms: one forward's time outside its blocks.
        blocks, calls: blocks of the model; denoiser calls per step (2 with classifier-free guidance).
        reuse_order: `[S, A]` the reuse order (0 or 1, `StepPlan.order`) of each `reuse_error` entry; None: all 0.
    """

    head_error: np.ndarray
    head_saving: np.ndarray
    head_block: np.ndarray
    reuse_error: np.ndarray
    merge_error: np.ndarray
    groups: tuple
    ratios: tuple
    ranges: tuple
    block_ms: np.ndarray
    kappa: np.ndarray
    outside_ms: float
    blocks: int
    calls: int = 1
    reuse_order: np.ndarray | None = None

    def __post_init__(self):
        if self.reuse_order is None:
            self.reuse_order = np.zeros(self.reuse_error.shape, dtype=np.int64)

    @property
    def steps(self) -> int:
        return self.reuse_error.shape[0]

    @property
    def max_age(self) -> int:
        return self.reuse_error.shape[1]

    @property
    def dense_ms(self) -> float:
        """One dense generation: every step computed, nothing merged, every head dense."""
        return self.calls * self.steps * (self.outside_ms + self.blocks * float(self.block_ms[0]))

    def group_of(self) -> np.ndarray:
        """`[blocks]` the merge group of each block (-1: never merged)."""
        out = np.full(self.blocks, -1)
        for g, bl in enumerate(self.groups):
            out[list(bl)] = g
        return out

    def range_of(self) -> np.ndarray:
        """`[S]` the step range of each step."""
        out = np.zeros(self.steps, dtype=np.int64)
        for k, (lo, hi) in enumerate(self.ranges):
            out[lo:hi] = k
        return out


def least_reuse_error(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(error, order)`, each `[S, A]`, of reuse errors `[S, A, 2]` measured at orders 0 and 1: per (step, age)
    the least error over the orders measured (NaN ones skipped; a tie keeps order 0) and its order.

    Example:
        >>> e = np.array([[[0.5, 0.2], [0.4, np.nan], [np.nan, np.nan]]])
        >>> err, order = least_reuse_error(e)
        >>> err.tolist(), order.tolist()
        ([[0.2, 0.4, nan]], [[1, 0, 0]])
    """
    errors = np.asarray(errors, dtype=np.float64)
    first = np.isfinite(errors[..., 1]) & ~(errors[..., 1] >= errors[..., 0])  # lower, or order 0 not measured
    return np.where(first, errors[..., 1], errors[..., 0]), first.astype(np.int64)


@dataclass
class PlanChoice:
    """One option per head, a compute flag per step and a ratio index per (merge group, step range)."""

    heads: np.ndarray
    compute: np.ndarray
    merge: np.ndarray
    info: dict = field(default_factory=dict)

    def ratio_at(self, p: PlanProblem) -> np.ndarray:
        """`[blocks, S]` the merge ratio index of every block at every step."""
        grp, rng = p.group_of(), p.range_of()
        out = np.zeros((p.blocks, p.steps), dtype=np.int64)
        for b in range(p.blocks):
            if grp[b] >= 0:
                out[b] = self.merge[grp[b], rng]
        return out

    def order_at(self, p: PlanProblem) -> np.ndarray:
        """`[S]` the reuse order of every step (`p.reuse_order` at its age since the last computed step; 0 where
        the step computes): the plan's `order`.

        Example:
            >>> p = _toy_problem()
            >>> p.reuse_order[2, 0] = 1
            >>> PlanChoice(np.zeros(2, int), np.array([1, 1, 0, 1], bool), np.zeros((1, 1), int)).order_at(p).tolist()
            [0, 0, 1, 0]
        """
        ages = _ages(self.compute)
        return np.array([int(p.reuse_order[s, a - 1]) if 0 < a <= p.max_age else 0 for s, a in enumerate(ages)],
                        dtype=np.int64)


def _block_savings(p: PlanProblem, heads: np.ndarray) -> np.ndarray:
    """`[blocks]` attention ms saved per call in each block by the heads' options."""
    out = np.zeros(p.blocks)
    np.add.at(out, p.head_block, p.head_saving[np.arange(len(heads)), heads])
    return out


def predict_time(p: PlanProblem, c: PlanChoice) -> float:
    """Predicted ms of one generation under the plan (the module docstring's time model).

    Example:
        >>> p = _toy_problem()
        >>> c = PlanChoice(np.zeros(2, int), np.ones(4, bool), np.zeros((1, 1), int))
        >>> predict_time(p, c) == p.dense_ms
        True
    """
    r = c.ratio_at(p)
    saving = _block_savings(p, c.heads)
    per_step = p.outside_ms + (p.block_ms[r] - p.kappa[r] * saving[:, None]).sum(0) * np.asarray(c.compute, float)
    return float(p.calls * per_step.sum())


def _ages(compute) -> np.ndarray:
    """`[S]` steps since the last computed step (0 where the step computes)."""
    out, last = np.zeros(len(compute), dtype=np.int64), 0
    for s, u in enumerate(compute):
        last = s if u else last
        out[s] = s - last
    return out


def predict_error(p: PlanProblem, c: PlanChoice) -> dict[str, float]:
    """The predicted error of the plan, by part: `attention`, `merge`, `reuse` and their `total`.

    Example:
        >>> p = _toy_problem()
        >>> predict_error(p, PlanChoice(np.array([1, 0]), np.array([1, 0, 1, 1], bool), np.zeros((1, 1), int)))
        {'attention': 0.4, 'merge': 0.0, 'reuse': 0.5, 'total': 0.9}
    """
    att = p.steps * float(p.head_error[np.arange(len(c.heads)), c.heads].sum())
    rng = p.range_of()
    merge = sum(float(p.merge_error[g, rng == k, c.merge[g, k]].sum())
                for g in range(len(p.groups)) for k in range(len(p.ranges)))
    ages = _ages(c.compute)
    reuse = float(sum(p.reuse_error[s, a - 1] for s, a in enumerate(ages) if a > 0))
    return {"attention": round(att, 12), "merge": round(merge, 12), "reuse": round(reuse, 12),
            "total": round(att + merge + reuse, 12)}


def _pareto(err: np.ndarray, saving: np.ndarray) -> list[list[int]]:
    """Per head, the options not dominated (another option saves at least as much with less error)."""
    out = []
    for e, s in zip(err, saving):
        keep, best = [], np.inf
        for o in np.lexsort((e, -s)):  # most saving first, then least error
            if np.isfinite(e[o]) and e[o] < best:
                keep.append(int(o))
                best = e[o]
        out.append(keep)
    return out


def _model(p: PlanProblem, objective: str, time_limit_ms: float | None):
    """The MILP: binaries per head option, per step (compute) and per (group, range, ratio)."""
    import pulp

    S, R, A = p.steps, len(p.ratios), p.max_age
    grp, rng = p.group_of(), p.range_of()
    prob = pulp.LpProblem("sparsify_plan", pulp.LpMinimize)
    var = prob.add_variable
    keep = _pareto(p.head_error, p.head_saving)
    x = [{o: var(f"x_{h}_{o}", 0, 1, pulp.LpBinary) for o in opts} for h, opts in enumerate(keep)]
    for h, xs in enumerate(x):
        prob += pulp.lpSum(xs.values()) == 1, f"head_{h}"
    u = [var(f"u_{s}", 0, 1, pulp.LpBinary) for s in range(S)]
    prob += u[0] == 1, "first_step_computes"  # (pulp resets a binary's bounds to [0, 1])
    m = [[[var(f"m_{g}_{k}_{r}", 0, 1, pulp.LpBinary) for r in range(R)] for k in range(len(p.ranges))]
         for g in range(len(p.groups))]
    for g in range(len(p.groups)):
        for k in range(len(p.ranges)):
            prob += pulp.lpSum(m[g][k]) == 1, f"merge_{g}_{k}"
    # y[g][s][r] = u_s AND m[g][k(s)][r]
    y = [[[var(f"y_{g}_{s}_{r}", 0, 1) for r in range(R)] for s in range(S)] for g in range(len(p.groups))]
    for g in range(len(p.groups)):
        for s in range(S):
            for r in range(R):
                mm = m[g][rng[s]][r]
                prob += y[g][s][r] <= u[s]
                prob += y[g][s][r] <= mm
                prob += y[g][s][r] >= u[s] + mm - 1
    # z[b][s] = u_s * kappa(r_bs) * A_b, A_b the block's attention saving (linearized with big-M)
    big = [float(p.kappa.max()) * sum(float(np.abs(p.head_saving[h]).max()) for h in np.flatnonzero(p.head_block == b))
           + 1e-9 for b in range(p.blocks)]
    block_save = [var(f"a_{b}", -big[b], big[b]) for b in range(p.blocks)]  # one variable: short z rows
    for b in range(p.blocks):
        prob += block_save[b] == pulp.lpSum(float(p.head_saving[h, o]) * v for h in np.flatnonzero(p.head_block == b)
                                            for o, v in x[h].items()), f"saving_{b}"
    amax = [max(0.0, sum(float(p.head_saving[h].max()) for h in np.flatnonzero(p.head_block == b)))
            for b in range(p.blocks)]  # the most a block's heads can save: a tighter bound on z than big-M alone
    block_time = []
    for b in range(p.blocks):
        for s in range(S):
            z = var(f"z_{b}_{s}", -big[b], big[b])
            if grp[b] < 0:
                prob += z <= float(p.kappa[0]) * block_save[b] + big[b] * (1 - u[s])
                prob += z <= float(p.kappa[0]) * amax[b] * u[s]
                block_time.append(float(p.block_ms[0]) * u[s] - z)
                continue
            ys = y[grp[b]][s]
            for r in range(R):
                prob += z <= float(p.kappa[r]) * block_save[b] + 2 * big[b] * (1 - ys[r])
            prob += z <= pulp.lpSum(float(p.kappa[r]) * amax[b] * ys[r] for r in range(R))
            block_time.append(pulp.lpSum(float(p.block_ms[r]) * ys[r] for r in range(R)) - z)
    total_time = p.calls * (S * p.outside_ms + pulp.lpSum(block_time))
    # reuse runs as paths: q[s, a] = 1 when step s reuses the residual of step s - a. Step s reuses at exactly one
    # age or computes; age 1 needs step s - 1 computed, age a > 1 needs step s - 1 reused at age a - 1. Ages
    # above A, or with no measured error, have no variable, so runs stay within them.
    q = {}
    for s in range(1, S):
        for a in range(1, min(A, s) + 1):
            if np.isfinite(p.reuse_error[s, a - 1]) and (a == 1 or (s - 1, a - 1) in q):
                q[s, a] = var(f"q_{s}_{a}", 0, 1)
                prob += q[s, a] <= (u[s - 1] if a == 1 else q[s - 1, a - 1])
        prob += pulp.lpSum(q[s, a] for a in range(1, A + 1) if (s, a) in q) == 1 - u[s], f"reuse_{s}"
    head_err = p.steps * pulp.lpSum(float(p.head_error[h, o]) * v for h in range(len(x)) for o, v in x[h].items())
    merge_err = pulp.lpSum(float(p.merge_error[g, rng == k, r].sum()) * m[g][k][r]
                           for g in range(len(p.groups)) for k in range(len(p.ranges)) for r in range(R))
    reuse_err = pulp.lpSum(float(p.reuse_error[s, a - 1]) * v for (s, a), v in q.items())
    if objective == "time":
        prob += total_time
    else:
        errs = np.concatenate([p.head_error[np.isfinite(p.head_error)].ravel() * p.steps,
                               p.merge_error.sum(1).ravel(), p.reuse_error[np.isfinite(p.reuse_error)].ravel()])
        scale = float(errs.max()) if errs.size and errs.max() > 0 else 1.0  # coefficients in [0, 1]
        prob += (head_err + merge_err + reuse_err) * (1.0 / scale)
        prob += total_time <= time_limit_ms, "time_budget"

    def read() -> PlanChoice:
        heads = np.array([max(xs, key=lambda o: xs[o].varValue or 0.0) for xs in x], dtype=np.int64)
        compute = np.array([(v.varValue or 0.0) > 0.5 for v in u])
        merge = np.array([[int(np.argmax([v.varValue or 0.0 for v in mk])) for mk in mg] for mg in m],
                         dtype=np.int64).reshape(len(p.groups), len(p.ranges))
        return PlanChoice(heads, compute, merge)

    return prob, read


def _solve(prob, solver: str, gap_rel: float, time_limit: float, msg: bool) -> int:
    """Solve with HiGHS (else CBC) through pulp: the solution status, 0 when there is no solution."""
    import pulp

    name = _solver_name(solver)
    if name not in ("highs", "cbc") or name not in available_solvers():
        raise RuntimeError(f"the plan's allocation needs the MILP solvers of pulp (highs or cbc); available here: "
                           f"{', '.join(available_solvers())} (pip install \"sparsify[calibrate]\")")
    with _silenced(not msg):
        prob.solve(_pulp_solver(name, msg=msg, gap_rel=gap_rel, time_limit=time_limit))
    return prob.sol_status if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible) else 0


def _solver_name(solver: str) -> str:
    return available_solvers()[0] if solver == "auto" else solver


def fastest_plan(p: PlanProblem, *, solver: str = "auto", time_limit: float = 60.0) -> PlanChoice:
    """The plan of least predicted time (what a time budget below it cannot reach).

    Example:
        >>> p = _toy_problem()
        >>> round(predict_time(p, fastest_plan(p)) / p.dense_ms, 3)
        0.438
    """
    prob, read = _model(p, "time", None)
    if not _solve(prob, solver, 1e-6, time_limit, False):
        raise RuntimeError("the solver found no plan at all (this is a bug: an all-dense plan always exists)")
    return read()


def _infeasible(p: PlanProblem, time_budget: float, fastest: PlanChoice, what: str) -> InfeasibleTimeBudgetError:
    f = predict_time(p, fastest) / p.dense_ms
    return InfeasibleTimeBudgetError(
        f"time budget {time_budget:g} is infeasible: the fastest {what} is {f:.4g} x dense "
        f"({predict_time(p, fastest):.4g} ms against {p.dense_ms:.4g} ms per generation); use --time-budget "
        f"{np.ceil(f * 1000) / 1000:g} or more, or allow more: a larger --max-reuse-age, higher --merge-ratios, "
        "lower --levels", fastest=f)


def solve_plan(p: PlanProblem, time_budget: float, *, solver: str = "auto", gap_rel: float = 1e-4,
               time_limit: float = 60.0, msg: bool = False) -> PlanChoice:
    """The plan of least predicted error whose predicted time is at most `time_budget` x dense.

    One MILP (pulp, solved by HiGHS, else CBC) over per-head options, per-step compute flags and per
    (merge group, step range) ratios, with the time and error of the module docstring; products of binaries
    are linearized exactly (AND constraints, big-M).

    Args:
        p: the problem.
        time_budget: the generation's time as a fraction of dense (0.2: five times faster).
        solver: `auto`, `highs` or `cbc`.
        gap_rel, time_limit, msg: the MILP's relative gap, seconds, and whether it prints its log.

    Raises:
        InfeasibleTimeBudgetError: no plan is that fast (the message names the fastest one's time).

    Example:
        >>> p = _toy_problem()
        >>> c = solve_plan(p, 0.6)
        >>> c.heads.tolist(), c.compute.tolist(), c.merge.tolist()
        ([1, 0], [True, False, True, False], [[0]])
    """
    if not 0 < time_budget <= 1e9:
        raise ValueError(f"time_budget must be > 0 (a fraction of dense time, e.g. 0.2); got {time_budget!r}")
    t0 = time.perf_counter()
    prob, read = _model(p, "error", time_budget * p.dense_ms)
    status = _solve(prob, solver, gap_rel, time_limit, msg)
    choice = read() if status else None
    if choice is None or predict_time(p, choice) > time_budget * p.dense_ms * (1 + 1e-6):
        raise _infeasible(p, time_budget, fastest_plan(p, solver=solver, time_limit=time_limit), "plan")
    import pulp

    how = f"optimal within gap {gap_rel:g}" if status == pulp.LpSolutionOptimal else \
        f"feasible: stopped at the {time_limit:g} s time limit before proving the gap"
    choice.info = {"solver": f"{_solver_name(solver)} ({how})",
                   "solve_seconds": round(time.perf_counter() - t0, 3), "variables": len(prob.variables())}
    return choice


def usv_entropy_plan(p: PlanProblem, entropy: np.ndarray, head_density: np.ndarray, time_budget: float, *,
                     gamma: float = 1.0, grid: int = 201) -> PlanChoice:
    """USV's entropy-aware policy on the same options: the baseline the ILP is measured against.

    Normalized attention entropy h per (block, step) gives a weight (1 - h)^gamma, scaled to mean 1; a
    global sparsity sigma becomes sigma * weight per (block, step), clipped to [0, 1]. The same schedule sets
    attention and token sparsity: each block's heads take the option whose density is nearest to
    1 - (the block's mean sparsity over steps) (least error among tiles at that density; densities are per
    head and fixed over steps in a recipe), and each (merge group, step range) the ratio nearest to
    max ratio x (its mean sparsity). Every step computes (USV removes steps by distillation, not reuse).
    The smallest sigma on a grid of `grid` values whose predicted time meets the budget is returned.

    Args:
        p: the problem.
        entropy: `[blocks, S]` normalized attention entropy in [0, 1].
        head_density: `[O]` the density of each head option (1.0 for dense).
        time_budget: as for `solve_plan`.
        gamma: the exponent of the weight.

    Raises:
        InfeasibleTimeBudgetError: even sigma = 1 is slower than the budget (its time is named).

    Example:
        >>> p = _toy_problem()
        >>> c = usv_entropy_plan(p, np.array([[0.2] * 4]), np.array([1.0, 0.1]), 0.9)
        >>> c.heads.tolist(), bool(c.compute.all()), c.info["sigma"]
        ([1, 1], True, 0.455)
    """
    w = (1.0 - np.clip(np.nan_to_num(np.asarray(entropy, float), nan=0.5), 0.0, 1.0)) ** gamma
    w = w / max(float(w.mean()), 1e-12)
    dens = np.asarray(head_density, float)
    rmax = max(p.ratios)
    rng = p.range_of()
    last = None
    for sigma in np.linspace(0.0, 1.0, grid):
        sp = np.clip(sigma * w, 0.0, 1.0)
        heads = np.zeros(len(p.head_block), dtype=np.int64)
        for h, b in enumerate(p.head_block):
            gap = np.abs(dens - (1.0 - sp[b].mean()))
            near = np.flatnonzero(np.isclose(gap, gap.min()) & np.isfinite(p.head_error[h]))
            heads[h] = near[np.argmin(p.head_error[h, near])] if near.size else 0
        merge = np.zeros((len(p.groups), len(p.ranges)), dtype=np.int64)
        for g, bl in enumerate(p.groups):
            for k in range(len(p.ranges)):
                target = rmax * float(sp[list(bl)][:, rng == k].mean())
                merge[g, k] = int(np.argmin(np.abs(np.asarray(p.ratios) - target)))
        last = PlanChoice(heads, np.ones(p.steps, bool), merge, {"sigma": float(sigma), "gamma": gamma})
        if predict_time(p, last) <= time_budget * p.dense_ms * (1 + 1e-9):
            return last
    raise _infeasible(p, time_budget, last, "usv-entropy plan (sigma = 1: the sparsest it allocates)")


def _toy_problem() -> PlanProblem:
    """Two heads in one block, four steps, one merge group and range (the docstring examples' problem)."""
    return PlanProblem(
        head_error=np.array([[0.0, 0.1], [0.0, 0.3]]), head_saving=np.array([[0.0, 1.0], [0.0, 1.0]]),
        head_block=np.array([0, 0]),
        reuse_error=np.array([[np.nan], [0.5], [0.8], [2.0]]), merge_error=np.array([[[0.0, 5.0]] * 4]),
        groups=((0,),), ratios=(0.0, 0.5), ranges=((0, 4),), block_ms=np.array([6.0, 4.0]),
        kappa=np.array([1.0, 0.5]), outside_ms=2.0, blocks=1, calls=1)
