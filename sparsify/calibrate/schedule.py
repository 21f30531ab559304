"""Calibration of the per-step budget schedule: where in the denoising steps a recipe's average density is spent."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import runtime
from ..recipe import Recipe, ScheduleStep, is_number, load_recipe
from .reuse import relative_l2


@dataclass
class ScheduleCalibration:
    """What `calibrate_schedule` measured and chose.

    Attributes:
        schedule: the chosen schedule, `ScheduleStep`s for `Defaults.schedule` (empty: flat, no schedule).
        tried: one dict per candidate run: `fraction`, `first_steps` (k = round(fraction * steps)), `scale`
            (a, the factor of the first k steps), `rest_scale` (r, the factor of the others), `density` (the
            achieved density of the run), `error` (relative L2 of its final sample against dense) and `eligible`
            (its density is at most the flat run's times 1 + tolerance).
        error_flat, density_flat: the flat recipe's final-sample error and achieved density.
        error, density: the chosen schedule's (the flat ones when flat is chosen).
        steps: denoising steps of the calibration run; the schedule's `from_step`s count these steps.

    Example:
        >>> sc = ScheduleCalibration((ScheduleStep(0, 2.0), ScheduleStep(2, 0.75)), [], 0.2, 0.15, 0.1, 0.1, 10)
        >>> round(sc.error / sc.error_flat - 1, 2)
        -0.25
    """

    schedule: tuple[ScheduleStep, ...]
    tried: list = field(default_factory=list)
    error_flat: float = 0.0
    error: float = 0.0
    density_flat: float = 0.0
    density: float = 0.0
    steps: int = 0


FRACTIONS = (0.1, 0.2, 0.3)
"""Default shares of the steps run at a candidate scale."""
SCALES = (1.5, 2.0, 3.0)
"""Default candidate factors of the first steps' density."""
TOLERANCE = 0.01
"""Default relative excess of a candidate's achieved density over flat that is still eligible."""


def two_piece_schedules(steps: int, fractions, scales) -> list[tuple[float, int, float, float]]:
    """The candidate schedules `(fraction, k, a, r)`: the first k = round(fraction * steps) steps at scale a, the
    rest at r = (steps - k * a) / (steps - k), so the mean scale over the steps is 1. Candidates with k < 1,
    k >= steps or r <= 0, a = 1 (the flat schedule) and repeats of an earlier (k, a) are left out.

    Example:
        >>> two_piece_schedules(10, (0.2, 0.25, 0.5), (1.5, 6.0))  # 0.25: 2 steps again; 6.0: r < 0
        [(0.2, 2, 1.5, 0.875), (0.5, 5, 1.5, 0.5)]
    """
    out, seen = [], set()
    for f in fractions:
        k = round(f * steps)
        for a in scales:
            if k < 1 or k >= steps or a == 1.0 or (k, a) in seen:
                continue
            r = (steps - k * a) / (steps - k)
            if r <= 0:
                continue
            seen.add((k, a))
            out.append((float(f), k, float(a), r))
    return out


def _check(steps, fractions, scales, tolerance, sample) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"calibrate_schedule: steps must be an integer >= 2 (the denoising steps of one "
                         f"generation of sample); got {steps!r}")
    try:
        fractions, scales = tuple(fractions), tuple(scales)
    except TypeError:
        raise ValueError(f"calibrate_schedule: fractions and scales must be sequences of numbers; got "
                         f"{fractions!r}, {scales!r}") from None
    if not fractions or not all(is_number(f) and 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"calibrate_schedule: fractions must be numbers in (0, 1) (the share of the steps "
                         f"given the first scale), at least one; got {fractions!r}")
    if not scales or not all(is_number(a) and math.isfinite(a) and a > 0 for a in scales):
        raise ValueError(f"calibrate_schedule: scales must be positive finite numbers (factors on every sparse "
                         f"head's density in the first steps), at least one; got {scales!r}")
    if not is_number(tolerance) or not 0.0 <= tolerance < math.inf:
        raise ValueError(f"calibrate_schedule: tolerance must be a number >= 0 (the relative excess of a "
                         f"candidate's achieved density over the flat one's still accepted); got {tolerance!r}")
    if not callable(sample):
        raise ValueError(f"calibrate_schedule: sample must be a callable sample(model) -> final latent; "
                         f"got {type(sample).__name__}")
    return fractions, scales


