"""Dispatch of one attention call: dense heads dense, sparse heads per (method, tile) group through the tiled op."""

from __future__ import annotations

import warnings

import torch

from ..factorized import axis_geometry, axis_tile, temporal_is_long
from ..geometry import Geometry, merged_layout, tile_layout
from ..kernels._triton import device_ints, enabled, needs_grad
from ..kernels.reference import block_sparse_attn_reference, scatter_rows
from .masks import dense_rows, plan_mask
from .reuse import select_tiles
from .state import STATE, current_geometry, site_state, timestep_value, unpack_geometry
from .tiled import tile_sequence, tiled_sparse_attention

_dense_sdpa = torch._C._nn.scaled_dot_product_attention  # the op's dense path: never the patched F.*


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
    """The block-sparse kernel for q: Triton on CUDA when it serves the call (and, for a call that records a
    gradient, the `backward` path is on), else the differentiable PyTorch reference."""
    if not (q.is_cuda and enabled("attention")) or (needs_grad(q) and not enabled("backward")):
        return block_sparse_attn_reference
    try:
        from ..kernels.block_sparse import block_sparse_attn, block_sparse_attn_scattered, supports
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
        >>> from sparsify.geometry import tile_layout
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


def _run_folded(q, k, v, site, heads, geometry, scale, attn_mask, timestep, gate):
    """`run_site` for q `[N, S, D]` or `[1, N, S, D]` with N = batch·heads (heads folded into the batch,
    batch-major as diffusers' `head_to_batch_dim`), or `[H, S, D]` (one batch element)."""
    shape = q.shape
    N, S, D = shape[-3:]
    if N % heads:
        st = site_state(site)
        st.warn_once("fold", f"q of shape {tuple(shape)} does not fold into {heads} heads; this call runs dense")
        return _dense_sdpa(q, k, v, attn_mask, 0.0, False, scale=scale).contiguous()
    fold = (N // heads, heads)
    q4, k4, v4 = (x.reshape(*fold, *x.shape[-2:]) for x in (q, k, v))
    m = attn_mask
    if m is not None:
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m
        m = m.reshape(*fold, *m.shape[-2:]) if m.shape[1] == N else m
    g = None if gate is None else gate.reshape(*fold, *gate.shape[-2:])
    out = run_site(q4, k4, v4, site, geometry, scale, m, timestep, g) if g is not None else \
        run_site(q4, k4, v4, site, geometry, scale, m, timestep)
    return out.reshape(shape)


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
    st = site_state(site)
    if q.dim() == 3 or (q.dim() == 4 and q.shape[0] == 1 and q.shape[1] != st.heads and q.shape[1] % st.heads == 0):
        return _run_folded(q, k, v, site, st.heads, geometry, scale, attn_mask, timestep, gate)
    st.calls += 1
    B, H, S, D = q.shape
    if D != st.head_dim:
        raise RuntimeError(
            f"sparsify: site '{st.path}' was installed for {st.heads} heads of dim {st.head_dim} "
            f"but is called with q of shape {tuple(q.shape)} ([B, H, S, D])")
    lo = st.head_offset(H)  # under Ulysses sequence parallelism the call holds heads [lo, lo + H)
    configs = st.configs[lo:lo + H]

    def dense(reason=None):
        if reason:
            st.warn_once(reason, f"{reason}; this call runs dense attention")
        st.add_work(B * H)
        st.dense_work += B * H
        return _dense_sdpa(q, k, v, attn_mask, 0.0, False, scale=scale).contiguous()

    consensus = st.mask_reuse is not None and timestep is not None and H != st.heads  # Ulysses: ranks agree on reuse
    if all(c.is_dense for c in configs) and STATE.observer is None and not consensus:
        return dense()
    if k.shape != q.shape or v.shape != q.shape:
        return dense(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    geom = unpack_geometry(geometry)
    if geom is None and STATE.geometry is not None:  # graph mode: the hook ran outside the graph
        geom = unpack_geometry(current_geometry())
        if timestep is None:
            timestep = STATE.timestep
    if geom is None:
        raise RuntimeError(
            f"sparsify: site '{st.path}' needs the token grid (T, H, W) but none is known: the model "
            "has no geometry adapter; pass grid=(T, H, W) (or a callable) to sparsify()")
    if geom.video_start < 0:  # the video is the last video_len tokens (text first, of any length)
        geom = Geometry(geom.grid, S - geom.video_len)
    step_grid, merged = geom.grid, STATE.merged
    if st.check is not None and (merged is None or not merged.applies(S)):
        st.check(st, geom, S)
    if st.axis != "full":  # factorized: each of the B sequences is one frame (spatial) or one pixel (temporal)
        geom, merged = axis_geometry(geom, st.axis), None
    elif merged is not None and merged.applies(S):  # a block with merged tokens: its tiles, the model's steps
        geom = merged.geometry
    else:
        merged = None
    geom.check(S, st.path)
    key_mask, plan = None, None
    if attn_mask is not None:
        key_mask = key_padding_mask(attn_mask, B, S)
        if key_mask is None:
            plan = plan_mask(attn_mask, B, H, S, (geom.video_start, geom.video_len))
            if plan is None:
                return dense(f"attention mask of shape {tuple(attn_mask.shape)} is not a key-padding mask nor the "
                             "same for every video query")
            key_mask = plan.key_mask
            if plan.dense_rows is not None:
                out = run_site(q, k, v, site, geometry, scale, key_mask, timestep, gate)
                st.calls -= 1
                return dense_rows(q, k, v, plan, out, scale, _dense_sdpa).contiguous()
    if STATE.observer is not None:
        STATE.observer(st, q, k, v, geom, scale, key_mask)
        if all(c.is_dense for c in configs):
            return dense()
    step = None
    if timestep is not None:
        step = STATE.steps.observe(timestep_value(timestep), step_grid)
        if (st.step_seen, st.gen_seen) != (step, STATE.steps.generation):
            st.step_seen, st.gen_seen, st.calls_in_step = step, STATE.steps.generation, 0
        else:
            st.calls_in_step += 1
        if step < st.dense_steps:
            return dense()
    st.dense_work += B * H
    groups: dict[tuple, list[int]] = {}
    for h, c in enumerate(configs):
        short = st.axis == "temporal" and not c.is_dense and not temporal_is_long(S, c.tile)  # dense unless long
        groups.setdefault(("dense",) if c.is_dense or short else (c.method, c.tile), []).append(h)
    agree = None
    if consensus:  # a rank whose heads are all dense still joins the reuse decisions of the others' groups
        from ..parallel.consensus import reuse_agreement

        groups, agree = reuse_agreement(st, groups, st.current_shard()[2], q.device)
    block_fn = block_fn_for(q)
    out = None
    for key, local in groups.items():
        if not local:  # a group only other ranks hold: join its reuse decision
            agree(key, False, None, 0, st.mask_reuse.threshold)
            continue
        whole = len(local) == H
        hi = None if whole else device_ints(local, q.device, torch.long)
        heads = [lo + h for h in local]  # global head ids: recipe entries, methods and caches
        qh, kh, vh = (q, k, v) if whole else (x.index_select(1, hi) for x in (q, k, v))
        if key == ("dense",):
            oh = dense_attention(qh, kh, vh, scale, key_mask)
            st.add_work(B * len(heads))
        else:
            method, tile = key[0], axis_tile(key[1], st.axis)
            impl = st.method(key, heads)
            if hasattr(impl, "attend"):  # a method with its own token order (e.g. SVG2's clusters)
                gkey = ("attend", key, tuple(heads), geom.grid, B, st.slot)
                cache = st.cache.get(gkey)
                if cache is None or cache.get("_generation") != STATE.steps.generation:
                    cache = st.cache[gkey] = {"_generation": STATE.steps.generation}
                oh, work = impl.attend(qh, kh, vh, geom, st.budgets(heads, step), scale=scale,
                                       key_mask=key_mask, cache=cache, block_fn=block_fn)
                st.selections += 1
                st.add_work(work)
            else:
                lay = merged_layout(merged.layout.n_tiles, tile, merged.layout.kept, q.device) \
                    if merged is not None and merged.layout.tile == tile else tile_layout(geom.grid, tile, q.device)
                ts = tile_sequence(qh, kh, vh, geom, lay, key_group=getattr(impl, "key_group", 0))
                idx, cnt = select_tiles(st, impl, key, heads, ts, lay, geom, STATE.steps.generation, step, B,
                                        agree=agree)
                oh = tiled_sparse_attention(qh, kh, vh, geom, lay, idx, cnt, scale=scale, key_mask=key_mask,
                                            block_fn=block_fn, tiled=ts)
                st.add_work(sparse_work(geom, lay, cnt, S))
                if gate is not None:  # VSA's gated coarse branch (sparsify.training.add_vsa_gates)
                    from ..methods.vsa import coarse_attention

                    P = ts.n_video_slots
                    c = coarse_attention(ts.q[:, :, :P], ts.k[:, :, :P], ts.v[:, :, :P], lay)
                    c = torch.nn.functional.pad(c, (0, 0, 0, ts.q.shape[2] - P)).index_select(2, ts.inverse)
                    gh = gate if whole else gate.index_select(1, hi)
                    oh = oh + gh.to(oh.dtype) * c.to(oh.dtype)
                    st.add_work(B * len(heads) * (lay.n_tiles / S) ** 2)  # tile-level scores and outputs
        if whole:
            if agree is None:
                return oh.to(q.dtype).contiguous()
            out = oh.to(q.dtype).contiguous()  # the groups left are other ranks' (they still join their decisions)
            continue
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        out.index_copy_(1, hi, oh.to(out.dtype))
    return out
