"""`python -m benchmarks.kernel --tiny`: the kernel benchmark's code paths on the CPU, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args, out):
    """Run `python -m benchmarks.<args>` from the repository root; return its JSON and its printed output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", *args, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(out).read_text()), p.stdout


@pytest.mark.slow
def test_forward_rows_match_flex_and_time_every_competitor(tmp_path):
    rec, printed = run_benchmark("benchmarks.kernel", "--tiny", "--densities", "25,50", "--op-methods", "vsa",
                                 out=tmp_path / "k.json")
    assert rec["command"].startswith("python -m benchmarks.kernel --tiny") and rec["torch"] and rec["date"]
    rows = {(r["density_pct"], r["method"]): r for r in rec["sparse"]}
    assert set(rows) == {(d, m) for d in (25, 50) for m in ("flex", "ours", "op vsa 4x4x4", "select vsa 4x4x4")}
    for d in (25, 50):
        ours = rows[(d, "ours")]
        assert ours["count"] == round(d / 100 * ours["n_kv_blocks"])
        assert ours["err_vs_flex"] is not None and ours["err_vs_flex"] < 1e-4  # same mask, same inputs
        assert rows[(d, "op vsa 4x4x4")]["err_vs_flex"] is None  # its own selection: no error against Flex
        assert all(r["ms"] > 0 for (dd, _), r in rows.items() if dd == d)
        assert ours["x_vs_flex"] == pytest.approx(rows[(d, "flex")]["ms"] / ours["ms"], rel=1e-2, abs=6e-4)  # 3 decimals
    assert "ours" in printed and "err vs Flex" in printed


@pytest.mark.slow
def test_backward_rows_match_the_masked_dense_gradients(tmp_path):
    rec, _ = run_benchmark("benchmarks.kernel", "--tiny", "--backward", "--densities", "50", out=tmp_path / "kb.json")
    assert rec["kind"] == "backward"
    by = {r["method"]: r for r in rec["sparse"]}
    assert {"flex_bwd", "flex_fwd_bwd", "ours_bwd", "ours_fwd_bwd", "ours_transpose", "ours_autograd_bwd"} <= set(by)
    assert by["ours_bwd"]["err_vs_flex"] < 1e-4 and by["ours_fwd_bwd"]["err_vs_flex"] < 1e-4


def test_unknown_shape_is_refused_with_the_known_ones():
    p = subprocess.run([sys.executable, "-m", "benchmarks.kernel", "--shapes", "wan2b"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode != 0 and "wan2b" in p.stderr and "wan14b" in p.stderr
