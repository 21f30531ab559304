"""Whole-op benchmark: layout + selection + Triton kernel (+ inverse layout), against dense cuDNN, in one run.

    python -m benchmarks.whole_op [--shapes 1.3b,14b] [--densities 0.02,0.05,0.1,0.2,0.5] [--tile 4x4x4]
                                  [--methods vsa,veda,xattention] [--ablate] [--profile]

Prints one table (times, ratios against cuDNN measured in the same run, the breakdown of the op into
its stages, and each method's selection time as a share of the kernel's; the op itself runs the inverse layout
inside the kernel's store, timed apart as "kernel storing to token order") and writes
benchmarks/results/whole_op_<date>.json. `--ablate` also times the op with each fast path of
`sparsify.kernels.gather.FAST` off; `--profile` prints a CUDA profile of one op call per method. Times are
medians of at least 10 repeats with the L2 flushed between them (`benchmarks.time_ms`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

SHAPES = {"1.3b": ("Wan-1.3B 480p", 12, (21, 30, 52)), "14b": ("Wan-14B 720p", 40, (21, 45, 80))}


def bench(fn):
    """Median ms of `fn` over at least 10 repeats (`benchmarks.time_ms`)."""
    from benchmarks import time_ms

    return time_ms(fn)


def method_spec(spec: str):
    """`name` or `veda:<peak>` (Veda's default estimator with that peak mode) -> (method name, head params)."""
    name, _, peak = spec.partition(":")
    return (name, {"peak": peak, "weights": {"mix": 1.0}}) if peak else (name, None)


def _stage_times(method, q, k, v, geo, lay, d, H):
    """Separate timings of the op's stages on the same inputs: gather, selection, kernel, inverse, and the kernel
    with the inverse fused into its store (how the op runs it)."""
    from sparsify.kernels.block_sparse import block_sparse_attn, block_sparse_attn_scattered
    from sparsify.runtime.tiled import _slot_source, tile_sequence
    from sparsify.geometry import from_tiles
    from sparsify.methods import get_method
    from sparsify.recipe import Budget

    vol, P = lay.volume, lay.padded_len
    name, params = method_spec(method)
    sel = get_method(name, [params] * H if params else None)
    budgets = [Budget(density=d)] * H
    kg = getattr(sel, "key_group", 0)  # as the op runs it: Veda's key groups pooled by the gather
    t_gather = bench(lambda: tile_sequence(q, k, v, geo, lay, key_group=kg))
    ts = tile_sequence(q, k, v, geo, lay, key_group=kg)
    qt, kt, vt = ts.q[:, :, :P], ts.k[:, :, :P], ts.v[:, :, :P]
    t_select = bench(lambda: sel.select(qt, kt, lay, budgets))
    qc, kc = qt.clone(), kt.clone()  # no tile means remembered from the gather: selection pools q and k itself
    t_select_alone = bench(lambda: sel.select(qc, kc, lay, budgets))
    idx, cnt = sel.select(qt, kt, lay, budgets)
    lens = lay.tile_lens.to("cuda")
    t_lens = bench(lambda: block_sparse_attn(qt, kt, vt, idx, cnt, block_size=(vol, vol), kv_block_lens=lens))
    L = ts.prefix_len or P  # as the op runs it: a prefix with an ordinary tail when only the last tile is short
    op_lens = None if ts.prefix_len else lens
    t_kernel = bench(lambda: block_sparse_attn(qt[:, :, :L], kt[:, :, :L], vt[:, :, :L], idx, cnt, block_size=(vol, vol),
                                               kv_block_lens=op_lens))
    o = block_sparse_attn(qt, kt, vt, idx, cnt, block_size=(vol, vol), kv_block_lens=lens)
    t_inverse = bench(lambda: from_tiles(o, lay))
    rows = _slot_source(ts.src, ts.valid)[:L]
    t_scatter = bench(lambda: block_sparse_attn_scattered(qt[:, :, :L], kt[:, :, :L], vt[:, :, :L], idx, cnt, rows,
                                                          q.shape[2], block_size=(vol, vol), kv_block_lens=op_lens))
    return t_gather, t_select, t_kernel, t_inverse, t_select_alone, t_lens, t_scatter


def bench_site(path: str, method: str, tile, density: float, H: int, D: int):
    """Register a runtime site whose H heads all run `method` (a `method_spec`) at `density`; returns its state
    (call `runtime.run_site` with `torch.tensor([state.site_id])`; pop `runtime.STATE.sites[state.site_id]` after).

    Example:
        >>> # st = bench_site("bench.14b", "vsa", (4, 4, 4), 0.05, 40, 128)
    """
    from sparsify import runtime
    from sparsify.recipe import Budget, HeadConfig

    name_m, params = method_spec(method)
    cfg = [HeadConfig(method=name_m, tile=tile, budget=Budget(density=density), params=params)] * H
    st = runtime.SiteState(site_id=runtime.STATE.new_id(), path=path, kind="self", heads=H, head_dim=D, configs=cfg)
    runtime.STATE.sites[st.site_id] = st
    return st


def run(shapes, densities, tile, method="vsa", methods=None, ablate=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsify import runtime
    from sparsify.kernels import gather as fast
    from sparsify.geometry import Geometry, tile_layout

    methods = methods or [method]
    rows = []
    for key in shapes:
        name, H, grid = SHAPES[key]
        geo = Geometry(grid)
        S, D = geo.video_len, 128
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        lay = tile_layout(grid, tile, "cuda")
        for meth in methods:
            for d in densities:
                st = bench_site(f"bench.{key}", meth, tile, d, H, D)
                site = torch.tensor([st.site_id])
                geom = [*grid, 0]

                def op():
                    return runtime.run_site(q, k, v, site, geom, None)

                t_op = bench(op)
                t_gather, t_select, t_kernel, t_inverse, t_alone, t_lens, t_scatter = _stage_times(
                    meth, q, k, v, geo, lay, d, H)
                floor = d * t_cudnn
                row = {
                    "shape": name, "H": H, "S": S, "tile": list(tile), "method": meth, "density": d,
                    "padding": round(lay.padding_fraction, 4), "cudnn_ms": t_cudnn, "op_ms": t_op,
                    "kernel_ms": t_kernel, "kernel_with_block_lens_ms": t_lens, "select_ms": t_select,
                    "select_alone_ms": t_alone, "select_alone_share_of_kernel": t_alone / t_kernel, "gather_ms": t_gather, "inverse_ms": t_inverse,
                    "kernel_scattering_ms": t_scatter,
                    "floor_ms": floor, "op_speedup_vs_cudnn": t_cudnn / t_op,
                    "kernel_speedup_vs_cudnn": t_cudnn / t_kernel, "select_share_of_kernel": t_select / t_kernel,
                }
                if ablate:  # the op with one fast path switched off at a time (the PyTorch path instead)
                    row["op_without_ms"] = {}
                    for name_fast in fast.FAST:
                        fast.FAST[name_fast] = False
                        try:
                            row["op_without_ms"][name_fast] = bench(op)
                        finally:
                            fast.FAST[name_fast] = True
                    for name_fast in fast.FAST:
                        fast.FAST[name_fast] = False
                    try:
                        row["op_all_torch_ms"] = bench(op)
                        row["select_torch_ms"] = _stage_times(meth, q, k, v, geo, lay, d, H)[1]
                    finally:
                        for name_fast in fast.FAST:
                            fast.FAST[name_fast] = True
                rows.append(row)
                runtime.STATE.sites.pop(st.site_id)
                print(f"{name:14s} {meth:10s} d={d:<5g} cuDNN {t_cudnn:8.2f} ms | op {t_op:7.2f} ms "
                      f"({t_cudnn / t_op:5.1f}x) | kernel {t_kernel:7.2f} ({t_cudnn / t_kernel:5.1f}x) select "
                      f"{t_select:6.2f} ({100 * t_select / t_kernel:5.1f}% of kernel; pooling q, k too: {t_alone:6.2f}, "
                      f"{100 * t_alone / t_kernel:5.1f}%) gather {t_gather:5.2f} "
                      f"inverse {t_inverse:5.2f} (kernel storing to token order {t_scatter:6.2f}) | floor d*cuDNN {floor:6.2f} | kernel with per-tile lengths "
                      f"{t_lens:6.2f}", flush=True)
                if ablate:
                    print("    op without each fast path: " + ", ".join(
                        f"{kk} {vv:.2f}" for kk, vv in row["op_without_ms"].items())
                        + f"; all PyTorch {row['op_all_torch_ms']:.2f} ms (select {row['select_torch_ms']:.2f})",
                        flush=True)
    return rows


def peak_configs(shape, tile, configs, groups=(1, 4)):
    """Time the fused tile-logit kernel (`tile_peaks`, the default Veda's `mass` output) per launch config
    `(BM, key tiles per step, warps)` and key group (1 = Veda's exact peak, G = `keys/G`, whose `group_means`
    pass is timed on its own)."""
    import math

    from sparsify.kernels.tile_select import group_means, tile_peaks
    from sparsify.geometry import tile_layout, to_tiles

    name, H, grid = SHAPES[shape]
    lay = tile_layout(grid, tile, "cuda")
    k = to_tiles(torch.randn(1, H, grid[0] * grid[1] * grid[2], 128, device="cuda", dtype=torch.bfloat16), lay)
    qm = torch.randn(1, H, lay.n_tiles, 128, device="cuda")
    out = {}
    for g in groups:
        keys = k if g == 1 else group_means(k, lay.tile_lens, lay.volume, g)
        if g > 1:
            t = bench(lambda: group_means(k, lay.tile_lens, lay.volume, g))
            out[f"group_means/{g}"] = t
            print(f"group_means {name} group {g}: {t:.3f} ms", flush=True)
        flop = 2.0 * lay.n_tiles * lay.padded_len / g * 128 * H
        for c in configs:
            try:
                t = bench(lambda: tile_peaks(qm, keys, lay.tile_lens, lay.volume // g, 1 / math.sqrt(128), group=g,
                                             outputs=("mass",), config=c))
            except Exception as e:  # e.g. a config over the shared-memory limit
                print(f"tile_peaks {name} group {g} config {c}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            out[f"g{g}:" + "x".join(map(str, c))] = t
            print(f"tile_peaks {name} group {g} config {c}: {t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s)", flush=True)
    return out


def profile(shape, tile, methods, density, out_dir=None):
    """torch.profiler table (CUDA time per kernel) of one op call per method."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from sparsify import runtime
    from sparsify.recipe import Budget, HeadConfig

    name, H, grid = SHAPES[shape]
    S = grid[0] * grid[1] * grid[2]
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for meth in methods:
        name_m, params = method_spec(meth)
        st = runtime.SiteState(site_id=runtime.STATE.new_id(), path="prof", kind="self", heads=H, head_dim=128,
                               configs=[HeadConfig(method=name_m, tile=tile, budget=Budget(density=density),
                                                   params=params)] * H)
        runtime.STATE.sites[st.site_id] = st
        site = torch.tensor([st.site_id])
        for _ in range(2):
            runtime.run_site(q, k, v, site, [*grid, 0], None)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            runtime.run_site(q, k, v, site, [*grid, 0], None)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(f"--- profile: {name} {meth} d={density} tile {tile}\n{table}", flush=True)
        if out_dir:
            Path(out_dir, f"profile_{meth.replace(':', '_').replace('/', '')}.txt").write_text(table)
        runtime.STATE.sites.pop(st.site_id)


GRIDS = {grid[0] * grid[1] * grid[2]: grid for _, _, grid in SHAPES.values()}


def op_row_factory(tile=(4, 4, 4), method="vsa"):
    """A `benchmarks.attention.register_row` factory: the whole op (layout, selection, kernel, inverse) on
    the case's q, k, v at the case's density (its own selection, not the case's random one)."""

    def factory(case):
        from sparsify import runtime
        from sparsify.recipe import Budget, HeadConfig

        grid = GRIDS.get(case.S)
        if grid is None:
            return None
        name, params = method_spec(method)
        st = runtime.SiteState(site_id=runtime.STATE.new_id(), path=f"bench.{case.shape}", kind="self", heads=case.H,
                               head_dim=case.D, configs=[HeadConfig(method=name, tile=tile, params=params,
                                                                    budget=Budget(density=case.density))] * case.H)
        runtime.STATE.sites[st.site_id] = st
        site, geom = torch.tensor([st.site_id]), [*grid, 0]
        return lambda: runtime.run_site(case.q, case.k, case.v, site, geom, None)

    return factory


def select_row_factory(tile=(4, 4, 4), method="vsa"):
    """A `register_row` factory: the method's selection alone on the case's q, k at the case's density.

    Tile methods select on q, k in tile order, pooling their tile means themselves (the op takes them from its
    gather, so this is an upper bound of what the op spends); SVG2 runs `cluster_select` on a warm cache (one
    k-means iteration per call, as on every call after a generation's first)."""

    def factory(case):
        from sparsify.geometry import tile_layout, to_tiles
        from sparsify.methods import get_method
        from sparsify.recipe import Budget

        grid = GRIDS.get(case.S)
        if grid is None:
            return None
        name, params = method_spec(method)
        sel = get_method(name, [params] * case.H if params else None)
        budgets = [Budget(density=case.density)] * case.H
        if hasattr(sel, "cluster_select"):
            cache: dict = {}
            sel.cluster_select(case.q, case.k, budgets, cache=cache)  # the cold start, once
            return lambda: sel.cluster_select(case.q, case.k, budgets, cache=cache)
        lay = tile_layout(grid, tile, case.q.device)
        qt, kt = to_tiles(case.q, lay), to_tiles(case.k, lay)
        return lambda: sel.select(qt, kt, lay, budgets)

    return factory


def register_op_rows(method: str, tile=(4, 4, 4)) -> None:
    """Add `op <method>` (the whole op) and `select <method>` (the selection alone) rows to `benchmarks.attention`.

    Example:
        >>> # register_op_rows("svg2")  # then benchmarks.attention.run(args) times both rows per case
    """
    from benchmarks.attention import register_row

    t = "x".join(map(str, tile))
    register_row(f"op {method} {t}", op_row_factory(tile, method), compare=False)
    register_row(f"select {method} {t}", select_row_factory(tile, method), compare=False)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.whole_op", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.3b,14b")
    p.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.5")
    p.add_argument("--tile", default="4x4x4")
    p.add_argument("--methods", default="vsa", help="comma-separated selection methods (vsa,veda,xattention; "
                   "veda:keys/4 = Veda with that peak mode)")
    p.add_argument("--ablate", action="store_true", help="also time the op with each fast path off")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per method first")
    p.add_argument("--peak-configs", default="", help="also time Veda's peak kernel per BMxTILESxWARPS config")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.whole_op needs a CUDA GPU")
    import triton

    tile = tuple(int(x) for x in a.tile.split("x"))
    methods, densities = a.methods.split(","), [float(x) for x in a.densities.split(",")]
    if a.profile:
        profile(a.shapes.split(",")[-1], tile, methods, densities[len(densities) // 2],
                Path(a.out).parent if a.out else None)
    peaks = {}
    if a.peak_configs:
        peaks = peak_configs(a.shapes.split(",")[-1], tile,
                             [tuple(int(x) for x in c.split("x")) for c in a.peak_configs.split(",")])
    rows = run(a.shapes.split(","), densities, tile, methods=methods, ablate=a.ablate)
    date = datetime.datetime.now(datetime.timezone.utc)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python -m benchmarks.whole_op " + " ".join(argv or sys.argv[1:]),
            "date": date.strftime("%Y-%m-%d %H:%M UTC"), "rows": rows, "peak_configs_ms": peaks}
    out = Path(a.out or Path(__file__).parent / "results" / f"whole_op_{date.strftime('%Y%m%d_%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
