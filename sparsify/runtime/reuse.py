"""Selection with temporal mask reuse: a head group reuses an earlier step's selection while q and k barely drift."""

from __future__ import annotations

import torch

from ..geometry import pool_tiles
from .state import STATE


def pooled_drift(a: torch.Tensor, b: torch.Tensor, *more: torch.Tensor) -> float:
    """Temporal mask reuse's drift: cosine distance between pooled tile statistics `[B, H, n, D]`,
    averaged over batch, heads and tiles (0: unchanged; 2: opposite). With more pairs
    (`pooled_drift(q, q0, k, k0)`) the largest of the pairs' drifts, read from the device in one sync.

    Example:
        >>> x = torch.randn(1, 2, 4, 8)
        >>> round(pooled_drift(x, x), 6), round(pooled_drift(x, -x), 6), round(pooled_drift(x, x, x, -x), 6)
        (0.0, 2.0, 2.0)
    """
    xs = (a, b, *more)
    if len(xs) % 2:
        raise ValueError("pooled_drift: pass the statistics in pairs (now, cached)")
    d = [1.0 - torch.nn.functional.cosine_similarity(xs[i], xs[i + 1], dim=-1).mean() for i in range(0, len(xs), 2)]
    return float(torch.stack(d).max()) if len(d) > 1 else float(d[0])


def select_tiles(st, impl, key, heads, ts, lay, geom, gen, step, B, agree=None):
    """The group's selection: computed, or reused from an earlier step while q and k barely drifted.

    A selection is reused for at most `max_age` denoising steps after the step that computed it, counted in
    the pipeline's steps (a step whose blocks a step cache skipped still counts), and only by the same call
    slot (`SiteState.slot`: the guidance branch when a cache context names it).
    `agree(key, ok, (drift_q, drift_k), n_heads, threshold) -> bool`, given under sequence parallelism, makes
    the reuse decision together with the ranks that hold the group's other heads (`sparsify.parallel`).
    """
    P = ts.n_video_slots
    budgets = st.budgets(heads, step)
    reuse = st.mask_reuse if step is not None else None
    log = STATE.selection_log if step is not None else None
    stats = ts.stats

    def select():
        return impl.select(ts.q[:, :, :P], ts.k[:, :, :P], lay, budgets, stats)

    if reuse is None and log is None:
        st.selections += 1
        return select()
    pq = stats.q_means if stats.q_means is not None else pool_tiles(ts.q[:, :, :P], lay)
    pk = stats.k_means if stats.k_means is not None else pool_tiles(ts.k[:, :, :P], lay)
    ckey = (key, tuple(heads), geom.grid, B, st.slot)
    hit = st.cache.get(ckey) if reuse is not None else None
    ok = (hit is not None and hit["generation"] == gen and 0 < step - hit["step"] <= reuse.max_age
          and hit["budgets"] == budgets)
    if agree is not None and reuse is not None:
        drifts = (pooled_drift(pq, hit["q"]), pooled_drift(pk, hit["k"])) if ok else None
        ok = agree(key, ok, drifts, len(heads), reuse.threshold)
    else:
        ok = ok and pooled_drift(pq, hit["q"], pk, hit["k"]) <= reuse.threshold
    if ok:
        hit["age"] += 1
        st.reused += 1
        return hit["idx"], hit["cnt"]
    idx, cnt = select()
    st.selections += 1
    if log is not None:
        log(st, (gen, *ckey), step, pq, pk, idx, cnt)
    if reuse is not None:
        st.cache[ckey] = {"q": pq, "k": pk, "idx": idx, "cnt": cnt, "age": 0, "step": step, "generation": gen,
                          "budgets": budgets}
    return idx, cnt
