"""Benchmarks: attention kernels (attention.py); results under results/, notes in NOTES.md."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def time_ms(fn, *, warmup_ms: float = 50.0, rep_ms: float = 200.0, min_reps: int = 10) -> float:
    """Median CUDA time of `fn()` in ms (`triton.testing.do_bench`, L2 flushed), over at least `min_reps` repeats.

    `do_bench` alone sizes its repeats as `rep_ms / estimate`: for a 15 ms function and `rep=20` that is one
    sample, taken right after a 256 MB cache flush and a short warm-up. This first times one call, then
    stretches the warm-up to at least two calls and the repeat window to at least `min_reps` calls.

    Example:
        >>> # t = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    """
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    return float(triton.testing.do_bench(fn, warmup=max(warmup_ms, 2 * est), rep=max(rep_ms, 1.1 * min_reps * est),
                                         return_mode="median"))


def alternated(calls: dict, rounds: int) -> tuple[dict, dict]:
    """Time each of `calls` (name -> zero-argument callable) once per round, in turn, for `rounds` rounds.

    Clock drift within a run then falls on every call alike. Returns `(times, medians)`: the `time_ms` of each
    round per name, and their median per name.

    Example:
        >>> # times, med = alternated({"a": fa, "b": fb}, 5); med["b"] / med["a"]
    """
    import statistics

    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_ms(fn))
    return times, {name: statistics.median(t) for name, t in times.items()}


def gpu_meta(module: str, argv) -> dict:
    """`{"gpu", "torch", "triton", "command"}` of a GPU benchmark run as `python -m benchmarks.<module> <argv>`.

    Example:
        >>> # write_result({**gpu_meta("l2_floor", argv), "rows": rows}, args.out, "l2_floor")
    """
    import sys

    import torch
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": f"python -m benchmarks.{module} " + " ".join(argv or sys.argv[1:])}


def write_result(result: dict, out: str | None, stem: str) -> Path:
    """Write a benchmark's `result` as JSON to `out`, default `benchmarks/results/<stem>_<date>.json`; print the path.

    Example:
        >>> # write_result({"rows": rows}, args.out, "e2e")  -> benchmarks/results/e2e_2026-12-03.json
    """
    path = Path(out or f"benchmarks/results/{stem}_{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path
