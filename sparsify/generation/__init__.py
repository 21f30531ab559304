"""Generation speed beyond attention: step caching that agrees with sparsify's step count, token merging, the plan."""

from .merge import merge_blocks
from .plan import MergeRange, PlanRunner, StepPlan
from .steps import attach_step_clock, cache_context, discovery_context

__all__ = ["MergeRange", "PlanRunner", "StepPlan", "attach_step_clock", "cache_context", "discovery_context",
           "merge_blocks"]
