"""Recipe schema (v2; v1 still read): typed dataclasses, strict YAML load/dump, validation and rule matching."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

RECIPE_VERSION = 2
RECIPE_VERSIONS = (1, 2)  # versions this sparsify reads; 2 adds `plan` (sparsify.generation.plan)
SITE_KINDS = ("self", "joint", "cross", "text")
TILE_VOLUMES = (64, 128)


def _fail(key: str, message: str) -> None:
    raise RecipeError(message, key=key)


def is_number(v) -> bool:
    """True for a real number: Python and numpy ints and floats; booleans are not numbers.

    Example:
        >>> import numpy as np
        >>> [is_number(x) for x in (0.5, np.float32(0.5), 2, True, "0.5")]
        [True, True, True, False, False]
    """
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _in_range(v, lo: float, hi: float, lo_open: bool) -> bool:
    try:
        if not is_number(v) or not math.isfinite(float(v)):
            return False
    except OverflowError:  # an int too large for a float
        return False
    return (lo < v if lo_open else lo <= v) and v <= hi


# ----------------------------------------------------------------------------------------------
# typed pieces


@dataclass(frozen=True)
class Budget:
    """How many key tiles a query tile keeps: top-k `density`, or top-p mass with a floor.

    Exactly one of `density` (fraction of key tiles, in (0, 1]) or `top_p` (cumulative coarse
    attention mass, in (0, 1]) is set; `min_density` (in [0, 1]) only goes with `top_p`.

    Example:
        >>> Budget(density=0.1)
        Budget(density=0.1, top_p=None, min_density=0.0)
    """

    density: float | None = None
    top_p: float | None = None
    min_density: float = 0.0

    def __post_init__(self):
        _check_budget(self.density, self.top_p, self.min_density, "budget")

    def to_dict(self) -> dict:
        if self.density is not None:
            return {"density": self.density}
        return {"top_p": self.top_p, "min_density": self.min_density}


def _check_budget(density, top_p, min_density, key):
    if (density is None) == (top_p is None):
        _fail(key, "give exactly one of 'density' (top-k fraction of key tiles) or 'top_p' (mass)")
    if density is not None and not _in_range(density, 0.0, 1.0, True):
        _fail(f"{key}.density", f"must be a number in (0, 1] (booleans are not numbers); got {density!r}")
    if top_p is not None and not _in_range(top_p, 0.0, 1.0, True):
        _fail(f"{key}.top_p", f"must be a number in (0, 1] (booleans are not numbers); got {top_p!r}")
    if not _in_range(min_density, 0.0, 1.0, False):
        _fail(f"{key}.min_density", f"must be a number in [0, 1] (booleans are not numbers); got {min_density!r}")
    if density is not None and min_density:
        _fail(f"{key}.min_density", "only valid together with 'top_p'")


def check_tile(tile: Any, key: str) -> tuple[int, int, int]:
    """Validate a 3-D tile shape `(t, h, w)`: positive ints whose product is 64 or 128."""
    if not (isinstance(tile, (list, tuple)) and len(tile) == 3
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in tile)):
        _fail(key, f"must be a list of three integers [t, h, w]; got {tile!r}")
    tile = tuple(int(x) for x in tile)
    if min(tile) < 1:
        _fail(key, f"every tile dimension must be >= 1; got {list(tile)}")
    vol = tile[0] * tile[1] * tile[2]
    if vol not in TILE_VOLUMES:
        _fail(key, f"tile volume t*h*w must be one of {TILE_VOLUMES} (the kernel block sizes); {list(tile)} has {vol}")
    return tuple(tile)


@dataclass(frozen=True)
class HeadConfig:
    """The effective configuration of one attention head.

    Example:
        >>> HeadConfig(method="vsa", tile=(4, 4, 4), budget=Budget(density=0.1))
        HeadConfig(method='vsa', tile=(4, 4, 4), budget=Budget(density=0.1, top_p=None, min_density=0.0), enable=True)
    """

    method: str = "vsa"
    tile: tuple[int, int, int] = (4, 4, 4)
    budget: Budget = Budget(density=1.0)
    enable: bool = True
    params: dict | None = field(default=None, hash=False, repr=False)  # method parameters (e.g. Veda's estimator)

    @property
    def is_dense(self) -> bool:
        """True when this head runs plain dense SDPA (disabled, or method `dense`).

        A sparse method at density 1.0 still runs the tiled sparse path (with every tile kept).
        """
        return (not self.enable) or self.method == "dense"


@dataclass(frozen=True)
class SiteSpec:
    """One attention site of the model signature: module path, kind, heads and head_dim."""

    path: str
    kind: str
    heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "heads": self.heads, "head_dim": self.head_dim}


@dataclass(frozen=True)
class ModelSignature:
    """Which model a recipe was made for: its class name and every attention site."""

    cls: str
    sites: tuple[SiteSpec, ...]

    def site(self, path: str) -> SiteSpec | None:
        return next((s for s in self.sites if s.path == path), None)


@dataclass(frozen=True)
class MaskReuse:
    """Temporal mask reuse (HASTE): reuse a head group's cached selection while the drift of its pooled
    q and k since the cached step stays under `threshold`, for at most `max_age` steps.

    Example:
        >>> MaskReuse(threshold=0.02, max_age=3)
        MaskReuse(threshold=0.02, max_age=3)
    """

    threshold: float = 0.02
    max_age: int = 3


@dataclass(frozen=True)
class ScheduleStep:
    """One entry of a per-step budget schedule: from denoising step `from_step` on, every sparse head's
    density (top-k `density`, or top-p's `min_density` floor) is multiplied by `scale` (capped at 1).

    Example:
        >>> ScheduleStep(from_step=10, scale=0.5).apply(Budget(density=0.1))
        Budget(density=0.05, top_p=None, min_density=0.0)
    """

    from_step: int
    scale: float

    def apply(self, budget: Budget) -> Budget:
        if self.scale == 1.0:
            return budget
        if budget.density is not None:
            return Budget(density=min(1.0, budget.density * self.scale))
        return Budget(top_p=budget.top_p, min_density=min(1.0, budget.min_density * self.scale))


def scheduled_budget(budget: Budget, schedule: tuple[ScheduleStep, ...], step: int | None) -> Budget:
    """`budget` at denoising step `step` under `schedule` (the last entry with `from_step <= step` applies).

    Example:
        >>> sch = (ScheduleStep(0, 2.0), ScheduleStep(10, 1.0))
        >>> [scheduled_budget(Budget(density=0.1), sch, s).density for s in (0, 9, 10, None)]
        [0.2, 0.2, 0.1, 0.1]
    """
    if step is None or not schedule:
        return budget
    entry = None
    for e in schedule:
        if e.from_step <= step:
            entry = e
    return budget if entry is None else entry.apply(budget)


@dataclass(frozen=True)
class Defaults:
    """Configuration applied to every enabled site unless a rule or explicit entry overrides it."""

    method: str = "vsa"
    tile: tuple[int, int, int] = (4, 4, 4)
    budget: Budget = Budget(density=0.1)
    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    mask_reuse: MaskReuse | None = None
    schedule: tuple[ScheduleStep, ...] = ()


@dataclass(frozen=True)
class Rule:
    """An override for the sites whose module path matches `match` (glob, or `re:` regex)."""

    match: str
    enable: bool = True
    method: str | None = None
    tile: tuple[int, int, int] | None = None
    budget: Budget | None = None

    def matches(self, path: str) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], path) is not None
        return fnmatch.fnmatchcase(path, self.match)


@dataclass(frozen=True)
class HeadEntry:
    """An explicit per-head override, as a calibrator emits it. Unset fields inherit."""

    head: int
    method: str | None = None
    tile: tuple[int, int, int] | None = None
    budget: Budget | None = None
    enable: bool | None = None
    params: dict | None = field(default=None, hash=False)  # parameters of `method` (which the entry must name)


@dataclass(frozen=True)
class SiteEntry:
    """Explicit configuration of one site: site-wide fields and per-head entries."""

    enable: bool | None = None
    method: str | None = None
    tile: tuple[int, int, int] | None = None
    budget: Budget | None = None
    heads: tuple[HeadEntry, ...] = ()


class YamlDocument:
    """`to_yaml` and `save` for a recipe document with a `to_dict`."""

    def to_yaml(self) -> str:
        """The document as YAML text (loading it gives back an equal document)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | Path) -> Path:
        """Write the document to `path` as YAML (creating its folder) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


@dataclass(frozen=True)
class Recipe(YamlDocument):
    """A sparsify recipe: which sites run sparse attention, with which method, tile and budget.

    Precedence, lowest to highest: `defaults`; the FIRST rule whose `match` fits the module path
    (later rules are not consulted); the explicit `sites` entry for that path; its per-head entries.
    A site listed in `model.sites` that no rule disables and no entry names runs with `defaults`.
    Only sites of kind `self` and `joint` are made sparse; `cross` and `text` sites stay dense.

    Example:
        >>> r = Recipe(defaults=Defaults(method="vsa", budget=Budget(density=0.25)),
        ...            rules=(Rule(match="blocks.0.*", enable=False),))
        >>> r.head_configs("blocks.0.attn1", heads=2)[0].enable
        False
    """

    version: int = RECIPE_VERSION
    model: ModelSignature | None = None
    defaults: Defaults = Defaults()
    rules: tuple[Rule, ...] = ()
    sites: dict[str, SiteEntry] = field(default_factory=dict)
    calibration: dict | None = None
    plan: Any = None  # StepPlan (version 2): per step compute or reuse, per block and step range a merge ratio
    source: str | None = field(default=None, compare=False)

    # -- resolution -----------------------------------------------------------------------------
    def rule_for(self, path: str) -> Rule | None:
        """The first rule that matches `path`, or None."""
        return next((r for r in self.rules if r.matches(path)), None)

    def head_configs(self, path: str, heads: int, *, site_index: int | None = None, kind: str = "self") -> list[HeadConfig]:
        """The effective per-head configuration of the site at `path`.

        Args:
            path: module path of the site, e.g. `blocks.3.attn1`.
            heads: number of heads at the site.
            site_index: the site's position in the model's site order, for `dense_layers`.
            kind: the site kind; only `self` and `joint` sites can be sparse.
        """
        d = self.defaults
        sparse_kind = kind in ("self", "joint")
        base = HeadConfig(method=d.method, tile=d.tile, budget=d.budget, enable=sparse_kind)
        if site_index is not None and site_index in d.dense_layers:
            base = dataclasses.replace(base, enable=False)
        rule = self.rule_for(path)
        if rule is not None:
            base = _override(base, rule.enable, rule.method, rule.tile, rule.budget)
        entry = self.sites.get(path)
        if entry is not None:
            base = _override(base, entry.enable, entry.method, entry.tile, entry.budget)
        out = [base] * heads
        if entry is not None:
            for h in entry.heads:
                out[h.head] = _override(base, h.enable, h.method, h.tile, h.budget, h.params)
        if not sparse_kind:
            out = [dataclasses.replace(c, enable=False) for c in out]
        return out

    @property
    def where(self) -> str:
        """The recipe's file, `<dict>`, or `<Recipe>` for one built in code (the start of every error)."""
        return self.source or "<Recipe>"

    @property
    def calibration_grid(self) -> tuple[int, int, int] | None:
        """The token grid `(T, H, W)` the recipe was calibrated at, if its provenance records one.

        Read from `calibration.grid` (`[T, H, W]`), else from a `--grid TxHxW` option in
        `calibration.command`; None when neither is there.

        Example:
            >>> Recipe(calibration={"command": "python -m sparsify.calibrate --grid 21x30x52"}).calibration_grid
            (21, 30, 52)
        """
        cal = self.calibration or {}
        grid = cal.get("grid")
        if isinstance(grid, (list, tuple)) and len(grid) == 3 and all(isinstance(x, int) for x in grid):
            return tuple(int(x) for x in grid)
        cmd = cal.get("command")
        m = re.search(r"--grid[ =](\d+)x(\d+)x(\d+)", cmd) if isinstance(cmd, str) else None
        return tuple(int(x) for x in m.groups()) if m else None

    # -- model matching -------------------------------------------------------------------------
    def unintended(self, sites: list[SiteSpec]) -> list[tuple[str, str]]:
        """Legal settings that change nothing on a model with these sites: `(key path, message)` pairs.

        Reported: a rule that matches no site, only cross/text sites (which stay dense), or only sites an
        earlier rule already takes (first match wins); a `sites` entry for a cross/text site; a
        `dense_layers` index past the model's last self/joint site.

        Example:
            >>> r = Recipe(rules=(Rule(match="transformer.*"),))
            >>> r.unintended([SiteSpec("blocks.0.attn1", "self", 2, 16)])[0][0]
            'rules[0].match'
        """
        out = []
        paths = [s.path for s in sites]
        sparse = [s.path for s in sites if s.kind in ("self", "joint")]
        for i, rule in enumerate(self.rules):
            hit = [p for p in paths if rule.matches(p)]
            key = f"rules[{i}].match"
            if not hit:
                out.append((key, f"pattern {rule.match!r} matches no attention site of this model; site paths: "
                                 f"{_short_list(paths)}"))
            elif not any(p in sparse for p in hit):
                out.append((key, f"pattern {rule.match!r} matches only cross- or text-attention sites "
                                 f"({_short_list(hit)}), which always run dense"))
            else:
                first = {p: next(j for j, r in enumerate(self.rules) if r.matches(p)) for p in hit if p in sparse}
                if all(j < i for j in first.values()):
                    earlier = sorted({j for j in first.values()})
                    out.append((key, f"pattern {rule.match!r} never applies: every site it matches is matched "
                                     f"first by {', '.join(f'rules[{j}]' for j in earlier)} (the first match wins)"))
        kinds = {s.path: s.kind for s in sites}
        for path in self.sites:
            if kinds.get(path) in ("cross", "text"):
                out.append((f"sites.{path}", f"site '{path}' is {kinds[path]}-attention, which always runs dense; "
                                             "this entry is ignored"))
        for j, idx in enumerate(self.defaults.dense_layers):
            if idx >= len(sparse):
                out.append((f"defaults.dense_layers[{j}]",
                            f"index {idx} is past the model's last self/joint site: it has {len(sparse)} "
                            f"(indices 0..{len(sparse) - 1}); this entry is ignored"))
        return out

    def check_against(self, model_cls: str, sites: list[SiteSpec]) -> None:
        """Raise RecipeError unless this recipe fits a model with class `model_cls` and these sites."""
        by_path = {s.path: s for s in sites}
        if self.model is not None:
            if self.model.cls != model_cls:
                raise RecipeError(
                    f"recipe is for model class '{self.model.cls}' but the model is '{model_cls}'",
                    source=self.where, key="model.class")
            for i, spec in enumerate(self.model.sites):
                got = by_path.get(spec.path)
                if got is None:
                    raise RecipeError(
                        f"site '{spec.path}' is not an attention site of this model; the model has: "
                        f"{_short_list(by_path)}", source=self.where, key=f"model.sites[{i}].path")
                for attr in ("kind", "heads", "head_dim"):
                    if getattr(got, attr) != getattr(spec, attr):
                        raise RecipeError(
                            f"recipe says {attr}={getattr(spec, attr)!r} but the model's site '{spec.path}' has "
                            f"{attr}={getattr(got, attr)!r}", source=self.where, key=f"model.sites[{i}].{attr}")
            if len(self.model.sites) != len(sites):
                missing = [p for p in by_path if self.model.site(p) is None]
                raise RecipeError(
                    f"the model has {len(sites)} attention sites, the recipe's signature lists "
                    f"{len(self.model.sites)}; not in the recipe: {_short_list(missing)}",
                    source=self.where, key="model.sites")
        for path, entry in self.sites.items():
            spec = by_path.get(path)
            if spec is None:
                raise RecipeError(
                    f"no attention site '{path}' in the model; valid site paths: {_short_list(by_path)}",
                    source=self.where, key=f"sites.{path}")
            for j, h in enumerate(entry.heads):
                if h.head >= spec.heads:
                    raise RecipeError(
                        f"head {h.head} does not exist: site '{path}' has {spec.heads} heads (0..{spec.heads - 1})",
                        source=self.where, key=f"sites.{path}.heads[{j}].head")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A plain-dict form that `recipe_from_dict` turns back into an equal Recipe."""
        d = self.defaults
        out: dict[str, Any] = {"version": self.version}
        if self.model is not None:
            out["model"] = {"class": self.model.cls, "sites": [s.to_dict() for s in self.model.sites]}
        out["defaults"] = {"method": d.method, "tile": list(d.tile), "budget": d.budget.to_dict(),
                           "dense_steps": d.dense_steps, "dense_layers": list(d.dense_layers)}
        if d.mask_reuse is not None:
            out["defaults"]["mask_reuse"] = {"threshold": d.mask_reuse.threshold, "max_age": d.mask_reuse.max_age}
        if d.schedule:
            out["defaults"]["schedule"] = [{"from_step": e.from_step, "scale": e.scale} for e in d.schedule]
        if self.rules:
            out["rules"] = [{"match": r.match, **_fields_dict(r)} for r in self.rules]
        if self.sites:
            out["sites"] = {p: _entry_dict(e) for p, e in self.sites.items()}
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        return out


def _short_list(items, n: int = 6) -> str:
    items = list(items)
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "(none)"


def _override(base: HeadConfig, enable, method, tile, budget, params=None) -> HeadConfig:
    return HeadConfig(
        method=method if method is not None else base.method,
        tile=tile if tile is not None else base.tile,
        budget=budget if budget is not None else base.budget,
        enable=enable if enable is not None else base.enable,
        params=params if params is not None else (base.params if method is None else None),
    )


def _fields_dict(obj) -> dict:
    out = {}
    for name in ("enable", "method", "tile"):
        val = getattr(obj, name, None)
        if val is not None:
            out[name] = list(val) if name == "tile" else val
    if getattr(obj, "budget", None) is not None:
        out.update(obj.budget.to_dict())
    return out


def _entry_dict(e: SiteEntry) -> dict:
    out = _fields_dict(e)
    if e.heads:
        out["heads"] = [{"head": h.head, **_fields_dict(h), **({"params": h.params} if h.params else {})}
                        for h in e.heads]
    return out


# ----------------------------------------------------------------------------------------------
# parsing with key paths


_TOP_KEYS = {"version", "model", "defaults", "rules", "sites", "calibration", "plan"}
_BUDGET_KEYS = {"density", "top_p", "min_density"}
_OVERRIDE_KEYS = {"enable", "method", "tile"} | _BUDGET_KEYS


def _expect_map(obj, key: str, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        _fail(key or "(top level)", f"must be a mapping; got {type(obj).__name__}")
    for k in obj:
        if k not in allowed:
            hint = _closest(str(k), allowed)
            _fail(f"{key}.{k}" if key else str(k),
                  f"unknown key{hint}; valid keys here: {', '.join(sorted(allowed))}")
    for k in required:
        if k not in obj:
            _fail(f"{key}.{k}" if key else k, "is required")
    return obj


def _closest(word: str, options) -> str:
    import difflib

    m = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _bool(v, key):
    if not isinstance(v, bool):
        _fail(key, f"must be true or false; got {v!r}")
    return v


def _schedule_from(raw, key: str) -> tuple[ScheduleStep, ...]:
    if not isinstance(raw, list):
        _fail(key, f"must be a list of {{from_step, scale}} entries; got {raw!r}")
    out = []
    for i, e in enumerate(raw):
        k = f"{key}[{i}]"
        e = _expect_map(e, k, {"from_step", "scale"}, required=("from_step", "scale"))
        step = _int(e["from_step"], f"{k}.from_step", 0)
        sc = e["scale"]
        if not _in_range(sc, 0.0, math.inf, True):
            _fail(f"{k}.scale", f"must be a positive finite number (a factor on each head's density); got {sc!r}")
        if out and step <= out[-1].from_step:
            _fail(f"{k}.from_step", f"entries must be in increasing step order; {step} follows {out[-1].from_step}")
        out.append(ScheduleStep(step, float(sc)))
    return tuple(out)


def _int(v, key, lo=None):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        _fail(key, f"must be an integer{'' if lo is None else f' >= {lo}'}; got {v!r}")
    if lo is not None and v < lo:
        _fail(key, f"must be >= {lo}; got {v}")
    return int(v)


def _params(entry: dict, method: str | None, key: str) -> dict:
    """Validate a head entry's `params` with its method's `check_params` (the entry must name the method)."""
    from .methods.registry import method_class

    params = entry["params"]
    if method is None:
        _fail(f"{key}.params", "needs 'method' in the same entry (parameters belong to one method)")
    if not isinstance(params, dict):
        _fail(f"{key}.params", f"must be a mapping; got {type(params).__name__}")
    cls = method_class(method)
    check = getattr(cls, "check_params", None)
    if check is None:
        _fail(f"{key}.params", f"method '{method}' takes no parameters")
    try:
        if hasattr(cls, "check_version"):
            cls.check_version(params)
        check({k: v for k, v in params.items() if k != "version"})
    except ValueError as e:
        _fail(f"{key}.params", str(e))
    return params


def _method(v, key):
    from .methods import available_methods

    names = available_methods()
    if not isinstance(v, str) or v not in names:
        _fail(key, f"unknown method {v!r}; registered methods: {', '.join(names)}")
    return v


def _budget_from(obj: dict, key: str) -> Budget | None:
    present = {k: obj[k] for k in _BUDGET_KEYS if k in obj}
    if not present:
        return None
    density, top_p = present.get("density"), present.get("top_p")
    min_density = present.get("min_density", 0.0)
    _check_budget(density, top_p, min_density, key)
    return Budget(density=None if density is None else float(density),
                  top_p=None if top_p is None else float(top_p), min_density=float(min_density))


def _overrides(obj: dict, key: str) -> dict:
    return {
        "enable": _bool(obj["enable"], f"{key}.enable") if "enable" in obj else None,
        "method": _method(obj["method"], f"{key}.method") if "method" in obj else None,
        "tile": check_tile(obj["tile"], f"{key}.tile") if "tile" in obj else None,
        "budget": _budget_from(obj, key),
    }


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build and validate a Recipe from plain data (parsed YAML).

    Raises:
        RecipeError: naming `source` and the key path of the first problem.

    Example:
        >>> recipe_from_dict({"version": 1, "defaults": {"method": "vsa", "budget": {"density": 0.2}}}).defaults.budget
        Budget(density=0.2, top_p=None, min_density=0.0)
    """
    try:
        return _parse(data, source)
    except RecipeError as e:
        if e.source is None and source is not None:
            raise RecipeError(e.reason, source=source, key=e.key) from None
        raise


