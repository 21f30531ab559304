"""A/B of the whole op with one fast path on and off: by default the inverse layout fused into the kernel's store
against a separate inverse pass.

    python -m benchmarks.scatter_ab [--shape 14b] [--densities 0.05,0.1] [--rounds 5] [--method vsa]
                                    [--switch scatter|hopper|direct] [--out PATH]

Times `runtime.run_site` (gather, selection, kernel, inverse layout) with `FAST[switch]` on and off, alternating for
`--rounds` rounds (`benchmarks.alternated`) on the same inputs, with dense cuDNN timed in the same process.
`--switch scatter` (default): on = the kernel stores each row to its token, off = slot order, then `gather_rows`
through the inverse permutation. `--switch hopper`: on = the Gluon kernels (sm_90), off = the plain Triton kernel.
`--switch direct`: on = the kernel reads q, k, v in token order (`sparsify.kernels.direct`), off = tile-order copies.
Prints the medians and writes a JSON.
"""

from __future__ import annotations

import argparse
import sys

import torch

# FAST switch -> (on, off) labels
NAMES = {"scatter": ("fused", "separate"), "hopper": ("gluon", "plain"), "direct": ("direct", "tiled")}


def run(shape: str, densities, rounds: int, method: str = "vsa", tile=(4, 4, 4), switch: str = "scatter") -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks import alternated, time_ms
    from benchmarks.whole_op import SHAPES, bench_site
    from sparsify import runtime
    from sparsify.kernels.gather import FAST

    name, H, grid = SHAPES[shape]
    S, D = grid[0] * grid[1] * grid[2], 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        t_cudnn = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows = []
    for d in densities:
        st = bench_site(f"scatter_ab.{shape}", method, tile, d, H, D)
        site, geom = torch.tensor([st.site_id]), [*grid, 0]

        def op(on: bool):
            FAST[switch] = on
            try:
                return runtime.run_site(q, k, v, site, geom, None)
            finally:
                FAST[switch] = True

        a, b = op(True), op(False)
        same = float((a.float() - b.float()).abs().max())
        on, off = NAMES[switch]
        times, med = alternated({on: lambda: op(True), off: lambda: op(False)}, rounds)
        runtime.STATE.sites.pop(st.site_id)
        rows.append({"shape": name, "method": method, "density": d, "switch": switch, "cudnn_ms": t_cudnn,
                     "ms": times, "median_ms": med, "max_abs_diff": same,
                     "x_vs_cudnn": {k_: t_cudnn / t for k_, t in med.items()}})
        print(f"{name} {method} d={d:<5g} cuDNN {t_cudnn:7.2f} ms | op {on} {med[on]:7.3f} ms "
              f"({t_cudnn / med[on]:5.2f}x)  {off} {med[off]:7.3f} ms ({t_cudnn / med[off]:5.2f}x)"
              f"  {on}/{off} {med[on] / med[off]:.3f}  max |diff| {same:.1e}  (rounds: {on} "
              f"{['%.2f' % t for t in times[on]]}, {off} {['%.2f' % t for t in times[off]]})", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    from benchmarks import gpu_meta, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.scatter_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="14b", choices=("1.3b", "14b"))
    ap.add_argument("--densities", default="0.05,0.1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--method", default="vsa")
    ap.add_argument("--switch", default="scatter", choices=sorted(NAMES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.scatter_ab needs a CUDA GPU")
    rows = run(a.shape, [float(x) for x in a.densities.split(",")], a.rounds, a.method, switch=a.switch)
    write_result({**gpu_meta("scatter_ab", argv), "rows": rows}, a.out, "scatter_ab")
    return rows


if __name__ == "__main__":
    main()
