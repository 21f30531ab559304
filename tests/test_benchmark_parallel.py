"""`python -m benchmarks.parallel --tiny`: one Ulysses rank's attention, dense and sparse, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_parallel_tiny_one_rank(tmp_path):
    out = tmp_path / "par.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.parallel", "--tiny", "--out", str(out)],
                       cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"] == f"python -m benchmarks.parallel --tiny --out {out}" and res["ranks"] == 1
    assert set(res["rows"]) == {"dense", "recipe order", "balanced"}
    for r in res["rows"].values():  # one rank: the slowest is the mean, and the measured balance is exact
        assert r["per_rank_ms"] == [r["slowest_ms"]] and r["measured_ratio"] == pytest.approx(1.0)
    assert sorted(res["balanced_order"]) == list(range(res["heads"]))