def _parse(data: Any, source: str | None) -> Recipe:
    if isinstance(data, dict) and "transformers" in data:
        _fail("transformers", "this is a pipeline recipe (one section per transformer): apply it to the pipeline with "
              "sparsify(pipe, recipe), or load it with sparsify.pipeline_recipe.load_pipeline_recipe")
    _expect_map(data, "", _TOP_KEYS, required=("version",))
    version = data["version"]
    if not isinstance(version, numbers.Integral) or isinstance(version, bool):
        _fail("version", f"must be the integer 1 or 2; got {version!r}")
    if version not in RECIPE_VERSIONS:
        _fail("version", f"unsupported recipe version {version!r}; this sparsify reads versions 1 and 2")
    version = int(version)
    plan = None
    if "plan" in data:
        if version < 2:
            _fail("plan", "a generation plan needs 'version: 2' (version 1 recipes hold attention settings only)")
        from .generation.plan import plan_from_dict

        plan = plan_from_dict(data["plan"])

    model = None
    if "model" in data:
        m = _expect_map(data["model"], "model", {"class", "sites"}, required=("class", "sites"))
        if not isinstance(m["class"], str):
            _fail("model.class", f"must be a string; got {m['class']!r}")
        if not isinstance(m["sites"], list):
            _fail("model.sites", "must be a list of {path, kind, heads, head_dim}")
        specs = []
        for i, s in enumerate(m["sites"]):
            k = f"model.sites[{i}]"
            _expect_map(s, k, {"path", "kind", "heads", "head_dim"}, required=("path", "kind", "heads", "head_dim"))
            if s["kind"] not in SITE_KINDS:
                _fail(f"{k}.kind", f"must be one of {SITE_KINDS}; got {s['kind']!r}")
            if not isinstance(s["path"], str):
                _fail(f"{k}.path", f"must be a string; got {s['path']!r}")
            specs.append(SiteSpec(s["path"], s["kind"], _int(s["heads"], f"{k}.heads", 1), _int(s["head_dim"], f"{k}.head_dim", 1)))
        model = ModelSignature(m["class"], tuple(specs))

    defaults = Defaults()
    if "defaults" in data:
        dd = _expect_map(data["defaults"], "defaults",
                         {"method", "tile", "budget", "dense_steps", "dense_layers", "mask_reuse", "schedule"})
        budget = defaults.budget
        if "budget" in dd:
            _expect_map(dd["budget"], "defaults.budget", _BUDGET_KEYS)
            budget = _budget_from(dd["budget"], "defaults.budget")
            if budget is None:
                _fail("defaults.budget", "give 'density' or 'top_p'")
        reuse = None
        if "mask_reuse" in dd:
            mr = _expect_map(dd["mask_reuse"], "defaults.mask_reuse", {"threshold", "max_age"})
            thr = mr.get("threshold", MaskReuse.threshold)
            if not _in_range(thr, 0.0, 2.0, False):
                _fail("defaults.mask_reuse.threshold", f"must be a drift in [0, 2] (cosine distance); got {thr!r}")
            reuse = MaskReuse(threshold=float(thr),
                              max_age=_int(mr.get("max_age", MaskReuse.max_age), "defaults.mask_reuse.max_age", 1))
        schedule = _schedule_from(dd.get("schedule", []), "defaults.schedule")
        layers = dd.get("dense_layers", [])
        if not isinstance(layers, list):
            _fail("defaults.dense_layers", f"must be a list of site indices; got {layers!r}")
        defaults = Defaults(
            method=_method(dd["method"], "defaults.method") if "method" in dd else defaults.method,
            tile=check_tile(dd["tile"], "defaults.tile") if "tile" in dd else defaults.tile,
            budget=budget,
            dense_steps=_int(dd.get("dense_steps", 0), "defaults.dense_steps", 0),
            dense_layers=tuple(_int(x, f"defaults.dense_layers[{i}]", 0) for i, x in enumerate(layers)),
            mask_reuse=reuse,
            schedule=schedule,
        )

    rules = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        _fail("rules", "must be a list of rules, each with a 'match' pattern")
    for i, r in enumerate(raw_rules):
        k = f"rules[{i}]"
        _expect_map(r, k, {"match"} | _OVERRIDE_KEYS, required=("match",))
        pat = r["match"]
        if not isinstance(pat, str) or not pat:
            _fail(f"{k}.match", f"must be a non-empty glob or 're:' regex; got {pat!r}")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                _fail(f"{k}.match", f"invalid regular expression: {e}")
        o = _overrides(r, k)
        rules.append(Rule(match=pat, enable=True if o["enable"] is None else o["enable"],
                          method=o["method"], tile=o["tile"], budget=o["budget"]))

    sites = {}
    raw_sites = data.get("sites", {})
    if not isinstance(raw_sites, dict):
        _fail("sites", "must be a mapping from module path to its configuration")
    for path, e in raw_sites.items():
        k = f"sites.{path}"
        _expect_map(e, k, _OVERRIDE_KEYS | {"heads"})
        o = _overrides(e, k)
        heads = []
        raw_heads = e.get("heads", [])
        if not isinstance(raw_heads, list):
            _fail(f"{k}.heads", "must be a list of per-head entries with a 'head' index")
        seen = set()
        for j, h in enumerate(raw_heads):
            hk = f"{k}.heads[{j}]"
            _expect_map(h, hk, _OVERRIDE_KEYS | {"head", "params"}, required=("head",))
            idx = _int(h["head"], f"{hk}.head", 0)
            if idx in seen:
                _fail(f"{hk}.head", f"head {idx} is listed twice")
            seen.add(idx)
            ho = _overrides(h, hk)
            params = _params(h, ho["method"], hk) if "params" in h else None
            heads.append(HeadEntry(head=idx, **ho, params=params))
        sites[str(path)] = SiteEntry(heads=tuple(heads), **o)

    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        _fail("calibration", "must be a mapping (provenance: model, inputs, budget, date, ...)")
    if calibration is not None and "grid" in calibration:
        g = calibration["grid"]
        if not (isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                            for x in g)):
            _fail("calibration.grid", f"must be the calibration token grid [T, H, W] (positive integers); got {g!r}")

    recipe = Recipe(version=version, model=model, defaults=defaults, rules=tuple(rules), sites=sites,
                    calibration=calibration, plan=plan, source=source)
    if model is not None:  # a recipe that carries a signature must be self-consistent
        recipe.check_against(model.cls, list(model.sites))
    return recipe


