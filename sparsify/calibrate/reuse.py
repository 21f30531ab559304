"""Calibration of temporal mask reuse: the drift threshold that keeps reused selections close to fresh ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import runtime
from ..kernels.reference import selection_to_block_mask
from ..recipe import MaskReuse, Recipe


@dataclass
class ReuseCalibration:
    """What `calibrate_mask_reuse` measured and chose.

    Attributes:
        threshold: the chosen drift threshold (cosine distance of pooled q and k; 0 disables reuse).
        reuse_share, min_overlap: share of selection calls skipped at `threshold`, and the least overlap of a
            reused selection with the fresh one it replaces.
        pairs: `(age, drift, overlap)` of every recorded (cached step, later step) pair within `max_age`.
        output_error_fresh, output_error_reuse: relative L2 error of the final output against dense, fresh
            and with reuse at `threshold` (None without the search).
        tried: `(threshold, measured reuse share, error growth)` of each threshold tried, largest first.
    """

    threshold: float
    max_age: int
    reuse_share: float
    min_overlap: float
    pairs: list = field(default_factory=list)
    output_error_fresh: float | None = None
    output_error_reuse: float | None = None
    tried: list = field(default_factory=list)

    @property
    def error_growth(self) -> float | None:
        """Relative growth of the final-output error caused by reuse (0.05 = 5% larger than fresh)."""
        if self.output_error_fresh is None or self.output_error_reuse is None or self.output_error_fresh == 0:
            return None
        return self.output_error_reuse / self.output_error_fresh - 1.0

    def mask_reuse(self) -> MaskReuse | None:
        """The recipe setting (None when no threshold keeps reused selections close enough)."""
        return MaskReuse(threshold=self.threshold, max_age=self.max_age) if self.threshold > 0 else None


class _Recorder:
    """`runtime.STATE.selection_log`: drift and selection overlap of each fresh selection against the last steps'."""

    def __init__(self, max_age: int):
        self.max_age = max_age
        self.history: dict[tuple, list] = {}  # (site, group key) -> [(step, pq, pk, mask)] of the last max_age steps
        self.sequences: dict[tuple, list] = {}  # (site, group key) -> [(step, {earlier step: (drift, overlap)})]

    def __call__(self, st, key, step, pq, pk, idx, cnt):
        seq = (st.path, key)
        mask = selection_to_block_mask(idx, cnt, pq.shape[2])
        fresh = mask.sum(-1).clamp_min(1)
        hist = self.history.setdefault(seq, [])
        links = {}
        for s0, q0, k0, m0 in hist:
            if 0 < step - s0 <= self.max_age:
                drift = runtime.pooled_drift(pq, q0, pk, k0)
                overlap = float(((m0 & mask).sum(-1) / fresh).mean())
                links[s0] = (drift, overlap)
        self.sequences.setdefault(seq, []).append((step, links))
        hist.append((step, pq, pk, mask))
        del hist[:-self.max_age]


def simulate(sequences: dict, threshold: float, max_age: int) -> tuple[float, float, int]:
    """Replay the runtime's reuse policy (reuse while drift <= `threshold` and age <= `max_age`) on recorded
    sequences: (reuse share, least overlap reused, calls).

    Example:
        >>> seqs = {"s": [(0, {}), (1, {0: (0.01, 0.95)}), (2, {0: (0.03, 0.9), 1: (0.01, 0.97)})]}
        >>> simulate(seqs, 0.02, 4)
        (0.3333333333333333, 0.95, 3)
    """
    reused, calls, least = 0, 0, 1.0
    for seq in sequences.values():
        cached = None
        for step, links in seq:
            calls += 1
            if cached is not None and cached in links and step - cached <= max_age:
                drift, overlap = links[cached]
                if drift <= threshold:
                    reused += 1
                    least = min(least, overlap)
                    continue
            cached = step
    return reused / max(calls, 1), least, calls


