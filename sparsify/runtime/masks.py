"""Dense attention masks read as what the sparse path can serve: key padding, plus dense rows outside the video span."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: An additive mask value at or below this is "masked": exp(-1e4 + score) underflows to 0 in float32.
MASKED_BELOW = -1e4


@dataclass
class MaskPlan:
    """How the sparse path serves a mask exactly.

    Attributes:
        key_mask: bool `[B, S]`: the keys every video query may attend to.
        dense_rows: long indices of the query rows (outside the video span) whose mask rows differ from
            `key_mask`; they are recomputed densely with their own mask rows. None: no such rows.
        mask: the bool mask `[B|1, H|1, S|1, S]` for those rows.
    """

    key_mask: torch.Tensor
    dense_rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def allowed(attn_mask: torch.Tensor) -> torch.Tensor | None:
    """Bool "may attend" of an SDPA mask, or None for an additive mask with values other than 0 and
    "masked" (-inf, or at most `MASKED_BELOW`, as diffusers' -10000 padding masks).

    Example:
        >>> allowed(torch.tensor([0.0, -10000.0, float("-inf")])).tolist()
        [True, False, False]
        >>> allowed(torch.tensor([0.0, -0.5])) is None
        True
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask
    ok = attn_mask == 0
    if not bool((ok | (attn_mask <= MASKED_BELOW)).all()):
        return None
    return ok


def plan_mask(attn_mask: torch.Tensor, B: int, H: int, S: int, video: tuple[int, int]) -> MaskPlan | None:
    """Read a dense SDPA mask (`[S, S]`, `[B|1, H|1, S|1, S]`, ...) of a call with q `[B, H, S, D]` as
    key padding for the video queries in `video = (start, length)`, plus dense rows for the other queries.

    Served exactly when every video query row of the mask is the same (per batch element, for every
    head) and lets it attend to at least one key: key padding in disguise (all rows equal), or block
    structured masks where text rows see other keys than video rows. Anything else returns None (the
    caller runs dense attention).

    Example:
        >>> m = torch.ones(6, 6, dtype=torch.bool); m[:4, 4:] = False  # video [0, 4) does not see the text
        >>> p = plan_mask(m, 1, 2, 6, (0, 4))
        >>> p.key_mask.tolist(), p.dense_rows.tolist()
        ([[True, True, True, True, False, False]], [4, 5])
    """
    a = allowed(attn_mask)
    if a is None:
        return None
    while a.dim() < 4:
        a = a.unsqueeze(0)
    if a.dim() != 4 or a.shape[-1] != S or a.shape[0] not in (1, B) or a.shape[1] not in (1, H) or a.shape[2] not in (1, S):
        return None
    start, length = video
    rows = a[:, :, start:start + length] if a.shape[2] == S else a
    first = rows[:, :1, :1]  # [B|1, 1, 1, S]
    if not bool((rows == first).all()) or not bool(first.any(-1).all()):
        return None
    key_mask = first[:, 0, 0].expand(B, S)
    if a.shape[2] == 1 or bool((a == first).all()):
        return MaskPlan(key_mask)
    other = torch.cat([torch.arange(0, start), torch.arange(start + length, S)]).to(a.device)
    return MaskPlan(key_mask, other, a)


def dense_rows(q, k, v, plan: MaskPlan, out: torch.Tensor, scale, sdpa) -> torch.Tensor:
    """`out` with the rows `plan.dense_rows` replaced by dense attention under their own mask rows."""
    if plan.dense_rows is None or plan.dense_rows.numel() == 0:
        return out
    r = plan.dense_rows
    rows = sdpa(q.index_select(2, r), k, v, plan.mask.index_select(2, r), 0.0, False, scale=scale)
    out = out.clone()
    out.index_copy_(2, r, rows.to(out.dtype))
    return out