def bundled_recipes() -> list[str]:
    """File names of the recipes shipped with sparsify (usable as `recipe="name.yaml"`)."""
    root = resources.files("sparsify.recipes")
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".yaml", ".yml"))) if root.is_dir() else []


_VALID = ("a Recipe, a dict, a path to a YAML file (str or pathlib.Path), or a bundled recipe name "
          "such as 'wan14b.yaml'")


def _resolve_path(name: str | Path) -> Path:
    p = Path(name)
    try:
        if p.exists():
            if p.is_dir():
                raise RecipeError("is a directory; pass the path of a recipe YAML file in it", source=str(name))
            return p
        if p.name == str(name):  # a bare file name: look among bundled recipes
            cand = resources.files("sparsify.recipes") / str(name)
            if cand.is_file():
                return Path(str(cand))
    except RecipeError:
        raise
    except (OSError, ValueError) as e:  # a name the OS cannot look up (too long, NUL byte, ...)
        raise RecipeError(f"cannot be looked up as a file ({type(e).__name__}: {e}); pass {_VALID}",
                          source=_shown(name)) from None
    raise RecipeError(
        f"no such recipe file; bundled recipes are: {', '.join(bundled_recipes()) or '(none)'}",
        source=str(name))


def _shown(value) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # nesting levels a recipe may have (it needs 6); deeper input is refused before it is composed


