"""Per-call runtime state: the site registry, the current geometry, and dispatch of one attention call."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch

from .kernels.gather import device_ints
from .layout import Geometry, pool_tiles, tile_layout
from .methods import get_method
from .recipe import HeadConfig, MaskReuse, ScheduleStep, scheduled_budget

_dense_sdpa = torch._C._nn.scaled_dot_product_attention  # the op's dense path: never the patched F.*


@dataclass
class SiteState:
    """Everything the op needs to know about one installed attention site."""

    site_id: int
    path: str
    kind: str
    heads: int
    head_dim: int
    configs: list[HeadConfig]
    index: int = 0
    calls: int = 0
    dense_steps: int = 0  # first denoising steps of each generation run dense
    mask_reuse: MaskReuse | None = None
    schedule: tuple[ScheduleStep, ...] = ()  # per-step budget schedule (factors on each head's density)
    selections: int = 0  # selections computed
    reused: int = 0  # selections reused from an earlier step (temporal mask reuse)
    cache: dict = field(default_factory=dict)
    step_seen: int = -1
    gen_seen: int = -1
    calls_in_step: int = 0  # calls of this site at the current step (CFG as two calls: 0 and 1)
    dense_work: float = 0.0  # attention FLOPs the same calls would take dense
    warned: set = field(default_factory=set)
    _work: float = 0.0  # host part of `work`
    _work_pending: torch.Tensor | None = None  # device part: summed without a host sync until `work` is read

    @property
    def work(self) -> float:
        """Attention FLOPs actually computed (padding included), in units of one dense call (syncs once to read)."""
        if self._work_pending is not None:
            self._work += float(self._work_pending)
            self._work_pending = None
        return self._work

    @work.setter
    def work(self, value: float) -> None:
        self._work, self._work_pending = float(value), None

    def add_work(self, amount) -> None:
        """Add computed work: a number, or a device tensor kept on the device (no host sync per call)."""
        if isinstance(amount, torch.Tensor):
            amount = amount.detach().reshape(())
            self._work_pending = amount if self._work_pending is None else self._work_pending + amount
        else:
            self._work += amount

    @property
    def density(self) -> float:
        """Achieved density over all calls so far: computed / dense attention work (padding counted)."""
        return self.work / self.dense_work if self.dense_work else float("nan")

    @property
    def is_dense(self) -> bool:
        return all(c.is_dense for c in self.configs)

    def budgets(self, heads, step: int | None) -> list:
        """The budgets of `heads` at denoising step `step` (None: no step known) under the schedule."""
        return [scheduled_budget(self.configs[h].budget, self.schedule, step) for h in heads]

    def method(self, key: tuple, heads) -> object:
        """The selection method of a head group `(method, tile)`, built once from its heads' recipe params."""
        ckey = ("method", key, tuple(heads))
        impl = self.cache.get(ckey)
        if impl is None:
            impl = self.cache[ckey] = get_method(key[0], [self.configs[h].params for h in heads])
        return impl

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"sparsify: site '{self.path}': {message}", stacklevel=3)


class StepTracker:
    """Turns the timesteps seen by attention calls into a denoising-step index per generation.

    A new generation starts when the timestep rises (samplers count down) or the grid changes; calls
    at an unchanged timestep (several sites, or classifier-free guidance as two calls) share a step.

    Example:
        >>> t = StepTracker()
        >>> [t.observe(x, (1, 2, 2)) for x in (999, 999, 800, 600, 999)]
        [0, 0, 1, 2, 0]
        >>> t.generation
        2
    """

    def __init__(self):
        self.last: float | None = None
        self.grid = None
        self.step = 0
        self.generation = 0

    def observe(self, timestep: float, grid) -> int:
        if self.last is None or grid != self.grid or timestep > self.last + 1e-6:
            self.generation += 1
            self.step = 0
        elif timestep < self.last - 1e-6:
            self.step += 1
        self.last, self.grid = timestep, grid
        return self.step

    def reset(self) -> None:
        self.last = None


class _State:
    """Process-wide runtime state (one per process; sites of several models may coexist)."""

    def __init__(self):
        self.sites: dict[int, SiteState] = {}
        self.geometry: tuple[int, int, int, int] | None = None  # (T, H, W, video_start) of the current forward
        self.timestep = None  # the current forward's timestep tensor (set by the geometry hook)
        self.timestep_seen = None  # (tensor, version, value) of the last timestep read by `timestep_value`
        self.steps = StepTracker()
        self.stack: list = []  # site tensors of the attention modules being executed
        self.observer = None  # callable(site_state, q, k, v, geometry, scale, key_mask), e.g. the calibrator
        self.selection_log = None  # callable(site_state, group_key, step, pooled_q, pooled_k, idx, cnt) per fresh selection
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        return next(self._ids)


