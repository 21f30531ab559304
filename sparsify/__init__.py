"""sparsify: calibrated block-sparse attention for video Diffusion Transformers."""

__version__ = "0.1.0"

from .api import find_sites, installed_sites, sparsify, unsparsify
from .errors import RecipeError, SparsifyArgumentError, SparsifyWarning
from .recipe import Recipe, load_recipe
from .training import SparsityRamp, add_vsa_gates, set_density


def calibrate(model, forward_loop, config=None, **kwargs) -> Recipe:
    """Calibrate `model` and return its recipe; see `sparsify.calibrate.core.calibrate` and `CalibrationConfig`."""
    from .calibrate.core import calibrate as _calibrate

    return _calibrate(model, forward_loop, config, **kwargs)


__all__ = ["sparsify", "unsparsify", "calibrate", "find_sites", "installed_sites", "Recipe", "RecipeError",
           "SparsifyArgumentError", "SparsifyWarning",
           "load_recipe", "add_vsa_gates", "set_density", "SparsityRamp"]