def _check_depth(text: str) -> None:
    """Raise RecipeError for YAML nested more than MAX_DEPTH levels (libyaml recurses per level: deep input
    would crash the process, and deep flow collections take quadratic time to parse)."""
    depth = peak = 0
    for ch in re.sub(r"[^\[\]{}]", "", text):  # flow brackets, counted without parsing (strings included)
        depth = depth + 1 if ch in "[{" else max(0, depth - 1)
        peak = max(peak, depth)
    if peak <= MAX_DEPTH:
        depth = 0
        for ev in yaml.parse(text, Loader=_SafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                peak = max(peak, depth)
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            if peak > MAX_DEPTH:
                break
    if peak > MAX_DEPTH:
        raise RecipeError(f"not a recipe: the YAML is nested more than {MAX_DEPTH} levels deep (a recipe needs 6)")


def _check_unique_keys(root) -> None:
    """Raise RecipeError (with the key path and line) for a key listed twice in one YAML mapping."""
    todo, seen_nodes = [(root, "")], set()
    while todo:
        node, path = todo.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode) or knode.tag == "tag:yaml.org,2002:merge":
                    todo.append((vnode, path))
                    continue
                key = f"{path}.{knode.value}" if path else str(knode.value)
                if knode.value in first:
                    raise RecipeError(
                        f"duplicate key (line {knode.start_mark.line + 1}; first at line {first[knode.value]}): "
                        "a YAML mapping may list each key once", key=key)
                first[knode.value] = knode.start_mark.line + 1
                todo.append((vnode, key))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((v, f"{path}[{j}]") for j, v in enumerate(node.value))


