"""Attention kernels and the pure-PyTorch oracle they are tested against; `kernel_backend` is the one switch."""

from ._triton import PATHS, enabled, kernel_backend
from .reference import block_sparse_attn_reference, scatter_rows, selection_to_block_mask

try:
    from .block_sparse import block_sparse_attn, supports as block_sparse_supports
    from .block_sparse_bwd import BlockSparseAttnFunction, block_sparse_attn_backward, transpose_selection
except ImportError:  # no Triton: the reference path serves every call
    block_sparse_attn = block_sparse_supports = None
    BlockSparseAttnFunction = block_sparse_attn_backward = transpose_selection = None

__all__ = ["PATHS", "enabled", "kernel_backend", "block_sparse_attn", "block_sparse_supports",
           "block_sparse_attn_backward", "BlockSparseAttnFunction", "transpose_selection",
           "block_sparse_attn_reference", "scatter_rows", "selection_to_block_mask"]
