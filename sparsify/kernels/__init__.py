"""Attention kernels: pure-PyTorch reference semantics, Triton kernels and the torch.library op."""

from .reference import block_sparse_attn_reference, selection_to_block_mask, tile_sequence, tiled_sparse_attention

try:
    from .block_sparse import block_sparse_attn, supports as block_sparse_supports
    from .block_sparse_bwd import BlockSparseAttnFunction, block_sparse_attn_backward, transpose_selection
except ImportError:  # no Triton: the reference path serves every call
    block_sparse_attn = block_sparse_supports = None
    BlockSparseAttnFunction = block_sparse_attn_backward = transpose_selection = None
from . import op  # noqa: F401  (registers torch.ops.sparsify.*)

__all__ = ["block_sparse_attn", "block_sparse_supports", "block_sparse_attn_backward", "BlockSparseAttnFunction",
           "transpose_selection", "block_sparse_attn_reference", "selection_to_block_mask",
           "tile_sequence", "tiled_sparse_attention"]
