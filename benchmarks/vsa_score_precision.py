"""What a cheaper precision for VSA's coarse-score GEMM would change: selections and tile recall, on the CPU.

    python -m benchmarks.vsa_score_precision [--sets planted444,testbed,wan14b] [--densities 5,10]
    python -m benchmarks.vsa_score_precision --time [--out F]   # on a GPU: the GEMM's time, Wan-14B, each way

VSA's scores are `mean(q_tile) . mean(k_tile) / sqrt(D)` in float32 (the issue asks for float32 means). On the GPU
that GEMM runs as cuBLAS's SIMT fp32 kernel (0.42 ms at Wan-14B, 2.6% of the op; RESULTS). A tensor-core version
would round the operands: TF32 keeps 10 mantissa bits; the 3-term bf16 split (`hi*hi + hi*lo + lo*hi`, with
`hi = bf16(x)`, `lo = bf16(x - hi)`) keeps about 16. This emulates both on the CPU (products and sums in float32,
as the tensor cores accumulate) and reports, against float32 scores at each density: the share of query tiles
whose selected set changes, the share of selected tiles that change, and, where exact tile masses are cheap
(`planted444`, `testbed`), the tile recall of each. A planner can read from it whether "float32 scores" may be
met by a tensor-core GEMM.

`--time` (CUDA) times the GEMM at Wan-14B (40 heads, 1,182 tile means of Gaussian 4x4x4 tiles) as the op runs it
(cuBLAS float32), in TF32, and as the bf16 split in one tensor-core GEMM with float32 output
(`bf16x3_scores`: the split, then `torch.bmm(..., out_dtype=torch.float32)` over the three terms side by side,
inner dimension 3D), and counts the selections that change on the GPU against float32 at 5% and 10%.
"""

from __future__ import annotations

import argparse

import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 mantissa bits, round to nearest even), kept in float32.

    Example:
        >>> float(tf32(torch.tensor([1.0 + 2 ** -11])))  # below half a TF32 ulp: rounds down
        1.0
    """
    i = x.contiguous().view(torch.int32)
    i = (i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32)


def scores(qm: torch.Tensor, km: torch.Tensor, mode: str) -> torch.Tensor:
    """Coarse scores `[B, H, n, n]` from float32 means with the GEMM's operands in `mode` (fp32, tf32, bf16x3)."""
    qs = qm * (1.0 / qm.shape[-1] ** 0.5)
    if mode == "fp32":
        return qs @ km.transpose(-1, -2)
    if mode == "tf32":
        return tf32(qs) @ tf32(km).transpose(-1, -2)
    if mode == "bf16x3":
        qh, kh = qs.bfloat16().float(), km.bfloat16().float()
        ql, kl = (qs - qh).bfloat16().float(), (km - kh).bfloat16().float()
        kt, klt = kh.transpose(-1, -2), kl.transpose(-1, -2)
        return qh @ kt + (qh @ klt + ql @ kt)
    raise ValueError(mode)


def changed(sel, ref, n: int) -> tuple[float, float]:
    """(share of query tiles whose selected set differs, share of `ref`'s selected tiles missing from `sel`)."""
    from sparsify.kernels.reference import selection_to_block_mask

    s, r = selection_to_block_mask(*sel, n), selection_to_block_mask(*ref, n)
    return float((s != r).any(-1).float().mean()), float((r & ~s).sum() / r.sum())


def bf16x3_scores(qm: torch.Tensor, km: torch.Tensor) -> torch.Tensor:
    """`scores(qm, km, "bf16x3")` as one bf16 tensor-core GEMM with float32 output (CUDA): `[hi, hi, lo] . [hi, lo, hi]`.

    Example:
        >>> # s = bf16x3_scores(qm.cuda(), km.cuda())  # float32 [B, H, n, n]
    """
    qs = qm * (1.0 / qm.shape[-1] ** 0.5)
    qh, kh = qs.bfloat16(), km.bfloat16()
    ql, kl = (qs - qh.float()).bfloat16(), (km - kh.float()).bfloat16()
    a = torch.cat([qh, qh, ql], -1).flatten(0, 1)
    b = torch.cat([kh, kl, kh], -1).flatten(0, 1)
    return torch.bmm(a, b.transpose(1, 2), out_dtype=torch.float32).view(*qm.shape[:-1], km.shape[-2])


