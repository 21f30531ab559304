"""SVG2 cost on the GPU: warm k-means step, scoring and selection beside the sparse kernels, in one run.

    python -m benchmarks.svg2_cost                       # Wan-14B 720p: B1 H40 S75600 D128 bf16, 5% density
    python -m benchmarks.svg2_cost --shape 1,12,32760,128 --grid 21,30,52 --out /tmp/svg2.json
    python -m benchmarks.svg2_cost --kernel-tiles 128x128,64x64   # also time the varlen kernel at these tiles
    python -m benchmarks.svg2_cost --assign-configs 128x64x8x3,256x64x8x3 --profile   # assignment launches; profile

Every timing is the median of `triton.testing.do_bench` (warm-up first), rotating over `--sets` fresh
random input sets (each with its own warm k-means cache, so no call sees the inputs of the previous one).
Rows: the warm selection (`SVG2.cluster_select`: one k-means iteration for q and for k from the previous
centroids, i.e. assignment + permutation + centroid update, then centroid scores and selection), the same
with the permutation by `torch.gather` instead of the Triton row gather, and its parts (scores and selection
also by `select_clusters`' torch path); the variable-size
block kernel on that selection, with the selected keys packed (the default; its key table timed alone too)
and block by block (`pack_keys=False`), and with packed keys at the `--kernel-tiles` tile sizes; the whole
`attend` (selection, permutations, kernel, un-permutation); the fixed-block kernel `block_sparse_attn` with 128-token blocks at the same
density (random selection); dense SDPA (cuDNN). Random Gaussian inputs: the k-means clusters are not
those of a real model, but the cost of every step does not depend on what the clusters mean.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys

import torch

from sparsify.kernels.block_sparse import block_sparse_attn
from sparsify.kernels.varlen import default_block_size, kv_key_table, varlen_block_attn, varlen_pairs
from sparsify.geometry import Geometry
from sparsify.kernels import gather as fast
from sparsify.methods import svg2
from sparsify.methods.svg2 import (SVG2, centroid_logits, cluster_blocks, cluster_sizes, kmeans_assign, permute_rows,
                                   segment_means, select_clusters)
from sparsify.recipe import Budget


def _bench(fn, rep_ms=400):
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def _rotating(fns):
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return call


def run_config(name, method, sets, grid, density, results, tiles=()):
    B, H, S, D = sets[0][0].shape
    budgets = [Budget(density=density)] * H
    scale = 1 / math.sqrt(D)
    caches = []
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    cold = []
    for q, k, v in sets:  # cold starts (once per set) make the warm caches
        cache: dict = {}
        t0.record()
        method.cluster_select(q, k, budgets, cache=cache)
        t1.record()
        torch.cuda.synchronize()
        cold.append(t0.elapsed_time(t1))
        caches.append(cache)
    row = {"clusters": list(method.n_clusters(S)), "cold_start_ms_first": cold, "cold_iters": caches[0]["iters"]}

    def select(i):
        return lambda: method.cluster_select(sets[i][0], sets[i][1], budgets, cache=caches[i])

    n = len(sets)
    row["select_ms"] = _bench(_rotating([select(i) for i in range(n)]))
    fast.FAST["gather"] = False  # the permutation by torch.gather instead of the Triton row gather
    try:
        row["select_torch_gather_ms"] = _bench(_rotating([select(i) for i in range(n)]))
    finally:
        fast.FAST["gather"] = True
    # parts of the warm selection
    cq = [c["svg2"]["q"] for c in caches]
    ck = [c["svg2"]["k"] for c in caches]
    row["assign_ms"] = _bench(_rotating([lambda i=i: (kmeans_assign(sets[i][0], cq[i]), kmeans_assign(sets[i][1], ck[i]))
                                         for i in range(n)]))
    labels = [(kmeans_assign(sets[i][0], cq[i]), kmeans_assign(sets[i][1], ck[i])) for i in range(n)]
    nq, nk = method.n_clusters(S)

    def perm_means(i):
        out = []
        for x, lab, c, m in ((sets[i][0], labels[i][0], cq[i], nq), (sets[i][1], labels[i][1], ck[i], nk)):
            perm, st, ln = cluster_blocks(lab, m)
            out.append(segment_means(permute_rows(x, perm), st, ln, c))
        return out

    row["permute_and_means_ms"] = _bench(_rotating([lambda i=i: perm_means(i) for i in range(n)]))
    blocks = [[cluster_blocks(lab, m) for lab, m in ((labels[i][0], nq), (labels[i][1], nk))] for i in range(n)]
    row["sort_ms"] = _bench(_rotating([lambda i=i: (cluster_blocks(labels[i][0], nq), cluster_blocks(labels[i][1], nk))
                                       for i in range(n)]))
    row["permute_ms"] = _bench(_rotating([lambda i=i: (permute_rows(sets[i][0], blocks[i][0][0]),
                                                       permute_rows(sets[i][1], blocks[i][1][0])) for i in range(n)]))
    row["permute_torch_gather_ms"] = _bench(_rotating([
        lambda i=i: [torch.gather(x, 2, b[0][..., None].expand(x.shape)) for x, b in zip(sets[i][:2], blocks[i])]
        for i in range(n)]))
    score_and_select = _rotating([
        lambda i=i: select_clusters(centroid_logits(cq[i], ck[i], scale), cluster_sizes(labels[i][1], nk), budgets)
        for i in range(n)])
    row["score_and_select_ms"] = _bench(score_and_select)
    widest, svg2._SELECT_MAX_NK = svg2._SELECT_MAX_NK, 0  # the torch path of select_clusters
    try:
        row["score_and_select_torch_ms"] = _bench(score_and_select)
    finally:
        svg2._SELECT_MAX_NK = widest
    # the variable-size block kernel on each set's selection
    sels = [method.cluster_select(q, k, budgets, cache=caches[i]) for i, (q, k, _) in enumerate(sets)]
    perm_in = []
    for (q, k, v), s in zip(sets, sels):
        g = permute_rows
        perm_in.append((g(q, s.q_perm), g(k, s.k_perm), g(v, s.k_perm), s.q_starts, s.q_lens, s.k_starts, s.k_lens,
                        s.kv_indices, s.kv_counts))
    row["varlen_kernel_ms"] = _bench(_rotating([lambda a=a: varlen_block_attn(*a, scale=scale) for a in perm_in]), 800)
    row["varlen_kernel_blocks_ms"] = _bench(_rotating([lambda a=a: varlen_block_attn(*a, scale=scale, pack_keys=False)
                                                       for a in perm_in]), 800)
    row["key_table_ms"] = _bench(_rotating([lambda a=a: kv_key_table(*a[5:]) for a in perm_in]))
    row["varlen_kernel_tiles_ms"] = {f"{bm}x{bn}": _bench(_rotating([
        lambda a=a: varlen_block_attn(*a, scale=scale, block_size=(bm, bn)) for a in perm_in]), 800)
        for bm, bn in tiles}
    bs = default_block_size(sets[0][0])
    s0 = sels[0]
    pairs = lambda *tb, pack=True: float(varlen_pairs(s0.q_lens, s0.k_lens, s0.kv_indices, s0.kv_counts, *tb,  # noqa: E731
                                                      pack_keys=pack).sum()) / (B * H * S * S)
    row["density_exact"] = pairs()
    row["density_tiles"] = pairs(bs)
    row["density_tiles_blocks"] = pairs(default_block_size(sets[0][0], pack_keys=False), pack=False)
    row["density_tiles_sweep"] = {f"{bm}x{bn}": pairs((bm, bn)) for bm, bn in tiles}
    row["kernel_tiles"] = list(bs)
    geom = Geometry(grid)
    row["attend_ms"] = _bench(_rotating([
        lambda i=i: method.attend(*sets[i], geom, budgets, scale=scale, key_mask=None, cache=caches[i], block_fn=None)
        for i in range(n)]), 800)
    del perm_in
    results[name] = row
    return row


def extra_runs(method, sets, args, row):
    """`--assign-configs` and `--profile` for one config (its warm caches rebuilt from a cold start)."""
    if not (args.assign_configs or args.profile):
        return
    q, k, _ = sets[0]
    budgets = [Budget(density=args.density)] * q.shape[1]
    cache: dict = {}
    method.cluster_select(q, k, budgets, cache=cache)
    cq, ck = cache["svg2"]["q"], cache["svg2"]["k"]
    want = (kmeans_assign(q, cq), kmeans_assign(k, ck))
    row["assign_configs_ms"] = {}
    default = dict(svg2.ASSIGN_LAUNCH)
    for cfg in (c for c in args.assign_configs.split(",") if c):
        bs, bc, nw, ns = (int(x) for x in cfg.split("x"))
        svg2.ASSIGN_LAUNCH.update(block_s=bs, block_c=bc, num_warps=nw, num_stages=ns)
        try:
            got = (kmeans_assign(q, cq), kmeans_assign(k, ck))
            agree = min(float((g == w).float().mean()) for g, w in zip(got, want))
            ms = _bench(lambda: (kmeans_assign(q, cq), kmeans_assign(k, ck)))
            row["assign_configs_ms"][cfg] = {"ms": ms, "labels_equal_to_default": agree}
            print(f"assign {cfg}: {ms:.3f} ms (default {default}); labels equal to the default's: {agree:.6f}",
                  flush=True)
        except Exception as e:  # a launch the GPU cannot take: say so, keep going
            row["assign_configs_ms"][cfg] = {"error": str(e)[:300]}
            print(f"assign {cfg}: failed: {str(e)[:300]}", flush=True)
        finally:
            svg2.ASSIGN_LAUNCH.update(default)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        method.cluster_select(q, k, budgets, cache=cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            method.cluster_select(q, k, budgets, cache=cache)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1,40,75600,128", help="B,H,S,D")
    ap.add_argument("--grid", default="21,45,80", help="T,H,W with T*H*W = S")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--sets", type=int, default=3, help="fresh random input sets rotated through")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA row")
    ap.add_argument("--assign-configs", default="",
                    help="comma list of BLOCK_SxBLOCK_CxWARPSxSTAGES (e.g. 128x128x8x3): also time the k-means "
                         "assignment of the first config's warm centroids with these launches")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one warm selection")
    ap.add_argument("--kernel-tiles", default="",
                    help="comma list of BLOCK_MxBLOCK_N (e.g. 128x128,64x64): also time the varlen kernel (packed "
                         "keys) with these tiles")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split(","))
    grid = tuple(int(x) for x in args.grid.split(","))
    if math.prod(grid) != S:
        raise SystemExit(f"--grid {grid} has {math.prod(grid)} tokens, --shape says S={S}")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sets = [tuple(torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3)) for _ in range(args.sets)]
    results: dict = {}
    configs = {"svg2 (default clusters)": SVG2(), "svg2 (300 q / 1000 k clusters)": SVG2(q_clusters=300, k_clusters=1000)}
    for name, m in configs.items():
        tiles = [tuple(int(x) for x in t.split("x")) for t in args.kernel_tiles.split(",") if t]
        r = run_config(name, m, sets, grid, args.density, results, tiles)
        if name == next(iter(configs)):
            extra_runs(m, sets, args, r)
        print(name, json.dumps(r), flush=True)
    # the fixed-block kernel at the same density (random selection of 128-token blocks)
    n_b = -(-S // 128)
    count = max(1, math.ceil(args.density * n_b - 1e-9))
    sel = []
    for _ in sets:
        perm = torch.rand(B, H, n_b, n_b, device=dev).argsort(-1).to(torch.int32)
        sel.append((perm[..., :count].sort(-1).values.contiguous(), torch.full((B, H, n_b), count, device=dev, dtype=torch.int32)))
    fixed = _bench(_rotating([lambda i=i: block_sparse_attn(*sets[i], *sel[i], block_size=(128, 128))
                              for i in range(len(sets))]), 800)
    dense = None
    if not args.no_dense:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            dense = _bench(_rotating([lambda i=i: torch.nn.functional.scaled_dot_product_attention(*sets[i])
                                      for i in range(len(sets))]), 1000)
    lines = [f"shape B{B} H{H} S{S} D{D} bf16, density {args.density:g}; fixed-block kernel (128x128, {count}/{n_b} "
             f"blocks): {fixed:.2f} ms" + (f"; dense SDPA {dense:.1f} ms" if dense else ""),
             "| config | clusters q/k | select (warm) | select, torch.gather | assign | permute+means (sort; permute; "
             "permute by torch.gather) | score+select (torch path) | varlen kernel, packed keys (key table) | varlen kernel, "
             "block by block | attend | density exact / tiles packed / tiles by block | "
             "select / fixed kernel | select / varlen kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        r["select_over_fixed_kernel"] = r["select_ms"] / fixed
        r["select_over_varlen_kernel"] = r["select_ms"] / r["varlen_kernel_ms"]
        lines.append(f"| {name} | {r['clusters'][0]}/{r['clusters'][1]} | {r['select_ms']:.2f} ms | "
                     f"{r['select_torch_gather_ms']:.2f} | {r['assign_ms']:.2f} | "
                     f"{r['permute_and_means_ms']:.2f} ({r['sort_ms']:.2f}; {r['permute_ms']:.2f}; "
                     f"{r['permute_torch_gather_ms']:.2f}) | {r['score_and_select_ms']:.2f} ({r['score_and_select_torch_ms']:.2f}) | {r['varlen_kernel_ms']:.2f} ms "
                     f"({r['key_table_ms']:.2f}) | {r['varlen_kernel_blocks_ms']:.2f} ms | {r['attend_ms']:.2f} ms | "
                     f"{r['density_exact']:.4f} / {r['density_tiles']:.4f} / {r['density_tiles_blocks']:.4f} | "
                     f"{r['select_over_fixed_kernel']:.1%} | {r['select_over_varlen_kernel']:.1%} |")
    for name, r in results.items():
        for t, ms in r["varlen_kernel_tiles_ms"].items():
            lines.append(f"{name}: varlen kernel, packed keys, {t} tiles: {ms:.2f} ms at tiled density "
                         f"{r['density_tiles_sweep'][t]:.4f}")
    table = "\n".join(lines)
    print(table)
    import triton

    record = {"benchmark": "svg2_cost", "command": "python -m benchmarks.svg2_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": [B, H, S, D], "grid": list(grid), "density": args.density, "sets": args.sets,
              "fixed_block_kernel_ms": fixed, "fixed_block_count": [count, n_b], "dense_sdpa_ms": dense,
              "configs": results, "table": table}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