STATE = _State()


def new_generation() -> None:
    """Start a new generation explicitly: the next call is step 0 and cached selections are dropped."""
    STATE.steps.reset()
    for st in STATE.sites.values():
        st.cache.clear()


def current_geometry() -> list[int]:
    """The op's geometry argument for the current forward: `[T, H, W, video_start]`, or `[]` if unknown."""
    return list(STATE.geometry) if STATE.geometry is not None else []


def set_timestep(t) -> None:
    """Record the current forward's timestep tensor (the geometry hook calls this once per forward).

    Example:
        >>> set_timestep(900); STATE.timestep
        tensor([900.])
        >>> set_timestep(None)  # (the example leaves no state behind)
    """
    STATE.timestep = t if (t is None or isinstance(t, torch.Tensor)) else torch.tensor([float(t)])
    STATE.timestep_seen = None


def timestep_value(t: torch.Tensor) -> float:
    """The first element of the op's timestep argument, read from the device once per timestep tensor: the
    sites of one forward receive the same tensor object and share one reading instead of each paying a host
    sync. A reading is reused only for the same object with the same version counter (an in-place update is
    a new reading); tensors without a version counter (inference mode) are read on every call.

    Example:
        >>> timestep_value(torch.tensor([800.0, 800.0]))
        800.0
    """
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        return float(t.reshape(-1)[0])
    seen = STATE.timestep_seen
    if seen is None or seen[0] is not t or seen[1] != version:
        seen = STATE.timestep_seen = (t, version, float(t.reshape(-1)[0]))  # holds t: no address reuse meanwhile
    return seen[2]


def _unpack_geometry(geom: list[int]) -> Geometry | None:
    return Geometry(tuple(geom[:3]), geom[3]) if len(geom) == 4 else None


def _site(site: torch.Tensor) -> SiteState:
    sid = int(site.reshape(-1)[0])
    try:
        return STATE.sites[sid]
    except KeyError:
        raise RuntimeError(f"sparsify: attention site id {sid} is not installed (was the model unsparsified?)") from None


def dense_attention(q, k, v, scale=None, key_mask=None):
    """Dense SDPA (never routed back into sparsify), with an optional bool key mask `[B, S]`."""
    mask = None if key_mask is None else key_mask.to(torch.bool)[:, None, None, :]
    return _dense_sdpa(q, k, v, mask, 0.0, False, scale=scale)


def block_lens_from_mask(key_mask: torch.Tensor, block: int) -> torch.Tensor | None:
    """Per-key-block valid lengths if `key_mask` `[B, S]` is the same for every batch row and each
    block's valid keys form a prefix (as padded tiles do); else None.

    Example:
        >>> block_lens_from_mask(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool), 2).tolist()
        [2, 1]
    """
    if key_mask.shape[0] > 1 and not bool((key_mask == key_mask[:1]).all()):
        return None
    m = key_mask[0]
    pad = (-m.numel()) % block
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    m = m.view(-1, block)
    lens = m.sum(-1)
    if not bool((m == (torch.arange(block, device=m.device) < lens[:, None])).all()):
        return None
    return lens.to(torch.int32)


_SLOW_PATH_WARNED: set = set()


def block_fn_for(q: torch.Tensor):
    """The block-sparse kernel for q's device: Triton on CUDA when it serves the call, else the reference."""
    from .kernels.reference import block_sparse_attn_reference, scatter_rows

    if not q.is_cuda:
        return block_sparse_attn_reference
    try:
        from .kernels.block_sparse import block_sparse_attn, block_sparse_attn_scattered, supports
    except ImportError:  # no Triton
        return block_sparse_attn_reference

    def triton_fn(qs, ks, vs, idx, cnt, *, block_size, scale, key_mask=None, kv_block_lens=None, out_rows=None,
                  out_len=None):
        ok, reason = supports(qs, block_size)
        lens = kv_block_lens if key_mask is None else block_lens_from_mask(key_mask, block_size[1])
        if not ok or (lens is None and key_mask is not None):
            why = reason if not ok else "the key mask is not a per-block prefix"
            if why not in _SLOW_PATH_WARNED:
                _SLOW_PATH_WARNED.add(why)
                warnings.warn(f"sparsify: the Triton kernel cannot serve this call ({why}); "
                              "using the PyTorch reference path (correct, slower)", stacklevel=2)
            out = block_sparse_attn_reference(qs, ks, vs, idx, cnt, block_size=block_size, scale=scale,
                                              key_mask=key_mask, kv_block_lens=kv_block_lens)
            return out if out_rows is None else scatter_rows(out, out_rows, out_len)
        if out_rows is not None:
            return block_sparse_attn_scattered(qs, ks, vs, idx, cnt, out_rows, out_len, block_size=block_size,
                                               scale=scale, kv_block_lens=lens)
        return block_sparse_attn(qs, ks, vs, idx, cnt, block_size=block_size, scale=scale, kv_block_lens=lens)

    triton_fn.scatters_rows = True  # tiled_sparse_attention hands it the inverse layout (no-grad calls)
    return triton_fn


