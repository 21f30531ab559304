"""A/B of the op's kernel call: per-tile lengths over all padded slots, against the slot prefix with no lengths.

    python -m benchmarks.prefix_ab [--densities 0.02,0.05,0.1,0.2] [--rounds 5] [--method vsa] [--out PATH]

At Wan-14B 720p with 4x4x4 tiles only the last tile is short, so the op can run the kernel on the first 75,600
slots as an ordinary tail (`TiledSequence.prefix_len`) instead of passing `kv_block_lens`. Both calls are timed on
the same q, k, v and selection, alternating for `--rounds` rounds (each a `benchmarks.time_ms` median), so clock
drift within the run falls on both; prints the median of the rounds per density and writes a JSON.
"""

from __future__ import annotations

import argparse
import sys

import torch


def run(densities, rounds: int, method: str = "vsa") -> list[dict]:
    from benchmarks import alternated
    from sparsify.kernels.block_sparse import block_sparse_attn
    from sparsify.runtime.tiled import tile_sequence
    from sparsify.geometry import Geometry, tile_layout
    from sparsify.methods import get_method
    from sparsify.recipe import Budget

    grid, H, D = (21, 45, 80), 40, 128
    geo, lay = Geometry(grid), tile_layout(grid, (4, 4, 4), "cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, geo.video_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ts = tile_sequence(q, k, v, geo, lay)
    P, L, vol = lay.padded_len, ts.prefix_len, lay.volume
    if L is None:
        sys.exit("prefix_ab: this layout has short tiles before the last one")
    lens = lay.tile_lens.to("cuda")
    rows = []
    for d in densities:
        idx, cnt = get_method(method).select(ts.q[:, :, :P], ts.k[:, :, :P], lay, [Budget(density=d)] * H)
        calls = {
            "lens": lambda: block_sparse_attn(ts.q, ts.k, ts.v, idx, cnt, block_size=(vol, vol), kv_block_lens=lens),
            "prefix": lambda: block_sparse_attn(ts.q[:, :, :L], ts.k[:, :, :L], ts.v[:, :, :L], idx, cnt,
                                                block_size=(vol, vol)),
        }
        times, med = alternated(calls, rounds)
        rows.append({"density": d, "method": method, "ms": times, "median_ms": med,
                     "prefix_over_lens": med["prefix"] / med["lens"]})
        print(f"density {d:<5g} lens {med['lens']:7.3f} ms  prefix {med['prefix']:7.3f} ms  "
              f"prefix/lens {med['prefix'] / med['lens']:.3f}  (rounds: lens {['%.2f' % t for t in times['lens']]}, "
              f"prefix {['%.2f' % t for t in times['prefix']]})", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    from benchmarks import gpu_meta, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefix_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--densities", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--method", default="vsa")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.prefix_ab needs a CUDA GPU")
    rows = run([float(x) for x in a.densities.split(",")], a.rounds, a.method)
    write_result({**gpu_meta("prefix_ab", argv), "rows": rows}, a.out, "prefix_ab")
    return rows


if __name__ == "__main__":
    main()
