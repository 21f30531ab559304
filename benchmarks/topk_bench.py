"""GPU timing of the shipped row top-k kernel (`topk_indices`) against torch.topk, each checked exactly first."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

from benchmarks import write_result

#: (label, shape [B, H, nq, nk], k) - Wan-14B 720p and Wan-1.3B 480p at 4x4x4 tiles (75,600 / 32,760 tokens / 64).
CASES = [
    ("wan14b_720p_k60", (1, 40, 1182, 1182), 60),
    ("wan14b_720p_k128", (1, 40, 1182, 1182), 128),
    ("wan13b_480p_k26", (1, 12, 512, 512), math.ceil(0.05 * 512)),
    ("wan14b_720p_k237", (1, 40, 1182, 1182), 237),
    ("wan14b_161f_k116", (1, 40, 2307, 2307), 116),  # 161 frames: 147,600 tokens in 2,307 merged tiles
]
DEVICE = "cuda"


def _parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.topk_bench", description=__doc__)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/topk_<date>.json)")
    p.add_argument("--reps", type=int, default=50, help="timed calls per entry (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per entry")
    p.add_argument("--budget", type=float, default=55.0, help="seconds after which remaining entries are skipped")
    p.add_argument("--cases", default=",".join(c[0] for c in CASES), help="comma-separated case labels")
    return p.parse_args(argv)


def _stable_ref(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k].to(torch.int32)


def _check(out: torch.Tensor, s: torch.Tensor, ks: list[int], topk_idx: torch.Tensor) -> tuple[bool, str]:
    """(ok, note): exact equality with torch.topk, else with a stable sort (ties by lower index)."""
    k = max(ks)
    if out.shape != topk_idx.shape or out.dtype != torch.int32:
        return False, f"bad output {tuple(out.shape)} {out.dtype}"
    if torch.equal(out, topk_idx):
        return True, "== torch.topk"
    rows = (out != topk_idx).any(-1).sum().item()
    if torch.equal(out, _stable_ref(s, k)):
        return True, f"== stable sort; torch.topk differs by tie order in {rows} rows"
    return False, f"MISMATCH in {rows} rows vs torch.topk (and vs stable sort)"


def _time(fn, shape, reps: int, warmup: int, seed: int) -> float:
    """Median ms of `fn(scores)` over `reps` calls, each on fresh torch.randn scores (generation untimed)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    s = torch.empty(shape, device=DEVICE)
    times = []
    for r in range(warmup + reps):
        torch.randn(shape, device=DEVICE, generator=g, out=s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(s)
        b.record()
        b.synchronize()
        if r >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def _torch_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """What `select_from_scores` runs without the Triton kernel (one k for all heads)."""
    return torch.topk(s, k, dim=-1, sorted=True).indices.to(torch.int32).contiguous()


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("topk_bench: no CUDA device here; run it on a GPU machine (python -m benchmarks.topk_bench)",
              file=sys.stderr)
        return 2
    import triton

    from sparsify.kernels.tile_select import topk_indices

    t0 = time.time()
    date = time.strftime("%Y%m%d_%H%M%S")
    wanted = args.cases.split(",")
    rows = []

    def entry(case, name, fn, s, ks, topk_idx, shape):
        rec = {"case": case, "variant": name, "shape": list(shape), "k": ks[0]}
        rows.append(rec)
        if time.time() - t0 > args.budget:
            rec.update(status="skipped (time budget)")
            return rec
        try:
            ok, note = _check(fn(s), s, ks, topk_idx)
            rec.update(check=note)
            if not ok:
                rec.update(status="mismatch")
            else:
                rec.update(ms=_time(fn, shape, args.reps, args.warmup, 1), status="ok")
        except Exception as e:  # noqa: BLE001 - report and go on
            rec.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return rec

    for case, shape, k in CASES:
        if case not in wanted:
            continue
        ks = [k] * shape[1]
        torch.manual_seed(0)
        s = torch.randn(shape, device=DEVICE)
        topk_idx = _torch_topk(s, k)
        ours = entry(case, "topk_indices", lambda x, ks=ks: topk_indices(x, ks), s, ks, topk_idx, shape)
        ref = entry(case, "torch.topk", lambda x, k=k: _torch_topk(x, k), s, ks, topk_idx, shape)
        if "ms" in ours and "ms" in ref:
            ours["x_torch"] = ref["ms"] / ours["ms"]
        del s, topk_idx
        torch.cuda.empty_cache()

    print(f"{'case':20s} {'variant':14s} {'ms':>8s} {'x torch':>7s}  status / check")
    for r in rows:
        ms = f"{r['ms']:.4f}" if "ms" in r else "-"
        xt = f"{r['x_torch']:.2f}" if "x_torch" in r else "-"
        print(f"{r['case']:20s} {r['variant']:14s} {ms:>8s} {xt:>7s}  {r['status']}; {r.get('check', '')}")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.topk_bench", *sys.argv[1:]]),
            "date": date, "reps": args.reps, "warmup": args.warmup, "timing": "CUDA events per call, median; "
            "fresh torch.randn scores before every call (untimed)", "wall_s": round(time.time() - t0, 1),
            "x_torch": "torch.topk ms / topk_indices ms (higher: the kernel is faster)"}
    write_result({"meta": meta, "rows": rows}, args.out, "topk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
