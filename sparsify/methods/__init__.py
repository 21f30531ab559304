"""Tile-selection methods: a registry of named methods that turn q, k and a tile layout into a selection."""

from .registry import available_methods, get_method, register_method
from .select import budget_counts, select_from_scores
from . import dense, vsa, xattention, veda, svg2  # noqa: F401  (register the built-in methods)

__all__ = ["available_methods", "get_method", "register_method", "budget_counts", "select_from_scores"]
