"""The calibration pipeline: capture candidates on the dense model, solve the budget ILP, emit the recipe."""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..api import SPARSE_KINDS, find_sites
from ..passes.discover import import_bound_modules
from ..passes.install import install, uninstall
from .. import runtime
from ..recipe import RECIPE_VERSION, Budget, Defaults, HeadConfig, HeadEntry, ModelSignature, Recipe, SiteEntry
from .capture import Capture
from .config import DEFAULT_LEVELS, DEFAULT_TILES, CalibrationConfig, CalibrationConfigError
from .solve import InfeasibleBudgetError, solve_allocation

__all__ = ["CalibrationResult", "calibrate", "run_calibration", "DEFAULT_LEVELS", "DEFAULT_TILES"]


class Progress:
    """A one-line progress report with ETA on stderr (no dependency), updated per measured site."""

    def __init__(self, total: int | None, label: str = "calibrate", stream=None, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def update(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        if self.total:
            eta = el / self.done * (self.total - self.done)
            msg = f"\r[{self.label}] {self.done}/{self.total} site calls  {el:5.1f}s elapsed  ETA {eta:5.1f}s  {what[:40]:40s}"
        else:
            msg = f"\r[{self.label}] {self.done} site calls  {el:5.1f}s elapsed  {what[:40]:40s}"
        self.stream.write(msg)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")


@dataclass
class CalibrationResult:
    """Everything a calibration produced: the recipe, the solver's allocation and the measurements.

    Attributes:
        recipe: the emitted Recipe (per-site, per-head entries plus provenance).
        sites: SiteInfo of the calibrated sites, in group order (one group per head).
        options: `("dense", None, None)` then `(tile, density, method)` per candidate; option index per
            head in `choice`.
        cost, error: `[G, O]` matrices given to the solver (G = total heads).
        weight: `[G]` dense attention work per head.
        choice: `[G]` chosen option per head.
        layer: `[G]` site index of each head.
        allocation: the solver's Allocation.
        config: the CalibrationConfig of the run.
        attention_error: `[G, O]` each head's share of its site's relative squared attention-output error
            (`error` before the per-site model-output scaling).
    """

    recipe: Recipe
    sites: list
    options: list
    cost: np.ndarray
    error: np.ndarray
    weight: np.ndarray
    layer: np.ndarray
    allocation: object
    capture_seconds: float = 0.0
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    attention_error: np.ndarray | None = None
    extras: dict = field(default_factory=dict)

    @property
    def choice(self) -> np.ndarray:
        return self.allocation.choice


def _problem(infos, results, cands, levels, work=None):
    """Build the [G, O] cost and error matrices: option 0 is dense, then every (method, tile) x level. A head's
    weight is its site's dense attention work per call, `work[path]` (sequences times squared length, which
    counts a factorized site's folded frames or pixels), else the squared sequence length."""
    options = [("dense", None, None)] + [(tuple(t), float(d), m) for m, t in cands for d in levels]
    costs, errors, weights, layers, names = [], [], [], [], []
    for si, info in enumerate(infos):
        m = results[info.path]
        rel = m.relative_error().numpy()  # [H, T, L]
        share = m.head_share().numpy()
        for h in range(info.heads):
            costs.append(np.concatenate([[1.0], m.cost.numpy().reshape(-1)]))
            errors.append(np.concatenate([[0.0], (rel[h] * share[h]).reshape(-1)]))
            weights.append(float((work or {}).get(info.path, float(info.q_len) ** 2)))
            layers.append(si)
            names.append(f"{info.path}.heads[{h}]")
    return options, np.array(costs), np.array(errors), np.array(weights), np.array(layers), names


def _run_outputs(model, output_loop):
    """Final outputs of `model` over `output_loop` (float32 copies)."""
    outputs: list = []

    def keep(mod, args, out):
        o = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        outputs.append(o.detach().float().clone())

    handle = model.register_forward_hook(keep)
    try:
        with torch.no_grad():
            output_loop(model)
    finally:
        handle.remove()
    return outputs


def model_output_error(model, all_infos, adapter, configs: dict, output_loop, dense) -> float:
    """Relative squared error of the model's outputs with `configs` ({site path: [HeadConfig]}) against `dense`."""
    infos = {i.path: i for i in all_infos}
    states = [runtime.SiteState(site_id=runtime.STATE.new_id(), path=p, kind=infos[p].kind, heads=infos[p].heads,
                                head_dim=infos[p].head_dim, configs=list(c), axis=infos[p].axis)
              for p, c in configs.items()]
    inst = install(model, all_infos, states, None, adapter, import_bound_modules(all_infos))
    try:
        outs = _run_outputs(model, output_loop)
    finally:
        uninstall(model, inst)
    err = sum(float(((o - d) ** 2).sum()) for o, d in zip(outs, dense))
    return err / max(sum(float((d ** 2).sum()) for d in dense), 1e-30)


def _veda_params(veda, path, tile, method, head):
    """Recipe params of a Veda head: its site's fitted estimator for `tile` (None for other methods)."""
    from ..methods.veda import Veda

    est = (veda or {}).get((path, tuple(tile))) if method == "veda" else None
    return Veda.head_params(est, head) if est is not None else None


def choice_configs(result: "CalibrationResult", choice) -> dict:
    """Per-site head configs `{path: [HeadConfig]}` of an option choice (e.g. a solver's `Allocation.choice`)."""
    recipe = Recipe(sites=site_entries(result.sites, result.options, choice, result.extras.get("veda")))
    return {info.path: recipe.head_configs(info.path, info.heads) for info in result.sites}


def _output_scales(model, all_infos, infos, adapter, results, cands, levels, output_loop, ref_density, progress,
                   veda=None):
    """HASTE's model-output error, per site: scale each site's attention-error surrogate to it.

    For each site, every head is made sparse at `ref_density` with its best tile (all other sites dense),
    `output_loop` runs, and the relative squared error of the model's final output against dense
    gives `alpha = output_error / predicted attention error` for that site.
    """
    dense = _run_outputs(model, output_loop)
    li = int(np.argmin([abs(x - ref_density) for x in levels]))
    alphas, measured = [], []
    for info in infos:
        rel = results[info.path].relative_error()
        share = results[info.path].head_share()
        best = rel[:, :, li].argmin(1)
        configs = [HeadConfig(method=cands[int(best[h])][0], tile=tuple(cands[int(best[h])][1]),
                              budget=Budget(density=levels[li]),
                              params=_veda_params(veda, info.path, cands[int(best[h])][1], cands[int(best[h])][0], h))
                   for h in range(info.heads)]
        err = model_output_error(model, all_infos, adapter, {info.path: configs}, output_loop, dense)
        pred = float((rel[torch.arange(info.heads), best, li] * share).sum())
        alphas.append(err / pred if pred > 0 else 1.0)
        measured.append(err)
        if progress is not None:
            progress.update(f"output error {info.path}")
    return np.array(alphas), np.array(measured), levels[li], dense


def site_entries(infos, options, choice, veda=None) -> dict:
    """`{site path: SiteEntry}` with one entry per head for the option `choice[g]` of every head g (in site order)."""
    sites = {}
    g = 0
    for info in infos:
        heads = []
        for h in range(info.heads):
            opt = options[int(choice[g])]
            g += 1
            if opt[0] == "dense":
                heads.append(HeadEntry(head=h, enable=False))
            else:
                heads.append(HeadEntry(head=h, method=opt[2], tile=opt[0], budget=Budget(density=opt[1]),
                                       params=_veda_params(veda, info.path, opt[0], opt[2], h)))
        sites[info.path] = SiteEntry(heads=tuple(heads))
    return sites


def _emit(model, all_infos, infos, options, choice, *, budget, defaults_tile, default_method, dense_steps, provenance,
          veda=None):
    """Recipe with explicit per-head entries for every calibrated site (Veda heads carry their fitted estimator)."""
    sites = site_entries(infos, options, choice, veda)
    sig = ModelSignature(type(model).__name__, tuple(i.spec() for i in all_infos))
    defaults = Defaults(method=default_method, tile=defaults_tile, budget=Budget(density=budget), dense_steps=dense_steps)
    return Recipe(version=RECIPE_VERSION, model=sig, defaults=defaults, sites=sites, calibration=provenance)


def _calibration_grid(model, adapter, example_inputs, grid):
    """The (T, H, W) token grid of `example_inputs` (where `tiles=None`/`levels=None` are resolved)."""
    from ..passes.discover import _split_inputs

    if grid is not None and not callable(grid):
        return tuple(grid)
    inputs = adapter.example_inputs(model) if example_inputs is None else example_inputs
    args, kwargs = _split_inputs(inputs)
    return tuple(adapter.geometry(model, args, kwargs).grid)


def _infeasible(e: InfeasibleBudgetError, config: CalibrationConfig, tiles, levels) -> InfeasibleBudgetError:
    """The solver's infeasibility, restated in the config's terms: the minimum feasible budget and what to change."""
    if e.min_density is None:  # the layer minimums, not the budget, are the obstacle
        return InfeasibleBudgetError(f"sparsify.calibrate: {e}; lower min_layer_density (--min-layer-density) or "
                                     f"raise budget (--budget, now {config.budget:g})")
    lo = e.min_density
    dense = f", {len(config.dense_layers)} dense layer(s)" if config.dense_layers else ""
    return InfeasibleBudgetError(
        f"sparsify.calibrate: budget {config.budget:g} is infeasible: the lowest density these candidates reach is "
        f"{lo:.4g} (every head at its sparsest candidate: tiles {', '.join('x'.join(map(str, t)) for t in tiles)}, "
        f"levels {', '.join(f'{x:g}' for x in levels)}{dense}). Use budget >= {math.ceil(lo * 1000) / 1000:g} "
        "(--budget), or make sparser candidates reachable: lower levels (--levels), fewer dense layers "
        "(--dense-layers) or a larger token grid (--grid), on which one key tile is a smaller share",
        min_density=lo)


def run_calibration(model, forward_loop, config: CalibrationConfig | None = None, *, example_inputs=None, grid=None,
                    video_start: int = 0, adapter=None, output_loop=None, n_forwards: int | None = None,
                    inputs_hash: str = "", **overrides) -> CalibrationResult:
    """Calibrate `model` under `config` and return the full result (recipe, allocation, measurements).

    Args:
        model: the DiT (any model `sparsify()` accepts).
        forward_loop: `forward_loop(model)` runs the calibration forwards (inputs x denoising steps).
        config: a `CalibrationConfig` (default: `CalibrationConfig()`).
        example_inputs, grid, video_start, adapter: as for `sparsify()`; `example_inputs` also sets the grid
            on which `config.tiles=None` / `config.levels=None` are resolved (see `CalibrationConfig.candidates`).
        output_loop: the forwards of the per-site model-output error (default: `forward_loop`; one input
            is usually enough).
        n_forwards: how many forwards `forward_loop` makes (for the progress ETA).
        inputs_hash: identifies the calibration inputs; checkpoints of other inputs are set aside.
        **overrides: `CalibrationConfig` fields, applied over `config` (e.g. `budget=0.05`).

    Returns:
        A `CalibrationResult`.

    Raises:
        CalibrationConfigError: an invalid config field or an unknown keyword.
        InfeasibleBudgetError: no allocation meets the budget; the message gives the lowest feasible
            budget and the options that would lower it.

    Example:
        >>> # res = run_calibration(model, loop, CalibrationConfig(budget=0.05), example_inputs=x)
        >>> # res.allocation.density <= 0.05, res.recipe.save("my.yaml")
    """
    config = (config or CalibrationConfig()).replace(**overrides) if overrides else (config or CalibrationConfig())
    clock = {"start": time.perf_counter()}
    say = (lambda msg: print(f"sparsify.calibrate: {msg}", file=sys.stderr)) if config.verbose else (lambda msg: None)
    all_infos, adapter = find_sites(model, example_inputs, grid=grid, video_start=video_start, adapter=adapter)
    infos = [i for i in all_infos if i.kind in SPARSE_KINDS]
    if not infos:
        raise ValueError(
            f"sparsify.calibrate: {type(model).__name__} has no self- or joint-attention site to calibrate "
            f"(found: {', '.join(f'{i.path} ({i.kind})' for i in all_infos) or 'no attention at all'})")
    bad = [i for i in config.dense_layers if i >= len(infos)]
    if bad:
        raise CalibrationConfigError(f"CalibrationConfig.dense_layers={list(config.dense_layers)} is invalid: "
                                     f"the model has {len(infos)} self/joint sites (indices 0..{len(infos) - 1})")
    clock["discovery"] = time.perf_counter()
    tiles, levels = config.candidates(_calibration_grid(model, adapter, example_inputs, grid))
    tiles, levels, methods = [tuple(t) for t in tiles], list(levels), list(config.methods)
    cands = [(m, t) for m in methods for t in tiles]
    # every site installed as dense: the model computes exactly its dense output while we observe
    states = [runtime.SiteState(site_id=runtime.STATE.new_id(), path=i.path, kind=i.kind, heads=i.heads,
                                head_dim=i.head_dim, configs=[HeadConfig(method="dense")] * i.heads, index=n,
                                axis=i.axis)
              for n, i in enumerate(infos)]
    config_key = repr((type(model).__name__, [(i.path, i.heads) + ((i.axis,) if i.axis != "full" else ()) for i in infos],
                       tiles, levels, methods,
                       config.query_fraction, inputs_hash))
    ckpt = config.checkpoint_dir
    bar = Progress(len(infos) * n_forwards if n_forwards else None, enabled=config.progress)
    inst = install(model, all_infos, states, None, adapter, import_bound_modules(all_infos))
    try:
        with Capture(tiles, levels, methods=methods, query_fraction=config.query_fraction, checkpoint_dir=ckpt,
                     config_key=config_key, progress=bar) as cap, torch.no_grad():
            forward_loop(model)
    except KeyboardInterrupt:
        bar.close()
        where = f" Measurements so far are in {ckpt}; rerun the same command to resume." if ckpt else ""
        raise KeyboardInterrupt(f"sparsify.calibrate interrupted.{where}") from None
    finally:
        uninstall(model, inst)
    bar.close()
    clock["measurement"] = time.perf_counter()
    if cap.loaded:
        say(f"resumed from {ckpt}: {cap.loaded} of {cap.loaded + cap.measured} site measurements loaded, "
            f"{cap.measured} measured now")
    missing = [i.path for i in infos if i.path not in cap.results]
    if missing:
        raise RuntimeError(f"sparsify.calibrate: the forward loop never reached these sites: {', '.join(missing)}")
    options, cost, error, weight, layer, names = _problem(infos, cap.results, cands, levels, cap.work)
    attention_error = error.copy()
    alphas = measured = None
    if config.output_error:
        bar = Progress(len(infos), label="output error", enabled=config.progress)
        alphas, measured, ref, dense_out = _output_scales(model, all_infos, infos, adapter, cap.results, cands, levels,
                                                          output_loop or forward_loop, config.reference_density, bar,
                                                          veda=cap.veda_estimators())
        bar.close()
        error = error * alphas[layer][:, None]
    clock["output error"] = time.perf_counter()
    dense_sites = set(config.dense_layers) | {n for n, i in enumerate(infos) if i.path in cap.dense_only}
    forced = {g: 0 for g in range(len(layer)) if int(layer[g]) in dense_sites}
    try:
        alloc = solve_allocation(cost, error, config.budget, weight=weight, layer=layer, forced=forced or None,
                                 min_layer_density=config.min_layer_density, error_cap=config.error_cap,
                                 solver=config.solver, gap_rel=config.solver_gap,
                                 time_limit=config.solver_time_limit, names=names)
    except InfeasibleBudgetError as e:
        raise _infeasible(e, config, tiles, levels) from None
    provenance = {
        "tool": f"sparsify {__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": type(model).__name__,
        "config_version": config.version,
        "inputs_hash": inputs_hash,
        "calls_per_site": int(next(iter(cap.results.values())).calls),
        **({"grid": list(next(iter(cap.grids)))} if len(cap.grids) == 1 else {"grids": [list(g) for g in cap.grids]}),
        "budget": float(config.budget),
        "achieved_density": round(float(alloc.density), 6),
        "predicted_error": float(alloc.total_error),  # in the units of error_metric
        "predicted_attention_speedup": round(1.0 / float(alloc.density), 3),
        "solver": f"{alloc.solver} ({alloc.status})",
        "candidates": {"methods": methods, "tiles": [list(t) for t in tiles], "densities": levels},
        "query_fraction": config.query_fraction,
        "error_metric": ("model-output relative squared error, predicted per head: the head's share of its site's "
                         "attention-output error, scaled per site by a measured model-output error"
                         if config.output_error else
                         "relative squared error of each site's attention output, split by head energy share"),
    }
    if config.output_error:
        provenance["output_scale_per_site"] = {i.path: round(float(a), 4) for i, a in zip(infos, alphas)}
    recipe = _emit(model, all_infos, infos, options, alloc.choice, budget=config.budget,
                   defaults_tile=tuple(tiles[0]), default_method=methods[0], dense_steps=config.dense_steps,
                   provenance=provenance, veda=cap.veda_estimators())
    if config.output_error:  # check the prediction: the emitted recipe's real model-output error
        configs = {i.path: recipe.head_configs(i.path, i.heads, kind=i.kind) for i in infos}
        measured_total = model_output_error(model, all_infos, adapter, configs, output_loop or forward_loop, dense_out)
        provenance["measured_output_error"] = float(measured_total)
    clock["solve, recipe and final check"] = time.perf_counter()
    marks = list(clock.values())
    seconds = {name: marks[i + 1] - marks[i] for i, name in enumerate(list(clock)[1:])}
    return CalibrationResult(recipe=recipe, sites=infos, options=options, cost=cost, error=error, weight=weight,
                             layer=layer, allocation=alloc, capture_seconds=cap.seconds, config=config,
                             attention_error=attention_error,
                             extras={"loaded_checkpoints": cap.loaded, "names": names, "alphas": alphas,
                                     "site_output_error": measured, "veda": cap.veda_estimators(),
                                     "seconds": seconds})


def calibrate(model, forward_loop, config: CalibrationConfig | None = None, **kwargs) -> Recipe:
    """Measure every head's error per candidate, solve the budget ILP, and return the recipe.

    Runs the DENSE model through `forward_loop(model)`; at each attention site and head it measures,
    for every candidate method, tile shape and density, the exact error of top-k selection against dense
    attention and its cost (attention FLOPs relative to dense, padding of partial tiles included). A
    multiple-choice knapsack (one option per head, dense included) minimizes the total error under
    the global density `config.budget`; tile shapes are chosen in the same solve.

    Args:
        model: the DiT (any model `sparsify()` accepts).
        forward_loop: `forward_loop(model)` runs the calibration forwards (inputs x denoising steps).
        config: a `CalibrationConfig` (budget, candidates, solver, checkpoints, ...).
        **kwargs: `CalibrationConfig` fields (applied over `config`) and the model arguments of
            `run_calibration` (`example_inputs`, `grid`, `video_start`, `adapter`, `output_loop`,
            `n_forwards`, `inputs_hash`).

    Returns:
        A Recipe with explicit per-site, per-head entries and a `calibration` provenance block.

    Example:
        >>> from sparsify.calibrate import CalibrationConfig, calibrate
        >>> from sparsify.testing.dits import tiny_wan
        >>> from sparsify.adapters import adapter_for
        >>> model = tiny_wan(layers=1, heads=2, head_dim=16)
        >>> x = adapter_for(model).example_inputs(model, grid=(4, 8, 8))
        >>> cfg = CalibrationConfig(budget=0.5, tiles=[(1, 8, 8)], levels=[0.25, 0.5], progress=False,
        ...                         verbose=False, output_error=False)
        >>> recipe = calibrate(model, lambda m: m(**x), cfg, example_inputs=x)
        >>> recipe.calibration["achieved_density"] <= 0.5
        True
        >>> calibrate(model, lambda m: m(**x), cfg, example_inputs=x, budget=0.25).calibration["budget"]
        0.25
    """
    return run_calibration(model, forward_loop, config, **kwargs).recipe
