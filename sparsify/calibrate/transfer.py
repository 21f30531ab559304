"""Resolution transfer: the output error of a recipe applied at another grid, against one calibrated there."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseRun:
    """Outputs of one sparse run and the attention density it achieved (padding counted, every sparse site)."""

    outputs: list
    density: float


def sparse_run(target, recipe, run, *, example_inputs=None) -> SparseRun:
    """Sparsify `target` (a model or a pipeline) with `recipe`, call `run()` (returns a list of tensors), restore it.

    Example:
        >>> # r = sparse_run(model, "my.yaml", lambda: [model(**x)[0]]); r.density
    """
    from ..api import installed_sites, sparsify, unsparsify
    from ..pipeline import is_pipeline, pipeline_transformers

    kw = {} if is_pipeline(target) or example_inputs is None else {"example_inputs": example_inputs}
    sparsify(target, recipe, **kw)
    try:
        with torch.no_grad():
            outputs = [o.detach().float() for o in run()]
        models = list(pipeline_transformers(target).values()) if is_pipeline(target) else [target]
        sites = [s for m in models for s in installed_sites(m)]
        work, dense = sum(s.work for s in sites), sum(s.dense_work for s in sites)
    finally:
        unsparsify(target)
    return SparseRun(outputs, work / dense if dense else 1.0)


def relative_error(outputs, reference) -> float:
    """Relative squared error `sum |o - r|^2 / sum |r|^2` over paired lists of tensors.

    Example:
        >>> relative_error([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 2.0])])
        0.2
    """
    num = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, reference))
    return num / max(sum(float((r.float() ** 2).sum()) for r in reference), 1e-30)


def transfer_report(target, transferred, native, run, *, example_inputs=None, grid=None) -> dict:
    """The output error (against dense) at the current resolution of a transferred recipe and of a native one.

    Args:
        target: the model or pipeline, dense (it is sparsified and restored twice).
        transferred: the recipe calibrated at another resolution.
        native: the recipe calibrated at this resolution with the same settings.
        run: `run()` produces the outputs compared (e.g. the model's outputs, or a pipeline's final latents).
        example_inputs: small inputs for site discovery (models only).
        grid: the token grid `(T, H, W)` of this resolution (recorded in the report).

    Returns:
        `{"from_grid", "to_grid", "transferred": {"output_error", "density"}, "native": {...}, "penalty"}`,
        penalty being the transferred error over the native one (1.0: no loss from transferring).
    """
    with torch.no_grad():
        dense = [o.detach().float() for o in run()]
    t = sparse_run(target, transferred, run, example_inputs=example_inputs)
    n = sparse_run(target, native, run, example_inputs=example_inputs)
    et, en = relative_error(t.outputs, dense), relative_error(n.outputs, dense)
    cal = getattr(transferred, "calibration", None) or {}
    return {"from_grid": cal.get("grid"), "to_grid": list(grid) if grid is not None else None,
            "transferred": {"output_error": et, "density": round(t.density, 6)},
            "native": {"output_error": en, "density": round(n.density, 6)},
            "penalty": et / en if en > 0 else float("inf") if et > 0 else 1.0}


def format_report(rep: dict) -> str:
    """A short table of `transfer_report`'s result."""
    g = lambda x: "x".join(map(str, x)) if x else "?"  # noqa: E731
    return (f"resolution transfer {g(rep['from_grid'])} -> {g(rep['to_grid'])} (model-output relative squared error "
            f"against dense; density = computed / dense attention work, padding counted)\n"
            f"  transferred recipe: error {rep['transferred']['output_error']:.4g}  density "
            f"{rep['transferred']['density']:.4g}\n"
            f"  native recipe:      error {rep['native']['output_error']:.4g}  density {rep['native']['density']:.4g}\n"
            f"  penalty (transferred / native error): {rep['penalty']:.3g}x")
