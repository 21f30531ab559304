"""Veda tile selection: extrema-aware tile statistics and a per-head estimator distilled from full attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..geometry import TileLayout, pool_tiles
from .base import SelectionMethod, TileStats
from .registry import register_method
from .select import select_from_scores

#: Features of a (query tile i, key tile j) pair, all in logit units (scaled by 1/sqrt(D)):
#: `mean` q̄_i·k̄_j (VSA's score); `peak` the largest logit of the mean query q̄_i over the keys of tile j
#: (see `PEAKS`); `mix` log((L_j - 1)/L_j · exp(mean) + exp(peak)/L_j): L_j - 1 keys at the mean logit
#: and one at the peak, the default estimate of the tile's mean exp-logit; and the four corner products
#: of the per-dim tile maxima and minima, `max_max` qmax_i·kmax_j, `min_min`, `max_min`, `min_max`.
FEATURES: tuple[str, ...] = ("mean", "peak", "mix", "max_max", "min_min", "max_min", "min_max")

#: How `peak` is computed: `keys`, from the mean query against every key of the tile (one `[n_tiles, S]` GEMM
#: per head); `keys/4`, against the means of consecutive groups of 4 key slots (a quarter of that GEMM; `mix`
#: then puts 4 keys at the peak). Other choices lost recall or time (docs/kernel-notes.md).
PEAKS: tuple[str, ...] = ("keys", "keys/4")

#: `keys/4` keeps most of the exact peak's recall gain at a quarter of its GEMM (RESULTS.md, "Selection fidelity").
DEFAULT_PEAK = "keys/4"

_MAX_ELEMS = 1 << 24  # logits held at once by the exact peak


def _check_features(features: Sequence[str]) -> None:
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise ValueError(f"veda: unknown feature(s) {bad}; features: {', '.join(FEATURES)}")


def peak_group(peak: str) -> int:
    """Key slots behind each logit of a `peak` mode: 1 for `keys`, 4 for `keys/4`.

    Example:
        >>> peak_group("keys"), peak_group("keys/4")
        (1, 4)
    """
    if peak not in PEAKS:
        raise ValueError(f"veda: unknown peak '{peak}'; choose one of {', '.join(PEAKS)}")
    return int(peak.partition("/")[2] or 1)


@dataclass(frozen=True)
class ExtremaStats:
    """Per-dimension mean, max and min over each tile's valid tokens, float32 `[B, H, n_tiles, D]` each."""

    mean: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor


def tile_stats(x: torch.Tensor, layout: TileLayout) -> ExtremaStats:
    """Mean, max and min of every tile of `x` `[B, H, n_tiles*volume, D]` (tile order), padding ignored.

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> lay = tile_layout((1, 1, 3), (1, 1, 64)); x = torch.zeros(1, 1, 64, 1); x[0, 0, :3, 0] = torch.tensor([1., 2., 6.])
        >>> st = tile_stats(x, lay); st.mean.item(), st.max.item(), st.min.item()
        (3.0, 6.0, 1.0)
    """
    from ..kernels._triton import use_triton

    if use_triton("pool", x) and x.shape[2] == layout.padded_len:  # one read of x for all three
        from ..kernels.gather import pool_stats

        return ExtremaStats(*pool_stats(x, layout.tile_lens, layout.volume, ("mean", "max", "min")))
    return ExtremaStats(pool_tiles(x, layout), pool_tiles(x, layout, "max"), pool_tiles(x, layout, "min"))


