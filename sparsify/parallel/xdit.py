"""xDiT (xfuser) Ulysses and CFG parallel: sparse attention after its all-to-all, in the one-process token order."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..geometry import Geometry
from ..runtime import STATE, set_geometry, set_timestep, site_state
from .shard import _ring_error, manual_shard

#: How xfuser 0.7 lays out each family's attention sequence over P Ulysses ranks (by sparsify adapter name):
#: `(text first, split)`. "tokens": rank r holds the frame-major video tokens `[r·N/P, (r+1)·N/P)` (HunyuanVideo:
#: its transformer forward chunks the flattened tokens); "rows": rank r holds the height band `[r·H/P, (r+1)·H/P)`
#: of every frame (CogVideoX: its pipeline slices the latent height).
FAMILIES = {"hunyuan_video": (False, "tokens"), "cogvideox": (True, "rows")}

_SITES: dict = {}  # site id -> (text_first, split) of the sites served under xDiT
_ORDERS: dict = {}  # (XditLayout, device) -> (order, inverse)


@dataclass(frozen=True)
class XditLayout:
    """Where every token of the full sequence sits after xDiT's Ulysses all-to-all.

    The all-to-all concatenates the ranks' local sequences. Rank r's local sequence is its share of the video
    tokens (see `FAMILIES` for `split`) with its chunk of the `text_len` text tokens before it (`text_first`) or
    after it. When the text does not divide by the degree (`joined`: xfuser's `split_text_embed_in_sp` is off),
    every rank keeps the whole text: its queries ride the all-to-all beside each rank's share (the text queries
    appear once per rank), and its keys and values are joined once after it, at the front or at the end.

    Example:
        >>> lay = XditLayout((1, 2, 2), text_len=2, degree=2, text_first=False)
        >>> lay.query_order().tolist(), lay.key_order().tolist()
        ([0, 1, 4, 2, 3, 5], [0, 1, 4, 2, 3, 5])
        >>> lay = XditLayout((1, 2, 2), 1, 2, text_first=True, split="rows", joined=True)
        >>> lay.query_order().tolist(), lay.key_order().tolist()
        ([0, 1, 2, 0, 3, 4], [0, 1, 2, 3, 4])
    """

    grid: tuple[int, int, int]
    text_len: int
    degree: int
    text_first: bool
    split: str = "tokens"
    joined: bool = False

    def __post_init__(self):
        T, H, W = self.grid
        if self.split not in ("tokens", "rows"):
            raise ValueError(f"XditLayout: split must be 'tokens' or 'rows'; got {self.split!r}")
        parts = T * H * W if self.split == "tokens" else H
        if self.degree < 1 or parts % self.degree:
            what = f"{parts} video tokens" if self.split == "tokens" else f"{parts} token rows (grid height)"
            raise ValueError(f"XditLayout: {what} of grid {self.grid} do not split evenly over degree={self.degree} "
                             "Ulysses ranks (xDiT's all-to-all needs equal shares)")
        if not self.joined and self.text_len % self.degree:
            raise ValueError(f"XditLayout: text_len={self.text_len} does not divide by degree={self.degree}; xfuser "
                             "then keeps the whole text on every rank: joined=True")

    def _parts(self):
        T, H, W = self.grid
        N, L, P = T * H * W, self.text_len, self.degree
        video = torch.arange(N) + (L if self.text_first else 0)
        text = torch.arange(L) + (0 if self.text_first else N)
        if self.split == "tokens":
            shares = list(video.view(P, -1))
        else:
            shares = [b.reshape(-1) for b in video.view(T, H, W).chunk(P, dim=1)]
        texts = [text] * P if self.joined else list(text.view(P, -1))
        return shares, texts, text

    def query_order(self) -> torch.Tensor:
        """long `[S_q]`: the one-process position of the query at each position of xDiT's query sequence."""
        shares, texts, _ = self._parts()
        return torch.cat([x for s, t in zip(shares, texts) for x in ((t, s) if self.text_first else (s, t))])

    def key_order(self) -> torch.Tensor:
        """long `[S_k]`: the one-process position of the key (and value) at each position of xDiT's key sequence."""
        if not self.joined:
            return self.query_order()
        shares, _, text = self._parts()
        return torch.cat([text, *shares] if self.text_first else [*shares, text])


