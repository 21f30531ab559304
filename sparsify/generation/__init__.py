"""Generation speed beyond attention: step caching that agrees with sparsify's step count, token merging, the plan."""

from .steps import attach_step_clock, cache_context, discovery_context

__all__ = ["attach_step_clock", "cache_context", "discovery_context"]
