"""The Gluon Hopper kernel's variants against the plain Triton kernel at the Wan-14B shape, one process per variant.

    python -m benchmarks.hopper_variants [--variants pingpong/2,pingpong_persistent/2,coop/2] [--counts 30,59] [--out PATH]

B1 H40 S75600 D128 bf16, 128x128 blocks, `count` random distinct sorted key blocks of 591 per query block (30 = 5%,
59 = 10%). Each Gluon `variant/stages` of `sparsify.kernels.hopper` runs in its own child process with a timeout (an
mbarrier deadlock would otherwise hang the run) and is timed with `triton.testing.do_bench(warmup=200, rep=1000,
median)` next to the plain kernel (`block_sparse.py`'s `_launch`, its defaults), on the same inputs, with the
relative L2 difference of the two outputs. Correctness against the reference is `tests/gpu/test_hopper_gpu.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

SHAPE = (1, 40, 75600, 128)


def child(variant: str, stages: int, counts) -> list[dict]:
    import triton.testing

    from benchmarks.attention import random_selection
    from sparsify.kernels import hopper
    from sparsify.kernels.block_sparse import _launch

    B, H, S, D = SHAPE
    n = -(-S // 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    rows = []
    for count in counts:
        idx, cnt = random_selection(B, H, n, n, count, device="cuda", generator=gen)
        plain = lambda: _launch(q, k, v, idx, cnt, (128, 128), D ** -0.5, None)  # noqa: E731
        gl = lambda: hopper.block_sparse_attn_hopper(q, k, v, idx, cnt, D ** -0.5, variant=variant,  # noqa: E731
                                                     num_stages=stages)
        ref = plain().float()
        diff = float((gl().float() - ref).norm() / ref.norm())
        del ref
        t = {name: triton.testing.do_bench(fn, warmup=200, rep=1000, return_mode="median")
             for name, fn in (("plain", plain), ("gluon", gl))}
        rows.append({"variant": variant, "stages": stages, "count": count, "plain_ms": t["plain"],
                     "gluon_ms": t["gluon"], "speedup": t["plain"] / t["gluon"], "rel_l2_vs_plain": diff})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hopper_variants", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="pingpong/2,pingpong_persistent/2,coop/2")
    ap.add_argument("--counts", default="30,59")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    counts = [int(c) for c in a.counts.split(",")]
    if a.child:
        variant, stages = a.child.split("/")
        print(json.dumps(child(variant, int(stages), counts)))
        return []
    if not torch.cuda.is_available():
        sys.exit("benchmarks.hopper_variants needs a CUDA GPU")

    from benchmarks import gpu_meta, write_result

    rows = []
    for spec in a.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.hopper_variants", "--child", spec, "--counts", a.counts]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []
            if not got:
                print(f"{spec}: failed (rc {r.returncode}): {r.stderr.strip()[-500:]}", flush=True)
        except subprocess.TimeoutExpired:
            got = []
            print(f"{spec}: no result within {a.timeout:.0f} s (a deadlock?)", flush=True)
        for row in got:
            print(f"{spec:24s} count {row['count']:3d}: plain {row['plain_ms']:8.3f} ms  gluon {row['gluon_ms']:8.3f} ms"
                  f"  speedup {row['speedup']:.3f}  rel-L2 vs plain {row['rel_l2_vs_plain']:.1e}", flush=True)
        rows += got
    write_result({**gpu_meta("hopper_variants", argv), "rows": rows}, a.out, "hopper_variants")
    return rows


if __name__ == "__main__":
    main()
