"""Attention kernels: pure-PyTorch reference semantics, Triton kernels and the torch.library op."""

from .reference import block_sparse_attn_reference, selection_to_block_mask, tiled_sparse_attention
from . import op  # noqa: F401  (registers torch.ops.sparsify.*)

__all__ = ["block_sparse_attn_reference", "selection_to_block_mask", "tiled_sparse_attention"]
