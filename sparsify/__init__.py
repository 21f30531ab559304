"""sparsify: calibrated block-sparse attention for video Diffusion Transformers."""

__version__ = "0.1.0"

from .api import find_sites, installed_sites, sparsify, unsparsify
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["sparsify", "unsparsify", "find_sites", "installed_sites", "Recipe", "RecipeError", "load_recipe"]
