"""Pure-PyTorch reference semantics of block-sparse attention: the oracle every kernel is tested against."""

from __future__ import annotations

import math

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


def _text_blocks(n_text: int, vol: int) -> int:
    return -(-n_text // vol)


def tiled_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry,
    layout,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    block_fn=None,
) -> torch.Tensor:
    """Sparse attention over a video sequence in its original token order: the op's reference semantics.

    The video span of `geometry` is permuted into the tiles of `layout` (partial edge tiles padded;
    padded keys never attended); query tile `i` attends to the video key tiles
    `kv_indices[b, h, i, :kv_counts[b, h, i]]`. Every other token (text) is dense: text queries attend
    to all tokens and every query attends to all text keys. The output is back in the original order.

    Args:
        q, k, v: `[B, H, S, D]`, original token order.
        geometry: a `Geometry` (grid and video start).
        layout: the `TileLayout` of `geometry.grid`.
        kv_indices, kv_counts: the selection among the `layout.n_tiles` video tiles.
        scale: softmax scale; default `1/sqrt(D)`.
        key_mask: optional bool `[B, S]`; False keys are excluded (e.g. padded text).
        block_fn: the block-sparse kernel to run (default: `block_sparse_attn_reference`); it is
            called as `block_fn(q, k, v, idx, cnt, block_size=..., scale=..., key_mask=...)`.

    Returns:
        `[B, H, S, D]` in q's dtype.

    Example:
        >>> from sparsify.layout import Geometry, tile_layout
        >>> g = Geometry((2, 4, 8)); lay = tile_layout(g.grid, (1, 4, 16))
        >>> q = torch.randn(1, 1, 64, 16); n = lay.n_tiles
        >>> idx = torch.arange(n, dtype=torch.int32).expand(1, 1, n, n); cnt = torch.full((1, 1, n), n)
        >>> out = tiled_sparse_attention(q, q, q, g, lay, idx, cnt)
    """
    block_fn = block_sparse_attn_reference if block_fn is None else block_fn
    B, H, S, D = q.shape
    geometry.check(S)
    vol, n = layout.volume, layout.n_tiles
    vs, vl = geometry.video_start, geometry.video_len
    dev = q.device
    text_idx = torch.cat([torch.arange(0, vs, device=dev), torch.arange(vs + vl, S, device=dev)])
    n_text = text_idx.numel()
    n_tb = _text_blocks(n_text, vol)
    gather = layout.gather.to(dev)
    slot_src = torch.where(gather >= 0, gather + vs, torch.zeros_like(gather))
    text_slots = torch.zeros(n_tb * vol, dtype=torch.long, device=dev)
    text_slots[:n_text] = text_idx
    src = torch.cat([slot_src, text_slots])  # token feeding each padded slot
    valid = torch.cat([gather >= 0, torch.arange(n_tb * vol, device=dev) < n_text])
    qs, ks, vs_ = (x.index_select(2, src) for x in (q, k, v))
    kmask = valid.unsqueeze(0).expand(B, -1)
    if key_mask is not None:
        kmask = kmask & key_mask.to(torch.bool).index_select(1, src)
    # full selection: video tiles (+ all text blocks); text query blocks see every block
    n_blocks = n + n_tb
    max_kv = kv_indices.shape[-1] + n_tb
    width = max(max_kv, n_blocks) if n_tb else max_kv  # text query blocks list every block
    idx = torch.zeros(B, H, n_blocks, width, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, H, n_blocks, dtype=torch.int32, device=dev)
    idx[:, :, :n, : kv_indices.shape[-1]] = kv_indices.to(dev, torch.int32)
    cnt[:, :, :n] = kv_counts.to(dev, torch.int32)
    if n_tb:
        text_ids = torch.arange(n, n_blocks, dtype=torch.int32, device=dev)
        # write the text block ids right after each row's live video entries
        pos = kv_counts.to(dev, torch.long).unsqueeze(-1) + torch.arange(n_tb, device=dev)
        idx[:, :, :n].scatter_(-1, pos, text_ids.expand(B, H, n, n_tb).contiguous())
        cnt[:, :, :n] += n_tb
        idx[:, :, n:, :n_blocks] = torch.arange(n_blocks, dtype=torch.int32, device=dev)
        cnt[:, :, n:] = n_blocks
    out_slots = block_fn(qs, ks, vs_, idx, cnt, block_size=(vol, vol), scale=scale, key_mask=kmask)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    live = torch.nonzero(valid).squeeze(1)
    out.index_copy_(2, src[live], out_slots.index_select(2, live))
    return out