def time_gemm(densities) -> dict:
    """The coarse-score GEMM's time at Wan-14B on the GPU, float32 / TF32 / bf16x3, and selection changes."""
    from benchmarks import time_ms
    from sparsify.geometry import pool_tiles, tile_layout, to_tiles
    from sparsify.methods.select import select_from_scores
    from sparsify.recipe import Budget

    lay = tile_layout((21, 45, 80), (4, 4, 4))
    g = torch.Generator(device="cuda").manual_seed(0)
    qm, km = (pool_tiles(to_tiles(torch.randn(1, 40, 75600, 128, device="cuda", generator=g, dtype=torch.bfloat16),
                                  lay).float(), lay) for _ in range(2))
    out = {"shape": list(qm.shape)}

    def tf32_scores():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return scores(qm, km, "fp32")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    ways = {"fp32": lambda: scores(qm, km, "fp32"), "tf32": tf32_scores, "bf16x3": lambda: bf16x3_scores(qm, km)}
    for name, fn in ways.items():
        out[f"{name}_ms"] = time_ms(fn)
    ref = ways["fp32"]()
    for d in densities:
        budgets = [Budget(density=d / 100)] * qm.shape[1]
        want = select_from_scores(ref, budgets)
        for name in ("tf32", "bf16x3"):
            rows, tiles = changed(select_from_scores(ways[name](), budgets), want, lay.n_tiles)
            out[f"{name}_{d:g}pct_selected_tiles_changed"] = tiles
            out[f"{name}_{d:g}pct_query_tiles_changed"] = rows
    print(" | ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()), flush=True)
    return out


def _sets(names):
    from benchmarks.selection import load_set, tile_masses

    for name in names:
        if name == "wan14b":
            g = torch.Generator().manual_seed(0)
            q, k = (torch.randn(1, 4, 21 * 45 * 80, 128, generator=g) for _ in range(2))
            yield name, (21, 45, 80), q, k, None
        else:
            grid, _, (q, k, _v), _ = load_set(name)
            yield name, grid, q, k, tile_masses


def main(argv=None) -> dict:
    from sparsify.geometry import pool_tiles, tile_layout, to_tiles
    from sparsify.methods.select import select_from_scores
    from sparsify.testing.planted import tile_recall
    from sparsify.recipe import Budget

    ap = argparse.ArgumentParser(prog="python -m benchmarks.vsa_score_precision",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="planted444,testbed,wan14b")
    ap.add_argument("--densities", default="5,10")
    ap.add_argument("--time", action="store_true", help="on a GPU: time the GEMM each way at Wan-14B")
    ap.add_argument("--out", default=None, help="with --time: JSON path")
    a = ap.parse_args(argv)
    if a.time:
        import datetime

        from benchmarks import gpu_meta, write_result

        res = time_gemm([float(x) for x in a.densities.split(",")])
        res.update(gpu_meta("vsa_score_precision", argv),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        write_result(res, a.out, "vsa_score_gemm")
        return res
    out = {}
    for name, grid, q, k, masses in _sets(a.sets.split(",")):
        lay = tile_layout(grid, (4, 4, 4))
        qt, kt = to_tiles(q.float(), lay), to_tiles(k.float(), lay)
        qm, km = pool_tiles(qt, lay), pool_tiles(kt, lay)
        mass = masses(qt, kt, lay) if masses is not None else None
        n = lay.n_tiles
        for d in (float(x) for x in a.densities.split(",")):
            budgets = [Budget(density=d / 100)] * q.shape[1]
            sel = {m: select_from_scores(scores(qm, km, m), budgets) for m in ("fp32", "tf32", "bf16x3")}
            row = {}
            for m in ("tf32", "bf16x3"):
                rows_changed, tiles_changed = changed(sel[m], sel["fp32"], n)
                row[m] = {"query_tiles_changed": rows_changed, "selected_tiles_changed": tiles_changed}
                if mass is not None:
                    row[m]["recall"] = float(tile_recall(mass, *sel[m]).mean())
            if mass is not None:
                row["fp32"] = {"recall": float(tile_recall(mass, *sel["fp32"]).mean())}
            out[(name, d)] = row
            parts = [f"{m}: {r['query_tiles_changed']:.4f} of query tiles, {r['selected_tiles_changed']:.5f} of "
                     f"selected tiles changed" + (f", recall {r['recall']:.4f}" if "recall" in r else "")
                     for m, r in row.items() if m != "fp32"]
            fp = f" | fp32 recall {row['fp32']['recall']:.4f}" if "fp32" in row else ""
            print(f"{name:10s} {d:4g}%: " + "; ".join(parts) + fp, flush=True)
    return out


if __name__ == "__main__":
    main()
