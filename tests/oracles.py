"""Slow, explicit oracles of the selection methods (loops, float64): what the method tests compare against."""

import math

import torch

from sparsify.methods.svg2 import KMeansResult
from sparsify.geometry import TileLayout
from sparsify.methods.veda import DEFAULT_PEAK, FEATURES, ExtremaStats, peak_group
from sparsify.methods.xattention import _check_stride


def veda_reference_stats(x: torch.Tensor, layout: TileLayout) -> ExtremaStats:
    """Slow, explicit reference of `tile_stats`: a loop over tiles and their valid tokens (float64)."""
    B, H, _, D = x.shape
    vol = layout.volume
    out = [torch.empty(B, H, layout.n_tiles, D, dtype=torch.float64) for _ in range(3)]
    for t in range(layout.n_tiles):
        slots = [t * vol + s for s in range(vol) if int(layout.gather[t * vol + s]) >= 0]
        xt = x[:, :, slots].double()
        out[0][:, :, t], out[1][:, :, t], out[2][:, :, t] = xt.mean(2), xt.amax(2), xt.amin(2)
    return ExtremaStats(*out)


def veda_reference_features(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, *,
                            peak: str = DEFAULT_PEAK) -> torch.Tensor:
    """Slow, explicit reference of `veda_features` (all of `FEATURES`): loops over tile pairs, float64."""
    B, H, _, D = q.shape
    scale = 1.0 / math.sqrt(D)
    group = peak_group(peak)
    sq, sk = veda_reference_stats(q, layout), veda_reference_stats(k, layout)
    n, vol = layout.n_tiles, layout.volume
    out = torch.empty(B, H, n, n, len(FEATURES), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            keys = [j * vol + s for s in range(vol) if int(layout.gather[j * vol + s]) >= 0]
            qm = sq.mean[:, :, i]
            mean = (qm * sk.mean[:, :, j]).sum(-1) * scale
            # groups of `group` consecutive slots with a valid key; their means
            groups = [[y for y in keys if (y - j * vol) // group == g] for g in range(vol // group)]
            rows = [k[:, :, ys].double().mean(2) for ys in groups if ys]
            pk = torch.stack([(qm * r).sum(-1) for r in rows], -1).amax(-1) * scale
            L = len(keys)
            c = min(group, L)
            mix = torch.log(((L - c) * torch.exp(mean) + c * torch.exp(pk)) / L)
            corners = [(getattr(sq, a)[:, :, i] * getattr(sk, b)[:, :, j]).sum(-1) * scale
                       for a, b in (("max", "max"), ("min", "min"), ("max", "min"), ("min", "max"))]
            out[:, :, i, j] = torch.stack([mean, pk, mix, *corners], -1)
    return out


def xattention_reference_scores(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, stride: int = 8) -> torch.Tensor:
    """Slow, explicit reference of `xattention_scores` (float64): loops over sub-blocks and antidiagonal entries."""
    _check_stride(layout, stride)
    B, H, N, D = q.shape
    S, n, per = stride, layout.n_tiles, layout.volume // stride
    valid = [int(g) >= 0 for g in layout.gather]
    qd, kd = q.double(), k.double()
    m = N // S
    logits = torch.full((B, H, m, m), float("-inf"), dtype=torch.float64)
    for a in range(m):
        for b in range(m):
            pairs = [(a * S + S - 1 - i, b * S + i) for i in range(S)]  # the sub-block's antidiagonal
            pairs = [(r, c) for r, c in pairs if valid[r] and valid[c]]
            n_keys = sum(valid[b * S:(b + 1) * S])
            if pairs:
                mean = sum((qd[:, :, r] * kd[:, :, c]).sum(-1) for r, c in pairs) / len(pairs)
                logits[:, :, a, b] = mean / math.sqrt(D) + math.log(n_keys)
    out = torch.zeros(B, H, n, n, dtype=torch.float64)
    for a in range(m):
        if not torch.isfinite(logits[0, 0, a]).any():
            continue
        p = torch.softmax(logits[:, :, a], -1) * sum(valid[a * S:(a + 1) * S])
        for j in range(n):
            out[:, :, a // per, j] += p[:, :, j * per:(j + 1) * per].sum(-1)
    return out / out.sum(-1, keepdim=True)


def kmeans_reference(x: torch.Tensor, init: torch.Tensor, iters: int) -> KMeansResult:
    """Exact, slow k-means: per head and per token loops in float64 (the oracle of `kmeans`)."""
    B, H, S, D = x.shape
    n = init.shape[2]
    c = init.double().clone()
    labels = torch.zeros(B, H, S, dtype=torch.int32)
    xd = x.double().cpu()
    c = c.cpu()
    for _ in range(iters):
        for b in range(B):
            for h in range(H):
                for s in range(S):
                    labels[b, h, s] = int(((xd[b, h, s] - c[b, h]) ** 2).sum(-1).argmin())
                for j in range(n):
                    members = xd[b, h][labels[b, h] == j]
                    if len(members):
                        c[b, h, j] = members.mean(0)
    return KMeansResult(c.float(), labels, iters)


def select_clusters_reference(cq, ck, k_sizes, budgets, scale):
    """Exact, slow `select_clusters(centroid_logits(cq, ck, scale), ...)`: the set of kept key clusters per
    (b, h, query cluster), by loops in float64."""
    B, H, nq, _ = cq.shape
    nk = ck.shape[2]
    out = []
    for b in range(B):
        for h in range(H):
            bud = budgets[h]
            sizes = [float(k_sizes[b, h, j]) for j in range(nk)]
            total = sum(sizes)
            for i in range(nq):
                lg = [float((cq[b, h, i].double() * ck[b, h, j].double()).sum()) * scale for j in range(nk)]
                live = [j for j in range(nk) if sizes[j] > 0]
                mx = max(lg[j] for j in live)
                w = {j: sizes[j] * math.exp(lg[j] - mx) for j in live}
                z = sum(w.values())
                if bud.density is not None:
                    ranked = sorted(live, key=lambda j: -lg[j])
                    need, floor = 0, bud.density
                else:
                    ranked = sorted(live, key=lambda j: -w[j])
                    acc, need = 0.0, 0
                    for j in ranked:
                        need += 1
                        acc += w[j] / z
                        if acc >= bud.top_p - 1e-6:
                            break
                    floor = bud.min_density
                held, n_floor = 0.0, 0
                for j in ranked:
                    if held >= floor * total - 1e-6:
                        break
                    n_floor += 1
                    held += sizes[j]
                out.append(set(ranked[:max(1, need, n_floor)]))
    return out
