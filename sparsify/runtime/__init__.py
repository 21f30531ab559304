"""The op's runtime: per-site state and step tracking, mask reuse, dispatch, the tiled sequence, the custom op."""

from .dispatch import (block_fn_for, block_lens_from_mask, dense_attention, key_padding_mask, run_site,
                       sparse_work)
from .reuse import pooled_drift
from .state import (STATE, SiteState, StepTracker, call_slot, current_geometry, forget_geometry, new_generation,
                    set_geometry, set_timestep, site_state, timestep_value)
from .tiled import TiledSequence, tile_sequence, tiled_sparse_attention
from . import op  # noqa: F401  (registers torch.ops.sparsify.*)

__all__ = ["STATE", "SiteState", "StepTracker", "TiledSequence", "block_fn_for", "block_lens_from_mask",
           "call_slot", "current_geometry", "dense_attention", "forget_geometry", "key_padding_mask",
           "new_generation", "pooled_drift", "run_site", "set_geometry", "set_timestep", "site_state", "sparse_work",
           "tile_sequence", "tiled_sparse_attention", "timestep_value"]
