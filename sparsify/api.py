"""The public facade: `sparsify(model, recipe)` and `unsparsify(model)`."""

from __future__ import annotations

import warnings

import torch

from . import runtime
from .adapters import Adapter, GridAdapter, adapter_for
from .adapters.base import check_count, check_grid
from .errors import SparsifyArgumentError, SparsifyWarning
from .generation.steps import attach_step_clock, discovery_context
from .passes.discover import _split_inputs, discover, import_bound_modules
from .passes import rewrite as _rewrite  # noqa: F401  (registers the 'sparsify' backend)
from .passes.install import install, uninstall
from .parallel.shard import attach as _attach_head_shards, serial_view
from .recipe import load_recipe

SPARSE_KINDS = ("self", "joint")
MODES = ("install", "graph")


def _check_model(model) -> None:
    """Raise SparsifyArgumentError unless `model` is a plain module sparsify can install on."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        inner = type(model._orig_mod).__name__
        raise SparsifyArgumentError(
            "model", model, f"is a torch.compile wrapper of {inner}; sparsify the module itself and compile after: "
            "m = sparsify(m, recipe); then torch.compile(m) or m.compile_repeated_blocks()",
            shown=f"torch.compile({inner})")
    if not isinstance(model, torch.nn.Module):
        parts = [n for n in ("transformer", "transformer_2") if isinstance(getattr(model, n, None), torch.nn.Module)]
        if parts:
            calls = " and ".join(f"sparsify(pipe.{n}, recipe)" for n in parts)
            raise SparsifyArgumentError(
                "model", model, f"is a {type(model).__name__} (a pipeline, not a module); sparsify its "
                f"transformer{'s' if len(parts) > 1 else ''} in place: {calls}", shown=f"<{type(model).__name__}>")
        raise SparsifyArgumentError("model", model, "must be a torch.nn.Module (the video DiT, e.g. pipe.transformer)",
                                    shown=f"<{type(model).__name__}>")


def _has_tensor(x, depth: int = 0) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if depth > 4:
        return False
    if isinstance(x, dict):
        return any(_has_tensor(v, depth + 1) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v, depth + 1) for v in x)
    return False


def _check_example_inputs(example_inputs) -> None:
    valid = ("must be the arguments of one forward call: a tensor, a tuple/list of positional arguments or a dict "
             "of keyword arguments, holding at least one tensor")
    if isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise SparsifyArgumentError("example_inputs", example_inputs,
                                        f"{valid}; dict keys must be argument names (str), got {bad[0]!r}")
    elif not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise SparsifyArgumentError("example_inputs", example_inputs, f"{valid}; got {type(example_inputs).__name__}")
    if not _has_tensor(example_inputs):
        raise SparsifyArgumentError("example_inputs", example_inputs, valid)


def _resolve_adapter(model, grid, video_start, adapter):
    """The adapter for `model` from `sparsify()`'s arguments, each validated (SparsifyArgumentError)."""
    if adapter is not None:
        if isinstance(adapter, type):
            raise SparsifyArgumentError("adapter", adapter, f"is a class; pass an instance: adapter={adapter.__name__}()")
        if not isinstance(adapter, Adapter) and not (callable(getattr(adapter, "geometry", None))
                                                     and callable(getattr(adapter, "timestep", None))):
            raise SparsifyArgumentError(
                "adapter", adapter, "must be a sparsify.adapters.Adapter (an object with geometry(model, args, "
                "kwargs) and timestep(model, args, kwargs)), or None for the model's registered adapter")
        if grid is not None:
            raise SparsifyArgumentError("grid", grid, "would be ignored: adapter= decides the grid; pass one or the other")
        if check_count(video_start, "video_start") != 0:
            raise SparsifyArgumentError("video_start", video_start,
                                        "would be ignored: adapter= decides where the video tokens start")
        return adapter
    if grid is not None:
        return GridAdapter(grid if callable(grid) else check_grid(grid), check_count(video_start, "video_start"))
    if check_count(video_start, "video_start") != 0:
        raise SparsifyArgumentError("video_start", video_start,
                                    "applies only together with grid=; without grid= the model's adapter knows "
                                    "where the video tokens start")
    return adapter_for(model)


