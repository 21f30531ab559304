"""Sparsify every transformer of a diffusers pipeline with its own section of a (pipeline) recipe."""

from __future__ import annotations

import inspect
import warnings

import torch

from .pipeline_recipe import PipelineRecipe, load_pipeline_recipe
from .recipe import RecipeError


def is_pipeline(obj) -> bool:
    """True for a diffusers pipeline (an object with `components`, not itself a module)."""
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "components", None), dict)


def pipeline_transformers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoiser components: those a geometry adapter knows, and the other `transformer*` modules,
    whose geometry is inferred from the arguments of their calls (LTX-Video), in component order.

    Wan 2.2 A14B gives `{"transformer": ..., "transformer_2": ...}`; components that are None are skipped.

    Example:
        >>> # list(pipeline_transformers(wan22_pipe))  -> ['transformer', 'transformer_2']
    """
    from .adapters import adapter_for

    out = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and (adapter_for(comp) is not None or name.startswith("transformer")):
            out[name] = comp
    return out


def call_inputs(model, args, kwargs) -> dict:
    """The arguments of one call of `model` as keyword arguments (`example_inputs` for `sparsify()`).

    Example:
        >>> call_inputs(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), {})["input"].shape
        torch.Size([1, 2])
    """
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    return {k: v for k, v in bound.items() if k != "return_dict"}


def _sparsify_at_first_call(model, recipe, mode: str):
    """Sparsify `model` (no family adapter: its geometry is inferred from the call) with the arguments of its next
    call, before that call runs; `model._sparsify_pending` holds the hook until then."""
    from .api import sparsify

    if getattr(model, "_sparsify", None) is not None or getattr(model, "_sparsify_pending", None) is not None:
        raise RuntimeError("sparsify: this model is already sparsified; call unsparsify(pipe) first")

    def hook(module, args, kwargs):
        handle = module._sparsify_pending
        handle.remove()
        del module._sparsify_pending
        sparsify(module, recipe, example_inputs=call_inputs(module, args, kwargs), mode=mode)
        # the hooks sparsify() registered (geometry, step clock) run from the next call on: run them for this one
        for hid, fn in [(i, f) for i, f in module._forward_pre_hooks.items() if i > handle.id]:
            out = fn(module, args, kwargs) if hid in module._forward_pre_hooks_with_kwargs else fn(module, args)
            if out is not None:
                args, kwargs = out if hid in module._forward_pre_hooks_with_kwargs else (out, kwargs)
                args = args if isinstance(args, tuple) else (args,)
        return args, kwargs

    model._sparsify_pending = model.register_forward_pre_hook(hook, with_kwargs=True)


def sparsify_pipeline(pipe, recipe, *, transformers=None, mode: str = "install"):
    """Sparsify the transformers of a diffusers pipeline, in place, each with its recipe section.

    A pipeline recipe (top-level `transformers:`) gives each named component its own section; a plain
    single-transformer recipe applies to the components named in `transformers` (default: `transformer`).
    Transformers without a recipe stay dense (with a warning). A transformer that no family adapter knows
    (LTX-Video) is sparsified at its next call, before that call runs: its sites are discovered and its token
    grid inferred from that call's arguments (`sparsify(..., example_inputs=<the call's arguments>)`).

    Args:
        pipe: a diffusers pipeline (WanPipeline, WanImageToVideoPipeline, CogVideoXPipeline, ...).
        recipe: a PipelineRecipe or Recipe, a dict, a YAML path or a bundled recipe name.
        transformers: with a plain recipe: the component names it applies to.
        mode: as for `sparsify()`.

    Returns:
        The same pipeline; `unsparsify_pipeline(pipe)` restores it.

    Example:
        >>> # recipe = calibrate_pipeline(pipe, ["a cat on a beach"], budget=0.1)
        >>> # pipe = sparsify_pipeline(pipe, recipe)      # or sparsify(pipe, recipe)
    """
    from .adapters import adapter_for
    from .api import sparsify

    recipe = load_pipeline_recipe(recipe)
    found = pipeline_transformers(pipe)
    if not found:
        raise ValueError(f"sparsify: {type(pipe).__name__} has no transformer that sparsify knows (components: "
                         f"{', '.join(k for k, v in pipe.components.items() if v is not None)})")
    if isinstance(recipe, PipelineRecipe):
        sections = dict(recipe.transformers)
    else:
        names = list(transformers) if transformers is not None else [next(iter(found))]
        sections = {n: recipe for n in names}
    for name in sections:
        if name not in found:
            raise RecipeError(f"the pipeline has no transformer '{name}'; its transformers are: {', '.join(found)}",
                              source=getattr(recipe, "source", None),
                              key=f"transformers.{name}" if isinstance(recipe, PipelineRecipe) else None)
    dense = [n for n in found if n not in sections]
    if dense:
        warnings.warn(f"sparsify: the recipe has no section for {', '.join(dense)}; it stays dense", stacklevel=2)
    done = []
    try:
        for name, section in sections.items():
            if adapter_for(found[name]) is None:
                _sparsify_at_first_call(found[name], section, mode)
            else:
                sparsify(found[name], section, mode=mode)
            done.append(name)
    except Exception:
        for name in done:
            from .api import unsparsify

            if getattr(found[name], "_sparsify_pending", None) is not None:
                found[name]._sparsify_pending.remove()
                del found[name]._sparsify_pending
            else:
                unsparsify(found[name])
        raise
    return pipe


def unsparsify_pipeline(pipe):
    """Undo `sparsify_pipeline(pipe, ...)` on every sparsified transformer of the pipeline."""
    from .api import unsparsify

    found = pipeline_transformers(pipe).values()
    pending = [m for m in found if getattr(m, "_sparsify_pending", None) is not None]
    for m in pending:
        m._sparsify_pending.remove()
        del m._sparsify_pending
    models = [m for m in found if getattr(m, "_sparsify", None) is not None]
    if not models and not pending:
        raise RuntimeError("sparsify: no transformer of this pipeline is sparsified")
    for m in models:
        unsparsify(m)
    return pipe
