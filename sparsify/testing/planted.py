"""Planted-geometry attention: synthetic heads and a small video DiT whose heads have known geometry and best tile."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.reference import selection_to_block_mask
from ..geometry import TileLayout, tile_layout

#: The geometry kinds `planted_heads` and `PlantedDiT` can plant.
KINDS: tuple[str, ...] = ("spatial", "temporal", "local3d", "global", "sink", "band", "mixed")

#: Candidate 3-D tiles (64 and 128 tokens) the best tiles are chosen among.
CANDIDATE_TILES: tuple[tuple[int, int, int], ...] = (
    (4, 4, 4), (1, 8, 8), (2, 4, 8), (8, 2, 4), (16, 2, 2), (1, 4, 16), (2, 8, 8), (8, 4, 4))

#: Token grid `(T, H, W)` of the planted heads and of `PlantedDiT`: 2,048 frame-major tokens.
PLANTED_GRID: tuple[int, int, int] = (8, 16, 16)

#: The density the best tiles are verified at (93.75% sparsity): on `PLANTED_GRID`, 2 key tiles of 64 tokens
#: or 1 of 128 per query tile, the same compute for every candidate.
REFERENCE_DENSITY: float = 1 / 16

#: Two candidates whose oracle recalls differ by no more than this are tied (see `good_tiles`).
TIE_TOLERANCE: float = 0.01

#: Per-kind geometry. `sigma`: `(sigma_t, sigma_h, sigma_w)` in grid units of the local kernel
#: `logit = -sum_axis min(d^2 / (2 sigma^2), LOGIT_FLOOR)` (0: the same index only), shaped so that one
#: candidate wins clearly on `PLANTED_GRID` (spatial and local3d heads twice as tall as wide, else an 8x8
#: tile ties a 4x16 strip). `sink_mass`: share of an average query's attention on the `N_SINK` first
#: tokens. `content`: std of the random content logit (default: `noise`). `band_sigma`: width in tokens
#: of the 1-D band in token order.
KIND_SPECS: dict[str, dict] = {
    "spatial": {"sigma": (0.0, 2.0, 1.0)},
    "temporal": {"sigma": (6.0, 0.3, 0.7)},
    "local3d": {"sigma": (1.0, 2.0, 1.0)},
    "global": {"content": 1.0},
    "sink": {"sink_mass": 0.7, "content": 1.0},
    "band": {"band_sigma": 16.0},
    "mixed": {"sigma": (0.0, 2.0, 1.0), "sink_mass": 0.4},
}

#: The best candidate tile of each kind at `REFERENCE_DENSITY` on `PLANTED_GRID`: the argmax of oracle
#: tile recall (see `tile_recall_table`), or, where several tie, the conventional one among them.
BEST_TILE: dict[str, tuple[int, int, int]] = {
    "spatial": (1, 8, 8),
    "temporal": (8, 2, 4),
    "local3d": (4, 4, 4),
    "global": (4, 4, 4),
    "sink": (4, 4, 4),
    "band": (1, 4, 16),
    "mixed": (1, 8, 8),
}

#: Every candidate within `TIE_TOLERANCE` of the best recall: the tile choices a calibrator may make. On
#: 8 frames a (16, 2, 2) tile is the same 8x2x4 column as (8, 2, 4); on a 16-wide frame two 8x8 tiles
#: are the same 8 full rows as two 4x16 strips; global and sink heads have no preference.
GOOD_TILES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "spatial": ((1, 8, 8),),
    "temporal": ((8, 2, 4), (16, 2, 2)),
    "local3d": ((4, 4, 4),),
    "global": CANDIDATE_TILES,
    "sink": CANDIDATE_TILES,
    "band": ((1, 8, 8), (1, 4, 16)),
    "mixed": ((1, 8, 8),),
}

LOGIT_FLOOR = 30.0  # lowest positional logit: exp(-30) ~ 1e-13, so far keys get no mass
N_SINK = 4
_BAND_FREQS = 12
_MIN_CONTENT_DIMS = 8


# positional features: q_i . k_j equals the planted logit exactly

def _axis_kernel(n: int, sigma: float) -> torch.Tensor:
    """`[n, n]` logits `-min(d^2 / (2 sigma^2), LOGIT_FLOOR)` of index distance d (sigma 0: 0 on the diagonal only)."""
    d = torch.arange(n, dtype=torch.float64)
    d2 = (d[:, None] - d[None, :]) ** 2
    if sigma <= 0:
        return torch.where(d2 == 0, 0.0, -LOGIT_FLOOR)
    return -(d2 / (2 * sigma * sigma)).clamp(max=LOGIT_FLOOR)


def _token_coords(grid) -> torch.Tensor:
    """long `[T*H*W, 3]`: the (t, h, w) of every token in frame-major order."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3)


