"""Whole-op benchmark: layout + selection + kernel + inverse layout per method, against dense cuDNN, in one run.

    python -m benchmarks.op [--shapes 1.3b,14b] [--densities 0.02,0.05,0.1,0.2,0.5] [--tile 4x4x4]
                            [--methods vsa,veda,xattention,svg2] [--ablate] [--profile]
    python -m benchmarks.op --shapes 14b --densities 0.05 --ab scatter --rounds 5   # one kernel path on / off
    python -m benchmarks.op --methods svg2 --no-dense       # SVG2's cost table at Wan-14B 5% (selection, kernel, attend)
    python -m benchmarks.op --tiny                          # CPU smoke run of every code path (Triton interpreter)

Tile methods (vsa, veda, xattention; `veda:<peak>` = Veda's default estimator with that peak mode) print one
row per shape and density: the op (`runtime.run_site`, as a recipe runs it), its stages timed apart (gather,
selection, kernel, inverse layout; the op itself runs the inverse inside the kernel's store, timed apart as
"kernel storing to token order"), each method's selection time as a share of the kernel's, and ratios against
cuDNN measured in the same run. `--ablate` also times the op with each Triton path of
`sparsify.kernels.PATHS` off in turn (the PyTorch path instead), and with all of them off (the attention
kernel stays on).

`svg2` (SVG2's k-means clusters, variable-size blocks) gets the whole op beside its cost table: the warm
selection (`SVG2.cluster_select`: one k-means iteration for q and for k from the previous centroids, then
centroid scores and selection), the same with the permutation by `torch.gather`, its parts (assignment,
permutation, cluster sort, scores and selection also by the torch path), the variable-size block kernel on
that selection (keys packed, and its key table alone), the whole `attend`, and the fixed-block
kernel with 128-token blocks at the same density (random selection). Its timings rotate over `--sets` fresh
random input sets, each with its own warm k-means cache, so no call sees the inputs of the previous one; it
runs with the default cluster counts and with 300 query / 1,000 key clusters.

`--ab PATH` times the op with one kernel path (one of `sparsify.kernels.PATHS`) on and off
(`kernel_backend("-PATH")`), alternating for `--rounds` rounds on the same inputs, so clock drift falls on
both; it prints the medians of the rounds and the largest output difference.

Every time is a `triton.testing.do_bench` median of at least 10 repeats with the L2 flushed between them
(`benchmarks._common.time_ms`), on fresh random (never zero) bf16 inputs. Writes
`benchmarks/results/op_<date>.json` (`op_ab_<date>.json` with `--ab`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from benchmarks._common import TINY_SHAPE, WAN_SHAPES, alternated, parse_list, run_header, time_ms, write_result

SHAPES = {"1.3b": WAN_SHAPES["wan1.3b"], "14b": WAN_SHAPES["wan14b"]}  # key: (label, B, H, S, D, grid)
GRIDS = {s[3]: s[5] for s in (*WAN_SHAPES.values(), TINY_SHAPE)}  # sequence length -> token grid
SVG2_CONFIGS = {"svg2 (default clusters)": {}, "svg2 (300 q / 1000 k clusters)": {"q_clusters": 300, "k_clusters": 1000}}
#: paths that never run in the op's forward: `rope` lives in Wan's attention processor (`benchmarks.e2e` times it,
#: row "dense, fused q/k"), `backward` in training (`benchmarks.kernel --backward`)
NOT_IN_OP = ("rope", "backward")

bench = time_ms


def method_spec(spec: str):
    """`name` or `veda:<peak>` (Veda's default estimator with that peak mode) -> (method name, head params).

    Example:
        >>> method_spec("veda:keys/4")
        ('veda', {'peak': 'keys/4', 'weights': {'mix': 1.0}})
    """
    name, _, peak = spec.partition(":")
    return (name, {"peak": peak, "weights": {"mix": 1.0}}) if peak else (name, None)


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


def _inputs(H, S, D, device, dtype, seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(1, H, S, D, device=device, dtype=dtype) for _ in range(3))


def _cudnn_ms(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not q.is_cuda:  # --tiny: the math backend stands in
        return bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))


def _stage_times(method, q, k, v, geo, lay, d, H):
    """Separate timings of the op's stages on the same inputs: gather, selection, kernel, inverse, and the kernel
    with the inverse fused into its store (how the op runs it)."""
    from sparsify.geometry import from_tiles
    from sparsify.kernels.block_sparse import block_sparse_attn, block_sparse_attn_scattered
    from sparsify.methods import get_method
    from sparsify.recipe import Budget
    from sparsify.runtime.tiled import _slot_source, tile_sequence

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
    lens = lay.tile_lens.to(q.device)
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


def _ablation_paths():
    from sparsify.kernels import PATHS

    return [p for p in PATHS if p not in ("attention",) + NOT_IN_OP]


def tile_row(key, meth, d, tile, q, k, v, t_cudnn, ablate=False):
    """One shape x tile method x density: the op, its stages, and (`ablate`) the op with each path off."""
    from sparsify import runtime
    from sparsify.geometry import Geometry, tile_layout
    from sparsify.kernels import kernel_backend

    name, _, H, S, D, grid = _shape(key)
    geo, lay = Geometry(grid), tile_layout(grid, tile, q.device)
    st = bench_site(f"bench.{key}", meth, tile, d, H, D)
    site, geom = torch.tensor([st.site_id]), [*grid, 0]

    def op():
        return runtime.run_site(q, k, v, site, geom, None)

    try:
        t_op = bench(op)
        t_gather, t_select, t_kernel, t_inverse, t_alone, t_lens, t_scatter = _stage_times(meth, q, k, v, geo, lay, d, H)
        floor = d * t_cudnn if t_cudnn else None
        row = {
            "shape": name, "H": H, "S": S, "tile": list(tile), "method": meth, "density": d,
            "padding": round(lay.padding_fraction, 4), "cudnn_ms": t_cudnn, "op_ms": t_op,
            "kernel_ms": t_kernel, "kernel_with_block_lens_ms": t_lens, "select_ms": t_select,
            "select_alone_ms": t_alone, "select_alone_share_of_kernel": t_alone / t_kernel, "gather_ms": t_gather,
            "inverse_ms": t_inverse, "kernel_scattering_ms": t_scatter, "floor_ms": floor,
            "op_speedup_vs_cudnn": t_cudnn / t_op if t_cudnn else None,
            "kernel_speedup_vs_cudnn": t_cudnn / t_kernel if t_cudnn else None,
            "select_share_of_kernel": t_select / t_kernel,
        }
        if ablate:  # the op with one path switched off at a time (the PyTorch path instead)
            paths = _ablation_paths()
            row["op_without_ms"] = {}
            for p in paths:
                with kernel_backend(f"-{p}"):
                    row["op_without_ms"][p] = bench(op)
            with kernel_backend(",".join(f"-{p}" for p in paths)):
                row["op_all_torch_ms"] = bench(op)
                row["select_torch_ms"] = _stage_times(meth, q, k, v, geo, lay, d, H)[1]
    finally:
        runtime.STATE.sites.pop(st.site_id)
    c = f"cuDNN {t_cudnn:8.2f} ms | " if t_cudnn else ""
    x = (lambda t: f" ({t_cudnn / t:5.1f}x)") if t_cudnn else (lambda t: "")
    print(f"{name:14s} {meth:10s} d={d:<5g} {c}op {t_op:7.2f} ms{x(t_op)} | kernel {t_kernel:7.2f}{x(t_kernel)} "
          f"select {t_select:6.2f} ({100 * t_select / t_kernel:5.1f}% of kernel; pooling q, k too: {t_alone:6.2f}, "
          f"{100 * t_alone / t_kernel:5.1f}%) gather {t_gather:5.2f} inverse {t_inverse:5.2f} (kernel storing to "
          f"token order {t_scatter:6.2f})" + (f" | floor d*cuDNN {floor:6.2f}" if floor else "")
          + f" | kernel with per-tile lengths {t_lens:6.2f}", flush=True)
    if ablate:
        print("    op without each path: " + ", ".join(f"{kk} {vv:.2f}" for kk, vv in row["op_without_ms"].items())
              + f"; all PyTorch {row['op_all_torch_ms']:.2f} ms (select {row['select_torch_ms']:.2f})", flush=True)
    return row


def _rotating(fns):
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return call


def svg2_rows(key, d, sets, t_cudnn, args, long_ms=800):
    """SVG2's whole op and cost table at one shape and density, for each of `SVG2_CONFIGS` (see the module
    docstring); `sets` are the rotated fresh input sets `[(q, k, v), ...]`."""
    from sparsify import runtime
    from sparsify.geometry import Geometry
    from sparsify.kernels import kernel_backend
    from sparsify.kernels.block_sparse import block_sparse_attn
    from sparsify.kernels.varlen import default_block_size, kv_key_table, varlen_block_attn, varlen_pairs
    from sparsify.methods.svg2 import (SVG2, centroid_logits, cluster_blocks, cluster_sizes, kmeans_assign,
                                       permute_rows, segment_means, select_clusters)
    from sparsify.recipe import Budget

    def sbench(fn, rep_ms=400):  # the cost table's repeat window (800 ms for kernels)
        return time_ms(fn, warmup_ms=50.0, rep_ms=rep_ms)

    name_s, _, H, S, D, grid = _shape(key)
    B = sets[0][0].shape[0]
    dev = sets[0][0].device
    budgets = [Budget(density=d)] * H
    scale = 1 / math.sqrt(D)
    n = len(sets)
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.kernel_tiles.split(",") if t]
    # the fixed-block kernel at the same density (random selection of 128-token blocks)
    n_b = -(-S // 128)
    count = max(1, math.ceil(d * n_b - 1e-9))
    fixed_sel = []
    for _ in sets:
        perm = torch.rand(B, H, n_b, n_b, device=dev).argsort(-1).to(torch.int32)
        fixed_sel.append((perm[..., :count].sort(-1).values.contiguous(),
                          torch.full((B, H, n_b), count, device=dev, dtype=torch.int32)))
    fixed = sbench(_rotating([lambda i=i: block_sparse_attn(*sets[i], *fixed_sel[i], block_size=(128, 128))
                             for i in range(n)]), rep_ms=long_ms)
    rows = []
    configs = SVG2_CONFIGS if not args.tiny else {"svg2 (default clusters)": {}}
    for cname, cfg in configs.items():
        method = SVG2(**cfg)
        # the whole op, as a recipe runs it (the site's head configs carry SVG2's default cluster counts)
        t_op = None
        if not cfg:
            st = bench_site(f"bench.{key}", "svg2", (4, 4, 4), d, H, D)
            site, geom = torch.tensor([st.site_id]), [*grid, 0]
            try:
                t_op = sbench(_rotating([lambda i=i: runtime.run_site(*sets[i], site, geom, None) for i in range(n)]))
            finally:
                runtime.STATE.sites.pop(st.site_id)
        caches, cold = [], []
        for q, k, _ in sets:  # cold starts (once per set) make the warm caches
            cache: dict = {}
            if dev.type == "cuda":
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0.record()
                method.cluster_select(q, k, budgets, cache=cache)
                t1.record()
                torch.cuda.synchronize()
                cold.append(t0.elapsed_time(t1))
            else:
                method.cluster_select(q, k, budgets, cache=cache)
            caches.append(cache)
        row = {"shape": name_s, "H": H, "S": S, "method": "svg2", "config": cname, "density": d,
               "clusters": list(method.n_clusters(S)), "cold_start_ms_first": cold, "cold_iters": caches[0]["iters"],
               "cudnn_ms": t_cudnn, "op_ms": t_op, "op_speedup_vs_cudnn": t_cudnn / t_op if t_cudnn and t_op else None,
               "fixed_block_kernel_ms": fixed, "fixed_block_count": [count, n_b]}

        def select(i):
            return lambda: method.cluster_select(sets[i][0], sets[i][1], budgets, cache=caches[i])

        row["select_ms"] = sbench(_rotating([select(i) for i in range(n)]))
        with kernel_backend("-gather"):  # the permutation by torch.gather instead of the Triton row gather
            row["select_torch_gather_ms"] = sbench(_rotating([select(i) for i in range(n)]))
        cq = [c["svg2"]["q"] for c in caches]
        ck = [c["svg2"]["k"] for c in caches]
        row["assign_ms"] = sbench(_rotating([lambda i=i: (kmeans_assign(sets[i][0], cq[i]), kmeans_assign(sets[i][1], ck[i]))
                                            for i in range(n)]))
        labels = [(kmeans_assign(sets[i][0], cq[i]), kmeans_assign(sets[i][1], ck[i])) for i in range(n)]
        nq, nk = method.n_clusters(S)

        def perm_means(i):
            out = []
            for x, lab, c, m in ((sets[i][0], labels[i][0], cq[i], nq), (sets[i][1], labels[i][1], ck[i], nk)):
                perm, st_, ln = cluster_blocks(lab, m)
                out.append(segment_means(permute_rows(x, perm), st_, ln, c))
            return out

        row["permute_and_means_ms"] = sbench(_rotating([lambda i=i: perm_means(i) for i in range(n)]))
        blocks = [[cluster_blocks(lab, m) for lab, m in ((labels[i][0], nq), (labels[i][1], nk))] for i in range(n)]
        row["sort_ms"] = sbench(_rotating([lambda i=i: (cluster_blocks(labels[i][0], nq), cluster_blocks(labels[i][1], nk))
                                          for i in range(n)]))
        row["permute_ms"] = sbench(_rotating([lambda i=i: (permute_rows(sets[i][0], blocks[i][0][0]),
                                                          permute_rows(sets[i][1], blocks[i][1][0])) for i in range(n)]))
        row["permute_torch_gather_ms"] = sbench(_rotating([
            lambda i=i: [torch.gather(x, 2, b[0][..., None].expand(x.shape)) for x, b in zip(sets[i][:2], blocks[i])]
            for i in range(n)]))
        score_and_select = _rotating([
            lambda i=i: select_clusters(centroid_logits(cq[i], ck[i], scale), cluster_sizes(labels[i][1], nk), budgets)
            for i in range(n)])
        row["score_and_select_ms"] = sbench(score_and_select)
        with kernel_backend("-kmeans"):  # the torch path of select_clusters
            row["score_and_select_torch_ms"] = sbench(score_and_select)
        # the variable-size block kernel on each set's selection
        sels = [method.cluster_select(q, k, budgets, cache=caches[i]) for i, (q, k, _) in enumerate(sets)]
        perm_in = [(permute_rows(q, s.q_perm), permute_rows(k, s.k_perm), permute_rows(v, s.k_perm), s.q_starts,
                    s.q_lens, s.k_starts, s.k_lens, s.kv_indices, s.kv_counts) for (q, k, v), s in zip(sets, sels)]
        row["varlen_kernel_ms"] = sbench(_rotating([lambda a=a: varlen_block_attn(*a, scale=scale) for a in perm_in]),
                                        rep_ms=long_ms)
        row["key_table_ms"] = sbench(_rotating([lambda a=a: kv_key_table(*a[5:]) for a in perm_in]))
        row["varlen_kernel_tiles_ms"] = {f"{bm}x{bn}": sbench(_rotating([
            lambda a=a: varlen_block_attn(*a, scale=scale, block_size=(bm, bn)) for a in perm_in]), rep_ms=long_ms)
            for bm, bn in tiles}
        bs = default_block_size(sets[0][0])
        s0 = sels[0]

        def pairs(*tb):
            return float(varlen_pairs(s0.q_lens, s0.k_lens, s0.kv_indices, s0.kv_counts, *tb).sum()) / (B * H * S * S)

        row["density_exact"] = pairs()
        row["density_tiles"] = pairs(bs)
        row["density_tiles_sweep"] = {f"{bm}x{bn}": pairs((bm, bn)) for bm, bn in tiles}
        row["kernel_tiles"] = list(bs)
        geom = Geometry(grid)
        row["attend_ms"] = sbench(_rotating([
            lambda i=i: method.attend(*sets[i], geom, budgets, scale=scale, key_mask=None, cache=caches[i], block_fn=None)
            for i in range(n)]), rep_ms=long_ms)
        row["select_over_fixed_kernel"] = row["select_ms"] / fixed
        row["select_over_varlen_kernel"] = row["select_ms"] / row["varlen_kernel_ms"]
        del perm_in
        if cname == next(iter(configs)):
            _svg2_extra(method, sets, budgets, args, row)
        rows.append(row)
        print(f"{name_s:14s} {cname} d={d:<5g} " + (f"op {t_op:.2f} ms | " if t_op else "")
              + f"select {row['select_ms']:.2f} ms ({row['select_over_varlen_kernel']:.1%} of its varlen kernel "
              f"{row['varlen_kernel_ms']:.2f} ms, {row['select_over_fixed_kernel']:.1%} of the fixed-block kernel "
              f"{fixed:.2f} ms) | attend {row['attend_ms']:.2f} ms", flush=True)
    return rows


def _svg2_extra(method, sets, budgets, args, row):
    """`--assign-configs` and `--profile` for SVG2's first config (its warm cache rebuilt from a cold start)."""
    from sparsify.kernels.kmeans import ASSIGN_LAUNCH, kmeans_assign

    if not (args.assign_configs or args.profile):
        return
    q, k, _ = sets[0]
    cache: dict = {}
    method.cluster_select(q, k, budgets, cache=cache)
    cq, ck = cache["svg2"]["q"], cache["svg2"]["k"]
    want = (kmeans_assign(q, cq), kmeans_assign(k, ck))
    row["assign_configs_ms"] = {}
    default = dict(ASSIGN_LAUNCH)
    for cfg in (c for c in args.assign_configs.split(",") if c):
        bs, bc, nw, ns = (int(x) for x in cfg.split("x"))
        ASSIGN_LAUNCH.update(block_s=bs, block_c=bc, num_warps=nw, num_stages=ns)
        try:
            got = (kmeans_assign(q, cq), kmeans_assign(k, ck))
            agree = min(float((g == w).float().mean()) for g, w in zip(got, want))
            ms = bench(lambda: (kmeans_assign(q, cq), kmeans_assign(k, ck)))
            row["assign_configs_ms"][cfg] = {"ms": ms, "labels_equal_to_default": agree}
            print(f"assign {cfg}: {ms:.3f} ms (default {default}); labels equal to the default's: {agree:.6f}",
                  flush=True)
        except Exception as e:  # a launch the GPU cannot take: say so, keep going
            row["assign_configs_ms"][cfg] = {"error": str(e)[:300]}
            print(f"assign {cfg}: failed: {str(e)[:300]}", flush=True)
        finally:
            ASSIGN_LAUNCH.update(default)
    if args.profile and q.is_cuda:
        from torch.profiler import ProfilerActivity, profile

        method.cluster_select(q, k, budgets, cache=cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            method.cluster_select(q, k, budgets, cache=cache)
            torch.cuda.synchronize()
        print("--- profile: one warm SVG2 selection\n"
              + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


def ab_rows(key, densities, tile, method, switch, rounds, q, k, v, t_cudnn):
    """The op with kernel path `switch` on and off (`kernel_backend("-switch")`), alternating for `rounds` rounds."""
    from sparsify import runtime
    from sparsify.kernels import kernel_backend

    name, _, H, S, D, grid = _shape(key)
    rows = []
    for d in densities:
        st = bench_site(f"ab.{key}", method, tile, d, H, D)
        site, geom = torch.tensor([st.site_id]), [*grid, 0]

        def on():
            return runtime.run_site(q, k, v, site, geom, None)

        def off():
            with kernel_backend(f"-{switch}"):
                return runtime.run_site(q, k, v, site, geom, None)

        try:
            same = float((on().float() - off().float()).abs().max())
            times, med = alternated({"on": on, "off": off}, rounds)
        finally:
            runtime.STATE.sites.pop(st.site_id)
        rows.append({"shape": name, "method": method, "density": d, "switch": switch, "cudnn_ms": t_cudnn,
                     "ms": times, "median_ms": med, "on_over_off": med["on"] / med["off"], "max_abs_diff": same,
                     "x_vs_cudnn": {k_: t_cudnn / t for k_, t in med.items()} if t_cudnn else None})
        print(f"{name} {method} d={d:<5g} " + (f"cuDNN {t_cudnn:7.2f} ms | " if t_cudnn else "")
              + f"op {switch} on {med['on']:7.3f} ms  off {med['off']:7.3f} ms  on/off {med['on'] / med['off']:.3f}  "
              f"max |diff| {same:.1e}  (rounds: on {['%.2f' % t for t in times['on']]}, "
              f"off {['%.2f' % t for t in times['off']]})", flush=True)
    return rows


def profile(key, tile, methods, density, q, k, v, out_dir=None):
    """torch.profiler table (CUDA time per kernel) of one op call per method."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from sparsify import runtime

    name, _, H, S, D, grid = _shape(key)
    for meth in methods:
        st = bench_site("prof", meth, tile, density, H, D)
        site = torch.tensor([st.site_id])
        try:
            for _ in range(2):
                runtime.run_site(q, k, v, site, [*grid, 0], None)
            torch.cuda.synchronize()
            with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
                runtime.run_site(q, k, v, site, [*grid, 0], None)
                torch.cuda.synchronize()
        finally:
            runtime.STATE.sites.pop(st.site_id)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(f"--- profile: {name} {meth} d={density} tile {tile}\n{table}", flush=True)
        if out_dir:
            Path(out_dir, f"profile_{meth.replace(':', '_').replace('/', '')}.txt").write_text(table)


def peak_configs(key, tile, configs, groups=(1, 4)):
    """Time the fused tile-logit kernel (`tile_peaks`, the default Veda's `mass` output) per launch config
    `(BM, key tiles per step, warps)` and key group (1 = Veda's exact peak, G = `keys/G`, whose `group_means`
    pass is timed on its own)."""
    from sparsify.geometry import tile_layout, to_tiles
    from sparsify.kernels.tile_select import group_means, tile_peaks

    name, _, H, S, D, grid = _shape(key)
    lay = tile_layout(grid, tile, "cuda")
    k = to_tiles(torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16), lay)
    qm = torch.randn(1, H, lay.n_tiles, D, device="cuda")
    out = {}
    for g in groups:
        keys = k if g == 1 else group_means(k, lay.tile_lens, lay.volume, g)
        if g > 1:
            t = bench(lambda: group_means(k, lay.tile_lens, lay.volume, g))
            out[f"group_means/{g}"] = t
            print(f"group_means {name} group {g}: {t:.3f} ms", flush=True)
        flop = 2.0 * lay.n_tiles * lay.padded_len / g * D * H
        for c in configs:
            try:
                t = bench(lambda: tile_peaks(qm, keys, lay.tile_lens, lay.volume // g, 1 / math.sqrt(D), group=g,
                                             outputs=("mass",), config=c))
            except Exception as e:  # e.g. a config over the shared-memory limit
                print(f"tile_peaks {name} group {g} config {c}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            out[f"g{g}:" + "x".join(map(str, c))] = t
            print(f"tile_peaks {name} group {g} config {c}: {t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s)", flush=True)
    return out


def _shape(key):
    return TINY_SHAPE if key == TINY_SHAPE[0] else SHAPES[key]


def run(args) -> dict:
    """Every row of one invocation (see the module docstring), as `{"rows": [...], ...}`."""
    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tile = tuple(int(x) for x in args.tile.split("x"))
    out: dict = {"rows": []}
    for key in args.shapes:
        name, _, H, S, D, grid = _shape(key)
        q, k, v = _inputs(H, S, D, dev, dtype)
        t_cudnn = None if args.no_dense else _cudnn_ms(q, k, v)
        if args.profile and dev.type == "cuda":
            tile_methods = [m for m in args.methods if not m.startswith("svg2")]
            profile(key, tile, tile_methods, args.densities[len(args.densities) // 2], q, k, v,
                    Path(args.out).parent if args.out else None)
        if args.ab:
            out["rows"] += ab_rows(key, args.densities, tile, args.methods[0], args.ab, args.rounds, q, k, v, t_cudnn)
            continue
        sets = None
        for meth in args.methods:
            for d in args.densities:
                if meth == "svg2":
                    if sets is None:  # fresh random sets, the first being the op's q, k, v
                        sets = [(q, k, v)] + [_inputs(H, S, D, dev, dtype, seed=i) for i in range(1, args.sets)]
                    out["rows"] += svg2_rows(key, d, sets, t_cudnn, args)
                else:
                    out["rows"].append(tile_row(key, meth, d, tile, q, k, v, t_cudnn, args.ablate))
        q = k = v = sets = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def op_row_factory(tile=(4, 4, 4), method="vsa"):
    """A `benchmarks.kernel.register_row` factory: the whole op (layout, selection, kernel, inverse) on the
    case's q, k, v at the case's density (its own selection, not the case's random one).

    Example:
        >>> # python -m benchmarks.kernel --op-methods vsa,svg2    (registers op_row_factory((4, 4, 4), m) per method)
    """

    def factory(case):
        from sparsify import runtime

        grid = GRIDS.get(case.S)
        if grid is None:
            return None
        st = bench_site(f"bench.{case.shape}", method, tile, case.density, case.H, case.D)
        site, geom = torch.tensor([st.site_id]), [*grid, 0]
        return lambda: runtime.run_site(case.q, case.k, case.v, site, geom, None)

    return factory


def select_row_factory(tile=(4, 4, 4), method="vsa"):
    """A `register_row` factory: the method's selection alone on the case's q, k at the case's density.

    Tile methods select on q, k in tile order, pooling their tile means themselves (the op takes them from its
    gather, so this is an upper bound of what the op spends); SVG2 runs `cluster_select` on a warm cache (one
    k-means iteration per call, as on every call after a generation's first).

    Example:
        >>> # python -m benchmarks.kernel --op-methods veda   (registers select_row_factory((4, 4, 4), "veda"))
    """

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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default 1.3b,14b; svg2 alone: 14b)")
    p.add_argument("--densities", default=None, help="comma list (default 0.02,0.05,0.1,0.2,0.5; svg2 alone: 0.05)")
    p.add_argument("--tile", default="4x4x4")
    p.add_argument("--methods", default="vsa", help="comma list of selection methods (vsa, veda, xattention, svg2; "
                   "veda:keys/4 = Veda with that peak mode)")
    p.add_argument("--ablate", action="store_true", help="also time the op with each kernel path off")
    p.add_argument("--ab", default=None, metavar="PATH",
                   help="time the op with kernel path PATH (one of sparsify.kernels.PATHS) on and off, alternating "
                        "(the first of --methods)")
    p.add_argument("--rounds", type=int, default=5, help="--ab: alternating rounds")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one op call per tile method (and of one warm SVG2 selection)")
    p.add_argument("--peak-configs", default="", help="also time Veda's peak kernel per BMxTILESxWARPS config")
    p.add_argument("--no-dense", action="store_true", help="skip the dense cuDNN timing (no ratios against it)")
    p.add_argument("--sets", type=int, default=3, help="svg2: fresh random input sets rotated through")
    p.add_argument("--kernel-tiles", default="", help="svg2: also time the varlen kernel (packed keys) with these "
                   "BLOCK_MxBLOCK_N tiles, e.g. 128x128,64x64")
    p.add_argument("--assign-configs", default="", help="svg2: also time the k-means assignment with these "
                   "BLOCK_SxBLOCK_CxWARPSxSTAGES launches, e.g. 128x128x8x3")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: Triton interpreter, one 256-token shape "
                   "(H2 D64, grid 4x8x8), fp32, 2 svg2 sets; wall times, not measurements")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/op[_ab]_<date>.json)")
    a = p.parse_args(argv)
    from sparsify.kernels import PATHS

    a.methods = [m for m in a.methods.split(",") if m]
    svg2_alone = a.methods == ["svg2"]  # SVG2's cost table: Wan-14B at 5% unless told
    a.densities = parse_list(a.densities or ("0.05" if svg2_alone else "0.02,0.05,0.1,0.2,0.5"), float, "--densities")
    a.shapes = a.shapes or ("14b" if svg2_alone else "1.3b,14b")
    if a.ab is not None and (a.ab not in PATHS or a.ab in NOT_IN_OP):
        p.error(f"--ab {a.ab!r}: choose a kernel path the op's forward runs, one of "
                f"{', '.join(x for x in PATHS if x not in NOT_IN_OP)}"
                + (" (rope: benchmarks.e2e row 'dense, fused q/k'; backward: benchmarks.kernel --backward)"
                   if a.ab in NOT_IN_OP else ""))
    if a.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        a.shapes, a.sets = TINY_SHAPE[0], min(a.sets, 2)
    a.shapes = [s for s in a.shapes.split(",") if s]
    unknown = sorted(set(a.shapes) - set(SHAPES) - ({TINY_SHAPE[0]} if a.tiny else set()))
    if unknown:
        p.error(f"unknown --shapes {unknown}; known: {sorted(SHAPES)}")
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks.op needs a CUDA GPU (or --tiny for the CPU smoke run)")
    peaks = {}
    if a.peak_configs and not a.tiny:
        peaks = peak_configs(a.shapes[-1], tuple(int(x) for x in a.tile.split("x")),
                             [tuple(int(x) for x in c.split("x")) for c in a.peak_configs.split(",")])
    result = {**run_header("op", argv), **run(a), "peak_configs_ms": peaks}
    write_result(result, a.out, "op_ab" if a.ab else "op")
    return result


if __name__ == "__main__":
    main()
