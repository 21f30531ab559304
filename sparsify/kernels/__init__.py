"""Attention kernels: pure-PyTorch reference semantics, Triton kernels and the torch.library op."""

from .reference import block_sparse_attn_reference, selection_to_block_mask

__all__ = ["block_sparse_attn_reference", "selection_to_block_mask"]
