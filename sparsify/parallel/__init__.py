"""Sequence parallelism: sparse attention under Ulysses (diffusers, xDiT), head balancing, CFG parallel."""

from .balance import BalancePlan, assign_heads, balance_heads, balance_ratio, head_costs, unbalance_heads
from .guidance import guidance_shard
from .shard import RingAttentionError, attach, diffusers_shard, head_shard, serial_view

__all__ = ["BalancePlan", "RingAttentionError", "assign_heads", "attach", "balance_heads", "balance_ratio",
           "diffusers_shard", "guidance_shard", "head_costs", "head_shard", "serial_view",
           "unbalance_heads"]
