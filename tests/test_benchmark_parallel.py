"""`python -m benchmarks.parallel --tiny`: Ulysses ranks' attention, dense and sparse, on the CPU in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.parallel", "--tiny", *args, "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_parallel_tiny_one_rank(tmp_path):
    out = tmp_path / "par.json"
    res = _run(out)
    assert res["command"] == f"python -m benchmarks.parallel --tiny --out {out}" and res["ranks"] == 1
    assert set(res["rows"]) == {"dense", "recipe order", "balanced"}
    for r in res["rows"].values():  # one rank: the slowest is the mean, and the measured balance is exact
        assert r["per_rank_ms"] == [r["slowest_ms"]] and r["measured_ratio"] == pytest.approx(1.0)
    assert sorted(res["balanced_order"]) == list(range(res["heads"]))


@pytest.mark.slow
def test_parallel_tiny_ranks_in_one_process(tmp_path):
    """`--ranks 2` without torchrun: both ranks' calls are timed in turn in one process."""
    res = _run(tmp_path / "par.json", "--ranks", "2")
    assert (res["ranks"], res["processes"]) == (2, 1)
    for r in res["rows"].values():
        assert len(r["per_rank_ms"]) == 2 and r["slowest_ms"] == max(r["per_rank_ms"])
    assert res["rows"]["recipe order"]["predicted_ratio"] > res["rows"]["balanced"]["predicted_ratio"]