def find_sites(model: torch.nn.Module, example_inputs=None, *, grid=None, video_start: int = 0, adapter=None,
               unplaced: list | None = None):
    """Discover the attention sites of `model` (see `sparsify.passes.discover`) with its adapter's inputs.

    Args:
        model, example_inputs, grid, video_start, adapter: as for `sparsify()`.
        unplaced: if given, receives the `file:line` of attention calls made outside any submodule.

    Returns:
        `(sites, adapter)`: the SiteInfo list and the geometry adapter used.

    Raises:
        SparsifyArgumentError: an argument is invalid, or the model's forward fails on `example_inputs`.

    Example:
        >>> # sites, _ = find_sites(wan_transformer)
        >>> # [s.path for s in sites if s.kind == "self"][:2]  -> ['blocks.0.attn1', 'blocks.1.attn1']
    """
    _check_model(model)
    adapter = _resolve_adapter(model, grid, video_start, adapter)
    given = example_inputs is not None
    if adapter is None and given:  # no family adapter: infer the geometry from shapes
        from .adapters.infer import find_sites_inferred

        _check_example_inputs(example_inputs)
        with discovery_context(model):
            return find_sites_inferred(model, example_inputs, unplaced=unplaced)
    if example_inputs is None:
        if adapter is None or isinstance(adapter, GridAdapter):
            hint = "" if adapter is not None else " and grid=(T, H, W) (no adapter knows this model)"
            raise SparsifyArgumentError(
                "example_inputs", None, f"{type(model).__name__} needs example inputs (the arguments of one forward "
                f"call, e.g. example_inputs=(x,) or a dict of keyword arguments) to find its attention sites{hint}")
        example_inputs = adapter.example_inputs(model)
    else:
        _check_example_inputs(example_inputs)
    args, kwargs = _split_inputs(example_inputs)
    if adapter is None:
        grid = None
    elif isinstance(adapter, GridAdapter) or not given:
        grid = adapter.geometry(model, args, kwargs).grid
    else:
        try:
            grid = adapter.geometry(model, args, kwargs).grid
        except SparsifyArgumentError:
            raise
        except Exception as e:  # noqa: BLE001 - the adapter cannot read these inputs
            raise SparsifyArgumentError(
                "example_inputs", example_inputs, f"the {adapter.name} adapter cannot read the token grid from them "
                f"({type(e).__name__}: {e}); pass the arguments of one forward call of {type(model).__name__}") from e
    try:
        with discovery_context(model):  # a step cache enabled before sparsify() needs a cache context
            infos = discover(model, example_inputs, grid=grid, unplaced=unplaced)
    except Exception as e:  # noqa: BLE001 - the forward failed on the inputs
        if not given:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SparsifyArgumentError(
            "example_inputs", example_inputs, f"running {type(model).__name__} on them under torch.compile (to find "
            f"its attention calls) failed with {type(e).__name__}: {first}; pass the arguments of one forward call "
            "that works") from e
    return infos, adapter


def _warn(message: str) -> None:
    warnings.warn(message, SparsifyWarning, stacklevel=3)