def _local_features(grid, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(fq, fk [S, T+H+W], log_z [S])`: kernel rows and one-hot coordinates, so that `fq[i] . fk[j]` is the
    separable local logit exactly; `log_z[i]`: the log partition function of query i."""
    xyz = _token_coords(grid)
    fq, fk, log_z = [], [], 0.0
    for axis, (n, s) in enumerate(zip(grid, sigma)):
        g = _axis_kernel(n, s)
        fq.append(g[xyz[:, axis]])
        fk.append(F.one_hot(xyz[:, axis], n).double())
        log_z = log_z + torch.logsumexp(g, 1)[xyz[:, axis]]
    return torch.cat(fq, 1), torch.cat(fk, 1), log_z


def _band_features(S: int, sigma: float, freqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fq, fk [S, 2*freqs + 1])` with `fq[i] . fk[j] = beta * (sum_f cos(w_f (i - j)) - freqs)`, `w_f = pi f / S`:
    about `-(i - j)^2 / (2 sigma^2)` near the diagonal, far below elsewhere (period 2S: no wrap-around)."""
    w = 2 * math.pi * torch.arange(1, freqs + 1, dtype=torch.float64) / (2 * S)
    beta = 1.0 / (sigma * sigma * (w * w).sum().item())  # curvature at 0 matches the Gaussian
    ang = torch.arange(S, dtype=torch.float64)[:, None] * w
    sc = torch.cat([ang.cos(), ang.sin()], 1)
    one = torch.ones(S, 1, dtype=torch.float64)
    return torch.cat([beta * sc, -beta * freqs * one], 1), torch.cat([sc, one], 1)


def _sink_logit(log_z: torch.Tensor, sink_mass: float, n_sink: int) -> float:
    """The sink logit that gives the sinks `sink_mass` of an average query's attention."""
    return math.log(sink_mass / (1 - sink_mass) / n_sink) + float(log_z.mean())


def content_std(kind: str, noise: float) -> float:
    """Std of the random content logit of a `kind` head: `noise`, or the kind's own `content` (global, sink)."""
    return float(KIND_SPECS[kind].get("content", noise))


def planted_logit_features(kind: str, grid, head_dim: int, *, noise: float = 0.1,
                           generator: torch.Generator | None = None,
                           random_content: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of one planted head with `fq @ fk.T` = its attention logits (before softmax).

    Positional dimensions come first (the local kinds need `T + H + W + 1 + 8 <= head_dim`); the content
    dimensions add a random logit of std `content_std(kind, noise)`, or stay zero without `random_content`
    (`PlantedDiT` fills them from tokens). Returns float64 `fq, fk [S, D]` and the bool content mask `[D]`.

    Example:
        >>> fq, fk, cm = planted_logit_features("spatial", (2, 4, 4), 32, noise=0.0)
        >>> logits = fq @ fk.T
        >>> float(logits[0, 16])  # token (t=1, h=0, w=0) is in another frame
        -30.0
    """
    if kind not in KINDS:
        raise ValueError(f"unknown planted kind '{kind}'; known: {', '.join(KINDS)}")
    spec = KIND_SPECS[kind]
    S = math.prod(grid)
    content = content_std(kind, noise)
    parts_q, parts_k = [], []
    log_z = torch.full((S,), math.log(S) + content * content / 2, dtype=torch.float64)  # E[sum_j exp(c_ij)]
    if "sigma" in spec:
        fq, fk, log_z = _local_features(grid, spec["sigma"])
        parts_q.append(fq)
        parts_k.append(fk)
    if kind == "band":
        freqs = min(_BAND_FREQS, (head_dim - _MIN_CONTENT_DIMS - 1) // 2)
        fq, fk = _band_features(S, spec["band_sigma"], freqs)
        parts_q.append(fq)
        parts_k.append(fk)
    if "sink_mass" in spec:
        sink = torch.zeros(S, 1, dtype=torch.float64)
        sink[:N_SINK] = 1.0
        parts_k = [p * (1 - sink) for p in parts_k]  # a sink's logit is the same for every query
        parts_q.append(torch.full((S, 1), _sink_logit(log_z, spec["sink_mass"], N_SINK), dtype=torch.float64))
        parts_k.append(sink)
    n_pos = sum(p.shape[1] for p in parts_q)
    n_content = head_dim - n_pos
    if n_content < _MIN_CONTENT_DIMS:
        raise ValueError(f"planted '{kind}' head on grid {tuple(grid)} needs {n_pos} positional dims plus "
                         f"{_MIN_CONTENT_DIMS} content dims; head_dim {head_dim} is too small")
    cq = torch.zeros(S, n_content, dtype=torch.float64)
    ck = torch.zeros(S, n_content, dtype=torch.float64)
    if random_content:
        amp = math.sqrt(content) / n_content ** 0.25  # (amp u) . (amp w) has std `content` for unit u, w
        cq = amp * torch.randn(S, n_content, generator=generator, dtype=torch.float64)
        ck = amp * torch.randn(S, n_content, generator=generator, dtype=torch.float64)
    mask = torch.arange(head_dim) >= n_pos
    return torch.cat(parts_q + [cq], 1), torch.cat(parts_k + [ck], 1), mask


# the synthetic head set

@dataclass
class PlantedHeads:
    """Heads with planted geometry: float32 `q, k, v [1, n_heads, S, head_dim]` (SDPA's default scale gives the
    planted logits), the `kinds` and `best_tile` of every head, and the token `grid`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kinds: list[str]
    best_tile: list[tuple[int, int, int]]
    grid: tuple[int, int, int]


def planted_heads(grid=PLANTED_GRID, head_dim: int = 64, kinds: Sequence[str] = KINDS, seed: int = 0,
                  noise: float = 0.1) -> PlantedHeads:
    """Synthetic q, k, v with one planted geometry kind per head (see `KIND_SPECS`).

    Kinds: `spatial` (own frame, 2-D neighbourhood), `temporal` (same position, every frame),
    `local3d` (3-D neighbourhood), `global` (random content logits, no geometry), `sink` (most mass
    on the first 4 tokens), `band` (|i - j| small in token order), `mixed` (spatial + sink).

    `seed` draws the content noise and v; `noise` is the std of the geometric kinds' content logit.

    Example:
        >>> ph = planted_heads(kinds=("spatial", "temporal"))
        >>> ph.q.shape, ph.best_tile
        (torch.Size([1, 2, 2048, 64]), [(1, 8, 8), (8, 2, 4)])
    """
    grid = tuple(int(g) for g in grid)
    gen = torch.Generator().manual_seed(seed)
    root = head_dim ** 0.25  # q . k / sqrt(D) = fq . fk
    qs, ks = [], []
    for kind in kinds:
        fq, fk, _ = planted_logit_features(kind, grid, head_dim, noise=noise, generator=gen)
        qs.append(fq * root)
        ks.append(fk * root)
    S = math.prod(grid)
    v = torch.randn(1, len(kinds), S, head_dim, generator=gen)
    return PlantedHeads(q=torch.stack(qs)[None].float(), k=torch.stack(ks)[None].float(), v=v, kinds=list(kinds),
                        best_tile=[BEST_TILE[k] for k in kinds], grid=grid)


# the selection-fidelity harness: true tile mass and recall

def _membership(layout: TileLayout, device) -> torch.Tensor:
    """float `[T*H*W, n_tiles]`: one-hot tile of every video token."""
    return F.one_hot(layout.scatter.to(device) // layout.volume, layout.n_tiles).float()


@torch.no_grad()
def attention_tile_masses(q: torch.Tensor, k: torch.Tensor, layouts: Sequence[TileLayout], *, scale: float | None = None,
                          video_start: int = 0, max_elems: int = 1 << 24) -> list[torch.Tensor]:
    """`attention_tile_mass` for several layouts of one grid, sharing one pass over the attention matrix.

    Example:
        >>> ph = planted_heads((4, 8, 8), kinds=("temporal",))
        >>> layouts = [tile_layout((4, 8, 8), t) for t in [(4, 4, 4), (1, 8, 8)]]
        >>> [m.shape[-1] for m in attention_tile_masses(ph.q, ph.k, layouts)]
        [4, 4]
    """
    B, Hh, S, D = q.shape
    vl = math.prod(layouts[0].grid)
    if any(lay.grid != layouts[0].grid for lay in layouts):
        raise ValueError("attention_tile_masses: all layouts must share one grid")
    if k.shape[-2] != S or video_start < 0 or video_start + vl > S:
        raise ValueError(f"attention_tile_mass: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D] "
                         f"self-attention holding the {vl} video tokens of grid {layouts[0].grid} from index {video_start}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    members = [_membership(lay, q.device).to(acc) for lay in layouts]
    masses = [torch.zeros(B, Hh, lay.n_tiles, lay.n_tiles, dtype=torch.float64, device=q.device) for lay in layouts]
    kt = k.to(acc).transpose(-1, -2)
    chunk = max(1, max_elems // (B * Hh * S))
    for i0 in range(0, vl, chunk):
        i1 = min(vl, i0 + chunk)
        p = torch.softmax(q[:, :, video_start + i0: video_start + i1].to(acc) @ kt * scale, dim=-1)
        p = p[..., video_start: video_start + vl]  # text keys take their share of the softmax, no tile
        for a, m in zip(members, masses):
            m += (a[i0:i1].T @ (p @ a)).double()
    return masses


def attention_tile_mass(q: torch.Tensor, k: torch.Tensor, layout: TileLayout, *, scale: float | None = None,
                        video_start: int = 0, max_elems: int = 1 << 24) -> torch.Tensor:
    """True full-attention probability mass of every (query tile, key tile) pair.

    `mass[b, h, i, j]` sums the softmax probabilities over the video queries of tile i and the video keys of
    tile j (a row sums to the tile's valid token count, less any text keys' share), in query chunks of at most
    `max_elems` probabilities.

    Args:
        q, k: `[B, H, S, D]`, frame-major video tokens at `[video_start, video_start + T*H*W)`; other tokens
            are keys in the softmax only.
        layout: the TileLayout of the video grid.
        scale: softmax scale; default `1/sqrt(D)`.

    Returns:
        float64 `[B, H, n_tiles, n_tiles]`.

    Example:
        >>> ph = planted_heads((4, 8, 8), kinds=("spatial",))
        >>> mass = attention_tile_mass(ph.q, ph.k, tile_layout((4, 8, 8), (1, 8, 8)))
        >>> round(float(mass[0, 0].diagonal().sum() / mass[0, 0].sum()), 3)  # attention stays in its frame
        1.0
    """
    return attention_tile_masses(q, k, [layout], scale=scale, video_start=video_start, max_elems=max_elems)[0]


def tile_recall(mass: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> torch.Tensor:
    """Share of the true attention mass that a tile selection keeps.

    Returns float64 `[B, H]`: the selected share of `mass` (`attention_tile_mass`) for a method's selection.

    Example:
        >>> mass = torch.tensor([[[[3.0, 1.0], [0.0, 4.0]]]])
        >>> idx = torch.tensor([[[[0], [1]]]]); cnt = torch.ones(1, 1, 2, dtype=torch.int32)
        >>> tile_recall(mass, idx, cnt).tolist()
        [[0.875]]
    """
    keep = selection_to_block_mask(kv_indices, kv_counts, mass.shape[-1])
    return (mass.double() * keep).sum((-1, -2)) / mass.double().sum((-1, -2)).clamp_min(1e-30)


def equal_cost_count(layout: TileLayout, density: float) -> int:
    """Key tiles per query tile that spend `density` of full attention's compute (`n_tiles * k * volume^2`
    slot pairs against `S^2`), padding included; `budget_counts` for unpadded layouts.

    Example:
        >>> [equal_cost_count(tile_layout((8, 16, 16), t), 1 / 16) for t in [(4, 4, 4), (8, 4, 4), (16, 2, 2)]]
        [2, 1, 2]
    """
    S = math.prod(layout.grid)
    k = math.ceil(density * S * S / (layout.padded_len * layout.volume) - 1e-9)
    return max(1, min(layout.n_tiles, k))


def oracle_selection(mass: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` key tiles of largest true mass per query tile: `(kv_indices, kv_counts)` int32."""
    idx = mass.topk(count, dim=-1).indices.to(torch.int32)
    return idx, torch.full(mass.shape[:-1], count, dtype=torch.int32, device=mass.device)


def tile_recall_table(q: torch.Tensor, k: torch.Tensor, grid, tiles: Sequence = CANDIDATE_TILES,
                      density: float = REFERENCE_DENSITY, **kw) -> dict[tuple[int, int, int], torch.Tensor]:
    """Oracle tile recall of every head for every candidate tile at equal compute.

    Per query tile the oracle keeps the `equal_cost_count(layout, density)` key tiles of largest true mass;
    returns `{tile: float64 [H]}`, the share of the attention mass kept, averaged over the batch.

    Example:
        >>> ph = planted_heads(kinds=("temporal",))
        >>> r = tile_recall_table(ph.q, ph.k, ph.grid)
        >>> max(r, key=lambda t: float(r[t][0]))
        (8, 2, 4)
    """
    tiles = [tuple(t) for t in tiles]
    layouts = [tile_layout(grid, t) for t in tiles]
    masses = attention_tile_masses(q, k, layouts, **kw)
    return {t: tile_recall(m, *oracle_selection(m, equal_cost_count(lay, density))).mean(0)
            for t, lay, m in zip(tiles, layouts, masses)}


def good_tiles(recalls: dict, head: int, tol: float = TIE_TOLERANCE) -> list[tuple[int, int, int]]:
    """Tiles whose recall for `head` is within `tol` of the best: all count as a correct tile choice.

    Example:
        >>> good_tiles({(4, 4, 4): torch.tensor([0.90]), (1, 8, 8): torch.tensor([0.95])}, 0)
        [(1, 8, 8)]
    """
    best = max(float(r[head]) for r in recalls.values())
    return [t for t, r in recalls.items() if float(r[head]) >= best - tol]


# the planted-geometry DiT
#: Kinds of `build_planted_dit`'s 4 layers x 4 heads: every layer mixes geometries.
PLANTED_LAYERS: tuple[tuple[str, ...], ...] = (
    ("spatial", "temporal", "local3d", "band"),
    ("temporal", "sink", "spatial", "global"),
    ("local3d", "mixed", "band", "spatial"),
    ("mixed", "global", "temporal", "local3d"),
)


@dataclass(frozen=True)
class PlantedKind:
    """What head `head` of `blocks.{layer}.attn` of a `PlantedDiT` was built to be: its kind and its
    `BEST_TILE` and `GOOD_TILES`."""

    layer: int
    head: int
    kind: str
    best_tile: tuple[int, int, int]
    good_tiles: tuple[tuple[int, int, int], ...]


class PlantedAttention(nn.Module):
    """SDPA self-attention with `q = pos_q + content_scale * to_q(x)` (likewise k): fixed positional features of
    each head's kind plus a content projection into the content dimensions."""

    def __init__(self, dim: int, kinds: Sequence[str], grid, head_dim: int, noise: float):
        super().__init__()
        self.kinds, self.grid = tuple(kinds), tuple(grid)
        self.heads, self.head_dim = len(kinds), head_dim
        inner = self.heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)
        root = head_dim ** 0.25  # q . k / sqrt(D) = planted logit
        pq, pk, cs = [], [], []
        for kind in kinds:
            fq, fk, mask = planted_logit_features(kind, grid, head_dim, random_content=False)
            pq.append(fq * root)
            pk.append(fk * root)
            # to_q(x) entries have unit variance: this makes the content logit's std content_std(kind)
            cs.append(mask * math.sqrt(content_std(kind, noise)) / int(mask.sum()) ** 0.25 * root)
        self.register_buffer("pos_q", torch.stack(pq).float(), persistent=False)
        self.register_buffer("pos_k", torch.stack(pk).float(), persistent=False)
        self.register_buffer("content_scale", torch.stack(cs).float().unsqueeze(1), persistent=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v `[B, heads, S, head_dim]` of normalized tokens `x [B, S, dim]`."""
        B, S, _ = x.shape
        if S != self.pos_q.shape[1]:
            raise ValueError(f"PlantedAttention: {S} tokens, but its heads are planted on grid {self.grid} "
                             f"({self.pos_q.shape[1]} tokens)")

        def split(t):
            return t.view(B, S, self.heads, self.head_dim).transpose(1, 2)

        q = self.pos_q.to(x.dtype) + self.content_scale.to(x.dtype) * split(self.to_q(x))
        k = self.pos_k.to(x.dtype) + self.content_scale.to(x.dtype) * split(self.to_k(x))
        return q, k, split(self.to_v(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        o = F.scaled_dot_product_attention(q, k, v)
        B, H, S, D = o.shape
        return self.to_out(o.transpose(1, 2).reshape(B, S, H * D))


class PlantedBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, dim: int, kinds: Sequence[str], grid, head_dim: int, noise: float, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = PlantedAttention(dim, kinds, grid, head_dim, noise)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlantedDiT(nn.Module):
    """A small video DiT whose self-attention heads have planted geometries (see `planted_heads`).

    `x [B, C, T, H, W]` becomes frame-major tokens, runs through pre-norm blocks (planted self-attention, MLP)
    and goes back to `[B, C, T, H, W]`. Each head's pattern is its kind's whatever the input: the positional
    logits are fixed, the content part has std `noise` (1 for global and sink heads).

    Args:
        grid: `(T, H, W)` token grid (the input's last three dims).
        heads_per_layer: heads of every layer (checked against `kinds_per_layer`).
        kinds_per_layer: one tuple of kinds per layer; default `PLANTED_LAYERS`.
        dim, head_dim, in_channels, mlp_ratio: model width, per-head width, C, MLP hidden width over `dim`.
        noise: std of the content logit of geometric heads.

    Attributes:
        planted_kinds: `[layer][head]` PlantedKind (kind, best tile, good tiles).

    Example:
        >>> model = build_planted_dit()
        >>> model(*planted_inputs()).shape
        torch.Size([1, 4, 8, 16, 16])
        >>> model.planted_kinds[0][1].kind, model.planted_kinds[0][1].best_tile
        ('temporal', (8, 2, 4))
    """

    def __init__(self, grid=PLANTED_GRID, heads_per_layer: int | None = None,
                 kinds_per_layer: Sequence[Sequence[str]] = PLANTED_LAYERS, dim: int = 128, head_dim: int = 64,
                 in_channels: int = 4, noise: float = 0.1, mlp_ratio: int = 2):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        widths = {len(k) for k in kinds_per_layer}
        if len(widths) != 1 or (heads_per_layer is not None and widths != {heads_per_layer}):
            raise ValueError(f"PlantedDiT: every layer needs {heads_per_layer or 'the same number of'} kinds; "
                             f"got {[len(k) for k in kinds_per_layer]}")
        self.embed = nn.Linear(in_channels, dim)
        self.blocks = nn.ModuleList(PlantedBlock(dim, kinds, self.grid, head_dim, noise, mlp_ratio)
                                    for kinds in kinds_per_layer)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, in_channels)
        self.planted_kinds = [[PlantedKind(i, h, kind, BEST_TILE[kind], GOOD_TILES[kind])
                               for h, kind in enumerate(kinds)] for i, kinds in enumerate(kinds_per_layer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if (T, H, W) != self.grid:
            raise ValueError(f"PlantedDiT: input grid {(T, H, W)} is not the planted grid {self.grid}")
        h = self.embed(x.flatten(2).transpose(1, 2))
        for blk in self.blocks:
            h = blk(h)
        return self.proj_out(self.norm_out(h)).transpose(1, 2).reshape(B, C, T, H, W)

    @torch.no_grad()
    def attention_qkv(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Run the model on `x` and return every layer's `(q, k, v)` `[B, heads, S, head_dim]`.

        Example:
            >>> model = build_planted_dit()
            >>> q, k, v = model.attention_qkv(*planted_inputs())[2]
            >>> q.shape
            torch.Size([1, 4, 2048, 64])
        """
        out = []
        hooks = [blk.attn.register_forward_pre_hook(lambda mod, args: out.append(mod.qkv(args[0])))
                 for blk in self.blocks]
        try:
            self(x)
        finally:
            for hk in hooks:
                hk.remove()
        return out


def build_planted_dit(seed: int = 0, **kwargs) -> PlantedDiT:
    """A `PlantedDiT(**kwargs)` in eval mode, its weights drawn from `seed` (the global random state untouched).

    Example:
        >>> a, b = build_planted_dit(), build_planted_dit()
        >>> bool(torch.equal(a.blocks[0].attn.to_q.weight, b.blocks[0].attn.to_q.weight))
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PlantedDiT(**kwargs)
        for name, p in model.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                nn.init.normal_(p, std=p.shape[1] ** -0.5)  # unit-variance projections of normalized tokens
    return model.eval()


def planted_inputs(batch: int = 1, seed: int = 0, grid=PLANTED_GRID, channels: int = 4) -> tuple[torch.Tensor]:
    """The args tuple of one `PlantedDiT` forward: `(x,)` with x float32 `[batch, channels, T, H, W]` ~ N(0, 1).

    Example:
        >>> planted_inputs(batch=2)[0].shape
        torch.Size([2, 4, 8, 16, 16])
    """
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, *grid, generator=gen),)


def planted_recipe(model: PlantedDiT, density: float = REFERENCE_DENSITY, method: str = "vsa",
                   tile_for=None, layers: Sequence[int] | None = None) -> dict:
    """A recipe dict giving every head of `model` its own tile: the planted best tile by default.

    `density` is every head's budget; `tile_for` (`PlantedKind -> (t, h, w)`) picks other tiles; only `layers`
    (default: all) run sparse.

    Example:
        >>> r = planted_recipe(build_planted_dit(), layers=[0])
        >>> r["sites"]["blocks.0.attn"]["heads"][1], r["rules"][0]
        ({'head': 1, 'tile': [8, 2, 4]}, {'match': 'blocks.1.attn', 'enable': False})
    """
    tile_for = tile_for or (lambda pk: pk.best_tile)
    layers = range(len(model.planted_kinds)) if layers is None else layers
    sites = {f"blocks.{i}.attn": {"heads": [{"head": pk.head, "tile": list(tile_for(pk))}
                                            for pk in model.planted_kinds[i]]} for i in layers}
    rules = [{"match": f"blocks.{i}.attn", "enable": False} for i in range(len(model.planted_kinds)) if i not in layers]
    recipe = {"version": 1, "defaults": {"method": method, "tile": [4, 4, 4], "budget": {"density": density}},
              "sites": sites}
    if rules:
        recipe["rules"] = rules
    return recipe