def _gather_index(order: torch.Tensor) -> torch.Tensor:
    """For each one-process position, the first xDiT position holding it (text queries repeat when joined)."""
    n = int(order.max()) + 1 if order.numel() else 0
    pos = torch.arange(order.numel())
    return torch.full((n,), order.numel(), dtype=torch.long).scatter_reduce_(0, order, pos, "amin")


def _orders(layout: XditLayout, device):
    """`(query order, query gather, key gather)` of `layout` on `device` (cached), None where xDiT's order is
    already the one-process order."""
    key = (layout, str(device))
    if key not in _ORDERS:
        qo, ko = layout.query_order(), layout.key_order()
        if torch.equal(qo, torch.arange(qo.numel())) and torch.equal(ko, qo):
            _ORDERS[key] = None
        else:
            _ORDERS[key] = tuple(x.to(device) for x in (qo, _gather_index(qo), _gather_index(ko)))
    return _ORDERS[key]


def _site_of_call(query, key, value, dropout_p, is_causal, attention_kwargs):
    """The sparsified site tensor whose call this is, or None (the call then runs the engine's own attention)."""
    if not STATE.stack or dropout_p or is_causal or query.dim() != 4:
        return None
    site = STATE.stack[-1]
    if int(site.reshape(-1)[0]) not in _SITES:
        return None
    st = site_state(site)
    same = key.shape == value.shape and key.shape[:2] + key.shape[3:] == query.shape[:2] + query.shape[3:]
    if not same or (attention_kwargs or {}).get("attn_mask") is not None:
        st.warn_once("xdit", f"xDiT hands this call q {tuple(query.shape)}, k {tuple(key.shape)}, "
                             f"v {tuple(value.shape)} or an attention mask; it runs the engine's dense attention")
        return None
    return site


def layout_of_call(st, q_len: int, kv_len: int) -> XditLayout:
    """The `XditLayout` of a call of site `st` with `q_len` queries and `kv_len` keys after the all-to-all, from
    the current forward's grid and the site's Ulysses degree (text joined whole when `q_len > kv_len`).

    Raises:
        RuntimeError: no grid is known, or the sequences do not fit the grid and degree.
    """
    if STATE.geometry is None:
        raise RuntimeError(f"sparsify: site '{st.path}' runs under xDiT but no token grid is known for this forward; "
                           "call sparsify.parallel.xdit.enable(transformer) after xDiT has wrapped the model")
    grid = tuple(STATE.geometry[:3])
    N = grid[0] * grid[1] * grid[2]
    shard = st.current_shard()
    degree = shard[1] if shard is not None else 1
    text_len = kv_len - N
    joined = q_len != kv_len
    if text_len < 0 or (joined and q_len != N + degree * text_len):
        raise RuntimeError(f"sparsify: site '{st.path}': after xDiT's all-to-all the call has {q_len} queries and "
                           f"{kv_len} keys, which do not fit the {N} video tokens of grid {grid} at Ulysses degree "
                           f"{degree} (with text split over ranks or joined whole)")
    text_first, split = _SITES[st.site_id]
    return XditLayout(grid, text_len, degree, text_first, split, joined)