def parse_yaml(text: str, source: str = "<string>"):
    """Parse recipe YAML strictly: safe tags only, and a key listed twice in one mapping is an error.

    Raises:
        RecipeError: naming `source`, and the key path and line of a duplicate key.

    Example:
        >>> parse_yaml("{version: 1, version: 1}")
        Traceback (most recent call last):
        ...
        sparsify.errors.RecipeError: <string>: key 'version': duplicate key (line 1; first at line 1): a YAML mapping may list each key once
    """
    loader = None
    try:
        _check_depth(text)
        loader = _SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    except RecipeError as e:
        raise RecipeError(e.reason, source=source, key=e.key) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {e}", source=source) from None
    except RecursionError:
        raise RecipeError("not a recipe: the YAML is nested too deeply to read", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_recipe_file(path: Path):
    """The parsed YAML of a recipe file, with every way of failing reported as RecipeError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot be read ({type(e).__name__}: {e.strerror or e})", source=str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        hint = " (it starts with a UTF-16 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise RecipeError(
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} cannot be decoded{hint}; a recipe is a "
            "UTF-8 YAML file", source=str(path)) from None
    if "\x00" in text:
        raise RecipeError("not a text file (it holds NUL bytes); a recipe is a UTF-8 YAML file", source=str(path))
    data = parse_yaml(text, str(path))
    if data is None:
        raise RecipeError("the file is empty; a recipe is a YAML mapping with at least 'version: 1'",
                          source=str(path))
    return data


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """Load and validate a recipe from a path, a bundled file name, a dict, or pass a Recipe through.

    Args:
        recipe: a YAML path, a bare bundled name such as `"wan14b.yaml"`, a dict, or a Recipe.

    Returns:
        The validated Recipe.

    Raises:
        RecipeError: for every malformed recipe and every argument that is not one: the message names the
            file (`<dict>` for a dict, `recipe` for a wrong argument), the key path of the problem and what
            is valid. YAML files must be UTF-8, with each key at most once per mapping.

    Example:
        >>> r = load_recipe({"version": 1, "defaults": {"budget": {"top_p": 0.9, "min_density": 0.05}}})
        >>> r.defaults.budget.top_p
        0.9
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, source="<dict>")
    if not isinstance(recipe, (str, Path)) or isinstance(recipe, str) and not recipe.strip():
        raise RecipeError(f"is {type(recipe).__name__} {_shown(recipe)}; pass {_VALID}", source="recipe")
    path = _resolve_path(recipe)
    return recipe_from_dict(read_recipe_file(path), source=str(path))
