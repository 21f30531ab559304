"""Temporal mask reuse under Ulysses: ranks decide each head group's reuse together, as one process would."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_order(configs) -> list[tuple]:
    """The head groups `(method, tile)` of a site's recipe entries in order of first appearance (dense: `("dense",)`).

    Example:
        >>> from sparsify.recipe import HeadConfig
        >>> group_order([HeadConfig(tile=(1, 8, 8)), HeadConfig(method="dense"), HeadConfig(tile=(1, 8, 8))])
        [('vsa', (1, 8, 8)), ('dense',)]
    """
    keys: dict = {}
    for c in configs:
        keys.setdefault(("dense",) if c.is_dense else (c.method, c.tile), None)
    return list(keys)


def reuse_agreement(st, groups: dict, group, device) -> tuple[dict, object]:
    """The rank's head groups in the site's global group order (groups held only by other ranks included, with
    no local heads), and the `agree` function that `select_tiles` calls to decide a group's reuse with all ranks.

    One process reuses a group's cached selection when its q and k drifts, averaged over ALL the group's heads,
    are within the threshold; under Ulysses the heads are spread over ranks, so every rank joins one all-reduce
    per tiled sparse group and call (ranks without heads of the group contribute nothing), in the same order.
    """
    order = group_order(st.configs)
    out = {key: groups.get(key, []) for key in order if key in groups or _tiled(st, key)}

    def agree(key, ok: bool, drifts, n_heads: int, threshold: float) -> bool:
        dq, dk = drifts if drifts is not None else (0.0, 0.0)
        t = torch.tensor([0.0 if ok or n_heads == 0 else 1.0, dq * n_heads, dk * n_heads, float(n_heads)],
                         dtype=torch.float64, device=device if dist.get_backend(group) != "gloo" else "cpu")
        dist.all_reduce(t, group=group)
        fail, sq, sk, n = t.tolist()
        return fail == 0 and n > 0 and sq / n <= threshold and sk / n <= threshold

    return out, agree


def _tiled(st, key) -> bool:
    """Whether the group `key` selects tiles (a sparse method without its own `attend`), so reuse applies."""
    if key == ("dense",):
        return False
    heads = [h for h, c in enumerate(st.configs) if not c.is_dense and (c.method, c.tile) == key]
    return not hasattr(st.method(key, heads), "attend")