def route(fn):
    """Wrap an xDiT attention function (`fn(q, k, v, dropout_p=, is_causal=, attention_kwargs=) -> (out, lse)`,
    what xfuser's `USP` calls after the Ulysses all-to-all) so that calls of sparsified sites run sparsify's op.

    The call holds the full sequence in xDiT's order for this rank's heads; it is permuted into the one-process
    order (`XditLayout`), run through `torch.ops.sparsify.sparse_attention` with the site's head range, and
    permuted back. Other calls run `fn` unchanged.

    Example:
        >>> def sdpa(q, k, v, dropout_p=0.0, is_causal=False, attention_kwargs=None):
        ...     return torch.nn.functional.scaled_dot_product_attention(q, k, v), None
        >>> q = torch.randn(1, 2, 8, 4)
        >>> torch.equal(route(sdpa)(q, q, q)[0], sdpa(q, q, q)[0])  # outside a sparsified site: fn itself
        True
    """
    if getattr(fn, "_sparsify_routed", None) is not None:
        return fn

    @functools.wraps(fn)
    def attention(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None, **kwargs):
        site = _site_of_call(query, key, value, dropout_p, is_causal, attention_kwargs)
        if site is None:
            return fn(query, key, value, dropout_p=dropout_p, is_causal=is_causal, attention_kwargs=attention_kwargs,
                      **kwargs)
        layout = layout_of_call(site_state(site), query.shape[2], key.shape[2])
        perm = _orders(layout, query.device)
        if perm is not None:
            query = query.index_select(2, perm[1])
            key, value = key.index_select(2, perm[2]), value.index_select(2, perm[2])
        T, H, W = layout.grid
        geometry = [T, H, W, layout.text_len if layout.text_first else 0]
        out = torch.ops.sparsify.sparse_attention(query, key, value, site, geometry, None, None, STATE.timestep)
        return (out if perm is None else out.index_select(2, perm[0])), None

    attention._sparsify_routed = fn
    return attention


def attach_sites(model, family: str, shard=None):
    """Serve the sparsified sites of `model` (a diffusers transformer) through `route`, as xDiT lays out `family`.

    Where xDiT replaced a site module by a wrapper whose `.module` is it (CogVideoX's `xFuserAttentionWrapper`),
    the wrapper puts the site on the runtime stack while it runs. `shard` (optional callable returning
    `(rank, degree, group)`) becomes each site's head shard (a `head_shard` block still takes precedence).

    Returns:
        A function that undoes it.

    Example:
        >>> # undo = attach_sites(transformer, "cogvideox")   (enable() does this with xfuser's shard)
    """
    inst = getattr(model, "_sparsify", None)
    if inst is None:
        raise RuntimeError("sparsify.parallel.xdit: the model is not sparsified; call sparsify(transformer, recipe) "
                           "on the diffusers transformer first")
    if family not in FAMILIES:
        raise ValueError(f"sparsify.parallel.xdit: family={family!r} has no known xDiT layout; known: "
                         f"{', '.join(sorted(FAMILIES))}")
    handles, old = [], []
    for st in inst.sites:
        _SITES[st.site_id] = FAMILIES[family]
        module = model.get_submodule(st.path)
        if not hasattr(module, "_sparsify_site") and hasattr(getattr(module, "module", None), "_sparsify_site"):
            site = module.module._sparsify_site
            handles.append(module.register_forward_pre_hook(lambda m, a, s=site: STATE.stack.append(s)))
            handles.append(module.register_forward_hook(_pop_site, always_call=True))
        if shard is not None:
            old.append((st, st.shard))
            st.shard = functools.partial(_shard_or_manual, shard)

    def undo():
        for h in handles:
            h.remove()
        for st, resolver in old:
            st.shard = resolver
        for st in inst.sites:
            _SITES.pop(st.site_id, None)

    return undo


def _pop_site(module, args, output) -> None:
    STATE.stack.pop()


def _shard_or_manual(shard):
    return manual_shard() or shard()


def cfg_branch(cfg_rank: int, cfg_degree: int) -> int:
    """The one-process call index of the guidance branch that xDiT's CFG rank `cfg_rank` runs (see
    `sparsify.parallel.guidance_shard`): xfuser gives CFG rank 0 the negative (unconditional) half of the batch and
    rank 1 the positive half; a pipeline running the branches as two calls calls cond first (0), then uncond (1).

    Example:
        >>> [cfg_branch(r, 2) for r in (0, 1)], cfg_branch(0, 1)
        ([1, 0], 0)
    """
    if cfg_degree not in (1, 2) or not 0 <= cfg_rank < cfg_degree:
        raise ValueError(f"cfg_branch: xDiT's CFG parallel has cfg_degree 1 or 2 and 0 <= cfg_rank < cfg_degree; "
                         f"got cfg_rank={cfg_rank}, cfg_degree={cfg_degree}")
    return cfg_degree - 1 - cfg_rank


