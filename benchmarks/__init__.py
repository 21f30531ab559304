"""Benchmarks: attention kernels (attention.py); results under results/, notes in NOTES.md."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


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
