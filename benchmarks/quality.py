"""Quality benchmarks: selection fidelity against dense attention (CPU), and sampled-video PSNR against dense sampling.

    python -m benchmarks.quality selection                       # every set and method, 5/10/20% (CPU, ~70 s)
    python -m benchmarks.quality selection --sets planted,random --no-save
    python -m benchmarks.quality selection --head-aware          # head-aware tiles vs 4x4x4 on the planted heads
    python -m benchmarks.quality video                           # GPU: testbed-16k, every method at 80/90/95%
    python -m benchmarks.quality reuse --steps 50 --videos 4 --densities 0.2,0.1,0.05   # GPU: mask reuse, 4k test-bed
    python -m benchmarks.quality selection --tiny                # CPU smoke runs
    python -m benchmarks.quality video --tiny
    python -m benchmarks.quality reuse --tiny
    python -m benchmarks.quality inputs                          # GPU: testbed-16k calibrated on its trajectory vs random
    python -m benchmarks.quality inputs --tiny
    python -m benchmarks.quality plan --time-budget 0.2          # GPU: unified plan vs USV and cache hooks, testbed-16k
    python -m benchmarks.quality plan --tiny

`selection`: for every input set and method, at top-k densities of 5, 10 and 20% of the key tiles:

- recall: the share of the true full-attention probability mass inside the selected tiles
  (`sparsify.testing.planted.tile_recall` of the exact tile masses), averaged over heads;
- err: the relative L2 error `|o_sparse - o_dense| / |o_dense|` of the attention output of each head
  (sparse = softmax restricted to the selected tiles, padded keys excluded), averaged over heads
  (`--error-fraction f` measures it on a seeded random share f of the query tiles only, to save time).

`svg2` (SVG2's k-means clusters, cold start, default cluster counts: S/256 query and S/128 key
clusters) and `svg2-fine` (64 query and 256 key clusters) are measured on the token order of the
held-out input: recall is the mass inside the selected (query cluster, key cluster) blocks, and the
density budget counts key tokens (`svg2_density_exact` per set: the achieved share of pairs).

Sets: `planted` (the 7 planted-geometry heads of `sparsify.testing.planted.planted_heads`, each with its best
tile), `planted444` (the same heads, all with 4x4x4 tiles), `random` (Gaussian q, k, v, 8 heads,
grid 8x16x16, 4x4x4 tiles) and `testbed` (q, k, v of the 8 `blocks.*.attn1` self-attentions x 4 heads
of the trained test-bed Wan model, 16x16x16 tokens, 4x4x4 tiles). Each set has a calibration input and
a held-out input (another seed: other content noise, another video): Veda's estimator is fitted on the
first, every number is measured on the second. `oracle` keeps the tiles of largest true mass.
Outputs are computed in one pass over the dense attention matrix per input (the exact semantics of
`sparsify.runtime.tiled_sparse_attention`, checked against it on one head at the start of every run), since
the reference kernel would take minutes on CPU. Writes `benchmarks/results/selection_<date>.json`
(`selection_head_aware_<date>.json`).

`video`: on a learned test-bed (`--model`, default `testbed-16k`), 50 Euler steps with classifier-free guidance
(scale 5) from the same noise and conditions for every recipe: dense, each uniform method (`vsa`, `veda`,
`svg2` with 4x4x4 tiles and one top-k density for all heads; `xattention` with one top-p, its p bisected on the
calibration inputs until its achieved density is within 10% of the target) and the calibrated recipe
(`sparsify.calibrate` at that budget, on the dense sampling trajectories of other seeds), at each sparsity.
Then `calibrated + schedule` and `vsa + schedule`: the calibrated and the uniform VSA recipe, each with the
per-step budget schedule `sparsify.calibrate.calibrate_schedule` chooses for it on the calibration seed's sampling
run (seed 100's noise and condition, the same steps, guidance and shift; a two-piece schedule that spends more of
the density early at no more achieved density than flat, or flat); `vsa + schedule` only when `vsa` is among
`--methods`, and `--no-schedule` leaves both rows out.
Per row: the achieved density (attention work over dense, whole sampling run), PSNR and SSIM of the sample
against the dense sample (`torchmetrics`), the relative L2 error of x_t against the dense trajectory at every
step, and the kernel time at that density at the Wan-14B 720p shape (`kernel_speedups`: our kernel with 64x64
blocks on a random selection of that density against SDPA cuDNN, bf16, measured in the same run; CUDA only).
Writes `benchmarks/results/quality_video_<date>.json` with a Pareto plot (PSNR against attention speedup,
`.pareto.png`) and the per-step error plot (`.steps.png`).

`reuse`: on the 4k test-bed, for each density a uniform recipe (VSA, 4x4x4) and a calibrated recipe sample from
the same noise as dense sampling (CFG off); then the calibrated recipe at the middle density gets its
temporal-mask-reuse threshold from `sparsify.calibrate.calibrate_mask_reuse` (on a trajectory from other noise,
or `--reuse-threshold`) and samples again with reuse: the share of selection calls saved, the PSNR, and the
relative L2 error of x_t against the dense trajectory at every step, fresh selection vs reuse (the final-output
error growth is the last step's ratio). Writes `benchmarks/results/fidelity_<date>.json`.

`plan`: the unified generation plan against USV's entropy plan and the attention recipe stacked with diffusers'
cache hooks, each tuned to the plan's predicted DiT time (`benchmarks.quality_plan` describes it). Writes
`benchmarks/results/quality_plan_<date>.json`.

`inputs`: what calibrating the test-bed (`--model`, default testbed-16k) on its own dense sampling trajectory
changes. It runs `python -m sparsify.calibrate --budget B --inputs-from S --inputs N` for each source S
(`trajectory`, `random`; or evaluates `--recipes`), both on seeds 0..N-1, and records the classes each source
covers (a trajectory run's class is its seed mod 8; a random input's class is drawn from its seed), then
evaluates every recipe the same way on held-out seeds: the relative L2 error of the model's output against dense
at `--eval-sampled` steps of `--eval-steps`-step dense trajectories with guidance (both branches), the same on
random inputs at those noise levels, and PSNR and SSIM (`torchmetrics`) of the latents sampled with the recipe
against dense sampling from the same noise. Writes
`benchmarks/results/calibration_inputs_<date>.json`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsify.runtime.tiled import tiled_sparse_attention
from sparsify.geometry import Geometry, from_tiles, tile_layout, to_tiles
from sparsify.methods import budget_counts, get_method
from sparsify.methods.veda import Veda, fit_veda_estimator
from sparsify.methods.xattention import XAttention
from sparsify.testing.planted import oracle_selection, planted_heads, tile_recall
from sparsify.recipe import Budget

DENSITIES = (0.05, 0.10, 0.20)
TILE_METHODS = ("oracle", "vsa", "veda", "veda-exact", "veda-fit", "xattention")
SVG2_CONFIGS = {"svg2": {}, "svg2-fine": {"q_clusters": 64, "k_clusters": 256}}  # default cluster counts; finer
METHODS = TILE_METHODS + tuple(SVG2_CONFIGS)
SETS = ("planted", "planted444", "random", "testbed")
_CHUNK = 1 << 23  # attention probabilities held at once


# ----------------------------------------------------------------------------------------------
# exact tile masses and sparse outputs in one pass over the dense attention matrix


def _dense_probs(q, k, layout, valid, i0, i1):
    """Dense attention probabilities of query tiles [i0, i1) over all valid keys, `[B, H, rows, N]`."""
    vol = layout.volume
    s = torch.matmul(q[:, :, i0 * vol:i1 * vol].float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if not bool(valid.all()):
        s = s.masked_fill(~valid.view(1, 1, 1, -1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _chunk_tiles(q, layout) -> int:
    B, H, N, _ = q.shape
    return max(1, _CHUNK // (B * H * N * layout.volume))


def tile_masses(q: torch.Tensor, k: torch.Tensor, layout) -> torch.Tensor:
    """Exact full-attention tile masses `[B, H, n, n]` (float64) of tiled q, k (video only, padding excluded)."""
    B, H, N, _ = q.shape
    n, vol = layout.n_tiles, layout.volume
    valid = layout.gather >= 0
    mass = torch.empty(B, H, n, n, dtype=torch.float64)
    step = _chunk_tiles(q, layout)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        p = _dense_probs(q, k, layout, valid, i0, i1).view(B, H, i1 - i0, vol, n, vol).sum(-1)
        mass[:, :, i0:i1] = (p * valid[i0 * vol:i1 * vol].view(1, 1, i1 - i0, vol, 1)).sum(3).double()
    return mass


def _sparse_out(p6, vt, idx, cnt):
    """Sparse attention output `[B, H, ct*vol, D]` of query tiles with dense probabilities `p6`
    `[B, H, ct, vol, n, vol]`, tiled values `vt` `[B, H, n, vol*D]` and selection rows `idx`, `cnt` `[B, H, ct(, kv)]`."""
    B, H, ct, vol, n, _ = p6.shape
    D = vt.shape[-1] // vol
    idx = idx.long()
    kv = idx.shape[-1]
    live = (torch.arange(kv) < cnt.long().unsqueeze(-1)).to(p6.dtype)  # [B, H, ct, kv]
    ps = torch.gather(p6, 4, idx.view(B, H, ct, 1, kv, 1).expand(B, H, ct, vol, kv, vol))
    ps = (ps * live.view(B, H, ct, 1, kv, 1)).reshape(B, H, ct, vol, kv * vol)
    vs = torch.gather(vt, 2, idx.reshape(B, H, ct * kv, 1).expand(B, H, ct * kv, vol * D))
    out = torch.matmul(ps, vs.view(B, H, ct, kv * vol, D)) / ps.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.view(B, H, ct * vol, D)


def output_errors(q, k, v, layout, selections: dict, query_tiles=None) -> dict:
    """Per-head relative L2 error of the sparse attention output of every selection, `{key: [H]}`.

    Sparse attention of a selection = the dense probabilities of the selected key tiles, renormalized
    (exactly softmax over the selected, valid keys); only the selected tiles are gathered, so the
    cost grows with the density. Padded query rows are not counted. `query_tiles` (sorted tile
    indices) restricts the error to a sample of query tiles; default all.
    """
    B, H, N, D = q.shape
    n, vol = layout.n_tiles, layout.volume
    valid = layout.gather >= 0
    sq_err = {key: torch.zeros(H, dtype=torch.float64) for key in selections}
    norm = torch.zeros(H, dtype=torch.float64)
    vt = v.float().reshape(B, H, n, vol * D)
    tiles = torch.arange(n) if query_tiles is None else torch.as_tensor(query_tiles)
    qv = q.view(B, H, n, vol, D)
    step = _chunk_tiles(q, layout)
    for c0 in range(0, tiles.numel(), step):
        ti = tiles[c0:c0 + step]
        rows = valid.view(n, vol)[ti].view(1, 1, -1, 1).float()
        p = _dense_probs(qv[:, :, ti].reshape(B, H, -1, D), k, layout, valid, 0, ti.numel())
        dense = torch.matmul(p, v.float())
        norm += (dense.square() * rows).sum((0, 2, 3)).double()
        p6 = p.view(B, H, ti.numel(), vol, n, vol)
        for key, (idx, cnt) in selections.items():
            out = _sparse_out(p6, vt, idx[:, :, ti], cnt[:, :, ti])
            sq_err[key] += ((out - dense).square() * rows).sum((0, 2, 3)).double()
    return {key: (e / norm.clamp_min(1e-30)).sqrt() for key, e in sq_err.items()}


def check_against_reference(q, k, v, layout, sel) -> float:
    """Max abs difference between `_sparse_out` and `tiled_sparse_attention` on the first head."""
    n, vol = layout.n_tiles, layout.volume
    q0, k0, v0 = (x[:1, :1] for x in (q, k, v))
    idx, cnt = (x[:1, :1] for x in sel)
    ref = tiled_sparse_attention(*(from_tiles(x, layout) for x in (q0, k0, v0)), Geometry(layout.grid), layout, idx, cnt)
    p6 = _dense_probs(q0, k0, layout, layout.gather >= 0, 0, n).view(1, 1, n, vol, n, vol)
    mine = _sparse_out(p6, v0.float().reshape(1, 1, n, -1), idx, cnt)
    return float((from_tiles(mine, layout) - ref.float()).abs().max())


# ----------------------------------------------------------------------------------------------
# input sets: (grid, calibration (q, k, v), held-out (q, k, v), [(head name, tile)])


def _planted(tiles_for):
    cal, ev = planted_heads(seed=0), planted_heads(seed=1)
    heads = [(kind, tiles_for(kind, best)) for kind, best in zip(ev.kinds, ev.best_tile)]
    return ev.grid, (cal.q, cal.k, cal.v), (ev.q, ev.k, ev.v), heads


def _random():
    grid = (8, 16, 16)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    qkv = [tuple(torch.randn(1, 8, math.prod(grid), 64, generator=g) for _ in range(3)) for g in gens]
    return grid, qkv[0], qkv[1], [(f"h{h}", (4, 4, 4)) for h in range(8)]


def _testbed():
    from sparsify.testbed import build_testbed, example_inputs, grid
    from tools.testbed_heads import recording

    model = build_testbed()
    out = []
    for seed in (0, 1):
        got: dict = {}
        with torch.inference_mode(), recording(model, lambda i, q, k, v: got.__setitem__(i, (q, k, v))):
            model(**example_inputs(seed=seed))
        # [B, S, H, D] per layer -> [B, layers*H, S, D]
        out.append(tuple(torch.cat([got[i][j].transpose(1, 2) for i in sorted(got)], 1).contiguous() for j in range(3)))
    H = out[0][0].shape[1] // len(model.blocks)
    return grid(), out[0], out[1], [(f"L{h // H}H{h % H}", (4, 4, 4)) for h in range(out[0][0].shape[1])]


def load_set(name: str):
    if name == "planted":
        return _planted(lambda kind, best: best)
    if name == "planted444":
        return _planted(lambda kind, best: (4, 4, 4))
    if name == "random":
        return _random()
    if name == "testbed":
        return _testbed()
    raise ValueError(f"unknown set '{name}'; known: {', '.join(SETS)}")


# ----------------------------------------------------------------------------------------------
# the run


def evaluate_group(grid, tile, cal, ev, densities, timings: dict, checks: list, error_fraction: float = 1.0):
    """Recall and output error of every method for the heads of one tile shape, `{method: {d: (recall [H], err [H])}}`."""
    lay = tile_layout(grid, tile)
    qc, kc = (to_tiles(x, lay) for x in cal[:2])
    q, k, v = (to_tiles(x, lay) for x in ev)
    H = q.shape[1]
    t0 = time.perf_counter()
    estimator = fit_veda_estimator(qc, kc, lay, mass=tile_masses(qc, kc, lay))
    timings["veda-fit (fitting)"] = timings.get("veda-fit (fitting)", 0.0) + time.perf_counter() - t0
    selectors = {"vsa": get_method("vsa"), "veda": Veda(),
                 "veda-exact": Veda(peak="keys"), "veda-fit": Veda(estimator), "xattention": XAttention()}
    mass = tile_masses(q, k, lay)
    sels = {}
    for d in densities:
        budgets = [Budget(density=d)] * H
        for m in TILE_METHODS:
            if m == "oracle":
                sels[(m, d)] = oracle_selection(mass, budget_counts(budgets[0], lay.n_tiles))
                continue
            t0 = time.perf_counter()
            sels[(m, d)] = selectors[m].select(q, k, lay, budgets)
            timings[m] = timings.get(m, 0.0) + time.perf_counter() - t0
    if not checks:
        checks.append(check_against_reference(q, k, v, lay, sels[("veda", densities[0])]))
    sample = None
    if error_fraction < 1.0:
        g = torch.Generator().manual_seed(0)
        sample = torch.randperm(lay.n_tiles, generator=g)[:max(1, round(error_fraction * lay.n_tiles))].sort().values
    errs = output_errors(q, k, v, lay, sels, sample)
    return {m: {d: (tile_recall(mass, *sels[(m, d)]).mean(0), errs[(m, d)]) for d in densities} for m in TILE_METHODS}


def evaluate_svg2(ev, densities, timings: dict, name: str = "svg2"):
    """SVG2 on the held-out input in token order (its blocks are clusters, not tiles), cold k-means start.

    Recall = the share of the true attention mass inside the selected (query cluster, key cluster)
    blocks; err = the relative L2 error of the attention output restricted to them. Returns
    `{d: (recall [H], err [H], exact density [H])}`.
    """
    from sparsify.methods.svg2 import SVG2

    q, k, v = ev
    H, S = q.shape[1], q.shape[2]
    out = {}
    for d in densities:
        t0 = time.perf_counter()
        sel = SVG2(**SVG2_CONFIGS[name]).cluster_select(q, k, [Budget(density=d)] * H)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        nq, nk = sel.q_lens.shape[-1], sel.k_lens.shape[-1]
        live = torch.arange(sel.kv_indices.shape[-1]) < sel.kv_counts[..., None].long()
        keep = torch.zeros(1, H, nq, nk + 1, dtype=torch.bool)
        keep.scatter_(-1, torch.where(live, sel.kv_indices.long(), nk), True)
        rec, err, dens = (torch.zeros(H, dtype=torch.float64) for _ in range(3))
        for h in range(H):
            mask = keep[0, h, :, :nk][sel.q_labels[0, h].long()][:, sel.k_labels[0, h].long()]  # [S, S]
            p = torch.softmax(q[0, h].float() @ k[0, h].float().T / math.sqrt(q.shape[-1]), -1)
            dense = p @ v[0, h].float()
            ps = p * mask
            rec[h] = ps.sum().double() / S
            sparse = (ps @ v[0, h].float()) / ps.sum(-1, keepdim=True).clamp_min(1e-30)
            err[h] = ((sparse - dense).norm() / dense.norm()).double()
            dens[h] = mask.double().mean()
        out[d] = (rec, err, dens)
    return out


def run_set(name, densities, timings, checks, error_fraction=1.0):
    grid, cal, ev, heads = load_set(name)
    groups: dict = {}
    for h, (_, tile) in enumerate(heads):
        groups.setdefault(tuple(tile), []).append(h)
    recall = {m: {d: torch.zeros(len(heads), dtype=torch.float64) for d in densities} for m in METHODS}
    err = {m: {d: torch.zeros(len(heads), dtype=torch.float64) for d in densities} for m in METHODS}
    for tile, hs in groups.items():
        sub = [tuple(x[:, hs] for x in t) for t in (cal, ev)]
        res = evaluate_group(grid, tile, *sub, densities, timings, checks, error_fraction)
        for m in TILE_METHODS:
            for d in densities:
                recall[m][d][hs], err[m][d][hs] = res[m][d][0], res[m][d][1].double()
    exact = {}
    for name in SVG2_CONFIGS:
        svg = evaluate_svg2(ev, densities, timings, name)
        for d in densities:
            recall[name][d], err[name][d] = svg[d][0], svg[d][1]
        exact[name] = {f"{d:g}": svg[d][2].mean().item() for d in densities}
    return {"svg2_density_exact": exact,
            "grid": list(grid), "error_fraction": error_fraction, "heads": [{"name": n, "tile": list(t)} for n, t in heads],
            "methods": {m: {f"{d:g}": {"recall": recall[m][d].mean().item(), "err": err[m][d].mean().item(),
                                       "recall_per_head": recall[m][d].tolist(), "err_per_head": err[m][d].tolist()}
                            for d in densities} for m in METHODS}}


def format_table(results: dict, densities) -> str:
    ds = [f"{round(100 * d)}%" for d in densities]
    head = ["set", "method"] + [f"recall@{d}" for d in ds] + [f"err@{d}" for d in ds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, r in results.items():
        for m in METHODS:
            row = r["methods"][m]
            cells = [f"{row[f'{d:g}']['recall']:.3f}" for d in densities] + [f"{row[f'{d:g}']['err']:.3f}" for d in densities]
            lines.append("| " + " | ".join([s, m] + cells) + " |")
    return "\n".join(lines)


HEAD_AWARE_METHODS = ("oracle", "vsa", "veda")


def head_aware(densities, methods=HEAD_AWARE_METHODS) -> dict:
    """Head-aware tiles against 4x4x4 for every planted head, by attention-output error at equal density.

    Every candidate tile is evaluated on the calibration and on the held-out planted input. Two head-aware
    choices are compared with 4x4x4 tiles for all heads: each head's planted best tile, and the tile of
    least error on the calibration input (what a calibrator would pick), both measured held out.

    Example:
        >>> # python -m benchmarks.quality selection --head-aware
    """
    from sparsify.testing.planted import CANDIDATE_TILES

    grid, cal, ev, heads = _planted(lambda kind, best: best)
    ev_err, cal_err, checks = {}, {}, []
    for tile in CANDIDATE_TILES:
        r_ev = evaluate_group(grid, tile, cal, ev, densities, {}, checks)
        r_cal = evaluate_group(grid, tile, cal, cal, densities, {}, checks)
        for m in methods:
            for d in densities:
                ev_err.setdefault((m, d), []).append(r_ev[m][d][1])
                cal_err.setdefault((m, d), []).append(r_cal[m][d][1])
    base_i = CANDIDATE_TILES.index((4, 4, 4))
    planted_i = torch.tensor([CANDIDATE_TILES.index(t) for _, t in heads])
    out = {"heads": [h for h, _ in heads], "tiles": [list(t) for t in CANDIDATE_TILES], "rows": [],
           "reference_check_max_abs": checks[0]}
    lines = ["| method | density | 4x4x4 | planted best tile (lower by) | calibration-chosen tile (lower by) | "
             "per head 4x4x4 -> chosen | chosen tiles |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        for d in densities:
            ev_t, cal_t = torch.stack(ev_err[(m, d)]), torch.stack(cal_err[(m, d)])  # [tiles, heads]
            pick = cal_t.argmin(0)
            base = ev_t[base_i]
            planted = ev_t.gather(0, planted_i[None])[0]
            chosen = ev_t.gather(0, pick[None])[0]
            row = {"method": m, "density": d, "err_444": base.tolist(), "err_planted_tile": planted.tolist(),
                   "err_chosen_tile": chosen.tolist(), "chosen_tiles": [list(CANDIDATE_TILES[i]) for i in pick.tolist()],
                   "mean_444": float(base.mean()), "mean_planted_tile": float(planted.mean()),
                   "mean_chosen_tile": float(chosen.mean())}
            out["rows"].append(row)
            per_head = ", ".join(f"{h} {a:.2f}->{b:.2f}" for (h, _), a, b in zip(heads, base.tolist(), chosen.tolist()))
            tiles = ", ".join("x".join(map(str, CANDIDATE_TILES[i])) for i in pick.tolist())
            lines.append(f"| {m} | {round(100 * d)}% | {base.mean():.3f} | {planted.mean():.3f} "
                         f"({100 * (1 - planted.mean() / base.mean()):.1f}%) | {chosen.mean():.3f} "
                         f"({100 * (1 - chosen.mean() / base.mean()):.1f}%) | {per_head} | {tiles} |")
    out["table"] = "\n".join(lines)
    return out


def selection(args, argv) -> dict:
    """The `selection` subcommand (see the module docstring)."""
    from benchmarks._common import run_header, write_result

    if args.tiny:
        args.sets, args.densities, args.error_fraction = "random", "0.1", 0.25
    densities = tuple(float(x) for x in args.densities.split(","))
    if args.head_aware:
        t0 = time.perf_counter()
        record = {"benchmark": "quality selection --head-aware", **run_header("quality", argv), **head_aware(densities)}
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        print(record["table"])
        if not args.no_save:
            write_result(record, args.out, "selection_head_aware")
        return record
    unknown = sorted(set(args.sets.split(",")) - set(SETS))
    if unknown:
        raise SystemExit(f"--sets: unknown {unknown}; known: {', '.join(SETS)}")
    t_start = time.perf_counter()
    timings: dict = {}
    checks: list = []
    results = {}
    for s in args.sets.split(","):
        t0 = time.perf_counter()
        results[s] = run_set(s, densities, timings, checks, args.error_fraction)
        results[s]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{s}: {results[s]['seconds']} s]", file=sys.stderr)
    table = format_table(results, densities)
    print(table)
    print(f"\ncheck: one-pass sparse output vs tiled_sparse_attention, max abs diff {checks[0]:.2e}")
    print("selection time (s, CPU, all sets and densities): " +
          ", ".join(f"{m} {t:.2f}" for m, t in sorted(timings.items())))
    wall = time.perf_counter() - t_start
    print(f"wall {wall:.1f} s")
    record = {"benchmark": "quality selection", **run_header("quality", argv), "wall_s": round(wall, 1),
              "densities": list(densities), "reference_check_max_abs": checks[0], "selection_seconds": timings,
              "table": table, "sets": results}
    if not args.no_save:
        write_result(record, args.out, "selection")
    return record


# ----------------------------------------------------------------------------------------------
# sampled video on the test-bed


def video_metrics():
    """`(psnr, ssim)` of two videos `[B, C, F, H, W]` with values in [-1, 1] (data range 2), from `torchmetrics`:
    PSNR over all values at once, SSIM the mean over frames (each frame a C-channel image).

    Example:
        >>> psnr, ssim = video_metrics()
        >>> x = torch.rand(1, 4, 2, 16, 16) * 2 - 1
        >>> round(ssim(x, x), 6), psnr(x + 0.02, x) > 30
        (1.0, True)
    """
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError:
        raise SystemExit("benchmarks.quality video needs torchmetrics for PSNR and SSIM: pip install torchmetrics") \
            from None

    def frames(x):  # [B, C, F, H, W] -> [B*F, C, H, W]
        return x.movedim(2, 1).flatten(0, 1)

    def psnr(a, b) -> float:
        return float(peak_signal_noise_ratio(a.double(), b.double(), data_range=2.0))

    def ssim(a, b) -> float:
        return float(structural_similarity_index_measure(frames(a).float(), frames(b).float(), data_range=2.0))

    return psnr, ssim


def sample_trajectory(model, noise, cond, *, steps: int, guidance: float = 1.0, shift: float = 1.0):
    """`(sample, [x_t per step, then the sample])` of one test-bed generation from `noise` (a new generation for
    sparsify's runtime; the trajectory float32 on the CPU).

    Example:
        >>> from sparsify.testbed import build_testbed, class_embeddings
        >>> x, xs = sample_trajectory(build_testbed(), torch.randn(1, 4, 2, 8, 8), class_embeddings(torch.tensor([0])),
        ...                           steps=2)
        >>> len(xs), bool((xs[-1] == x).all())
        (3, True)
    """
    from sparsify import runtime
    from sparsify.testbed import sample

    runtime.new_generation()
    xs = []
    with torch.no_grad():
        x = sample(model, noise, cond, steps=steps, guidance_scale=guidance, shift=shift,
                   callback=lambda i, t, x: xs.append(x.float().cpu()))
    xs.append(x.float().cpu())
    return x, xs


def step_errors(traj, ref) -> list[float]:
    """Relative L2 error of each x_t of `traj` against `ref` (same steps; the last is the sample).

    Example:
        >>> step_errors([torch.ones(2), torch.ones(2)], [torch.ones(2), 2 * torch.ones(2)])
        [0.0, 0.5]
    """
    return [float((x - d).norm() / d.norm()) for x, d in zip(traj, ref)]


#: Uniform recipes of `video`: one method and one budget for every head (XAttention's top-p is matched to the density).
UNIFORM_METHODS = ("vsa", "veda", "xattention", "svg2")
WAN14B_ATTENTION = (1, 40, 75600, 128)  # [B, H, S, D] of one Wan2.1-14B 720p, 81-frame self-attention call


def kernel_speedups(densities, device) -> dict:
    """`{density: (sparse ms, dense ms)}` of one self-attention call at the Wan-14B 720p shape, bf16: our
    block-sparse kernel (64x64 blocks, the 4x4x4 tiles, a random selection of that density) against SDPA cuDNN, in
    one process on fresh random inputs. Empty without CUDA.

    Example:
        >>> kernel_speedups([0.1], "cpu")
        {}
    """
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks._common import time_ms
    from benchmarks.kernel import random_selection
    from sparsify.kernels import block_sparse_attn

    B, H, S, D = WAN14B_ATTENTION
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    n = -(-S // 64)
    out = {}
    for d in sorted(set(round(float(x), 4) for x in densities)):
        idx, cnt = random_selection(B, H, n, n, max(1, round(d * n)), device=device)
        out[d] = (time_ms(lambda: block_sparse_attn(q, k, v, idx, cnt, block_size=(64, 64))), dense)
    return out


def match_top_p(model, recipe_of, target: float, probe, tol: float = 0.1, iters: int = 8) -> tuple[float, float]:
    """`(p, density)`: the top-p of `recipe_of(p)` whose achieved density on `probe(model)` is closest to `target`
    (bisection; stops within `tol` relative). Top-p budgets adapt per query tile, so a uniform top-p recipe is
    compared at the density it achieves on the sampled inputs.
    """
    from sparsify import installed_sites, runtime, sparsify, unsparsify

    lo, hi, best = 0.0, 1.0, (1.0, 1.0)
    for _ in range(iters):
        p = (lo + hi) / 2
        sparsify(model, recipe_of(p))
        runtime.new_generation()
        probe(model)
        sites = installed_sites(model)
        density = sum(s.work for s in sites) / sum(s.dense_work for s in sites)
        unsparsify(model)
        if abs(density - target) < abs(best[1] - target):
            best = (p, density)
        if abs(density - target) <= tol * target:
            break
        lo, hi = (p, hi) if density < target else (lo, p)
    return best


def _plots(rows, path_pareto, path_steps):
    """The Pareto plot (PSNR against attention speedup at the Wan-14B shape) and the per-step latent error plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["attention_speedup"], r["psnr_db"]) for r in rows
                     if r["method"] == method and r["attention_speedup"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("attention speedup over cuDNN at the Wan-14B 720p shape (kernel)")
    ax.set_ylabel("PSNR against dense sampling (dB)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no speedups without CUDA
        ax.legend()
    fig.tight_layout()
    fig.savefig(path_pareto, dpi=120)
    plt.close(fig)
    sparsities = sorted({r["sparsity"] for r in rows})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 3.4), squeeze=False)
    for ax, s in zip(axes[0], sparsities):
        for r in rows:
            if r["sparsity"] == s:
                ax.semilogy(range(len(r["step_error"])), r["step_error"], label=r["method"])
        ax.set_title(f"{round(100 * s)}% sparsity")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rel. L2 error of x_t vs dense")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_steps, dpi=120)
    plt.close(fig)