def _key_peak(k: torch.Tensor, qm: torch.Tensor, layout: TileLayout, scale: float, group: int = 1,
              max_elems: int = _MAX_ELEMS) -> torch.Tensor:
    """max over the valid keys y of tile j (group = 1), or over the means of its groups of `group` consecutive
    slots with a valid key, of `q̄_i · k_y * scale`: `[B, H, n, n]`, in query-tile chunks."""
    B, H, N, D = k.shape
    n, vol = layout.n_tiles, layout.volume
    if _fast_peaks(k, layout, group, qm):  # one fused GEMM + max, no logits in memory
        from ..kernels.tile_select import tile_peaks

        return tile_peaks(qm, _key_rows(k, layout, group), layout.tile_lens, vol // group, scale, group=group)[0]
    rows = vol // group
    valid = (layout.gather >= 0).to(k.device).view(n, rows, group)
    if group > 1:  # group means over valid slots, rounded to k's dtype as the fast path's are
        kg = k.view(B, H, n, rows, group, D).float().masked_fill(~valid.view(1, 1, n, rows, group, 1), 0.0)
        k = (kg.sum(-2) / valid.sum(-1).clamp_min(1).view(1, 1, n, rows, 1)).to(k.dtype).view(B, H, n * rows, D)
    empty = ~valid.any(-1).view(1, 1, 1, n, rows)
    kt = k.transpose(-1, -2)  # the GEMM runs in k's dtype (bf16 on GPU), logits in float32
    qm = qm.to(k.dtype)
    out = torch.empty(B, H, n, n, dtype=torch.float32, device=k.device)
    step = max(1, max_elems // max(1, B * H * n * rows))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        lg = (torch.matmul(qm[:, :, i0:i1], kt).float() * scale).view(B, H, i1 - i0, n, rows)
        out[:, :, i0:i1] = lg.masked_fill(empty, float("-inf")).amax(-1)
    return out


def _key_rows(k: torch.Tensor, layout: TileLayout, group: int, stats: TileStats | None = None) -> torch.Tensor:
    """The key rows `tile_peaks` takes: k itself, or the means of its groups of `group` slots (in k's dtype;
    those the fused gather computed, `stats.k_group_means`, else one pass over k)."""
    if group == 1:
        return k
    from ..kernels.tile_select import group_means

    hit = stats.k_group_means if stats is not None else None
    if hit is not None and hit.shape[2] == layout.padded_len // group:
        return hit
    return group_means(k, layout.tile_lens, layout.volume, group)


def _q_means(q: torch.Tensor, layout: TileLayout, stats: TileStats | None) -> torch.Tensor:
    """q's float32 tile means: those the gather computed, else pooled."""
    return stats.q_means if stats is not None and stats.q_means is not None else pool_tiles(q, layout)


def _fast_peaks(k: torch.Tensor, layout: TileLayout, group: int, *others: torch.Tensor) -> bool:
    from ..kernels._triton import use_triton

    vol, D = layout.volume, k.shape[-1]
    return (use_triton("peak", k, *others) and not vol & (vol - 1) and not D & (D - 1) and D >= 16
            and k.shape[2] == layout.padded_len and 1 <= group <= vol)


def _log_lens(layout: TileLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log L_j, log(L_j - 1))` of the key tiles as `[1, 1, 1, n]` rows (log 0 = -inf)."""
    lens = layout.tile_lens.to(device).float().view(1, 1, 1, -1)
    return lens.log(), (lens - 1).log()


def mix_logit(mean: torch.Tensor, peak: torch.Tensor, layout: TileLayout, group: int = 1) -> torch.Tensor:
    """The `mix` feature: `log((L_j - c)/L_j · exp(mean) + c/L_j · exp(peak))` for key tiles of `L_j` valid
    keys, with `c = min(group, L_j)` keys at the peak (`group` = the key slots behind a peak logit).

    Example:
        >>> from sparsify.geometry import tile_layout
        >>> lay = tile_layout((1, 1, 64), (1, 1, 64))  # one full tile of 64 keys
        >>> round(mix_logit(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), lay).item(), 6)  # all logits 0
        0.0
    """
    if group == 1:
        log_len, log_len1 = _log_lens(layout, mean.device)
        return torch.logaddexp(mean + log_len1, peak) - log_len
    lens = layout.tile_lens.to(mean.device).float().view(1, 1, 1, -1)
    c = lens.clamp(max=group)
    return torch.logaddexp(mean + (lens - c).log(), peak + c.log()) - lens.log()


def veda_features(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, *, peak: str = DEFAULT_PEAK,
                  features: Sequence[str] = FEATURES, max_elems: int = _MAX_ELEMS) -> torch.Tensor:
    """The tile-pair features an estimator weighs, float32 `[B, H, n_tiles, n_tiles, len(features)]`.

    `q, k` are `[B, H, n_tiles*volume, D]` in tile order (padded slots ignored); `features` are from `FEATURES`,
    in the order wanted; `max_elems` bounds the logits the exact peak holds at once.

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> lay = tile_layout((2, 8, 8), (1, 8, 8)); x = to_tiles(torch.randn(1, 2, 128, 16), lay)
        >>> veda_features(x, x, lay).shape
        torch.Size([1, 2, 2, 2, 7])
    """
    _check_features(features)
    scale = 1.0 / math.sqrt(q.shape[-1])
    group = peak_group(peak)
    cache: dict[str, torch.Tensor] = {}
    wanted = [f for f in ("peak", "mean", "mix") if f in features]
    if wanted and _fast_peaks(k, layout, group, q):
        # one fused kernel: GEMM of the tile means of q with every key row, max (and mean, mix) per key tile
        cache.update(zip(wanted, _fused(q, k, layout, group, wanted)))
    stats: dict[str, ExtremaStats] = {}

    def st(name: str) -> ExtremaStats:  # q's or k's tile statistics, computed when first needed
        if name not in stats:
            stats[name] = tile_stats(q if name == "q" else k, layout)
        return stats[name]

    def dot(a, b):
        return torch.matmul(a, b.transpose(-1, -2)) * scale

    def feat(name: str) -> torch.Tensor:
        if name in cache:
            return cache[name]
        sq, sk = (st("q"), st("k")) if name != "peak" else (None, None)
        if name == "mean":
            v = dot(sq.mean, sk.mean)
        elif name == "peak":
            v = _key_peak(k, pool_tiles(q, layout), layout, scale, group, max_elems)
        elif name == "mix":
            v = mix_logit(feat("mean"), feat("peak"), layout, group)
        else:
            a, b = name.split("_")
            v = dot(getattr(sq, a), getattr(sk, b))
        cache[name] = v
        return v

    return torch.stack([feat(f) for f in features], -1)


def _fused(q, k, layout: TileLayout, group: int, outputs, stats: TileStats | None = None) -> list[torch.Tensor]:
    """`tile_peaks` outputs for the tile means of q against k's key rows of `group` slots."""
    from ..kernels.tile_select import tile_peaks

    return tile_peaks(_q_means(q, layout, stats), _key_rows(k, layout, group, stats), layout.tile_lens,
                      layout.volume // group, 1.0 / math.sqrt(q.shape[-1]), group=group, outputs=outputs)


@dataclass
class VedaEstimator:
    """Per-head weights over tile-pair features: `score = sum_f w[h, f] * feature_f + log L_j`.

    The score estimates a tile pair's log attention mass up to a per-query-tile constant. `weights`: float32
    `[H, len(features)]`; `default_estimator` puts 1 on `mix`, `fit_veda_estimator` distills them.

    Example:
        >>> est = default_estimator(2)
        >>> est.to_dict()["heads"][0]["mix"], VedaEstimator.from_dict(est.to_dict()).weights.shape
        (1.0, torch.Size([2, 7]))
    """

    features: tuple[str, ...]
    weights: torch.Tensor
    peak: str = DEFAULT_PEAK

    def __post_init__(self):
        self.features = tuple(self.features)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32)
        if self.weights.dim() != 2 or self.weights.shape[1] != len(self.features):
            raise ValueError(f"VedaEstimator: weights must be [heads, {len(self.features)}] for features "
                             f"{self.features}; got {tuple(self.weights.shape)}")
        _check_features(self.features)
        peak_group(self.peak)

    @property
    def heads(self) -> int:
        return self.weights.shape[0]

    def to_dict(self) -> dict:
        """Plain floats, for a recipe: `{"version", "peak", "heads": [{feature: weight}, ...]}`."""
        return {"version": 1, "peak": self.peak,
                "heads": [{f: float(w) for f, w in zip(self.features, row)} for row in self.weights.tolist()]}

    @classmethod
    def from_dict(cls, d: dict) -> "VedaEstimator":
        """Inverse of `to_dict`; a feature missing from a head's dict has weight 0."""
        heads = d["heads"]
        feats = tuple(f for f in FEATURES if any(f in h for h in heads))
        return cls(feats, [[float(h.get(f, 0.0)) for f in feats] for h in heads], d.get("peak", DEFAULT_PEAK))

    def subset(self, heads: Sequence[int]) -> "VedaEstimator":
        """The estimator of some heads only (e.g. one tile group of a site, or one rank's heads)."""
        return VedaEstimator(self.features, self.weights[list(heads)], self.peak)

    def scores(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
               stats: TileStats | None = None) -> torch.Tensor:
        """Estimated log tile masses `[B, H, n, n]` (up to a per-row constant) of tiled q, k (`stats`: tile
        means the gather already computed)."""
        if q.shape[1] != self.heads:
            raise ValueError(f"veda: the estimator has weights for {self.heads} heads, q has {q.shape[1]}; "
                             "use VedaEstimator.subset(heads) for a subset")
        used = [i for i in range(len(self.features)) if bool((self.weights[:, i] != 0).any())]
        group = peak_group(self.peak)
        if ([self.features[i] for i in used] == ["mix"] and bool((self.weights[:, used[0]] == 1).all())
                and _fast_peaks(k, layout, group, q)):  # the default estimator: the fused kernel's log mass
            return _fused(q, k, layout, group, ("mass",), stats)[0]
        log_len, _ = _log_lens(layout, q.device)
        if not used:
            return log_len.expand(q.shape[0], q.shape[1], layout.n_tiles, -1).contiguous()
        X = veda_features(q, k, layout, peak=self.peak, features=[self.features[i] for i in used])
        w = self.weights[:, used].to(X.device).view(1, -1, 1, 1, len(used))
        return (X * w).sum(-1) + log_len


def default_estimator(heads: int, peak: str = DEFAULT_PEAK) -> VedaEstimator:
    """The unfitted estimator: weight 1 on `mix`, i.e. `score = log((L_j - c) exp(mean) + c exp(peak))`.

    Example:
        >>> default_estimator(1).weights.tolist()
        [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    """
    w = torch.zeros(heads, len(FEATURES))
    w[:, FEATURES.index("mix")] = 1.0
    return VedaEstimator(FEATURES, w, peak)


def fit_veda_estimator(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, *, peak: str = DEFAULT_PEAK,
                       features: Sequence[str] = FEATURES, mass: torch.Tensor | None = None, iters: int = 50,
                       l2: float = 1e-3) -> VedaEstimator:
    """Distill per-head feature weights from full attention on calibration q, k.

    Minimizes, per head, the mass-weighted KL divergence from each query tile's true tile-level attention
    distribution to `softmax` of the estimated scores over key tiles (convex in the weights): L-BFGS (`iters`)
    on standardized features from the default estimator, with an L2 pull `l2` towards it.

    Args:
        q, k: calibration `[B, H, n_tiles*volume, D]` in tile order; B indexes samples.
        layout: their TileLayout.
        features: the features to weigh (must include `mix`, the default start).
        mass: true tile masses `[B, H, n, n]` (default: `testing.planted.attention_tile_mass` of q, k).

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> lay = tile_layout((4, 8, 8), (1, 8, 8)); q, k = (to_tiles(torch.randn(1, 2, 256, 16), lay) for _ in "qk")
        >>> est = fit_veda_estimator(q, k, lay, iters=5)
        >>> est.weights.shape, sorted(est.to_dict()["heads"][0])[:2]
        (torch.Size([2, 7]), ['max_max', 'max_min'])
    """
    features = tuple(features)
    if "mix" not in features:
        raise ValueError(f"fit_veda_estimator: features must include 'mix' (the default start); got {features}")
    if mass is None:
        from ..geometry import from_tiles
        from ..testing.planted import attention_tile_mass

        mass = attention_tile_mass(from_tiles(q, layout), from_tiles(k, layout), layout)
    B, H = q.shape[:2]
    X = veda_features(q, k, layout, peak=peak, features=features).double()
    log_len, _ = _log_lens(layout, q.device)
    mass = mass.to(X.device).double()
    target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-300)
    row_w = mass.sum(-1) / mass.sum((-1, -2)).clamp_min(1e-300).unsqueeze(-1) / B  # [B, H, n]
    finite = torch.isfinite(X)
    X = torch.where(finite, X, torch.zeros_like(X))
    mu = X.mean((0, 2, 3), keepdim=True)
    sd = X.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    Z = (X - mu) / sd
    w0 = default_estimator(H, peak).weights.double()[:, [FEATURES.index(f) for f in features]]
    w0 = w0 * sd.view(H, -1)  # the default in standardized units
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (Z * w.view(1, H, 1, 1, -1)).sum(-1) + log_len.double()
        nll = -(target * torch.log_softmax(logits, -1)).sum(-1)
        loss = (nll * row_w).sum() + l2 * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return VedaEstimator(features, (w.detach() / sd.view(H, -1)).float(), peak)


@register_method("veda")
class Veda(SelectionMethod):
    """Veda's selection: top-k (or top-p) of estimated tile masses per query tile.

    Args:
        estimator: fitted per-head weights (`fit_veda_estimator`); default: `default_estimator`.
        peak: how the default estimator computes tile peaks (`PEAKS`); ignored with an estimator.

    Example:
        >>> from sparsify.geometry import tile_layout, to_tiles
        >>> from sparsify.recipe import Budget
        >>> lay = tile_layout((4, 8, 8), (1, 8, 8)); x = to_tiles(torch.randn(1, 2, 256, 16), lay)
        >>> idx, cnt = Veda().select(x, x, lay, [Budget(density=0.5)] * 2)
        >>> cnt.tolist()
        [[[2, 2, 2, 2], [2, 2, 2, 2]]]
    """

    def __init__(self, estimator: VedaEstimator | None = None, peak: str = DEFAULT_PEAK):
        peak_group(peak)
        self.estimator, self.peak = estimator, peak

    @property
    def key_group(self) -> int:
        """Key slots per peak row when the peak is `keys/4` (the gather can pool k's groups of 4), else 0."""
        g = peak_group(self.estimator.peak if self.estimator is not None else self.peak)
        return g if g > 1 else 0

    def scores(self, q: torch.Tensor, k: torch.Tensor, layout: TileLayout,
               stats: TileStats | None = None) -> torch.Tensor:
        """Estimated log tile masses `[B, H, n, n]` (up to a per-query-tile constant)."""
        est = self.estimator or default_estimator(q.shape[1], self.peak)
        return est.scores(q, k, layout, stats)

    def select(self, q, k, layout, budgets, stats=None):
        return select_from_scores(self.scores(q, k, layout, stats), budgets)

    @staticmethod
    def check_params(params: dict) -> None:
        """Validate one head's recipe parameters: `{peak: one of PEAKS, weights: {feature: float}}`."""
        bad = set(params) - {"peak", "weights"}
        if bad:
            raise ValueError(f"unknown Veda parameter(s) {sorted(bad)}; valid: peak, weights")
        if params.get("peak", DEFAULT_PEAK) not in PEAKS:
            raise ValueError(f"peak must be one of {', '.join(PEAKS)}; got {params.get('peak')!r}")
        w = params.get("weights", {})
        if not isinstance(w, dict) or not w:
            raise ValueError(f"weights must be a non-empty mapping of feature -> number; got {w!r}")
        for f, x in w.items():
            if f not in FEATURES:
                raise ValueError(f"unknown feature {f!r} in weights; features: {', '.join(FEATURES)}")
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                raise ValueError(f"weight of {f!r} must be a finite number; got {x!r}")

    @classmethod
    def from_head_params(cls, head_params) -> "Veda":
        """A Veda whose estimator has one row per head: the head's `weights`, or the default without params.

        Example:
            >>> v = Veda.from_head_params([{"weights": {"mix": 0.5, "mean": 0.5}}, None])
            >>> v.estimator.weights[:, [FEATURES.index("mean"), FEATURES.index("mix")]].tolist()
            [[0.5, 0.5], [0.0, 1.0]]
        """
        peaks = {p.get("peak", DEFAULT_PEAK) for p in head_params if p}
        if len(peaks) > 1:
            raise ValueError(f"veda: heads of one group must share one peak mode; got {sorted(peaks)}")
        peak = peaks.pop() if peaks else DEFAULT_PEAK
        default = default_estimator(1, peak).weights[0].tolist()
        rows = [[float(p["weights"].get(f, 0.0)) for f in FEATURES] if p else default for p in head_params]
        return cls(VedaEstimator(FEATURES, rows, peak))

    @staticmethod
    def head_params(estimator: VedaEstimator, head: int) -> dict:
        """The recipe parameters of one head of a fitted estimator (inverse of `from_head_params`)."""
        return {"peak": estimator.peak,
                "weights": {f: round(float(w), 6) for f, w in zip(estimator.features, estimator.weights[head].tolist())}}
