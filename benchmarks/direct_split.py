"""Where the op's direct path (`sparsify.kernels.direct`) gains and loses at Wan-14B 720p, VSA, 4x4x4 tiles.

    python -m benchmarks.direct_split

Times, on the same inputs and VSA selections (5% and 10%): the 64x64 Gluon kernel reading q, k, v in token order
through 5-D TMA boxes (`direct.attention`) against the same kernel on tile-order copies with the fused inverse
(`block_sparse_attn_scattered`); then the direct path's preparation (the write-free means pass and the edge gather)
against the tile-order gather it replaces (`tile_sequence`). Prints only.
"""

from __future__ import annotations

import sys

import torch


def main() -> None:
    from benchmarks import time_ms
    from sparsify.kernels import direct
    from sparsify.kernels.block_sparse import block_sparse_attn_scattered
    from sparsify.kernels.gather import gather_rows
    from sparsify.kernels.reference import _slot_source, tile_sequence
    from sparsify.layout import Geometry, tile_layout
    from sparsify.methods.vsa import VSA
    from sparsify.recipe import Budget

    if not torch.cuda.is_available():
        sys.exit("benchmarks.direct_split needs a CUDA GPU")
    grid, H = (21, 45, 80), 40
    geo = Geometry(grid)
    S = geo.video_len
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = tile_layout(grid, (4, 4, 4), "cuda")
    dt = direct.prepare(q, k, v, lay)
    ts = tile_sequence(q, k, v, geo, lay)
    L = ts.prefix_len
    rows = _slot_source(ts.src, ts.valid)[:L]
    for d in (0.05, 0.1):
        idx, cnt = VSA().select_from_means(*dt.means, lay, [Budget(density=d)] * H)
        t_direct = time_ms(lambda: direct.attention(q, k, v, lay, dt, idx, cnt))
        t_tiled = time_ms(lambda: block_sparse_attn_scattered(ts.q[:, :, :L], ts.k[:, :, :L], ts.v[:, :, :L], idx,
                                                              cnt, rows, S, block_size=(64, 64)))
        print(f"density {d}: kernel direct (5-D boxes) {t_direct:.3f} ms, kernel tiled (3-D boxes) {t_tiled:.3f} ms, "
              f"ratio {t_direct / t_tiled:.3f}", flush=True)
    table, edge_src, slots = direct.edge_table(lay, q.device)
    t_means = time_ms(lambda: gather_rows([q, k], slots, pool_tiles=lay.n_tiles, tile_lens=lay.tile_lens, volume=64,
                                          write=False))
    t_edges = time_ms(lambda: gather_rows([q, k, v], edge_src))
    t_gather = time_ms(lambda: tile_sequence(q, k, v, geo, lay))
    print(f"means pass {t_means:.3f} ms, edge gather {t_edges:.3f} ms, full tile-order gather {t_gather:.3f} ms",
          flush=True)


if __name__ == "__main__":
    main()
