"""`CalibrationConfig`: the typed, validated settings of one calibration run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1
DEFAULT_TILES = ((4, 4, 4), (1, 8, 8), (2, 4, 8), (8, 2, 4), (16, 2, 2), (1, 4, 16))
DEFAULT_LEVELS = (0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
SOLVERS = ("auto", "highs", "cbc", "lagrangian")
MIN_TILES = 4  # a default tile shape must cut the grid into at least this many tiles
MAX_PADDING = 0.25  # ... and pad it by at most this share


class CalibrationConfigError(ValueError):
    """A `CalibrationConfig` field has an invalid value (the message names the field, the value and what is valid)."""


def _fail(name: str, value: Any, valid: str) -> None:
    raise CalibrationConfigError(f"CalibrationConfig.{name}={value!r} is invalid: {valid}")


def _density(name: str, x: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not ok or not ((0.0 <= x) if allow_zero else (0.0 < x)) or x > 1.0:
        _fail(name, x, f"expected a density in {'[0' if allow_zero else '(0'}, 1], e.g. 0.1")
    return float(x)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of a calibration: the candidates measured per head, the budget, and the solve.

    Every field has a default; `__post_init__` validates each one and raises
    `CalibrationConfigError` (a `ValueError`) naming the field, its value and what would be valid.
    Lists are stored as tuples.

    Attributes:
        version: schema version of this config (`CONFIG_VERSION`).
        budget: target attention density over all sparsifiable heads, in (0, 1] (0.1 = 90% sparse).
        methods: selection methods each head may use (tile methods: `vsa`, `veda`, `xattention`).
        tiles: candidate tile shapes `(t, h, w)` of volume 64 or 128; None: those of `DEFAULT_TILES`
            that cut the calibration grid into at least `MIN_TILES` tiles with at most 25% padding.
        levels: candidate densities per head, each in (0, 1]; None: `DEFAULT_LEVELS`, keeping one level per
            distinct number of key tiles on the calibration grid.
        dense_layers: indices of the self/joint sites kept dense.
        dense_steps: first denoising steps kept dense (written to the recipe; a runtime policy).
        min_layer_density: minimum density of every site, or `{site index: density}`.
        error_cap: per-head cap on the error; options above it are never chosen.
        solver: `auto` (HiGHS through pulp, else CBC, else the numpy Lagrangian; the Lagrangian also for
            problems too large for a MILP), `highs`, `cbc` or `lagrangian`.
        solver_gap: relative optimality gap at which the MILP may stop.
        solver_time_limit: seconds the MILP may run before its best solution is taken.
        query_fraction: share of video query tokens measured per call, in (0, 1].
        output_error: weigh each site's errors by a measured model-output error (one extra forward per site).
        reference_density: density at which that per-site output error is measured.
        checkpoint_dir: folder of per-site measurements that makes a run resumable (None: none).
        progress: print a progress line with ETA to stderr.
        verbose: print what the run does (resumed checkpoints, set-aside folders) to stderr.

    Example:
        >>> cfg = CalibrationConfig(budget=0.05, tiles=[(4, 4, 4), (1, 8, 8)], methods=["vsa", "veda"])
        >>> cfg.tiles, cfg.methods
        (((4, 4, 4), (1, 8, 8)), ('vsa', 'veda'))
        >>> CalibrationConfig(budget=1.5)
        Traceback (most recent call last):
        ...
        sparsify.calibrate.config.CalibrationConfigError: CalibrationConfig.budget=1.5 is invalid: expected a density in (0, 1], e.g. 0.1
    """

    version: int = CONFIG_VERSION
    budget: float = 0.1
    methods: tuple[str, ...] = ("vsa",)
    tiles: tuple[tuple[int, int, int], ...] | None = None
    levels: tuple[float, ...] | None = None
    dense_layers: tuple[int, ...] = ()
    dense_steps: int = 0
    min_layer_density: float | Mapping[int, float] | None = None
    error_cap: float | None = None
    solver: str = "auto"
    solver_gap: float = 1e-4
    solver_time_limit: float = 60.0
    query_fraction: float = 0.125
    output_error: bool = True
    reference_density: float = 0.1
    checkpoint_dir: str | Path | None = None
    progress: bool = True
    verbose: bool = True

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        if self.version != CONFIG_VERSION:
            _fail("version", self.version, f"this sparsify reads version {CONFIG_VERSION}")
        put("budget", _density("budget", self.budget))
        put("methods", self._methods(self.methods))
        if self.tiles is not None:
            put("tiles", self._tiles(self.tiles))
        if self.levels is not None:
            if isinstance(self.levels, (str, bytes)) or not hasattr(self.levels, "__iter__") or not list(self.levels):
                _fail("levels", self.levels, "expected a non-empty list of densities in (0, 1], e.g. [0.05, 0.1, 0.2]")
            put("levels", tuple(sorted({_density("levels", x) for x in self.levels})))
        layers = self.dense_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            _fail("dense_layers", layers, "expected a list of site indices >= 0, e.g. [0]")
        put("dense_layers", tuple(layers))
        if not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool) or self.dense_steps < 0:
            _fail("dense_steps", self.dense_steps, "expected an int >= 0")
        mld = self.min_layer_density
        if isinstance(mld, Mapping):
            put("min_layer_density", {int(k): _density("min_layer_density", v, allow_zero=True) for k, v in mld.items()})
        elif mld is not None:
            put("min_layer_density", _density("min_layer_density", mld, allow_zero=True))
        if self.error_cap is not None and not (isinstance(self.error_cap, (int, float)) and self.error_cap >= 0):
            _fail("error_cap", self.error_cap, "expected a number >= 0 or None")
        if self.solver not in SOLVERS:
            _fail("solver", self.solver, f"expected one of {', '.join(SOLVERS)}")
        if not (isinstance(self.solver_gap, (int, float)) and 0 <= self.solver_gap < 1):
            _fail("solver_gap", self.solver_gap, "expected a relative gap in [0, 1), e.g. 1e-4")
        if not (isinstance(self.solver_time_limit, (int, float)) and self.solver_time_limit > 0):
            _fail("solver_time_limit", self.solver_time_limit, "expected seconds > 0")
        put("query_fraction", _density("query_fraction", self.query_fraction))
        put("reference_density", _density("reference_density", self.reference_density))
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, Path)):
            _fail("checkpoint_dir", self.checkpoint_dir, "expected a folder path or None")
        for flag in ("output_error", "progress", "verbose"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "expected True or False")

    @staticmethod
    def _methods(methods) -> tuple[str, ...]:
        from ..methods import available_methods
        from ..methods.registry import method_class

        def usable(m):  # the measurement ranks key tiles with `select`: not `attend`-only methods
            return m in available_methods() and m != "dense" and not hasattr(method_class(m), "attend")

        valid = ", ".join(m for m in available_methods() if usable(m))
        if isinstance(methods, str) or not hasattr(methods, "__iter__"):
            _fail("methods", methods, f"expected a list of tile selection methods from: {valid}")
        methods = tuple(methods)
        if not methods or not all(isinstance(m, str) and usable(m) for m in methods):
            _fail("methods", list(methods), f"expected a non-empty list of tile selection methods from: {valid}")
        return methods

    @staticmethod
    def _tiles(tiles) -> tuple[tuple[int, int, int], ...]:
        from ..recipe import TILE_VOLUMES

        out = []
        for t in tiles if hasattr(tiles, "__iter__") and not isinstance(tiles, str) else [tiles]:
            t = tuple(t) if isinstance(t, (list, tuple)) else t
            if not (isinstance(t, tuple) and len(t) == 3 and all(isinstance(x, int) and x >= 1 for x in t)
                    and math.prod(t) in TILE_VOLUMES):
                _fail("tiles", t, f"expected (t, h, w) positive ints of volume {' or '.join(map(str, TILE_VOLUMES))}, "
                      "e.g. (4, 4, 4)")
            out.append(t)
        if not out:
            _fail("tiles", tiles, "expected at least one tile shape, or None for the defaults that fit the grid")
        return tuple(dict.fromkeys(out))

    def replace(self, **changes) -> "CalibrationConfig":
        """A copy with `changes` applied (and validated); unknown names raise `CalibrationConfigError`.

        Example:
            >>> CalibrationConfig().replace(budget=0.05).budget
            0.05
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise CalibrationConfigError(
                f"CalibrationConfig has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    def candidates(self, grid) -> tuple[tuple[tuple[int, int, int], ...], tuple[float, ...]]:
        """The tile shapes and densities measured on a `(T, H, W)` grid (the defaults resolved for it).

        Example:
            >>> tiles, levels = CalibrationConfig().candidates((8, 16, 8))
            >>> (4, 4, 4) in tiles, levels[0]
            (True, 0.05)
        """
        return (self.tiles or default_tiles(grid)), (self.levels or default_levels(grid, self.tiles))


def _layout_fit(grid, tile) -> tuple[int, float]:
    """(tiles, padding share) of `tile` on `grid`."""
    from ..geometry import tile_layout

    lay = tile_layout(tuple(grid), tuple(tile))
    tokens = math.prod(grid)
    return lay.n_tiles, lay.n_tiles * lay.volume / tokens - 1.0


def default_tiles(grid) -> tuple[tuple[int, int, int], ...]:
    """The `DEFAULT_TILES` that cut `grid` into at least `MIN_TILES` tiles with at most 25% padding.

    When none does (a grid of fewer than a few hundred tokens), the one with the most tiles.

    Example:
        >>> default_tiles((16, 16, 16)) == DEFAULT_TILES
        True
        >>> default_tiles((2, 4, 4))  # 32 tokens: less than one tile of any shape
        ((4, 4, 4),)
    """
    fit = {t: _layout_fit(grid, t) for t in DEFAULT_TILES}
    good = tuple(t for t, (n, pad) in fit.items() if n >= MIN_TILES and pad <= MAX_PADDING)
    return good or (max(DEFAULT_TILES, key=lambda t: (fit[t][0], -fit[t][1])),)


def default_levels(grid, tiles=None) -> tuple[float, ...]:
    """`DEFAULT_LEVELS` thinned to one level per distinct key-tile count on `grid` (the largest density of each).

    Levels that keep every key tile (dense in disguise) are dropped while a sparser one remains.

    Example:
        >>> default_levels((16, 16, 16))  # 64 tiles of 64 tokens: 0.02 and 0.03 both keep 2
        (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
        >>> default_levels((8, 16, 8))  # 16 tiles
        (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    """
    n = min(_layout_fit(grid, t)[0] for t in (tiles or default_tiles(grid)))
    by_k: dict[int, float] = {}
    for d in DEFAULT_LEVELS:
        k = max(1, min(n, math.ceil(d * n - 1e-9)))
        by_k[k] = max(by_k.get(k, 0.0), d)
    sparse = tuple(d for k, d in sorted(by_k.items()) if k < n)
    return sparse or tuple(sorted(by_k.values()))
