"""Per-family geometry adapters: where the video tokens are, and example inputs for discovery."""

from .base import Adapter, GridAdapter, adapter_for, register_adapter
from . import cogvideox, hunyuan, wan  # noqa: F401  (register the built-in adapters)

__all__ = ["Adapter", "GridAdapter", "adapter_for", "register_adapter"]