def sparse_work(geom: Geometry, layout, kv_counts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Attention work of a selection relative to one dense head, summed over `[B, H]` (padding counted).

    Video-video blocks count `volume²` each; text rows and columns are dense.

    Example:
        >>> from sparsify.layout import tile_layout
        >>> g = Geometry((4, 8, 8)); lay = tile_layout(g.grid, (1, 8, 8))
        >>> float(sparse_work(g, lay, torch.full((1, 1, 4), 2), 256))
        0.5
    """
    n_text = seq_len - geom.video_len
    vol = layout.volume
    video = kv_counts.to(torch.float64).sum() * vol * vol
    text = n_text * (layout.padded_len + n_text) + layout.padded_len * n_text
    return (video + text * kv_counts.shape[0] * kv_counts.shape[1]) / float(seq_len * seq_len)


def key_padding_mask(attn_mask, B: int, S: int):
    """A bool `[B, S]` key mask equivalent to `attn_mask`, or None if the mask is not key padding.

    Accepts bool or 0/-inf float masks shaped `[B, S]`, `[B|1, 1, 1, S]`.
    """
    m = attn_mask
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0, :]
    if m.dim() != 2 or m.shape[-1] != S or m.shape[0] not in (1, B):
        return None
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == float("-inf"))).all()):
            return None
        m = m == 0
    return m.expand(B, S)


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


def _select(st, impl, key, heads, ts, lay, geom, gen, step, B):
    """The group's selection: computed, or reused from an earlier step while q and k barely drifted."""
    P = ts.n_video_slots
    budgets = st.budgets(heads, step)
    reuse = st.mask_reuse if step is not None else None
    log = STATE.selection_log if step is not None else None
    means = getattr(ts, "means", None)  # the direct path (sparsify.kernels.direct) has no tile-order copies

    def select():
        if means is not None:
            return impl.select_from_means(*means, lay, budgets)
        return impl.select(ts.q[:, :, :P], ts.k[:, :, :P], lay, budgets)

    if reuse is None and log is None:
        st.selections += 1
        return select()
    pq, pk = means if means is not None else (pool_tiles(ts.q[:, :, :P], lay), pool_tiles(ts.k[:, :, :P], lay))
    ckey = (key, tuple(heads), geom.grid, B, st.calls_in_step)
    hit = st.cache.get(ckey) if reuse is not None else None
    if (hit is not None and hit["generation"] == gen and hit["age"] < reuse.max_age and hit["budgets"] == budgets
            and pooled_drift(pq, hit["q"], pk, hit["k"]) <= reuse.threshold):
        hit["age"] += 1
        st.reused += 1
        return hit["idx"], hit["cnt"]
    idx, cnt = select()
    st.selections += 1
    if log is not None:
        log(st, (gen, *ckey), step, pq, pk, idx, cnt)
    if reuse is not None:
        st.cache[ckey] = {"q": pq, "k": pk, "idx": idx, "cnt": cnt, "age": 0, "generation": gen, "budgets": budgets}
    return idx, cnt


def run_site(q, k, v, site: torch.Tensor, geometry: list[int], scale, attn_mask=None, timestep=None,
             gate=None) -> torch.Tensor:
    """Execute one attention call of an installed site: dense heads dense, sparse heads per tile group.

    With a `gate` (`[B, H, S, D]`, VSA's learned gate), tiled sparse heads add VSA's coarse branch:
    `out = sparse_out + gate * coarse_out`, coarse_out being attention among tile means broadcast to
    each video token of the tile (0 on text tokens); dense heads ignore the gate.

    With a `timestep`, the denoising step is tracked: the first `dense_steps` steps of a generation run
    dense, and with `mask_reuse` a head group's selection is reused across steps while its pooled q and
    k drift less than the threshold.
    """
    from .kernels import direct
    from .kernels.reference import tile_sequence, tiled_sparse_attention

    st = _site(site)
    st.calls += 1
    B, H, S, D = q.shape
    if H != st.heads or D != st.head_dim:
        raise RuntimeError(
            f"sparsify: site '{st.path}' was installed for {st.heads} heads of dim {st.head_dim} "
            f"but is called with q of shape {tuple(q.shape)} ([B, H, S, D])")

    def dense(reason=None):
        if reason:
            st.warn_once(reason, f"{reason}; this call runs dense attention")
        st.add_work(B * H)
        st.dense_work += B * H
        return _dense_sdpa(q, k, v, attn_mask, 0.0, False, scale=scale).contiguous()

    if st.is_dense and STATE.observer is None:
        return dense()
    if k.shape != q.shape or v.shape != q.shape:
        return dense(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    key_mask = None
    if attn_mask is not None:
        key_mask = key_padding_mask(attn_mask, B, S)
        if key_mask is None:
            return dense(f"attention mask of shape {tuple(attn_mask.shape)} is not a key-padding mask")
    geom = _unpack_geometry(geometry)
    if geom is None and STATE.geometry is not None:  # graph mode: the hook ran outside the graph
        geom = _unpack_geometry(current_geometry())
        if timestep is None:
            timestep = STATE.timestep
    if geom is None:
        raise RuntimeError(
            f"sparsify: site '{st.path}' needs the token grid (T, H, W) but none is known: the model "
            "has no geometry adapter; pass grid=(T, H, W) (or a callable) to sparsify()")
    geom.check(S, st.path)
    if STATE.observer is not None:
        STATE.observer(st, q, k, v, geom, scale, key_mask)
        if st.is_dense:
            return dense()
    step = None
    if timestep is not None:
        step = STATE.steps.observe(timestep_value(timestep), geom.grid)
        if (st.step_seen, st.gen_seen) != (step, STATE.steps.generation):
            st.step_seen, st.gen_seen, st.calls_in_step = step, STATE.steps.generation, 0
        else:
            st.calls_in_step += 1
        if step < st.dense_steps:
            return dense()
    st.dense_work += B * H
    groups: dict[tuple, list[int]] = {}
    for h, c in enumerate(st.configs):
        groups.setdefault(("dense",) if c.is_dense else (c.method, c.tile), []).append(h)
    block_fn = block_fn_for(q)
    out = None
    for key, heads in groups.items():
        whole = len(heads) == H
        hi = None if whole else device_ints(heads, q.device, torch.long)
        qh, kh, vh = (q, k, v) if whole else (x.index_select(1, hi) for x in (q, k, v))
        if key == ("dense",):
            oh = dense_attention(qh, kh, vh, scale, key_mask)
            st.add_work(B * len(heads))
        else:
            method, tile = key
            impl = st.method(key, heads)
            if hasattr(impl, "attend"):  # a method with its own token order (e.g. SVG2's clusters)
                gkey = ("attend", key, tuple(heads), geom.grid, B, st.calls_in_step)
                cache = st.cache.get(gkey)
                if cache is None or cache.get("_generation") != STATE.steps.generation:
                    cache = st.cache[gkey] = {"_generation": STATE.steps.generation}
                oh, work = impl.attend(qh, kh, vh, geom, st.budgets(heads, step), scale=scale,
                                       key_mask=key_mask, cache=cache, block_fn=block_fn)
                st.selections += 1
                st.add_work(work)
            else:
                lay = tile_layout(geom.grid, tile, q.device)
                if direct.serves(qh, kh, vh, geom, lay, impl, key_mask, gate):  # no tile-order copies
                    ts = direct.prepare(qh, kh, vh, lay)
                    idx, cnt = _select(st, impl, key, heads, ts, lay, geom, STATE.steps.generation, step, B)
                    oh = direct.attention(qh, kh, vh, lay, ts, idx, cnt, scale)
                else:
                    ts = tile_sequence(qh, kh, vh, geom, lay, key_group=getattr(impl, "key_group", 0))
                    idx, cnt = _select(st, impl, key, heads, ts, lay, geom, STATE.steps.generation, step, B)
                    oh = tiled_sparse_attention(qh, kh, vh, geom, lay, idx, cnt, scale=scale, key_mask=key_mask,
                                                block_fn=block_fn, tiled=ts)
                st.add_work(sparse_work(geom, lay, cnt, S))
                if gate is not None:  # VSA's gated coarse branch (sparsify.training.add_vsa_gates)
                    from .methods.vsa import coarse_attention

                    P = ts.n_video_slots
                    c = coarse_attention(ts.q[:, :, :P], ts.k[:, :, :P], ts.v[:, :, :P], lay)
                    c = torch.nn.functional.pad(c, (0, 0, 0, ts.q.shape[2] - P)).index_select(2, ts.inverse)
                    gh = gate if whole else gate.index_select(1, hi)
                    oh = oh + gh.to(oh.dtype) * c.to(oh.dtype)
                    st.add_work(B * len(heads) * (lay.n_tiles / S) ** 2)  # tile-level scores and outputs
        if whole:
            return oh.to(q.dtype).contiguous()
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        out.index_copy_(1, hi, oh.to(out.dtype))
    return out
