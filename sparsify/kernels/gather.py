"""Triton row gather (q, k, v into tile order in one launch, tile means on the fly) and per-tile pooling."""

from __future__ import annotations

import torch

from ._triton import _MAX, _MIN, _SUM, interpreter, jit, tl, triton  # noqa: F401  (interpreter: for the examples)

# Only triton builtins in the kernels (tl.reduce with these combiners, not the @jit helpers tl.sum / tl.max,
# which cannot run under the interpreter if TRITON_INTERPRET was unset when triton was imported).


def _gather_kernel(x0, x1, x2, y0, y1, y2, src_ptr, lens_ptr, p0, p1, g_ptr,
                   H, n_out, n_pool_tiles,
                   sb0, sh0, ss0, sb1, sh1, ss1, sb2, sh2, ss2,
                   D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, POOL: tl.constexpr,
                   VOL: tl.constexpr, SRC_BH: tl.constexpr, GROUP: tl.constexpr, WRITE: tl.constexpr):
    """y_t[b, h, s] = x_t[b, h, src[s]] (zeros where src < 0; with SRC_BH src[b, h, s]) for tensor t =
    program_id(2); with POOL, the programs of tensors 0 and 1 also write the float32 mean of each VOL-slot
    tile (first n_pool_tiles tiles), and with GROUP > 0 those of tensor 1 the mean of each group of GROUP
    consecutive slots of those tiles (in x's dtype; valid slots are a tile's leading lens[tile]). Without WRITE
    only the means are written (the gathered rows are not stored)."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    t = tl.program_id(2)
    b = bh // H
    h = bh % H
    if GROUP > 0:
        if t == 1:  # k: G strided row sets (rows u, u + G, ...), summed in registers for the group means
            gr = pid_s * (BLOCK_S // GROUP) + tl.arange(0, BLOCK_S // GROUP)
            cols = tl.arange(0, BLOCK_D)
            cmask = cols[None, :] < D
            base = x1 + b.to(tl.int64) * sb1 + h.to(tl.int64) * sh1
            gs = tl.full((BLOCK_S // GROUP, BLOCK_D), 0.0, tl.float32)
            for u in tl.static_range(GROUP):
                r_u = gr * GROUP + u
                rm = r_u < n_out
                src = tl.load(src_ptr + r_u, mask=rm, other=-1).to(tl.int64)
                ok = src >= 0
                xu = tl.load(base + tl.where(ok, src, 0)[:, None] * ss1 + cols[None, :], mask=ok[:, None] & cmask,
                             other=0.0)
                if WRITE:
                    tl.store(y1 + (bh.to(tl.int64) * n_out + r_u[:, None].to(tl.int64)) * D + cols[None, :], xu,
                             mask=rm[:, None] & cmask)
                gs += xu.to(tl.float32)
            if pid_s * (BLOCK_S // VOL) < n_pool_tiles:  # padded slots were loaded as zeros
                n_g = n_pool_tiles * (VOL // GROUP)
                gm = gr < n_g
                gl = tl.load(lens_ptr + (gr * GROUP) // VOL, mask=gm, other=0)
                gc = tl.minimum(tl.maximum(gl - (gr * GROUP) % VOL, 0), GROUP).to(tl.float32)
                gout = g_ptr + (bh.to(tl.int64) * n_g + gr[:, None].to(tl.int64)) * D + cols[None, :]
                tl.store(gout, (gs / tl.maximum(gc, 1.0)[:, None]).to(g_ptr.dtype.element_ty), mask=gm[:, None] & cmask)
                tiles = pid_s * (BLOCK_S // VOL) + tl.arange(0, BLOCK_S // VOL)
                xs = tl.reduce(tl.reshape(gs, (BLOCK_S // VOL, VOL // GROUP, BLOCK_D)), 1, _SUM)
                tmask = tiles < n_pool_tiles
                ln = tl.load(lens_ptr + tiles, mask=tmask, other=1).to(tl.float32)
                pout = p1 + (bh.to(tl.int64) * n_pool_tiles + tiles[:, None].to(tl.int64)) * D + cols[None, :]
                tl.store(pout, xs / tl.maximum(ln, 1.0)[:, None], mask=tmask[:, None] & cmask)
    if (t != 1) | (GROUP == 0):
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < n_out
        if SRC_BH:
            src = tl.load(src_ptr + bh.to(tl.int64) * n_out + rows, mask=rmask, other=-1).to(tl.int64)
        else:
            src = tl.load(src_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        valid = src >= 0
        src = tl.where(valid, src, 0)
        cmask = cols[None, :] < D
        if t == 0:
            xp = x0 + b.to(tl.int64) * sb0 + h.to(tl.int64) * sh0 + src[:, None] * ss0
            yp = y0
            pp = p0
        elif t == 1:
            xp = x1 + b.to(tl.int64) * sb1 + h.to(tl.int64) * sh1 + src[:, None] * ss1
            yp = y1
            pp = p1
        else:
            xp = x2 + b.to(tl.int64) * sb2 + h.to(tl.int64) * sh2 + src[:, None] * ss2
            yp = y2
            pp = p1
        x = tl.load(xp + cols[None, :], mask=valid[:, None] & cmask, other=0.0)
        if WRITE:
            out = yp + (bh.to(tl.int64) * n_out + rows[:, None].to(tl.int64)) * D + cols[None, :]
            tl.store(out, x, mask=rmask[:, None] & cmask)
        if POOL:
            if t < 2:
                tiles = pid_s * (BLOCK_S // VOL) + tl.arange(0, BLOCK_S // VOL)
                if pid_s * (BLOCK_S // VOL) < n_pool_tiles:
                    xs = tl.reduce(tl.reshape(x.to(tl.float32), (BLOCK_S // VOL, VOL, BLOCK_D)), 1, _SUM)
                    tmask = tiles < n_pool_tiles
                    ln = tl.load(lens_ptr + tiles, mask=tmask, other=1).to(tl.float32)
                    mean = xs / tl.maximum(ln, 1.0)[:, None]
                    pout = pp + (bh.to(tl.int64) * n_pool_tiles + tiles[:, None].to(tl.int64)) * D + cols[None, :]
                    tl.store(pout, mean, mask=tmask[:, None] & cmask)


def _pool_kernel(x_ptr, lens_ptr, mean_ptr, max_ptr, min_ptr, n_tiles, H, sxb, sxh, sxs,
                 D: tl.constexpr, VOL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 MEAN: tl.constexpr, MAX: tl.constexpr, MIN: tl.constexpr):
    """Mean / max / min over the valid (leading `lens[tile]`) slots of one tile of x[b, h]."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.arange(0, BLOCK_V)
    cols = tl.arange(0, BLOCK_D)
    ln = tl.load(lens_ptr + tile)
    rmask = (r < ln) & (r < VOL)
    m = rmask[:, None] & (cols[None, :] < D)
    base = x_ptr + (bh // H).to(tl.int64) * sxb + (bh % H).to(tl.int64) * sxh
    x = tl.load(base + (tile.to(tl.int64) * VOL + r[:, None]) * sxs + cols[None, :], mask=m, other=0.0).to(tl.float32)
    o = (bh.to(tl.int64) * n_tiles + tile) * D + cols
    cm = cols < D
    if MEAN:
        tl.store(mean_ptr + o, tl.reduce(x, 0, _SUM) / tl.maximum(ln, 1).to(tl.float32), mask=cm)
    if MAX:
        tl.store(max_ptr + o, tl.reduce(tl.where(m, x, float("-inf")), 0, _MAX), mask=cm)
    if MIN:
        tl.store(min_ptr + o, tl.reduce(tl.where(m, x, float("inf")), 0, _MIN), mask=cm)


def gather_rows(xs, src: torch.Tensor, *, pool_tiles: int = 0, tile_lens: torch.Tensor | None = None,
                volume: int = 0, block: int = 64, group: int = 0, write: bool = True):
    """Gather rows of up to three `[B, H, S, D]` tensors in one launch: `y[b, h, s] = x[b, h, src[s]]` (zeros
    where `src < 0`), or `x[b, h, src[b, h, s]]` with a per-head `src`. Not differentiable.

    Args:
        xs: 1 to 3 tensors of equal shape and dtype (any strides with a unit last stride).
        src: long/int `[n_out]` source row of each output slot, or -1; or `[B, H, n_out]`, one row per head
            (not with pooling).
        pool_tiles: if > 0, also return the float32 means over each `volume`-slot tile of the first
            `pool_tiles` tiles of `xs[0]` and `xs[1]` (`[B, H, pool_tiles, D]`), valid slots being the
            leading `tile_lens[tile]` ones.
        tile_lens: int `[>= pool_tiles]`, needed with `pool_tiles`.
        volume: slots per tile (with `pool_tiles`; a power of two).
        block: slots per program (a power of two).
        group: with `pool_tiles`, also `tile_select.group_means` of `xs[1]` (Veda's `keys/G` rows).
        write: False: only the means (with `pool_tiles`); `ys` is empty.

    Returns:
        `(ys, means)`: the gathered contiguous `[B, H, n_out, D]` tensors and the list of means (empty
        without `pool_tiles`; q's and k's tile means, then k's group means with `group`).

    Example:
        >>> x = torch.arange(8.0).view(1, 1, 4, 2)
        >>> with interpreter():
        ...     (y,), _ = gather_rows([x], torch.tensor([3, -1, 0]), block=4)
        >>> y[0, 0].tolist()
        [[6.0, 7.0], [0.0, 0.0], [0.0, 1.0]]
    """
    xs = list(xs)
    if not 1 <= len(xs) <= 3 or any(x.shape != xs[0].shape or x.dtype != xs[0].dtype for x in xs):
        raise ValueError(f"gather_rows: 1 to 3 tensors of one shape and dtype; got {[tuple(x.shape) for x in xs]}")
    if xs[0].dim() != 4:
        raise ValueError(f"gather_rows: tensors must be [B, H, S, D]; got {tuple(xs[0].shape)}")
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    B, H, S, D = xs[0].shape
    per_head = src.dim() == 3
    if per_head and (tuple(src.shape[:2]) != (B, H) or pool_tiles):
        raise ValueError(f"gather_rows: a per-head src must be [{B}, {H}, n_out] (without pooling); got "
                         f"{tuple(src.shape)}")
    n_out = src.shape[-1]
    src = src.to(xs[0].device, torch.int32 if S < 2**31 else torch.int64).contiguous()
    pool = pool_tiles > 0
    if not write:
        if not pool:
            raise ValueError("gather_rows: write=False needs pooling (pool_tiles > 0)")
        xs = xs[:2]  # only q and k are read
    ys = [torch.empty(B, H, n_out if write else 0, D, dtype=x.dtype, device=x.device) for x in xs]
    if pool:
        if len(xs) < 2 or tile_lens is None or volume < 1 or (block % volume and volume % block):
            raise ValueError("gather_rows: pooling needs q and k, tile_lens and a volume dividing the block")
        block = max(block, volume)
        if volume & (volume - 1):
            raise ValueError(f"gather_rows: pooling needs a power-of-two tile volume; got {volume}")
        means = [torch.empty(B, H, pool_tiles, D, dtype=torch.float32, device=xs[0].device) for _ in range(2)]
        lens = tile_lens.to(xs[0].device, torch.int32).contiguous()
        if group:
            if group & (group - 1) or volume % group:
                raise ValueError(f"gather_rows: group {group} must be a power of two dividing the volume {volume}")
            means.append(torch.empty(B, H, pool_tiles * volume // group, D, dtype=xs[1].dtype, device=xs[0].device))
    else:
        if group:
            raise ValueError("gather_rows: group means need pooling (pool_tiles > 0)")
        means, lens = [], src
    if block & (block - 1):
        raise ValueError(f"gather_rows: block must be a power of two; got {block}")
    pad = xs + [xs[0]] * (3 - len(xs))
    ypad = ys + [ys[0]] * (3 - len(ys))
    mp = means[:2] + [ys[0]] * (2 - len(means[:2]))
    gp = means[2] if group else ys[0]
    strides = [s for x in pad for s in (x.stride(0), x.stride(1), x.stride(2))]
    grid = (triton.cdiv(n_out, block), B * H, len(xs))
    jit(_gather_kernel)[grid](*pad, *ypad, src, lens, *mp, gp, H, n_out, pool_tiles, *strides,
                               D=D, BLOCK_S=block, BLOCK_D=triton.next_power_of_2(D), POOL=pool,
                               VOL=max(volume, 1), SRC_BH=per_head, GROUP=group, WRITE=write, num_warps=4)
    return (ys if write else []), means


def pool_stats(x: torch.Tensor, tile_lens: torch.Tensor, volume: int, stats=("mean",)) -> list[torch.Tensor]:
    """Per-tile float32 statistics of tiled `x` `[B, H, n_tiles*volume, D]` over each tile's leading
    `tile_lens[t]` (valid) slots, in one read of `x`.

    Args:
        stats: any of `mean`, `max`, `min`, in the order wanted.

    Returns:
        One float32 `[B, H, n_tiles, D]` tensor per statistic.

    Example:
        >>> x = torch.tensor([1.0, 5.0, 3.0, 9.0]).view(1, 1, 4, 1)
        >>> with interpreter():
        ...     stats = pool_stats(x, torch.tensor([3]), 4, ("mean", "max"))
        >>> [s.item() for s in stats]
        [3.0, 5.0]
    """
    B, H, N, D = x.shape
    n = tile_lens.numel()
    if N != n * volume:
        raise ValueError(f"pool_stats: x has {N} slots, expected {n} tiles x {volume}")
    bad = [s for s in stats if s not in ("mean", "max", "min")]
    if bad:
        raise ValueError(f"pool_stats: unknown statistic(s) {bad}; use mean, max, min")
    if x.stride(-1) != 1:
        x = x.contiguous()
    outs = {s: torch.empty(B, H, n, D, dtype=torch.float32, device=x.device) for s in stats}
    dummy = next(iter(outs.values()))
    jit(_pool_kernel)[(n, B * H)](x, tile_lens.to(x.device, torch.int32).contiguous(), outs.get("mean", dummy),
                                   outs.get("max", dummy), outs.get("min", dummy), n, H, x.stride(0), x.stride(1),
                                   x.stride(2), D=D, VOL=volume,
                                   BLOCK_V=triton.next_power_of_2(volume), BLOCK_D=triton.next_power_of_2(D),
                                   MEAN="mean" in outs, MAX="max" in outs, MIN="min" in outs, num_warps=4)
    return [outs[s] for s in stats]