def _xfuser():
    try:
        from xfuser.core.distributed import (attention_backend, get_classifier_free_guidance_rank,
                                             get_classifier_free_guidance_world_size, get_sp_group)
    except (ImportError, NotImplementedError) as e:  # xfuser 0.7 raises NotImplementedError without a GPU
        raise ImportError("sparsify.parallel.xdit needs xDiT: pip install xfuser (0.7, with yunchang); "
                          f"importing it failed: {e}") from e
    return get_sp_group, attention_backend, (get_classifier_free_guidance_rank, get_classifier_free_guidance_world_size)


def _xfuser_shard():
    sp = _xfuser()[0]()
    if sp.ring_world_size > 1:
        raise _ring_error("(every xDiT site)", sp.ring_world_size)
    return sp.ulysses_rank, sp.ulysses_world_size, sp.ulysses_group


def enable(transformer) -> None:
    """Run the sparsified sites of an xDiT model through sparsify under xDiT's Ulysses sequence parallelism.

    Call it on every rank after xfuser's parallel state is initialized and after xDiT has taken the model over:
    sparsify the diffusers transformer first (one-process discovery), then let xDiT install its processors or
    wrap it, then call `enable` with the model xDiT runs (the diffusers model itself, or xDiT's wrapper whose
    `.module` it is). Every attention function xfuser can pick is routed (`route`); each site's head range comes
    from xfuser's Ulysses rank, and the reuse of masks is agreed within its Ulysses group. Under CFG parallel
    (`cfg_degree=2`) each forward runs as its guidance branch's call of the one-process run (`cfg_branch`,
    `sparsify.parallel.guidance_shard`). Ring degree > 1 is refused when a site runs (`RingAttentionError`).
    `unsparsify()` undoes it.

    Raises:
        ImportError: xfuser is not installed.

    Example:
        >>> # sparsify(transformer, recipe)                       # diffusers HunyuanVideo, before xDiT
        >>> # transformer.__class__ = xFuserHunyuanVideoTransformer3DWrapper
        >>> # transformer.install_xdit_attention_processors()
        >>> # sparsify.parallel.xdit.enable(transformer)
    """
    get_sp_group, backend, (cfg_rank, cfg_degree) = _xfuser()
    inner = transformer if hasattr(transformer, "_sparsify") else getattr(transformer, "module", transformer)
    inst = getattr(inner, "_sparsify", None)
    family = getattr(inst.adapter, "name", None) if inst is not None else None
    undo_sites = attach_sites(inner, family, shard=_xfuser_shard)
    registry = backend.ATTENTION_FUNCTION_REGISTRY
    saved = dict(registry)
    for name, fn in saved.items():
        registry[name] = route(fn)
    hooks = []
    if inner is not transformer:  # xDiT's own forward replaces the model's: the grid and timestep come from it
        _, split = FAMILIES[family]

        def grid_hook(mod, args, kwargs):
            g = inst.adapter.geometry(inner, args, kwargs)
            rows = get_sp_group().ulysses_world_size if split == "rows" else 1
            set_geometry(Geometry((g.grid[0], g.grid[1] * rows, g.grid[2]), g.video_start), inst)
            set_timestep(inst.adapter.timestep(inner, args, kwargs))

        hooks.append(transformer.register_forward_pre_hook(grid_hook, with_kwargs=True))
    if cfg_degree() > 1:
        guidance = (cfg_branch(cfg_rank(), cfg_degree()), cfg_degree())

        def enter_branch(mod, args):
            STATE.guidance = guidance

        def leave_branch(mod, args, output):
            STATE.guidance = None

        hooks.append(transformer.register_forward_pre_hook(enter_branch))
        hooks.append(transformer.register_forward_hook(leave_branch, always_call=True))

    def undo():
        for h in hooks:
            h.remove()
        registry.update(saved)
        undo_sites()

    inst.undo.append(undo)