def choose_threshold(sequences: dict, max_age: int, min_overlap: float) -> tuple[float, float, float]:
    """The drift threshold that skips the most selections while every reused selection keeps at least
    `min_overlap` of the fresh selection's tiles (ties: the smallest such threshold). Returns
    (threshold, reuse share, least overlap); threshold 0 when no threshold qualifies.

    Example:
        >>> seqs = {"s": [(0, {}), (1, {0: (0.01, 0.95)}), (2, {0: (0.03, 0.6), 1: (0.01, 0.97)})]}
        >>> choose_threshold(seqs, 4, 0.9)
        (0.01, 0.3333333333333333, 0.95)
    """
    drifts = sorted({d for seq in sequences.values() for _, links in seq for d, _ in links.values()})
    best = (0.0, 0.0, 1.0)
    for t in drifts:
        share, least, _ = simulate(sequences, t, max_age)
        if least >= min_overlap and share > best[1]:
            best = (t, share, least)
    return best


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """`||x - ref|| / ||ref||` in float64 (the final-output error of the reuse and schedule calibrations).

    Example:
        >>> relative_l2(torch.tensor([0.0, 8.0]), torch.tensor([0.0, 5.0]))
        0.6
    """
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def calibrate_mask_reuse(model, recipe: Recipe, trajectory: Callable, *, max_age: int = 4, min_overlap: float = 0.9,
                         max_error_growth: float | None = 0.05, candidates: int = 6) -> ReuseCalibration:
    """Choose the temporal-mask-reuse threshold of `recipe` on a denoising trajectory of `model`.

    `trajectory(model)` (one sampling run from fixed noise, returning the final sample) runs dense, then
    sparsified by `recipe` with fresh selection at every step, recording each head group's drift of pooled
    q and k and tile overlap against the previous `max_age` steps. The overlap rule (`choose_threshold`) takes
    the drift that skips the most selections while reused ones keep `min_overlap` of the fresh tiles. With
    `max_error_growth`, `candidates` drift quantiles (and the overlap rule's) are tried from the largest down,
    rerunning the trajectory: the first whose final-output error grows by at most that much wins.

    Args:
        model: the dense model (not sparsified); it is sparsified and restored here.
        recipe: the recipe to calibrate (its own `mask_reuse` is ignored).
        max_error_growth: tolerated relative growth of the final-output error; None: overlap rule only.

    Returns:
        A ReuseCalibration; `.mask_reuse()` is the recipe setting.

    Example:
        >>> from sparsify.calibrate.reuse import calibrate_mask_reuse
        >>> # rc = calibrate_mask_reuse(model, recipe, lambda m: sample(m, noise, cond, steps=20))
        >>> # recipe = with_mask_reuse(recipe, rc)
    """
    from ..api import installed_sites, sparsify, unsparsify

    base = dataclasses.replace(recipe, defaults=dataclasses.replace(recipe.defaults, mask_reuse=None))

    def run(r, log=None):
        sparsify(model, r)
        try:
            runtime.new_generation()
            runtime.STATE.selection_log = log
            with torch.no_grad():
                out = trajectory(model)
            sites = installed_sites(model)
            share = sum(s.reused for s in sites) / max(1, sum(s.reused + s.selections for s in sites))
        finally:
            runtime.STATE.selection_log = None
            unsparsify(model)
        return out, share

    dense_out = None
    if max_error_growth is not None:
        runtime.new_generation()
        with torch.no_grad():
            dense_out = trajectory(model)
    rec = _Recorder(max_age)
    fresh_out, _ = run(base, rec)
    threshold, share, least = choose_threshold(rec.sequences, max_age, min_overlap)
    pairs = [(step - s0, d, o) for seq in rec.sequences.values() for step, links in seq for s0, (d, o) in links.items()]
    result = ReuseCalibration(threshold=threshold, max_age=max_age, reuse_share=share, min_overlap=least, pairs=pairs)
    if max_error_growth is None:
        return result
    result.output_error_fresh = relative_l2(fresh_out, dense_out)
    drifts = torch.tensor(sorted(d for _, d, _ in pairs), dtype=torch.float64)
    tried = sorted({float(torch.quantile(drifts, q)) for q in torch.linspace(1.0, 0.3, candidates).tolist()}
                   | ({threshold} if threshold > 0 else set()), reverse=True) if drifts.numel() else []
    result.threshold, result.reuse_share, result.output_error_reuse = 0.0, 0.0, result.output_error_fresh
    result.tried = []
    for t in tried:
        out, measured = run(with_mask_reuse(base, ReuseCalibration(t, max_age, 0.0, 1.0)))
        err = relative_l2(out, dense_out)
        growth = err / result.output_error_fresh - 1.0 if result.output_error_fresh > 0 else 0.0
        result.tried.append((t, measured, growth))
        if growth <= max_error_growth:
            result.threshold, result.reuse_share, result.output_error_reuse = t, measured, err
            result.min_overlap = simulate(rec.sequences, t, max_age)[1]
            break
    return result


def with_mask_reuse(recipe: Recipe, rc: ReuseCalibration) -> Recipe:
    """`recipe` with the calibrated `mask_reuse` setting and its provenance in `calibration`.

    Example:
        >>> from sparsify.recipe import recipe_from_dict
        >>> r = with_mask_reuse(recipe_from_dict({"version": 1}), ReuseCalibration(0.03, 4, 0.6, 0.92))
        >>> r.defaults.mask_reuse
        MaskReuse(threshold=0.03, max_age=4)
    """
    cal = dict(recipe.calibration or {})
    if recipe.calibration is not None or rc.output_error_fresh is not None:
        cal["mask_reuse"] = {"threshold": round(rc.threshold, 6), "max_age": rc.max_age,
                             "reuse_share": round(rc.reuse_share, 4),
                             "least_overlap_reused": round(rc.min_overlap, 4)}
        if rc.error_growth is not None:
            cal["mask_reuse"].update(output_error_fresh=round(rc.output_error_fresh, 6),
                                     output_error_reuse=round(rc.output_error_reuse, 6),
                                     error_growth=round(rc.error_growth, 4),
                                     tried=[[round(t, 6), round(s, 4), round(g, 4)] for t, s, g in rc.tried])
    return dataclasses.replace(recipe, defaults=dataclasses.replace(recipe.defaults, mask_reuse=rc.mask_reuse()),
                               calibration=cal if cal else recipe.calibration)
