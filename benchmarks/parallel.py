"""Ulysses benchmark: each rank's attention (dense and sparse, without and with head balancing) at the Wan-14B shape.

    torchrun --nproc_per_node=P -m benchmarks.parallel [--tiny] [--densities 0.025,0.2] [--tile 4x4x4]
    python -m benchmarks.parallel [--ranks P] # one process (one GPU, or CPU with --tiny): the P ranks' calls in turn

After the Ulysses all-to-all each rank attends over the whole sequence for H/P heads. Per rank this times that
call: dense SDPA, and `torch.ops.sparsify.sparse_attention` under a head shard with a recipe whose per-head
densities are spread log-uniformly over `--densities` (seeded, the same on every rank), with heads in recipe order
and with the balanced order of `sparsify.parallel.assign_heads`. It prints one table (the slowest rank, the mean,
the measured balance ratio slowest / mean, and the ratio the cost model predicts) on rank 0 and writes
benchmarks/results/parallel_<date>_p<P>.json. The default shape is Wan-14B 720p (S = 75,600, 40 heads, D 128,
bf16, CUDA: ranks use `cuda:<local rank>`); `--tiny` is a CPU/gloo shape (8 heads, 8x16x16 tokens, fp32). The
all-to-all itself is not timed (it is the same dense or sparse).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {"14b": ("Wan-14B 720p", 40, 128, (21, 45, 80)), "tiny": ("tiny (CPU)", 8, 32, (8, 16, 16))}


def densities(H: int, lo: float, hi: float, seed: int = 0) -> list[float]:
    """Per-head densities spread log-uniformly over `[lo, hi]` (both ends present), seeded.

    Example:
        >>> d = densities(8, 0.025, 0.2); (min(d), max(d), len(d))
        (0.025, 0.2, 8)
    """
    g = torch.Generator().manual_seed(seed)
    d = (lo * (hi / lo) ** torch.rand(H, generator=g, dtype=torch.float64)).tolist()
    d[0], d[-1] = lo, hi
    return d


def _timer(device):
    if device.type == "cuda":
        from benchmarks._common import time_ms

        return time_ms

    def cpu_ms(fn, reps: int = 3) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]

    return cpu_ms


def run(shape: str, lo: float, hi: float, tile, ranks: int = 1) -> dict:
    """Time each Ulysses rank's attention call: this process's rank under torchrun, else `ranks` ranks one after
    another in this one process (one GPU)."""
    from sparsify import runtime
    from sparsify.parallel import assign_heads, balance_ratio, head_costs, head_shard
    from sparsify.recipe import Budget, HeadConfig

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, ranks)
    name, H, D, grid = SHAPES[shape]
    if H % world:
        raise SystemExit(f"benchmarks.parallel: {H} heads do not split over {world} ranks")
    cuda = torch.cuda.is_available() and shape != "tiny"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    S = math.prod(grid)
    dens = densities(H, lo, hi)
    configs = [HeadConfig(tile=tile, budget=Budget(density=d)) for d in dens]
    costs = head_costs(configs, grid)
    balanced = [h for b in assign_heads(costs, world) for h in b]
    orders = {"recipe order": list(range(H)), "balanced": balanced}
    Hl = H // world
    ms = _timer(device)

    def rank_times(r: int) -> dict:
        g = torch.Generator(device=device).manual_seed(1234 + r)
        q, k, v = (torch.randn(1, Hl, S, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        times = {"dense": ms(lambda: runtime.dense_attention(q, k, v))}
        for label, order in orders.items():
            st = runtime.SiteState(site_id=runtime.STATE.new_id(), path=f"bench.parallel.{label}", kind="self",
                                   heads=H, head_dim=D, configs=[configs[h] for h in order])
            runtime.STATE.sites[st.site_id] = st
            site = torch.tensor([st.site_id])
            try:
                with head_shard(r, world):
                    times[label] = ms(lambda: torch.ops.sparsify.sparse_attention(q, k, v, site, [*grid, 0], None))
            finally:
                runtime.STATE.sites.pop(st.site_id, None)
        return times

    if dist.is_initialized():
        every = [None] * world
        dist.all_gather_object(every, rank_times(rank))
    else:
        every = [rank_times(r) for r in range(world)]
    rows = {}
    for label in ["dense", *orders]:
        per_rank = [t[label] for t in every]
        mean = sum(per_rank) / world
        predicted = 1.0 if label == "dense" else balance_ratio(costs, world, orders[label])
        rows[label] = {"per_rank_ms": per_rank, "slowest_ms": max(per_rank), "mean_ms": mean,
                       "measured_ratio": max(per_rank) / mean, "predicted_ratio": predicted}
    return {"shape": name, "S": S, "heads": H, "head_dim": D, "grid": list(grid), "ranks": world,
            "processes": world if dist.is_initialized() else 1,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
            "tile": list(tile), "densities": dens, "balanced_order": balanced, "rows": rows,
            "versions": {"torch": torch.__version__}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU shape (8 heads, 8x16x16 tokens, fp32)")
    p.add_argument("--densities", default="0.025,0.2", help="lowest,highest per-head density (log-uniform between)")
    p.add_argument("--tile", default="4x4x4")
    p.add_argument("--ranks", type=int, default=1,
                   help="without torchrun: time each of this many Ulysses ranks' calls one after another here")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lo, hi = (float(x) for x in a.densities.split(","))
    tile = tuple(int(x) for x in a.tile.split("x"))
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and a.ranks != 1:
        raise SystemExit("benchmarks.parallel: --ranks is for one process; under torchrun the ranks are its processes")
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and not a.tiny else "gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        res = run("tiny" if a.tiny else "14b", lo, hi, tile, a.ranks)
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank:
        return res
    print(f"{res['shape']}: S={res['S']} H={res['heads']} D={res['head_dim']}, {res['ranks']} rank(s), "
          f"{res['device']} {res['dtype']}, tile {a.tile}, per-head density {lo:g}..{hi:g}")
    print(f"{'attention':<14} {'slowest ms':>11} {'mean ms':>9} {'slowest/mean':>13} {'cost model':>11}  per rank ms")
    for label, r in res["rows"].items():
        print(f"{label:<14} {r['slowest_ms']:>11.2f} {r['mean_ms']:>9.2f} {r['measured_ratio']:>13.3f} "
              f"{r['predicted_ratio']:>11.3f}  " + " ".join(f"{t:.2f}" for t in r["per_rank_ms"]))
    from benchmarks._common import run_header, write_result

    date = datetime.datetime.now(datetime.timezone.utc)
    out = a.out or Path(__file__).parent / "results" / (
        f"parallel_{date.strftime('%Y%m%d_%H%M')}_p{res['ranks']}{'_tiny' if a.tiny else ''}.json")
    write_result({**run_header("parallel", argv), **res}, out, "parallel")
    return res


if __name__ == "__main__":
    main()
