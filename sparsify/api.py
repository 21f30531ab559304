"""The public facade: `sparsify(model, recipe)` and `unsparsify(model)`."""

from __future__ import annotations

import torch

from . import runtime
from .adapters import GridAdapter, adapter_for
from .passes.discover import _split_inputs, discover, import_bound_modules
from .passes import rewrite as _rewrite  # noqa: F401  (registers the 'sparsify' backend)
from .passes.install import install, uninstall
from .parallel.shard import attach as _attach_head_shards, serial_view
from .recipe import load_recipe

SPARSE_KINDS = ("self", "joint")


def find_sites(model: torch.nn.Module, example_inputs=None, *, grid=None, video_start: int = 0, adapter=None):
    """Discover the attention sites of `model` (see `sparsify.passes.discover`) with its adapter's inputs.

    Returns:
        `(sites, adapter)`: the SiteInfo list and the geometry adapter used.

    Example:
        >>> # sites, _ = find_sites(wan_transformer)
        >>> # [s.path for s in sites if s.kind == "self"][:2]  -> ['blocks.0.attn1', 'blocks.1.attn1']
    """
    if adapter is None:
        adapter = GridAdapter(grid, video_start) if grid is not None else adapter_for(model)
    if example_inputs is None:
        if adapter is None or isinstance(adapter, GridAdapter):
            raise ValueError(
                f"sparsify: no adapter knows {type(model).__name__}; pass example_inputs= (the arguments of "
                "one forward call) so its attention sites can be discovered, and grid=(T, H, W)")
        example_inputs = adapter.example_inputs(model)
    args, kwargs = _split_inputs(example_inputs)
    video_len = adapter.geometry(model, args, kwargs).video_len if adapter is not None else None
    return discover(model, example_inputs, video_len=video_len), adapter


def sparsify(model: torch.nn.Module, recipe, *, example_inputs=None, grid=None, video_start: int = 0,
             adapter=None, mode: str = "install") -> torch.nn.Module:
    """Make the attention sites a recipe enables run block-sparse attention, in place.

    Sites are discovered on the model's Dynamo graph, checked against the recipe, and installed so
    that eager calls, `torch.compile(model, fullgraph=True)`, `backend="sparsify"` and diffusers'
    `compile_repeated_blocks()` all run `torch.ops.sparsify.sparse_attention` there. Per-site
    configuration reaches the op through a per-module tensor, so one compiled block graph serves
    blocks with different configurations.

    Args:
        model: a video DiT (diffusers Wan, HunyuanVideo, CogVideoX, or any module with `grid=`).
        recipe: a Recipe, a dict, a YAML path, or a bundled recipe name such as `"wan14b.yaml"`.
        example_inputs: arguments of one forward call (dict of kwargs or tuple) used to discover
            sites; known families make small ones themselves.
        grid: for models without an adapter: the `(T, H, W)` token grid, or a callable
            `grid(args, kwargs)` evaluated on every top-level call.
        video_start: with `grid`: index of the first video token in the attention sequence.
        adapter: a custom `sparsify.adapters.Adapter`.
        mode: `install` (default) routes sites to the op in Python: eager and every compile style.
            `graph` leaves the model's code alone; the rewrite then happens on the Dynamo graph with
            `torch.compile(model, backend="sparsify")` or the inductor pre-grad pass (whole-model
            compiles only; eager calls stay dense).

    Returns:
        The same model, sparsified. `unsparsify(model)` restores it exactly.

    Raises:
        RecipeError: the recipe does not fit the model (message names the file and key).
        ValueError: no attention sites, or no way to know the token grid.

    Example:
        >>> from sparsify import sparsify
        >>> # model = sparsify(pipe.transformer, recipe="wan14b.yaml")
        >>> # model = sparsify(my_dit, {"version": 1, "defaults": {"budget": {"density": 0.1}}},
        >>> #                  example_inputs=(x,), grid=(16, 30, 52))
    """
    if getattr(model, "_sparsify", None) is not None:
        raise RuntimeError("sparsify: this model is already sparsified; call unsparsify(model) first")
    recipe = load_recipe(recipe)
    with serial_view(model):  # under context parallelism: discover the one-process sites (all heads)
        infos, adapter = find_sites(model, example_inputs, grid=grid, video_start=video_start, adapter=adapter)
    if not any(i.kind in SPARSE_KINDS for i in infos):
        found = ", ".join(f"{i.path} ({i.kind}, {i.q_len} tokens)" for i in infos) or "none"
        raise ValueError(
            f"sparsify: found no self- or joint-attention site in {type(model).__name__}; attention calls "
            f"found: {found}. A site is video attention when its sequence holds the video tokens of the "
            "grid (check grid=/the adapter)")
    recipe.check_against(type(model).__name__, [i.spec() for i in infos])
    states, index = [], 0
    for info in infos:
        if info.kind not in SPARSE_KINDS:
            continue
        configs = recipe.head_configs(info.path, info.heads, site_index=index, kind=info.kind)
        index += 1
        if not any(c.enable for c in configs):
            continue
        states.append(runtime.SiteState(site_id=runtime.STATE.new_id(), path=info.path, kind=info.kind,
                                        heads=info.heads, head_dim=info.head_dim, configs=configs, index=index - 1,
                                        dense_steps=recipe.defaults.dense_steps,
                                        mask_reuse=recipe.defaults.mask_reuse, schedule=recipe.defaults.schedule))
    model._sparsify = install(model, infos, states, recipe, adapter, import_bound_modules(infos), mode)
    try:
        _attach_head_shards(model, model._sparsify)  # Ulysses sequence parallelism: heads per rank
    except Exception:
        unsparsify(model)
        raise
    return model


def unsparsify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `sparsify(model)` exactly: hooks, forwards, attributes and SDPA patches are restored.

    Example:
        >>> # model = unsparsify(model)
    """
    inst = getattr(model, "_sparsify", None)
    if inst is None:
        raise RuntimeError("sparsify: this model is not sparsified")
    uninstall(model, inst)
    del model._sparsify
    return model


def installed_sites(model: torch.nn.Module) -> list:
    """The runtime SiteState of every installed site of a sparsified model (empty if none)."""
    inst = getattr(model, "_sparsify", None)
    return list(inst.sites) if inst is not None else []
