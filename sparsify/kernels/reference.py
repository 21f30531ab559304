"""Pure-PyTorch reference semantics of block-sparse attention: the oracle every kernel is tested against."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def _check_block_inputs(q, k, v, kv_indices, kv_counts, block_size):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, S, D] with equal shapes; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, S, _ = q.shape
    bm, bn = block_size
    n_qb = -(-S // bm)
    if tuple(kv_counts.shape) != (B, H, n_qb):
        raise ValueError(f"kv_counts must be [B, H, ceil(S/BLOCK_M)] = {(B, H, n_qb)}; got {tuple(kv_counts.shape)}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, n_qb):
        raise ValueError(
            f"kv_indices must be [B, H, ceil(S/BLOCK_M), max_kv] with leading dims {(B, H, n_qb)}; "
            f"got {tuple(kv_indices.shape)}"
        )


def selection_to_block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n_kv_blocks: int) -> torch.Tensor:
    """Turn a (kv_indices, kv_counts) selection into a boolean block mask.

    Args:
        kv_indices: int `[B, H, n_q_blocks, max_kv]`; entries past `kv_counts` are ignored.
        kv_counts: int `[B, H, n_q_blocks]`.
        n_kv_blocks: number of key blocks.

    Returns:
        bool `[B, H, n_q_blocks, n_kv_blocks]`, True where a key block is selected.

    Example:
        >>> idx = torch.tensor([[[[1, 0]]]]); cnt = torch.tensor([[[1]]])
        >>> selection_to_block_mask(idx, cnt, 3).int().tolist()
        [[[[0, 1, 0]]]]
    """
    B, H, n_qb, max_kv = kv_indices.shape
    live = torch.arange(max_kv, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    mask = torch.zeros(B, H, n_qb, n_kv_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    # dead entries are routed to a spare column that is dropped afterwards
    idx = torch.where(live, kv_indices.long(), torch.full_like(kv_indices.long(), n_kv_blocks))
    mask.scatter_(-1, idx, True)
    return mask[..., :n_kv_blocks]


def block_sparse_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    kv_block_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention, computed one query block at a time in float32 (float64 for float64 inputs).

    Query block `i` (rows `i*BLOCK_M .. (i+1)*BLOCK_M`) attends to the key blocks
    `kv_indices[b, h, i, :kv_counts[b, h, i]]`, each covering key rows `j*BLOCK_N .. (j+1)*BLOCK_N`
    clipped to `S`. These are the semantics of FlexAttention's
    `BlockMask.from_kv_blocks(kv_counts, kv_indices, BLOCK_SIZE=(BLOCK_M, BLOCK_N))` with no
    mask_mod. A query row that sees no key at all returns zeros (not NaN).

    Args:
        q, k, v: `[B, H, S, D]`.
        kv_indices: int `[B, H, ceil(S/BLOCK_M), max_kv]`.
        kv_counts: int `[B, H, ceil(S/BLOCK_M)]`.
        block_size: `(BLOCK_M, BLOCK_N)`.
        scale: softmax scale; default `1/sqrt(D)`.
        key_mask: optional bool `[B, S]`; False keys are never attended (used for padded tiles).
        kv_block_lens: optional int32 `[ceil(S/BLOCK_N)]`: only the first `kv_block_lens[j]` keys of
            key block `j` are valid (the Triton kernel's form of a padding mask).

    Returns:
        `[B, H, S, D]` in q's dtype.

    Example:
        >>> q = k = v = torch.randn(1, 2, 200, 64)
        >>> cnt = torch.full((1, 2, 2), 2, dtype=torch.int32)
        >>> idx = torch.tensor([0, 1], dtype=torch.int32).expand(1, 2, 2, 2)
        >>> out = block_sparse_attn_reference(q, k, v, idx, cnt)  # all blocks: dense attention
    """
    _check_block_inputs(q, k, v, kv_indices, kv_counts, block_size)
    B, H, S, D = q.shape
    bm, bn = block_size
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    n_kb = -(-S // bn)
    if kv_block_lens is not None:
        lens_mask = torch.arange(bn, device=q.device).view(1, bn) < kv_block_lens.view(-1, 1).to(q.device)
        lens_mask = lens_mask.reshape(-1)[:S].unsqueeze(0).expand(B, S)
        key_mask = lens_mask if key_mask is None else key_mask.to(torch.bool) & lens_mask
    block_mask = selection_to_block_mask(kv_indices, kv_counts, n_kb)  # [B,H,nq,nk]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf, vf = k.to(acc), v.to(acc)
    out = torch.empty(B, H, S, D, dtype=acc, device=q.device)
    for i in range(block_mask.shape[2]):
        rows = slice(i * bm, min(S, (i + 1) * bm))
        keys = block_mask[:, :, i].repeat_interleave(bn, dim=-1)[..., :S]  # [B,H,S]
        if key_mask is not None:
            keys = keys & key_mask[:, None, :].to(torch.bool)
        s = torch.matmul(q[:, :, rows].to(acc), kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~keys[:, :, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)  # all -inf rows stay finite
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vf) / denom.clamp_min(1e-30)
        out[:, :, rows] = torch.where(denom > 0, o, torch.zeros_like(o))
    return out.to(q.dtype)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, out_len: int) -> torch.Tensor:
    """`y[:, :, rows[r]] = x[:, :, r]` for every `rows[r] >= 0`, into a zeroed `[B, H, out_len, D]`.

    The PyTorch form of the Triton kernel's fused output scatter (`block_sparse_attn_scattered`).

    Example:
        >>> scatter_rows(torch.arange(3.).view(1, 1, 3, 1), torch.tensor([1, -1, 0]), 2).flatten().tolist()
        [2.0, 0.0]
    """
    rows = rows.to(x.device, torch.long)
    keep = rows >= 0
    y = x.new_zeros(*x.shape[:2], out_len, x.shape[3])
    y[:, :, rows[keep]] = x[:, :, keep]
    return y