def calibrate_schedule(model, recipe, sample: Callable, *, steps: int, fractions=FRACTIONS,
                       scales=SCALES, tolerance: float = TOLERANCE, say: Callable | None = None
                       ) -> ScheduleCalibration:
    """Choose a two-piece density schedule for `recipe` by the final-sample error of one generation.

    `sample(model)` runs one generation of `steps` denoising steps from fixed noise and condition and returns
    the final latent. It runs once dense, then sparsified by `recipe` without a schedule (flat) and with every
    candidate of `two_piece_schedules(steps, fractions, scales)`: the first k steps at `scale` a, the rest at
    the scale that keeps the mean at 1 (`defaults.schedule` multiplies every sparse head's density, capped at
    1). Each run records its achieved density (attention work over dense work) and the relative L2 error of its
    final latent against dense. Rounding top-k budgets to whole key tiles can make a schedule denser than flat:
    a candidate whose density exceeds the flat one's by more than `tolerance` (relative) is not eligible. The
    eligible run of least error wins, flat included, so on this generation the choice is never worse than flat.

    Args:
        model: the dense model (not sparsified); it is sparsified and restored for every run.
        recipe: the recipe to schedule (a Recipe, dict or path); its own `defaults.schedule` is replaced.
        sample: `sample(model) -> final latent`, one generation of `steps` steps. A new generation is started
            before each call (`sparsify.runtime.new_generation`), so the runtime counts its steps from 0.
        steps: denoising steps of one generation of `sample` (>= 2). The schedule counts absolute steps, so
            apply it to generations of this many steps.
        fractions: shares of the steps, in (0, 1), that run at a candidate scale.
        scales: candidate factors of the first steps (> 1 spends more of the density early).
        tolerance: relative excess of a candidate's achieved density over the flat one's still eligible.
        say: called with one line per run (schedule, achieved density, error); None: silent.

    Returns:
        A ScheduleCalibration; `with_schedule(recipe, result)` is the recipe with the chosen schedule.

    Raises:
        ValueError: an invalid argument (the message names it and what is valid), or a sparsified `model`.
        RuntimeError: `sample` ran no attention call of the sparsified model.

    Example:
        >>> from sparsify.testbed import build_testbed, class_embeddings, sample
        >>> model = build_testbed(pretrained=False, overrides={"num_layers": 1})
        >>> noise, cond = torch.randn(1, 4, 4, 16, 16), class_embeddings(torch.tensor([0]))
        >>> recipe = {"version": 1, "defaults": {"tile": [4, 4, 4], "budget": {"density": 0.5}}}
        >>> sc = calibrate_schedule(model, recipe, lambda m: sample(m, noise, cond, steps=4), steps=4,
        ...                         fractions=(0.5,), scales=(1.5,))
        >>> len(sc.tried), sc.tried[0]["rest_scale"], sc.error <= sc.error_flat
        (1, 0.5, True)
    """
    from ..api import installed_sites, sparsify, unsparsify

    fractions, scales = _check(steps, fractions, scales, tolerance, sample)
    if getattr(model, "_sparsify", None) is not None:
        raise ValueError("calibrate_schedule: model is sparsified; pass the dense model (sparsify.unsparsify(model))")
    base = load_recipe(recipe)
    say = say or (lambda msg: None)

    def generate():
        runtime.new_generation()
        with torch.no_grad():
            return sample(model)

    def run(schedule: tuple[ScheduleStep, ...]) -> tuple[float, float]:
        sparsify(model, dataclasses.replace(base, defaults=dataclasses.replace(base.defaults, schedule=schedule)))
        try:
            out = generate()
            sites = installed_sites(model)
            dense_work = sum(s.dense_work for s in sites)
            if not dense_work:
                raise RuntimeError("calibrate_schedule: sample(model) ran no attention call of the sparsified model; "
                                   "it must sample with the model it is given")
            density = sum(s.work for s in sites) / dense_work
        finally:
            unsparsify(model)
        return relative_l2(out, dense), density

    dense = generate()
    error_flat, density_flat = run(())
    say(f"schedule flat: density {density_flat:.4f}, error {error_flat:.4f}")
    best = (error_flat, density_flat, ())
    tried = []
    for f, k, a, r in two_piece_schedules(steps, fractions, scales):
        schedule = (ScheduleStep(0, a), ScheduleStep(k, r))
        error, density = run(schedule)
        eligible = density <= density_flat * (1.0 + tolerance)
        tried.append({"fraction": f, "first_steps": k, "scale": a, "rest_scale": r, "density": density,
                      "error": error, "eligible": eligible})
        say(f"schedule fraction {f:g} (first {k} of {steps} steps) at x{a:g}, rest x{r:.4g}: density {density:.4f}, "
            f"error {error:.4f}" + ("" if eligible else f" (denser than flat by more than {tolerance:g}: not eligible)"))
        if eligible and error < best[0]:
            best = (error, density, schedule)
    return ScheduleCalibration(schedule=best[2], tried=tried, error_flat=error_flat, error=best[0],
                               density_flat=density_flat, density=best[1], steps=steps)


def with_schedule(recipe: Recipe, sc: ScheduleCalibration) -> Recipe:
    """`recipe` with the calibrated `defaults.schedule` and its provenance in `calibration["schedule"]`.

    Example:
        >>> from sparsify.recipe import recipe_from_dict
        >>> sc = ScheduleCalibration((ScheduleStep(0, 2.0), ScheduleStep(2, 0.75)), [], 0.2, 0.15, 0.1, 0.1, 10)
        >>> r = with_schedule(recipe_from_dict({"version": 1}), sc)
        >>> r.defaults.schedule[1], r.calibration["schedule"]["error"]
        (ScheduleStep(from_step=2, scale=0.75), 0.15)
    """
    recipe = load_recipe(recipe)
    cal = dict(recipe.calibration or {})
    cal["schedule"] = {
        "steps": sc.steps, "error_flat": round(sc.error_flat, 6), "error": round(sc.error, 6),
        "density_flat": round(sc.density_flat, 4), "density": round(sc.density, 4),
        "tried": [{"fraction": t["fraction"], "first_steps": t["first_steps"], "scale": t["scale"],
                   "rest_scale": round(t["rest_scale"], 4), "density": round(t["density"], 4),
                   "error": round(t["error"], 6), "eligible": bool(t["eligible"])} for t in sc.tried]}
    return dataclasses.replace(recipe, defaults=dataclasses.replace(recipe.defaults, schedule=tuple(sc.schedule)),
                               calibration=cal)