def _check_geometry(model, infos, adapter, example_inputs) -> None:
    """Warn (once per sequence length) where a `grid=` leaves tokens of a site outside the video span, and raise
    where the span does not fit the sequence at all."""
    if not isinstance(adapter, GridAdapter):
        return
    args, kwargs = _split_inputs(example_inputs if example_inputs is not None else ())
    geo = adapter.geometry(model, args, kwargs)
    by_len: dict[int, list[str]] = {}
    for i in infos:
        if i.kind not in SPARSE_KINDS or i.axis != "full":  # factorized sequences hold one frame or one pixel
            continue
        if geo.video_start + geo.video_len > i.q_len:
            raise SparsifyArgumentError(
                "video_start", geo.video_start, f"with grid={geo.grid} the video tokens would end at "
                f"{geo.video_start + geo.video_len}, past the {i.q_len}-token sequence of site '{i.path}'; "
                f"video_start must be at most {i.q_len - geo.video_len}")
        if i.q_len > geo.video_len:
            by_len.setdefault(i.q_len, []).append(i.path)
    for q_len, paths in by_len.items():
        extra = q_len - geo.video_len
        _warn(f"sparsify: grid={geo.grid} covers {geo.video_len} tokens (from token {geo.video_start}) but site "
              f"{', '.join(repr(p) for p in paths[:4])}{f' and {len(paths) - 4} more' if len(paths) > 4 else ''} "
              f"attend over {q_len}: the other {extra} tokens of every call run dense, as text. If they are "
              "video, pass the full grid (a callable grid= for inputs of varying size)")


