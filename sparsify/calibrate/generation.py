"""Calibration of a generation plan: measure every option on the model's own trajectory, allocate, emit a v2 recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LatencyTableError, SparsifyWarning
from .allocate import (PlanChoice, PlanProblem, least_reuse_error, predict_error, predict_time, solve_plan,
                       usv_entropy_plan)
from .config import CalibrationConfig
from .latency import LatencyTable, model_shape
from .plan_errors import (Trajectory, attention_entropy, interpolate, measured_steps, merge_errors, record_trajectory,
                         reuse_errors)

POLICIES = ("unified", "usv-entropy")


@dataclass
class PlanCalibration:
    """What `calibrate_plan` produced: the recipe, the problem, the choice and the predictions.

    Attributes:
        recipe: the version-2 recipe (per-head attention entries and the per-step `plan`).
        problem: the `PlanProblem` solved; `choice`: the `PlanChoice` taken.
        attention: the attention-only `CalibrationResult` the per-head options come from.
        policy: `unified` or `usv-entropy`.
        time_budget: the requested time as a fraction of dense.
        predicted_ms, dense_ms: predicted time of one generation with the plan and dense.
        predicted_error: `predict_error` of the choice.
        measured: the steps measured on the trajectory.
    """

    recipe: object
    problem: PlanProblem
    choice: PlanChoice
    attention: object
    policy: str
    time_budget: float
    predicted_ms: float
    dense_ms: float
    predicted_error: dict
    measured: list

    def summary(self) -> str:
        """A human-readable account of the plan: reused steps (and which extrapolate), merge ranges, densities,
        predicted time.

        Example:
            >>> # print(calibrate_plan(...).summary())
        """
        plan, p = self.recipe.plan, self.problem
        reused = [s for s, c in enumerate(plan.compute) if not c]
        extrapolated = [s for s in reused if plan.order[s]]
        lines = [f"generation plan ({self.policy}), time budget {self.time_budget:g} x dense:",
                 f"  predicted time {self.predicted_ms:.4g} ms per generation against {self.dense_ms:.4g} ms dense "
                 f"({self.predicted_ms / self.dense_ms:.3f} x dense, {self.dense_ms / self.predicted_ms:.2f}x faster)",
                 f"  steps: {plan.steps}, {len(reused)} reused: {reused or 'none'}",
                 f"  reused steps extrapolated from the last two computed (order 1): {len(extrapolated)} of "
                 f"{len(reused)}{f': {extrapolated}' if extrapolated else ''}"]
        merges = [m for m in plan.merge if m.ratio > 0]
        lines.append("  token merging: " + ("none" if not merges else "; ".join(
            f"blocks {','.join(map(str, m.blocks))} steps {m.from_step}-{m.to_step - 1} ratio {m.ratio:g}"
            for m in merges)))
        opts = self.attention.options
        for b in range(p.blocks):
            picked = [opts[int(o)] for o in self.choice.heads[p.head_block == b]]
            if picked:
                dens = ", ".join("dense" if o[0] == "dense" else f"{o[1]:g}@{'x'.join(map(str, o[0]))}" for o in picked)
                lines.append(f"  block {b} head densities: {dens}")
        e = self.predicted_error
        lines.append(f"  predicted error (sum over steps of relative squared output error): {e['total']:.4g} "
                     f"(attention {e['attention']:.4g}, merging {e['merge']:.4g}, reuse {e['reuse']:.4g})")
        return "\n".join(lines)


def _block_of(path: str) -> int:
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    raise ValueError(f"sparsify.calibrate: site '{path}' is not inside `blocks.<i>`: a generation plan needs every "
                     "self-attention site in a block")


def _groups(blocks: int, n: int) -> tuple[tuple[int, ...], ...]:
    """`n` groups of consecutive blocks, as even as possible."""
    n = max(1, min(n, blocks))
    edges = [round(i * blocks / n) for i in range(n + 1)]
    return tuple(tuple(range(edges[i], edges[i + 1])) for i in range(n))


def _ranges(steps: int, n: int) -> tuple[tuple[int, int], ...]:
    n = max(1, min(n, steps))
    edges = [round(i * steps / n) for i in range(n + 1)]
    return tuple((edges[i], edges[i + 1]) for i in range(n))


def build_problem(result, table: LatencyTable, reuse: np.ndarray, merge: np.ndarray, *, groups, ratios, ranges,
                  calls: int) -> PlanProblem:
    """The `PlanProblem` of an attention calibration `result`, a latency table and the step errors.

    `reuse` is `[S, A]` (order 0 only) or `[S, A, 2]` (orders 0 and 1: the problem takes the lesser error of each
    step and age and records its order, `allocate.least_reuse_error`); `merge` is `[groups, S, len(ratios)]`
    (ratios without 0). Head options whose tile the table lacks are left out, with one warning.

    Example:
        >>> # p = build_problem(res, table, reuse, merge, groups=((0, 1),), ratios=(0.25,), ranges=((0, 8),), calls=2)
    """
    missing_r = [r for r in ratios if r not in table.block_ms or r not in table.dense_attention_ms]
    if missing_r:
        raise LatencyTableError(f"merge ratio(s) {', '.join(f'{r:g}' for r in missing_r)} were not measured; measured: "
                                f"{', '.join(f'{r:g}' for r in table.ratios)} (choose --merge-ratios among them)",
                                source=table.meta.get("file"), key="ms.block")
    sites = result.sites
    heads_of = np.array([s.heads for s in sites])[result.layer]
    dense_att = table.dense_attention_ms[0.0]
    saving = np.zeros(result.error.shape)
    error = result.error.copy()
    lacking = set()
    for o, opt in enumerate(result.options):
        if opt[0] == "dense":
            continue
        if tuple(opt[0]) not in table.attention_ms:
            lacking.add("x".join(map(str, opt[0])))
            error[:, o] = np.inf
            continue
        saving[:, o] = (dense_att - table.attention_call_ms(opt[0], opt[1])) / heads_of
    if lacking:
        warnings.warn(f"sparsify.calibrate: the latency table has no times for tile(s) {', '.join(sorted(lacking))}; "
                      "heads do not use them", SparsifyWarning, stacklevel=2)
    R = (0.0, *ratios)
    reuse = np.asarray(reuse, dtype=np.float64)
    reuse, order = least_reuse_error(reuse) if reuse.ndim == 3 else (reuse, None)
    return PlanProblem(
        head_error=error, head_saving=saving, head_block=np.array([_block_of(sites[i].path) for i in result.layer]),
        reuse_error=reuse, reuse_order=order,
        merge_error=np.concatenate([np.zeros((merge.shape[0], merge.shape[1], 1)), merge], axis=2),
        groups=tuple(groups), ratios=R, ranges=tuple(ranges),
        block_ms=np.array([table.block_ms[r] for r in R]),
        kappa=np.array([table.dense_attention_ms[r] / dense_att for r in R]),
        outside_ms=table.outside_ms, blocks=table.shape.blocks, calls=calls)


def plan_candidates(config: CalibrationConfig, grid, table: LatencyTable) -> CalibrationConfig:
    """`config` with its head candidates fixed for a plan on `grid`: the defaults resolved on that grid (not on the
    small inputs of site discovery), and default tiles narrowed to those `table` has times for. Tiles and levels
    the config names are kept as they are (a tile the table lacks is left out of the plan with one warning).

    Example:
        >>> from sparsify.calibrate.latency import ModelShape
        >>> t = LatencyTable(ModelShape("M", 2, 2, 16, (4, 8, 8), 256, 1, "float32"), "cpu", forward_ms=10.0,
        ...                  block_ms={0.0: 4.0}, attention_ms={(1, 8, 8): {0.2: 1.0}}, dense_attention_ms={0.0: 2.0})
        >>> c = plan_candidates(CalibrationConfig(), (4, 8, 8), t)
        >>> c.tiles, c.levels
        (((1, 8, 8),), (0.2, 0.5))
    """
    tiles, levels = config.candidates(grid)
    if config.tiles is None:
        tiles = [t for t in tiles if tuple(t) in table.attention_ms] or tiles
    return config.replace(tiles=tiles, levels=levels)


def _check_reachable(table, candidates, method, time_budget, *, steps, max_age, groups, ranges, ratios, calls, policy,
                     solver) -> None:
    """Refuse an unreachable budget before measuring anything: the fastest plan depends on the times alone."""
    from types import SimpleNamespace

    from .allocate import fastest_plan

    tiles, levels = candidates
    heads, blocks = table.shape.heads, table.shape.blocks
    options = [("dense", None, None)] + [(tuple(t), float(d), method) for t in tiles for d in levels]
    sites = [SimpleNamespace(path=f"blocks.{b}", heads=heads) for b in range(blocks)]
    stub = SimpleNamespace(sites=sites, options=options, layer=np.repeat(np.arange(blocks), heads),
                           error=np.zeros((blocks * heads, len(options))))
    reuse = np.zeros((steps, max_age))
    for a in range(1, max_age + 1):
        reuse[:a, a - 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsifyWarning)  # a missing tile warns once, when the real problem is built
        p = build_problem(stub, table, reuse, np.zeros((len(groups), steps, len(ratios))), groups=groups,
                          ratios=ratios, ranges=ranges, calls=calls)
    if policy == "usv-entropy":  # no reuse: every step computes
        p.reuse_error[:] = np.nan
    fastest = fastest_plan(p, solver="auto" if solver == "lagrangian" else solver)
    if predict_time(p, fastest) > time_budget * p.dense_ms * (1 + 1e-6):
        from .allocate import _infeasible

        raise _infeasible(p, time_budget, fastest, "plan" if policy == "unified" else
                          "plan of any policy (usv-entropy's own sparsest plan may be slower)")


def _inputs_hash(*parts) -> str:
    """Identifies the trajectory the per-head errors are measured on (checkpoints of another are set aside)."""
    h = hashlib.sha256()
    for x in parts:
        h.update(x.detach().float().cpu().numpy().tobytes() if isinstance(x, torch.Tensor) else repr(x).encode())
    return "plan:" + h.hexdigest()[:16]


def _interpolated_reuse(measured: list[int], values: np.ndarray, steps: int) -> np.ndarray:
    """`[S, A, 2]`: each age's and order's errors (`reuse_errors`) interpolated over the steps old enough for
    them (NaN before): step a on for age a at order 0, step 2a + 1 on at order 1 (two computed steps before)."""
    A = values.shape[1]
    out = np.full((steps, A, 2), np.nan)
    for a in range(1, A + 1):
        for o, lo in ((0, a), (1, 2 * a + 1)):
            ok = [i for i, s in enumerate(measured) if s >= lo and np.isfinite(values[i, a - 1, o])]
            if ok and lo < steps:
                xs = [measured[i] for i in ok]
                out[lo:, a - 1, o] = np.interp(np.arange(lo, steps), xs, values[ok, a - 1, o])
    return out


def calibrate_plan(model, noise, cond, *, table: LatencyTable, time_budget: float, config: CalibrationConfig | None = None,
                   policy: str = "unified", steps: int = 50, measure: int = 6, attention_steps: int = 2,
                   guidance_scale: float = 5.0, shift: float = 1.0, null_cond=None, max_age: int = 3,
                   merge_groups: int = 4, step_ranges: int = 4, merge_ratios=(0.25, 0.5), gamma: float = 1.0,
                   gap_rel: float = 1e-3,
                   example_inputs=None, say=lambda msg: None) -> PlanCalibration:
    """Calibrate a generation plan of `model` for one time budget and return its version-2 recipe.

    On the model's own dense Euler trajectory from `noise` (`steps` steps, classifier-free guidance) it
    measures: every head's error per candidate (`run_calibration` at `attention_steps` steps, both guidance
    calls), the output error of reusing a step (ages 1..`max_age`, the last computed residual as it is and
    extrapolated from the last two: the plan's `order`) and of merging tokens around each group of blocks at
    each ratio, at `measure` steps (linearly interpolated to the others). Times come from `table`.
    The policy `unified` solves one ILP (`allocate.solve_plan`); `usv-entropy` allocates by attention entropy
    (`allocate.usv_entropy_plan`). The error and time models are those of `sparsify.calibrate.allocate`.

    Args:
        model: a diffusers Wan-style transformer on its device, not sparsified.
        noise, cond, guidance_scale, shift, null_cond: the sample (as for `sparsify.testbed.sample`).
        table: a latency table of this model and shape (`measure_latency_table`).
        time_budget: the generation's time as a fraction of dense (0.2: five times faster).
        config: the attention calibration's settings (candidates, solver, ...); its `budget` is not used. Default
            candidates are resolved on the generation's grid, tiles narrowed to those `table` timed
            (`plan_candidates`).
        policy: `unified` or `usv-entropy`.
        steps: the schedule's steps (the plan's `steps`; a schedule of another length is mapped by fraction).
        measure, attention_steps: steps measured for reuse/merging, and for the per-head errors.
        max_age: the most consecutive reused steps.
        merge_groups, step_ranges: blocks and steps are cut into this many consecutive groups and ranges; each
            (group, range) takes one merge ratio from `(0, *merge_ratios)`.
        gamma: the exponent of USV's entropy weight.
        gap_rel: the plan MILP's relative optimality gap (its time limit is `config.solver_time_limit`).
        example_inputs: small inputs for site discovery (default: the adapter's).
        say: a progress printer.

    Returns:
        A `PlanCalibration`.

    Raises:
        InfeasibleTimeBudgetError: no plan meets the budget (the message names the fastest time).
        LatencyTableError: the table was measured for another model or shape, or lacks a merge ratio.

    Example:
        >>> # pc = calibrate_plan(model, noise, cond, table=t, time_budget=0.2); pc.recipe.save("plan.yaml")
    """
    from .core import run_calibration, site_entries
    from ..recipe import RECIPE_VERSION
    from ..generation.plan import MergeRange, StepPlan

    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {', '.join(POLICIES)}")
    config = config or CalibrationConfig()
    blocks = len(model.blocks)
    groups, ranges = _groups(blocks, merge_groups), _ranges(steps, step_ranges)
    merge_ratios = tuple(sorted({float(r) for r in merge_ratios} - {0.0}))
    tile = table.merge_tile
    measured = measured_steps(steps, measure)
    keep = {c for s in measured for a in range(1, max_age + 1) for c in (s - a, s - 2 * a - 1) if c >= 0}
    first = {"hidden_states": noise, "timestep": torch.zeros(noise.shape[0], device=noise.device),
             "encoder_hidden_states": cond, "return_dict": False}
    shape = model_shape(model, first)
    table.check_shape(shape)
    config = plan_candidates(config, shape.grid, table)
    calls = 2 if guidance_scale != 1.0 else 1
    _check_reachable(table, config.candidates(shape.grid), config.methods[0], time_budget, steps=steps, max_age=max_age,
                     groups=groups, ranges=ranges, ratios=merge_ratios, calls=calls, policy=policy, solver=config.solver)
    say(f"dense trajectory: {steps} steps x {2 if guidance_scale != 1.0 else 1} calls")
    traj: Trajectory = record_trajectory(model, noise, cond, steps=steps, guidance_scale=guidance_scale, shift=shift,
                                         null_cond=null_cond, keep_residuals=keep)
    att_steps = sorted({min(steps - 1, int((i + 0.5) * steps / attention_steps)) for i in range(attention_steps)})
    say(f"per-head errors at steps {att_steps}")

    def forward_loop(m):
        for s in att_steps:
            traj.run(m, s)

    def output_loop(m):
        traj.run(m, att_steps[len(att_steps) // 2])

    result = run_calibration(model, forward_loop, config.replace(budget=1.0), example_inputs=example_inputs,
                             output_loop=output_loop, n_forwards=len(att_steps) * traj.calls_per_step,
                             inputs_hash=_inputs_hash(noise, cond, null_cond, steps, att_steps, guidance_scale, shift))
    merging = (f"merge errors ({len(groups)} groups x ratios {', '.join(f'{r:g}' for r in merge_ratios)})"
               if merge_ratios else "no merging")
    say(f"reuse errors (ages 1..{max_age}, orders 0 and 1) and {merging} at steps {measured}")
    reuse = _interpolated_reuse(measured, reuse_errors(model, traj, measured, max_age), steps)
    merge = interpolate(measured, merge_errors(model, traj, measured, groups, merge_ratios, tile).transpose(1, 0, 2),
                        steps).transpose(1, 0, 2) if merge_ratios else np.zeros((len(groups), steps, 0))
    p = build_problem(result, table, reuse, merge, groups=groups, ratios=merge_ratios, ranges=ranges,
                      calls=traj.calls_per_step)
    if policy == "unified":
        choice = solve_plan(p, time_budget, solver=config.solver if config.solver != "lagrangian" else "auto",
                            gap_rel=gap_rel, time_limit=config.solver_time_limit)
    else:
        say("attention entropy per block and step")
        ent = interpolate(measured, attention_entropy(model, traj, measured).T, steps).T
        dens = np.array([1.0 if o[0] == "dense" else o[1] for o in result.options])
        choice = usv_entropy_plan(p, ent, dens, time_budget, gamma=gamma)
    ratio = np.asarray(p.ratios)[choice.merge]
    plan = StepPlan(model=type(model).__name__, blocks=blocks, steps=steps, compute=tuple(bool(c) for c in choice.compute),
                    merge=tuple(MergeRange(tuple(groups[g]), lo, hi, float(ratio[g, k]))
                                for g in range(len(groups)) for k, (lo, hi) in enumerate(ranges) if ratio[g, k] > 0),
                    tile=tuple(tile), order=tuple(int(o) for o in choice.order_at(p)))
    t, e = predict_time(p, choice), predict_error(p, choice)
    cal = dict(result.recipe.calibration)
    for key in ("budget", "achieved_density", "predicted_error", "predicted_attention_speedup", "solver",
                "measured_output_error"):
        cal.pop(key, None)
    cal["plan"] = {"policy": policy, "time_budget": float(time_budget), "predicted_ms": round(t, 4),
                   "dense_ms": round(p.dense_ms, 4), "predicted_speedup": round(p.dense_ms / t, 3),
                   "predicted_error": e, "latency_table": {"device": table.device, **table.meta},
                   "trajectory": {"steps": steps, "guidance_scale": guidance_scale, "shift": shift,
                                  "measured_steps": measured, "attention_steps": att_steps},
                   "error_model": "additive proxy: sum over steps of relative squared model-output error "
                                  "(sparsify.calibrate.allocate)", **choice.info}
    recipe = dataclasses.replace(result.recipe, version=RECIPE_VERSION, plan=plan, calibration=cal,
                                 sites=site_entries(result.sites, result.options, choice.heads,
                                                    result.extras.get("veda")))
    return PlanCalibration(recipe, p, choice, result, policy, float(time_budget), t, p.dense_ms, e, measured)
