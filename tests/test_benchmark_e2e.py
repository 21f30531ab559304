"""`python -m benchmarks.e2e --tiny`: the end-to-end benchmark's code paths at toy sizes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_e2e_tiny_runs_every_path(tmp_path):
    out = tmp_path / "e2e.json"
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.e2e", "--tiny", "--frames", "81",
                        "--densities", "0.5", "--pipeline-steps", "2", "--reps", "1", "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"].startswith("python -m benchmarks.e2e --tiny") and res["diffusers"]
    (fwd,) = res["per_forward"]
    labels = [r["label"] for r in fwd["rows"]]
    assert labels == ["dense (cuDNN)", "vsa 0.5"]
    sparse = fwd["rows"][1]
    assert 0.0 < sparse["achieved_density"] < 1.0  # the sites really ran sparse
    # the ceiling is the Amdahl formula on the same run's numbers (no timing is asserted: toy CPU sizes are noise)
    dense, n, t = fwd["rows"][0]["forward_ms"], fwd["blocks"], sparse["attention_dense_ms"]
    assert sparse["ceiling"] == pytest.approx(dense / (dense - n * t + 0.5 * n * t))
    assert fwd["rows"][0]["ceiling"] == pytest.approx(1.0)
    gen = res["per_generation"]
    by = {r["label"]: r for r in gen["rows"]}
    assert by["vsa 0.5"]["selections"] == 2 * 2 * 2  # 2 steps x 2 CFG calls x 2 blocks
    assert by["vsa 0.5 + mask reuse"]["reused"] + by["vsa 0.5 + mask reuse"]["selections"] == 8