def sparsify(model: torch.nn.Module, recipe, *, example_inputs=None, grid=None, video_start: int = 0,
             adapter=None, mode: str = "install") -> torch.nn.Module:
    """Make the attention sites a recipe enables run block-sparse attention, in place.

    Sites are discovered on the model's Dynamo graph, checked against the recipe, and installed so
    that eager calls, `torch.compile(model, fullgraph=True)`, `backend="sparsify"` and diffusers'
    `compile_repeated_blocks()` all run `torch.ops.sparsify.sparse_attention` there. Per-site
    configuration reaches the op through a per-module tensor, so one compiled block graph serves
    blocks with different configurations.

    Args:
        model: a video DiT (diffusers Wan, HunyuanVideo, CogVideoX, or any module with `grid=`); the module,
            not a `torch.compile` wrapper; or a diffusers pipeline (see `sparsify.pipeline.sparsify_pipeline`).
        recipe: a Recipe, a dict, a YAML path, or a bundled recipe name such as `"wan14b.yaml"`; for a
            pipeline also a PipelineRecipe (one section per transformer).
        example_inputs: arguments of one forward call (a tensor, a tuple of positional arguments or a dict
            of keyword arguments) used to discover sites; known families make small ones themselves.
        grid: for models without an adapter: the `(T, H, W)` token grid (three positive integers), or a
            callable `grid(args, kwargs)` evaluated on every top-level call.
        video_start: with `grid` only: index (>= 0) of the first video token in the attention sequence.
        adapter: a custom `sparsify.adapters.Adapter` instance (instead of `grid`).
        mode: `install` (default) routes sites to the op in Python: eager and every compile style.
            `graph` leaves the model's code alone; the rewrite then happens on the Dynamo graph with
            `torch.compile(model, backend="sparsify")` or the inductor pre-grad pass (whole-model
            compiles only; eager calls stay dense).

    Returns:
        The same model, sparsified. `unsparsify(model)` restores it exactly.

    Raises:
        RecipeError: the recipe is malformed or does not fit the model (the message names the file, or
            `<dict>`, and the key path).
        SparsifyArgumentError: an argument is invalid (the message names it, its value and what is valid),
            including a grid that leaves the model without a self- or joint-attention site.
        RuntimeError: the model is already sparsified.

    Warns:
        SparsifyWarning: legal but probably unintended input, once per cause: recipe rules or entries that
            change nothing, tokens outside a `grid=`, a grid that differs from the recipe's calibration grid.

    Example:
        >>> from sparsify import sparsify
        >>> # model = sparsify(pipe.transformer, recipe="wan14b.yaml")
        >>> # model = sparsify(my_dit, {"version": 1, "defaults": {"budget": {"density": 0.1}}},
        >>> #                  example_inputs=(x,), grid=(16, 30, 52))
    """
    from .pipeline import is_pipeline, sparsify_pipeline

    if is_pipeline(model):  # a diffusers pipeline: every transformer, each with its recipe section
        return sparsify_pipeline(model, recipe, mode=mode)
    _check_model(model)
    if not isinstance(mode, str) or mode not in MODES:
        raise SparsifyArgumentError("mode", mode, f"must be one of {', '.join(repr(m) for m in MODES)}")
    if getattr(model, "_sparsify", None) is not None:
        raise RuntimeError("sparsify: this model is already sparsified; call unsparsify(model) first")
    adapter = _resolve_adapter(model, grid, video_start, adapter)
    recipe = load_recipe(recipe)
    unplaced: list = []
    with serial_view(model):  # under context parallelism: discover the one-process sites (all heads)
        infos, adapter = find_sites(model, example_inputs, adapter=adapter, unplaced=unplaced)  # None: infer it
    if adapter is None and example_inputs is not None:
        raise SparsifyArgumentError(
            "grid", None, f"no adapter knows {type(model).__name__} and its token grid could not be inferred from "
            "the shapes (a 5-D video latent entering a Conv3d, per-frame Conv2d or Linear patch embedding); pass "
            "grid=(T, H, W) (or a callable grid(args, kwargs)), or adapter=")
    outside = (f"{len(unplaced)} attention call(s) outside any submodule ({', '.join(sorted(set(unplaced))[:3])}), "
               "which sparsify cannot install on: it routes attention per submodule, so move such a call into an "
               "nn.Module of its own") if unplaced else ""
    if not any(i.kind in SPARSE_KINDS for i in infos):
        found = ", ".join(f"{i.path} ({i.kind}, {i.q_len} tokens)" for i in infos) or "none in submodules"
        arg, val = ("grid", grid) if grid is not None else ("model", model)
        raise SparsifyArgumentError(
            arg, val, f"found no self- or joint-attention site in {type(model).__name__}; attention calls "
            f"found: {found}{'; ' + outside if outside else ''}. A site is video attention when its sequence holds "
            "the video tokens of the grid (check grid=/the adapter)",
            shown=None if arg == "grid" else f"<{type(model).__name__}>")
    if outside:
        _warn(f"sparsify: {type(model).__name__}: {outside}; they run dense")
    _check_geometry(model, infos, adapter, example_inputs)
    specs = [i.spec() for i in infos]
    recipe.check_against(type(model).__name__, specs)
    if recipe.plan is not None:  # a generation plan is made for one model: refuse another before installing
        blocks = getattr(model, "blocks", None)
        recipe.plan.check_model(type(model).__name__, len(blocks) if isinstance(blocks, torch.nn.ModuleList) else 0,
                                recipe.where)
    for key, message in recipe.unintended(specs):
        _warn(f"sparsify: {recipe.where}: key '{key}': {message}")
    shared: set = set()
    states, index = [], 0
    for info in infos:
        if info.kind not in SPARSE_KINDS:
            continue
        configs = recipe.head_configs(info.path, info.heads, site_index=index, kind=info.kind)
        index += 1
        if not any(c.enable for c in configs):
            continue
        states.append(runtime.SiteState(site_id=runtime.STATE.new_id(), path=info.path, kind=info.kind,
                                        heads=info.heads, head_dim=info.head_dim, axis=info.axis, configs=configs,
                                        index=index - 1,
                                        dense_steps=recipe.defaults.dense_steps,
                                        mask_reuse=recipe.defaults.mask_reuse, schedule=recipe.defaults.schedule,
                                        check=call_check(info, adapter, example_inputs, model, recipe, shared)))
    model._sparsify = install(model, infos, states, recipe, adapter, import_bound_modules(infos), mode)
    try:
        _attach_head_shards(model, model._sparsify)  # Ulysses sequence parallelism: heads per rank
        if adapter is not None:
            attach_step_clock(model, model._sparsify.hooks)  # steps a step cache skips still count
        if recipe.plan is not None:
            from .generation.plan import PlanRunner

            runner = PlanRunner(model, recipe.plan, recipe.defaults.tile, recipe.where)
            model._sparsify.undo.append(runner.remove)
    except Exception:
        unsparsify(model)
        raise
    return model


