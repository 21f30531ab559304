"""FX passes: discover attention sites, install them, and rewrite compiled graphs to the sparse op."""

from .discover import SiteInfo, capture_graphs, discover
from .patterns import AttentionMatch, find_attention

__all__ = ["SiteInfo", "capture_graphs", "discover", "AttentionMatch", "find_attention"]
