"""Pipeline recipes: one version-1 recipe section per transformer of a diffusers pipeline (e.g. Wan 2.2 A14B)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .recipe import (RECIPE_VERSION, RECIPE_VERSIONS, Recipe, RecipeError, YamlDocument, _resolve_path,
                     read_recipe_file, recipe_from_dict)

_TOP_KEYS = {"version", "transformers", "calibration"}


@dataclass(frozen=True)
class PipelineRecipe(YamlDocument):
    """Recipes for the transformers of one pipeline, keyed by component name (`transformer`, `transformer_2`).

    In YAML a top-level `transformers:` mapping holds one complete version-1 recipe per component; a file
    without it is a single-transformer recipe and loads as a plain `Recipe`, unchanged.

    Example:
        >>> r = PipelineRecipe({"transformer": Recipe(), "transformer_2": Recipe()}, calibration={"pipeline": "WanPipeline"})
        >>> sorted(load_pipeline_recipe(r.to_dict()).transformers)
        ['transformer', 'transformer_2']
    """

    transformers: dict[str, Recipe]
    calibration: dict | None = None
    version: int = RECIPE_VERSION
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """A plain-dict form that `load_pipeline_recipe` turns back into an equal PipelineRecipe."""
        out = {"version": self.version, "transformers": {k: r.to_dict() for k, r in self.transformers.items()}}
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        return out



def is_pipeline_recipe_data(data) -> bool:
    """True when parsed recipe data is a pipeline recipe (it has a top-level `transformers` mapping)."""
    return isinstance(data, dict) and "transformers" in data


def pipeline_recipe_from_dict(data, source: str | None = None) -> PipelineRecipe:
    """Build and validate a PipelineRecipe; errors name `source` and the key path (`transformers.<name>.<key>`)."""
    if not isinstance(data, dict):
        raise RecipeError(f"must be a mapping; got {type(data).__name__}", source=source, key="(top level)")
    for k in data:
        if k not in _TOP_KEYS:
            raise RecipeError(f"unknown key in a pipeline recipe; valid keys here: {', '.join(sorted(_TOP_KEYS))}",
                              source=source, key=str(k))
    if data.get("version") not in RECIPE_VERSIONS or isinstance(data.get("version"), bool):
        raise RecipeError(f"unsupported recipe version {data.get('version')!r}; this sparsify reads versions "
                          f"{' and '.join(map(str, RECIPE_VERSIONS))}", source=source, key="version")
    sections = data["transformers"]
    if not isinstance(sections, dict) or not sections:
        raise RecipeError("must be a non-empty mapping from pipeline component name (e.g. transformer, transformer_2) "
                          "to a recipe", source=source, key="transformers")
    out = {}
    for name, section in sections.items():
        try:
            out[str(name)] = recipe_from_dict(section)
        except RecipeError as e:
            key = f"transformers.{name}" + (f".{e.key}" if e.key else "")
            raise RecipeError(e.reason, source=source, key=key) from None
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise RecipeError("must be a mapping (provenance)", source=source, key="calibration")
    return PipelineRecipe(out, calibration=calibration, source=source)


def load_pipeline_recipe(recipe) -> Recipe | PipelineRecipe:
    """Load a pipeline recipe or a single-transformer recipe from a path, bundled name, dict, or object.

    Returns:
        A `PipelineRecipe` when the data has a top-level `transformers` mapping, else a plain `Recipe`.

    Example:
        >>> type(load_pipeline_recipe({"version": 1})).__name__
        'Recipe'
        >>> type(load_pipeline_recipe({"version": 1, "transformers": {"transformer": {"version": 1}}})).__name__
        'PipelineRecipe'
    """
    if isinstance(recipe, (Recipe, PipelineRecipe)):
        return recipe
    if isinstance(recipe, dict):
        data, source = recipe, "<dict>"
    else:
        path = _resolve_path(recipe)
        data, source = read_recipe_file(path), str(path)
    if is_pipeline_recipe_data(data):
        return pipeline_recipe_from_dict(data, source)
    return recipe_from_dict(data, source=source)