def video(a, argv) -> dict:
    """The `video` subcommand (see the module docstring)."""
    from benchmarks._common import run_header, write_result
    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.calibrate import calibrate_schedule, run_calibration, with_schedule
    from sparsify.calibrate.schedule import FRACTIONS, SCALES, TOLERANCE
    from sparsify.calibrate.trajectory import sample_steps, seed_inputs, testbed_trajectory
    from sparsify.testbed import build_testbed, get_variant, sample

    psnr, ssim = video_metrics()
    if a.tiny:
        a.model, a.steps, a.videos, a.sparsities, a.device = "testbed", 2, 1, "0.5", "cpu"
    variant = get_variant(a.model)
    data = variant.data_module()
    latent = variant.latent_shape
    cal_opts = {}
    if a.tiny:
        latent = (4, 8, 16, 16)  # 512 tokens, 8 tiles of 4x4x4
        cal_opts = dict(tiles=[(4, 4, 4)], levels=(0.25, 0.5, 1.0), output_error=False, query_fraction=0.05)
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(UNIFORM_METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {', '.join(UNIFORM_METHODS)}")
    sparsities = [float(x) for x in a.sparsities.split(",") if x]
    if any(not 0.0 < s < 1.0 for s in sparsities):
        raise SystemExit(f"--sparsities: each must be in (0, 1); got {a.sparsities}")
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    model = build_testbed(device=dev, name=variant.name, weights=a.weights, dtype=dtype)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(a.videos, *latent, generator=g).to(dev, dtype)
    cond = data.class_embeddings(torch.arange(a.videos) % data.NUM_CLASSES).to(dev, dtype)
    t_start = time.perf_counter()
    traj: dict = {}

    def run(label):
        x, traj[label] = sample_trajectory(model, noise, cond, steps=a.steps, guidance=a.guidance, shift=a.shift)
        return x

    def achieved():
        sites = installed_sites(model)
        return sum(s.work for s in sites) / sum(s.dense_work for s in sites)

    dense = run("dense")
    # calibration inputs: the dense trajectory of other noise and conditions (seeds 100..), at sampled steps
    sampled = sample_steps(range(a.steps), 2 if a.tiny else a.calibration_steps)
    calls = [c.kwargs for c in testbed_trajectory(model, range(100, 100 + a.calibration_videos), num_steps=a.steps,
                                                  sampled=sampled, guidance_scale=a.guidance, shift=a.shift,
                                                  latent_shape=latent, name=variant.name)]

    def loop(m):
        for kw in calls:
            m(**kw)

    def probe(m):  # a short pass over the calibration inputs, for XAttention's top-p matching
        with torch.no_grad():
            loop(m)

    # the schedule search samples the first calibration seed as its trajectory did
    noise_cal, cond_cal = seed_inputs(model, 100, latent_shape=latent, name=variant.name)

    def sample_calibration_seed(m):  # calibrate_schedule starts a new generation before each call
        return sample(m, noise_cal, cond_cal, steps=a.steps, guidance_scale=a.guidance, shift=a.shift)

    schedule_opts = dict(fractions=(0.5,), scales=(1.5,)) if a.tiny else {}

    rows = []
    ckpt = tempfile.mkdtemp(prefix="sparsify_quality_")  # one measurement, solved at every sparsity's budget
    partial = Path(a.out or Path(tempfile.gettempdir()) / "quality_video.json").with_suffix(".partial.json")
    for s in sparsities:
        d = round(1.0 - s, 6)
        recipes = {}
        for m in methods:
            if m == "xattention":
                p, _ = match_top_p(model, lambda p: {"version": 1, "defaults": {
                    "method": "xattention", "tile": [4, 4, 4], "budget": {"top_p": p}}}, d, probe)
                recipes[m] = ({"version": 1, "defaults": {"method": m, "tile": [4, 4, 4], "budget": {"top_p": p}}},
                              {"top_p": round(p, 5)})
            else:
                recipes[m] = ({"version": 1, "defaults": {"method": m, "tile": [4, 4, 4], "budget": {"density": d}}},
                              {})
        t0 = time.perf_counter()
        res = run_calibration(model, loop, budget=d, example_inputs=calls[0], progress=False, checkpoint_dir=ckpt,
                              **cal_opts)
        recipes["calibrated"] = (res.recipe, {"calibration_seconds": round(time.perf_counter() - t0, 1)})
        if not a.no_schedule:
            vsa = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": d}}}
            for name, base in (("calibrated", res.recipe), ("vsa", vsa))[:2 if "vsa" in methods else 1]:
                t0 = time.perf_counter()
                sc = calibrate_schedule(model, base, sample_calibration_seed, steps=a.steps, **schedule_opts,
                                        say=lambda line, name=name: print(f"{name} {s:g}: {line}", flush=True))
                scheduled = with_schedule(base, sc)
                recipes[f"{name} + schedule"] = (scheduled, {
                    "schedule": [[e.from_step, round(e.scale, 4)] for e in sc.schedule],
                    "schedule_search": {**scheduled.calibration["schedule"],
                                        "seconds": round(time.perf_counter() - t0, 1)}})
        for name, (recipe, extra) in recipes.items():
            sparsify(model, recipe)
            x = run(f"{name} {s:g}")
            density = achieved()
            unsparsify(model)
            err = step_errors(traj[f"{name} {s:g}"], traj["dense"])
            rows.append({"method": name, "sparsity": s, "density_target": d, "density_achieved": round(density, 4),
                         "psnr_db": round(psnr(x, dense), 2), "ssim": round(ssim(x, dense), 4),
                         "step_error": err, **extra})
            print({k: v for k, v in rows[-1].items() if k != "step_error"}, flush=True)
        write_result({"benchmark": "quality video", "partial": True, "rows": rows}, partial, "quality_video")
    kernel = kernel_speedups([r["density_achieved"] for r in rows], dev)
    for r in rows:
        t = kernel.get(round(r["density_achieved"], 4))
        r["kernel_ms"], r["dense_ms"] = (round(t[0], 3), round(t[1], 3)) if t else (None, None)
        r["attention_speedup"] = round(t[1] / t[0], 2) if t else None
    lines = [f"| sparsity | recipe | achieved density | PSNR dB | SSIM | x_t error at step {a.steps // 2} | "
             "kernel ms (Wan-14B) | speedup vs cuDNN |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "- | -" if r["attention_speedup"] is None else f"{r['kernel_ms']:.2f} | {r['attention_speedup']:.1f}x"
        lines.append(f"| {round(100 * r['sparsity'])}% | {r['method']} | {r['density_achieved']:.3f} | "
                     f"{r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['step_error'][a.steps // 2]:.4f} | {speed} |")
    table = "\n".join(lines)
    print(table)
    meta = {"benchmark": "quality video", **run_header("quality", argv), "model": variant.name,
            "latent_shape": list(latent), "dtype": a.dtype, "steps": a.steps, "videos": a.videos,
            "guidance_scale": a.guidance, "shift": a.shift,
            "calibration": {"videos": a.calibration_videos, "sampled_steps": sampled,
                            "inputs": "dense sampling trajectory, seeds 100..",
                            "schedule_search": None if a.no_schedule else {
                                "seed": 100, "tolerance": TOLERANCE,
                                "fractions": list(schedule_opts.get("fractions", FRACTIONS)),
                                "scales": list(schedule_opts.get("scales", SCALES))}},
            "wan14b_attention_shape": list(WAN14B_ATTENTION), "wall_s": round(time.perf_counter() - t_start, 1),
            "table": table, "rows": rows}
    path = write_result(meta, a.out, "quality_video")
    partial.unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    if not a.no_plots:
        _plots(rows, path.with_suffix(".pareto.png"), path.with_suffix(".steps.png"))
        print(f"plots: {path.with_suffix('.pareto.png')}, {path.with_suffix('.steps.png')}")
    return meta


def reuse(a, argv) -> dict:
    """The `reuse` subcommand (see the module docstring)."""
    from benchmarks._common import run_header, write_result
    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.calibrate import run_calibration
    from sparsify.testbed import build_testbed, example_inputs, sample
    from sparsify.testbed.data import class_embeddings

    psnr, ssim = video_metrics()
    latent = (4, 16, 32, 32)  # the test-bed's training shape: 4,096 tokens
    if a.tiny:
        a.steps, a.videos, a.densities, a.reuse_steps, a.device = 2, 1, "0.2", 2, "cpu"
        latent = (4, 8, 16, 16)  # 512 tokens, 8 tiles of 4x4x4
    dev = torch.device(a.device)
    model = build_testbed(device=dev)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(a.videos, *latent, generator=g).to(dev)
    cond = class_embeddings(torch.arange(a.videos) % 8).to(dev)

    traj: dict = {}

    def run(label):
        t0 = time.perf_counter()
        x, traj[label] = sample_trajectory(model, noise, cond, steps=a.steps)
        return x, time.perf_counter() - t0

    def errors(label):  # relative L2 error of x_t against the dense trajectory, per step (last = output)
        return step_errors(traj[label], traj["dense"])

    dense, t_dense = run("dense")
    rows = []

    def loop(m):  # calibration inputs: seeds 100.. (the sampled noise is seed 1234), 2 noise levels
        for seed in (100, 101)[:1 if a.tiny else 2]:
            for t in (0.8, 0.4)[:1 if a.tiny else 2]:
                m(**example_inputs(seed=seed, t=t, device=dev, latent_shape=latent))

    # --tiny: one candidate tile, three levels, no output-error pass (the calibrator's code path, not its result)
    cal_opts = dict(tiles=[(4, 4, 4)], levels=(0.1, 0.3, 1.0), output_error=False, query_fraction=0.05) if a.tiny else {}

    calibrated = {}
    for d in [float(x) for x in a.densities.split(",")]:
        uniform = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": d}}}
        res = run_calibration(model, loop, budget=d, example_inputs=example_inputs(device=dev, latent_shape=latent),
                              progress=False,
                              **cal_opts)
        calibrated[d] = res.recipe
        for name, recipe in (("uniform 4x4x4", uniform), ("calibrated", res.recipe)):
            sparsify(model, recipe)
            x, secs = run(name)
            density = sum(s.work for s in installed_sites(model)) / sum(s.dense_work for s in installed_sites(model))
            unsparsify(model)
            rows.append({"recipe": name, "density_target": d, "density_achieved": round(density, 4),
                         "psnr_db": round(psnr(x, dense), 2), "ssim": round(ssim(x, dense), 4),
                         "seconds": round(secs, 2)})
            print(rows[-1], flush=True)

    d_mid = sorted(calibrated)[len(calibrated) // 2]
    base = calibrated[d_mid]
    sparsify(model, base)
    x_fresh, _ = run("fresh")  # the calibrated recipe again, recording its trajectory
    unsparsify(model)
    reuse_cal = None
    if a.reuse_threshold is None:
        from sparsify.calibrate import calibrate_mask_reuse

        g2 = torch.Generator().manual_seed(4321)
        noise2 = torch.randn(1, *latent, generator=g2).to(dev)
        cond2 = class_embeddings(torch.tensor([3])).to(dev)
        rc = calibrate_mask_reuse(model, base, lambda m: sample(m, noise2, cond2, steps=a.reuse_steps),
                                  max_age=a.reuse_max_age)
        threshold = rc.threshold
        reuse_cal = {"threshold": rc.threshold, "max_age": rc.max_age, "trajectory_steps": a.reuse_steps,
                     "reuse_share": rc.reuse_share, "least_overlap": rc.min_overlap, "tried": rc.tried,
                     "calibration_error_growth": rc.error_growth}
        print("reuse calibration:", reuse_cal, flush=True)
    else:
        threshold = a.reuse_threshold
    reuse_recipe = base.to_dict()
    reuse_recipe["defaults"]["mask_reuse"] = {"threshold": threshold, "max_age": a.reuse_max_age}
    sparsify(model, reuse_recipe)
    x_reuse, secs = run("reuse")
    sites = installed_sites(model)
    sel, reused = sum(s.selections for s in sites), sum(s.reused for s in sites)
    unsparsify(model)
    fresh = next(r for r in rows if r["recipe"] == "calibrated" and r["density_target"] == d_mid)
    err_fresh, err_reuse = errors("fresh"), errors("reuse")
    reuse_row = {"recipe": "calibrated + mask reuse", "density_target": d_mid, "psnr_db": round(psnr(x_reuse, dense), 2),
                 "ssim": round(ssim(x_reuse, dense), 4), "threshold": threshold, "max_age": a.reuse_max_age,
                 "calibration": reuse_cal, "selections": sel, "reused": reused,
                 "reuse_share": round(reused / max(1, sel + reused), 3),
                 "psnr_fresh_db": round(psnr(x_fresh, dense), 2), "psnr_fresh_first_run_db": fresh["psnr_db"],
                 "output_error_fresh": err_fresh[-1], "output_error_reuse": err_reuse[-1],
                 "output_error_growth": err_reuse[-1] / err_fresh[-1] - 1.0,
                 "step_error_fresh": err_fresh, "step_error_reuse": err_reuse, "seconds": round(secs, 2)}
    rows.append(reuse_row)
    print({k: v for k, v in reuse_row.items() if not k.startswith("step_error")}, flush=True)
    print("step  error fresh  error reuse  (relative L2 of x_t vs the dense trajectory)")
    for i in sorted(set(range(0, len(err_fresh), max(1, len(err_fresh) // 10))) | {len(err_fresh) - 1}):
        print(f"{i:4d}  {err_fresh[i]:11.5f}  {err_reuse[i]:11.5f}")
    meta = {"benchmark": "quality reuse", **run_header("quality", argv), "steps": a.steps, "videos": a.videos,
            "dense_seconds": round(t_dense, 2), "rows": rows}
    write_result(meta, a.out, "fidelity")
    return meta


# ----------------------------------------------------------------------------------------------
# calibration inputs on the test-bed: its sampling trajectory against made-up inputs


def calibration_inputs(a, argv) -> dict:
    """The `inputs` subcommand: calibrate the test-bed on each input source, evaluate every recipe the same way."""
    from benchmarks._common import run_header, write_result
    from sparsify import installed_sites, runtime, sparsify, unsparsify
    from sparsify.calibrate.__main__ import main as calibrate_main
    from sparsify.calibrate.trajectory import sample_steps, testbed_trajectory
    from sparsify.recipe import load_recipe
    from sparsify.testbed import build_testbed, example_inputs, sample
    from sparsify.testbed.variants import get_variant

    psnr, ssim = video_metrics()
    variant = get_variant("testbed" if a.tiny else a.model)
    data = variant.data_module()
    latent, extra = variant.latent_shape, []
    if a.tiny:
        a.eval_seeds, a.eval_steps, a.eval_sampled, a.videos, a.budget, a.inputs = "100", 4, 2, 1, 0.5, 2
        latent = (4, 4, 16, 16)
        extra = ["--grid", "4x8x8", "--tiles", "1x8x8", "--levels", "0.25,0.5", "--no-output-error"]
    seeds = [int(x) for x in a.eval_seeds.split(",") if x]
    calib_seeds = list(range(a.inputs))
    if set(seeds) & set(calib_seeds):
        raise SystemExit(f"--eval-seeds {a.eval_seeds} overlap the calibration seeds 0..{a.inputs - 1} (--inputs)")
    classes = {"trajectory": sorted({s % data.NUM_CLASSES for s in calib_seeds}),
               "random": sorted({int(data.make_batch(1, seed=s, latent_shape=latent)[1][0]) for s in calib_seeds}),
               "evaluation": sorted({s % data.NUM_CLASSES for s in seeds})}
    out_dir = Path(a.workdir)
    recipes = {}
    t0 = time.perf_counter()
    given = dict(x.split("=", 1) for x in a.recipes.split(",") if x) if a.recipes else {}
    for source, path in given.items():
        recipes[source] = (Path(path), None, (load_recipe(path).calibration or {}).get("command"))
    for source in [] if given else a.sources.split(","):
        path = out_dir / f"inputs_{source}.yaml"
        cmd = ["--model", variant.name, "--budget", f"{a.budget:g}", "--inputs-from", source, "--inputs",
               str(a.inputs), "--out", str(path), "--checkpoint-dir", "none", "--no-plots", "--quiet", "--device",
               a.device, *extra]
        t1 = time.perf_counter()
        if calibrate_main(cmd) != 0:
            raise SystemExit(f"calibration with --inputs-from {source} failed")
        recipes[source] = (path, round(time.perf_counter() - t1, 1), "python -m sparsify.calibrate " + " ".join(cmd))
    model = build_testbed(device=a.device, name=variant.name)
    sampled = sample_steps(range(a.eval_steps), a.eval_sampled)
    traj = [c.kwargs for c in testbed_trajectory(model, seeds, num_steps=a.eval_steps, sampled=sampled,
                                                 guidance_scale=a.guidance, latent_shape=latent, name=variant.name)]
    made = [example_inputs(seed=s, t=1.0 - i / a.eval_steps, latent_shape=latent, device=a.device, name=variant.name)
            for s in seeds for i in sampled]
    gens = [(torch.randn(1, *latent, generator=torch.Generator().manual_seed(s)).to(a.device),
             data.class_embeddings(torch.tensor([s % data.NUM_CLASSES])).to(a.device)) for s in seeds[:a.videos]]

    def outputs(calls):
        with torch.no_grad():
            return [model(**kw)[0].float() for kw in calls]

    def videos():
        xs = []
        for noise, cond in gens:
            runtime.new_generation()
            xs.append(sample(model, noise, cond, steps=a.eval_steps, guidance_scale=a.guidance))
        return xs

    def rel_l2(outs, refs):
        return math.sqrt(sum(float((o - r).square().sum()) for o, r in zip(outs, refs))
                         / sum(float(r.square().sum()) for r in refs))

    dense = {"trajectory": outputs(traj), "random": outputs(made), "videos": videos()}
    rows = []
    for source, (path, secs, cmd) in recipes.items():
        recipe = load_recipe(path)
        sparsify(model, recipe)
        err_traj, err_made = rel_l2(outputs(traj), dense["trajectory"]), rel_l2(outputs(made), dense["random"])
        xs = videos()
        sites = installed_sites(model)
        density = sum(s.work for s in sites) / sum(s.dense_work for s in sites)
        unsparsify(model)
        rows.append({"calibrated_on": source, "command": cmd, "calibration_seconds": secs,
                     "density_achieved": round(density, 4),
                     "predicted_output_error": recipe.calibration.get("predicted_error"),
                     "calibration_measured_output_error": recipe.calibration.get("measured_output_error"),
                     "output_rel_l2_on_trajectory": round(err_traj, 5), "output_rel_l2_on_random": round(err_made, 5),
                     "psnr_db": [round(psnr(x, d), 2) for x, d in zip(xs, dense["videos"])],
                     "ssim": [round(ssim(x, d), 4) for x, d in zip(xs, dense["videos"])]})
        print(rows[-1], flush=True)
    lines = [f"| calibrated on | density | output rel. L2, trajectory inputs | output rel. L2, random inputs | "
             f"PSNR dB ({a.eval_steps} steps, CFG {a.guidance:g}) | SSIM |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibrated_on']} | {r['density_achieved']:.4f} | {r['output_rel_l2_on_trajectory']:.4f} | "
                     f"{r['output_rel_l2_on_random']:.4f} | {', '.join(f'{x:.2f}' for x in r['psnr_db'])} | "
                     f"{', '.join(f'{x:.3f}' for x in r['ssim'])} |")
    table = "\n".join(lines)
    print(table)
    meta = {"benchmark": "quality inputs", **run_header("quality", argv), "model": variant.name,
            "latent_shape": list(latent), "budget": a.budget, "calibration_seeds": calib_seeds,
            "classes": classes, "eval_seeds": seeds,
            "eval_steps": a.eval_steps, "eval_sampled_steps": sampled, "guidance_scale": a.guidance,
            "videos": len(gens), "wall_s": round(time.perf_counter() - t0, 1), "table": table, "rows": rows}
    if not a.no_save:
        write_result(meta, a.out, "calibration_inputs")
    return meta


def main(argv=None) -> dict:
    from benchmarks.quality_plan import add_arguments as plan_arguments, plan_quality

    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("selection", help="selection fidelity, tile recall, head-aware tiles (CPU)")
    s.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    s.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    s.add_argument("--error-fraction", type=float, default=1.0,
                   help="share of query tiles (seeded random sample) whose output error is measured")
    s.add_argument("--no-save", action="store_true", help="do not write the JSON")
    s.add_argument("--head-aware", action="store_true",
                   help="instead: head-aware tiles vs 4x4x4 on the planted heads (selection_head_aware_<date>.json)")
    s.add_argument("--tiny", action="store_true", help="smoke run: the random set at 10%%, a quarter of the query tiles")
    s.add_argument("--out", default=None, help="JSON path (default benchmarks/results/selection_<date>.json)")
    v = sub.add_parser("video", help="sampled-video PSNR / SSIM of every method and the calibrated recipe against "
                       "dense sampling on a test-bed, with the kernel speedup at the Wan-14B shape (GPU)")
    v.add_argument("--model", default="testbed-16k", help="test-bed variant: testbed-16k (default) or testbed")
    v.add_argument("--weights", default=None, help="a safetensors file of the variant (default: the shipped one)")
    v.add_argument("--steps", type=int, default=50, help="Euler steps of every sampling run")
    v.add_argument("--videos", type=int, default=2, help="videos sampled per recipe (same noise and conditions)")
    v.add_argument("--sparsities", default="0.8,0.9,0.95")
    v.add_argument("--methods", default=",".join(UNIFORM_METHODS), help="uniform recipes (4x4x4 tiles)")
    v.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    v.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule")
    v.add_argument("--calibration-videos", type=int, default=2,
                   help="dense sampling runs (other seeds) whose trajectories the calibrated recipes are fitted on")
    v.add_argument("--calibration-steps", type=int, default=4, help="steps of each such run fed to the calibrator")
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the model and of every sampling run (bfloat16: the deployed precision; the "
                        "test-beds' bfloat16 noise floor against float32 is in RESULTS.md)")
    v.add_argument("--no-plots", action="store_true", help="skip the Pareto and per-step error plots")
    v.add_argument("--no-schedule", action="store_true",
                   help="leave out the 'calibrated + schedule' and 'vsa + schedule' rows (per-step budget schedules "
                        "searched on the calibration seed's sampling run)")
    v.add_argument("--tiny", action="store_true", help="CPU smoke run: the 4k test-bed at 512 tokens, 2 steps, 50%% "
                   "sparsity, a one-tile calibration, one schedule candidate")
    v.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_video_<date>.json)")
    r = sub.add_parser("reuse", help="temporal mask reuse on the 4k test-bed: PSNR / SSIM and x_t error against dense")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--videos", type=int, default=4)
    r.add_argument("--densities", default="0.2,0.1,0.05")
    r.add_argument("--reuse-threshold", type=float, default=None, help="fixed threshold (default: calibrated)")
    r.add_argument("--reuse-steps", type=int, default=20, help="steps of the reuse-calibration trajectory")
    r.add_argument("--reuse-max-age", type=int, default=4)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--tiny", action="store_true", help="CPU smoke run: 1 video of 512 tokens, 2 steps, density 0.2, "
                   "a one-tile calibration on one input")
    r.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fidelity_<date>.json)")
    c = sub.add_parser("inputs", help="test-bed calibration on its sampling trajectory vs on random inputs")
    c.add_argument("--model", default="testbed-16k", help="test-bed variant: testbed-16k (default) or testbed")
    c.add_argument("--budget", type=float, default=0.1)
    c.add_argument("--inputs", type=int, default=8,
                   help="calibration inputs of every source (seeds 0..N-1): sampling runs for the trajectory, "
                        "videos for random inputs; a trajectory run's class is its seed mod 8")
    c.add_argument("--sources", default="trajectory,random", help="the --inputs-from values calibrated and compared")
    c.add_argument("--eval-seeds", default="100,101,102,103", help="seeds of the evaluation runs (disjoint from calibration's)")
    c.add_argument("--eval-steps", type=int, default=20, help="Euler steps of the evaluation sampling runs")
    c.add_argument("--eval-sampled", type=int, default=4, help="steps of each evaluation run whose outputs are compared")
    c.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale of the evaluation runs")
    c.add_argument("--videos", type=int, default=2, help="evaluation runs also sampled to the end for PSNR and SSIM")
    c.add_argument("--workdir", default=".", help="folder of the calibrated recipes inputs_<source>.yaml")
    c.add_argument("--recipes", default=None, metavar="NAME=PATH,...",
                   help="evaluate these recipes instead of calibrating (e.g. trajectory=a.yaml,random=b.yaml)")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--tiny", action="store_true", help="CPU smoke run: the 4k test-bed at 256 tokens, 4 steps, one "
                   "evaluation seed, 2 calibration inputs, budget 0.5")
    c.add_argument("--no-save", action="store_true", help="do not write the JSON")
    c.add_argument("--out", default=None, help="JSON path (default benchmarks/results/calibration_inputs_<date>.json)")
    plan_arguments(sub)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"selection": selection, "video": video, "reuse": reuse, "inputs": calibration_inputs,
                "plan": plan_quality}
    return commands[args.command](args, argv)


if __name__ == "__main__":
    main()
