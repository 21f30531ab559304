"""Whole-op benchmark: layout + VSA selection + Triton kernel + inverse layout, against dense cuDNN, in one run.

    python -m benchmarks.whole_op [--shapes 1.3b,14b] [--densities 0.02,0.05,0.1,0.2,0.5] [--tile 4x4x4]

Prints one table (times, ratios against cuDNN measured in the same run, and the breakdown of the op
into its stages) and writes benchmarks/results/whole_op_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

SHAPES = {"1.3b": ("Wan-1.3B 480p", 12, (21, 30, 52)), "14b": ("Wan-14B 720p", 40, (21, 45, 80))}


def bench(fn, reps=20):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=reps, return_mode="median")


def run(shapes, densities, tile, method="vsa"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsify import runtime
    from sparsify.kernels.block_sparse import block_sparse_attn
    from sparsify.layout import Geometry, from_tiles, tile_layout, to_tiles
    from sparsify.methods import get_method
    from sparsify.recipe import Budget, HeadConfig

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
        vol = lay.volume
        for d in densities:
            cfg = [HeadConfig(method=method, tile=tile, budget=Budget(density=d))] * H
            st = runtime.SiteState(site_id=runtime.STATE.new_id(), path=f"bench.{key}", kind="self", heads=H,
                                   head_dim=D, configs=cfg)
            runtime.STATE.sites[st.site_id] = st
            site = torch.tensor([st.site_id])
            geom = [*grid, 0]
            t_op = bench(lambda: runtime.run_site(q, k, v, site, geom, None))
            qt, kt, vt = (to_tiles(x, lay) for x in (q, k, v))
            t_gather = bench(lambda: [to_tiles(x, lay) for x in (q, k, v)])
            sel = get_method(method)
            t_select = bench(lambda: sel.select(qt, kt, lay, [Budget(density=d)] * H))
            idx, cnt = sel.select(qt, kt, lay, [Budget(density=d)] * H)
            lens = lay.tile_lens.to("cuda")
            t_kernel = bench(lambda: block_sparse_attn(qt, kt, vt, idx, cnt, block_size=(vol, vol), kv_block_lens=lens))
            o = block_sparse_attn(qt, kt, vt, idx, cnt, block_size=(vol, vol), kv_block_lens=lens)
            t_inverse = bench(lambda: from_tiles(o, lay))
            floor = d * t_cudnn
            rows.append({
                "shape": name, "H": H, "S": S, "tile": list(tile), "density": d, "padding": round(lay.padding_fraction, 4),
                "cudnn_ms": t_cudnn, "op_ms": t_op, "kernel_ms": t_kernel, "select_ms": t_select,
                "gather_ms": t_gather, "inverse_ms": t_inverse, "floor_ms": floor,
                "op_speedup_vs_cudnn": t_cudnn / t_op, "kernel_speedup_vs_cudnn": t_cudnn / t_kernel,
                "select_share_of_kernel": t_select / t_kernel,
            })
            runtime.STATE.sites.pop(st.site_id)
            print(f"{name:14s} d={d:<5g} cuDNN {t_cudnn:8.2f} ms | op {t_op:7.2f} ms ({t_cudnn / t_op:5.1f}x) | "
                  f"kernel {t_kernel:7.2f} ({t_cudnn / t_kernel:5.1f}x) select {t_select:5.2f} gather {t_gather:5.2f} "
                  f"inverse {t_inverse:5.2f} | floor d*cuDNN {floor:6.2f}", flush=True)
    return rows


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
        st = runtime.SiteState(site_id=runtime.STATE.new_id(), path=f"bench.{case.shape}", kind="self", heads=case.H,
                               head_dim=case.D, configs=[HeadConfig(method=method, tile=tile,
                                                                    budget=Budget(density=case.density))] * case.H)
        runtime.STATE.sites[st.site_id] = st
        site, geom = torch.tensor([st.site_id]), [*grid, 0]
        return lambda: runtime.run_site(case.q, case.k, case.v, site, geom, None)

    return factory


try:  # `python -m benchmarks.attention --plugin benchmarks.whole_op` adds the whole-op row to that table
    from benchmarks.attention import register_row

    register_row("op vsa 4x4x4", op_row_factory())
except ImportError:  # pragma: no cover
    pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.whole_op", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.3b,14b")
    p.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.5")
    p.add_argument("--tile", default="4x4x4")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.whole_op needs a CUDA GPU")
    import triton

    tile = tuple(int(x) for x in a.tile.split("x"))
    rows = run(a.shapes.split(","), [float(x) for x in a.densities.split(",")], tile)
    date = datetime.datetime.now(datetime.timezone.utc)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python -m benchmarks.whole_op " + " ".join(argv or sys.argv[1:]),
            "date": date.strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
    out = Path(a.out or Path(__file__).parent / "results" / f"whole_op_{date.strftime('%Y%m%d_%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