def call_check(info, adapter, example_inputs, model, recipe, shared: set):
    """The check run before each call of the site `info`: a `grid=` that now leaves video tokens outside its
    span, and a grid that differs from the recipe's calibration grid (warned once per model).

    Returns:
        `check(state, geometry, seq_len)`, or None when there is nothing to check.
    """
    extra0 = None
    if isinstance(adapter, GridAdapter) and info.axis == "full":
        args, kwargs = _split_inputs(example_inputs if example_inputs is not None else ())
        extra0 = info.q_len - adapter.geometry(model, args, kwargs).video_len
    cal = recipe.calibration_grid
    if extra0 is None and cal is None:
        return None

    def check(st, geom, seq_len):
        extra = seq_len - geom.video_len
        if extra0 is not None and extra > extra0:
            if extra0 == 0:
                raise SparsifyArgumentError(
                    "grid", geom.grid, f"site '{st.path}' is video-only self-attention (its {info.q_len} tokens "
                    f"were the whole grid when sparsify() ran) but this call has {seq_len} tokens and the grid "
                    f"covers {geom.video_len}: {extra} video tokens would run dense as text. Pass a callable "
                    "grid(args, kwargs) -> (T, H, W) that reads the grid from the inputs")
            if ("tokens", seq_len) not in st.warned:
                st.warned.add(("tokens", seq_len))
                _warn(f"sparsify: site '{st.path}': this call has {seq_len} tokens; grid={geom.grid} covers "
                      f"{geom.video_len} (from token {geom.video_start}): {extra} tokens run dense as text, "
                      f"{extra - extra0} more than when sparsify() ran. If they are video, pass a callable grid=")
        if cal is not None and tuple(geom.grid) != cal and "calibration" not in shared:
            shared.add("calibration")
            _warn(f"sparsify: {recipe.where}: key 'calibration': the recipe was calibrated at grid {cal} but "
                  f"the model now runs at {tuple(geom.grid)}; per-head budgets and tiles chosen at one resolution "
                  "may not suit another: recalibrate at this resolution for the best quality")

    return check


def unsparsify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `sparsify(model)` exactly: hooks, forwards, attributes, processors and SDPA patches are restored.

    Compilation applied in place after `sparsify()` (`compile_repeated_blocks()`, `module.compile()`) traced
    the sparse op into its graphs, so it is removed as well: afterwards the model computes exactly what it
    computed before `sparsify()`, uncompiled; compile it again for a compiled dense model. A
    `torch.compile(model)` wrapper is a separate object that unsparsify cannot reach: it recompiles the dense
    code on its next call and matches the original only within the compiler's rounding.

    Example:
        >>> # model = unsparsify(model)
    """
    from .pipeline import is_pipeline, unsparsify_pipeline

    if is_pipeline(model):
        return unsparsify_pipeline(model)
    inst = getattr(model, "_sparsify", None)
    if inst is None:
        raise RuntimeError("sparsify: this model is not sparsified")
    uninstall(model, inst)
    del model._sparsify
    return model


def installed_sites(model: torch.nn.Module) -> list:
    """The runtime SiteState of every installed site of a sparsified model (empty if none).

    Counters of each state: `calls` counts attention calls of the site. `selections` and `reused` count per
    head group and call: the heads of a site are grouped by (method, tile), and every call computes (or, with
    `mask_reuse`, reuses) one selection per sparse group, so a call whose heads use two tile shapes adds 2.
    `density` is the attention work computed over the work the same calls take dense (padding counted).

    Example:
        >>> # for s in installed_sites(model): print(s.path, s.calls, s.selections, s.reused, s.density)
    """
    inst = getattr(model, "_sparsify", None)
    return list(inst.sites) if inst is not None else []
