"""One notion of a denoising step for sparsify and diffusers' step caches (`enable_cache`, `cache_context`)."""

from __future__ import annotations

import contextlib

import torch

from ..runtime.state import STATE, timestep_value

DISCOVERY_CONTEXT = "sparsify-discovery"  # the cache context sparsify's site discovery runs in


def _state_managers(model: torch.nn.Module) -> list:
    """The `StateManager`s of the stateful diffusers hooks on `model` and its submodules (empty without any)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is None:
        return []
    try:
        from diffusers.hooks.hooks import StateManager
    except ImportError:
        return []
    children = registry._get_child_registries() if hasattr(registry, "_get_child_registries") else []
    out = []
    for reg in (registry, *children):
        for hook in reg.hooks.values():
            if getattr(hook, "_is_stateful", False):
                out.extend(a for a in vars(hook).values() if isinstance(a, StateManager))
    return out


def cache_context(model: torch.nn.Module):
    """The diffusers `CacheContext` the current call of `model` runs in, or None.

    A pipeline wraps each denoiser call in `model.cache_context("cond" | "uncond", step_index=i, ...)`; the
    context reaches the state managers of the model's stateful cache hooks, so it is visible only while a
    step cache (`model.enable_cache(...)`) is enabled. Without one, nothing is skipped and the timesteps alone
    count the steps.

    Example:
        >>> # with model.cache_context("cond", step_index=3): cache_context(model).step_index  -> 3
    """
    for sm in _state_managers(model):
        ctx = getattr(sm, "_context", None)
        if ctx is not None:
            return ctx
    return None


def _step_hook(model, args, kwargs):
    """Forward pre-hook after sparsify's geometry hook: count this forward's step even if a step cache skips
    every block of it, with the pipeline's own step index where the cache context gives one, and record the
    guidance branch the context names."""
    if torch.compiler.is_compiling():  # a whole-model graph: the op counts steps from the timestep at run time
        return None
    ctx = cache_context(model)
    STATE.branch = getattr(ctx, "name", None)
    STATE.merged = None  # no block runs merged tokens yet (a block that raised may have left its own)
    if STATE.geometry is None:
        return None
    grid = tuple(STATE.geometry[:3])
    t = timestep_value(STATE.timestep) if STATE.timestep is not None else None
    step = getattr(ctx, "step_index", None)
    if step is not None:
        STATE.steps.tell(int(step), t, grid)
    elif t is not None:
        STATE.steps.observe(t, grid)
    return None


def attach_step_clock(model: torch.nn.Module, hooks: list) -> None:
    """Register the step hook on `model` (after sparsify's geometry hook) and append its handle to `hooks`.

    Example:
        >>> # attach_step_clock(model, model._sparsify.hooks)   (sparsify() does this)
    """
    hooks.append(model.register_forward_pre_hook(_step_hook, with_kwargs=True))


CACHE_HOOK_MODULES = ("first_block_cache", "mag_cache", "taylorseer_cache", "faster_cache",
                      "pyramid_attention_broadcast", "sea_cache", "text_kv_cache")  # diffusers.hooks.<name>


def _cache_only_forwards(model: torch.nn.Module) -> list:
    """`(module, forward)` of every module under `model` whose instance forward diffusers' hooks set and whose
    hooks are all step-cache hooks (other hooks, e.g. group offloading, must keep running)."""
    out = []
    for mod in model.modules():
        reg = mod.__dict__.get("_diffusers_hook")
        if reg is None or "forward" not in mod.__dict__ or not reg.hooks:
            continue
        kinds = {type(h).__module__.rpartition(".")[2] for h in reg.hooks.values()}
        if kinds <= set(CACHE_HOOK_MODULES):
            out.append((mod, mod.__dict__["forward"]))
    return out


@contextlib.contextmanager
def discovery_context(model: torch.nn.Module):
    """Run sparsify's site discovery on a model whose step cache is already enabled.

    Discovery traces one forward with Dynamo. Step-cache hooks would hide blocks from it (MagCache's hooks run
    outside Dynamo) and refuse a forward outside a `cache_context`, so while discovery runs the modules that
    carry only cache hooks call their own forward; any other cache state is kept in a context of its own,
    dropped afterwards. The cache starts the first generation as if discovery had never run.

    Example:
        >>> # with discovery_context(model): find_sites(model)
    """
    bypassed = _cache_only_forwards(model)
    for mod, _ in bypassed:
        del mod.__dict__["forward"]
    try:
        if _state_managers(model) and hasattr(model, "cache_context"):
            with model.cache_context(DISCOVERY_CONTEXT):
                yield
        else:
            yield
    finally:
        for mod, fwd in bypassed:
            mod.forward = fwd
        for sm in _state_managers(model):
            state = getattr(sm, "_state_cache", {}).pop(DISCOVERY_CONTEXT, None)
            if state is not None and hasattr(state, "reset"):
                state.reset()
