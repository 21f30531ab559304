"""`python -m benchmarks.op --tiny`: the whole-op benchmark's rows on the CPU, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args, out=None, ok=True):
    """Run `python -m benchmarks.<args>` from the repository root; return (its JSON or None, the process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-W", "ignore", "-m", *args] + (["--out", str(out)] if out else [])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return (json.loads(Path(out).read_text()) if out and ok else None), p


@pytest.mark.slow
def test_tile_and_svg2_rows(tmp_path):
    rec, p = run_benchmark("benchmarks.op", "--tiny", "--methods", "vsa,svg2", "--densities", "0.25",
                           out=tmp_path / "op.json")
    assert rec["command"] == "python -m benchmarks.op --tiny --methods vsa,svg2 --densities 0.25 --out " + str(
        tmp_path / "op.json")
    vsa, svg2 = rec["rows"]  # svg2 runs one cluster config at --tiny
    assert vsa["method"] == "vsa" and vsa["density"] == 0.25 and vsa["shape"] == "tiny" and vsa["tile"] == [4, 4, 4]
    for key in ("op_ms", "kernel_ms", "select_ms", "gather_ms", "inverse_ms", "kernel_scattering_ms", "cudnn_ms"):
        assert vsa[key] > 0, key
    assert vsa["op_speedup_vs_cudnn"] == pytest.approx(vsa["cudnn_ms"] / vsa["op_ms"])
    assert vsa["select_share_of_kernel"] == pytest.approx(vsa["select_ms"] / vsa["kernel_ms"])
    assert svg2["method"] == "svg2" and svg2["config"] == "svg2 (default clusters)"
    for key in ("op_ms", "select_ms", "select_torch_gather_ms", "assign_ms", "varlen_kernel_ms", "attend_ms",
                "fixed_block_kernel_ms", "score_and_select_torch_ms"):
        assert svg2[key] > 0, key
    assert svg2["select_over_varlen_kernel"] == pytest.approx(svg2["select_ms"] / svg2["varlen_kernel_ms"])
    assert 0.0 < svg2["density_exact"] <= svg2["density_tiles"] <= 1.0  # tiles round clusters up
    assert "svg2 (default clusters)" in p.stdout


@pytest.mark.slow
def test_ab_times_one_path_on_and_off_with_equal_outputs(tmp_path):
    rec, _ = run_benchmark("benchmarks.op", "--tiny", "--ab", "gather", "--rounds", "2", "--densities", "0.25",
                           out=tmp_path / "ab.json")
    (row,) = rec["rows"]
    assert row["switch"] == "gather" and len(row["ms"]["on"]) == len(row["ms"]["off"]) == 2
    assert row["on_over_off"] == pytest.approx(row["median_ms"]["on"] / row["median_ms"]["off"])
    assert row["max_abs_diff"] < 1e-4  # the PyTorch gather computes the same op


@pytest.mark.parametrize("switch", ["rope", "bogus"])
def test_ab_refuses_paths_the_op_does_not_run(switch):
    _, p = run_benchmark("benchmarks.op", "--tiny", "--ab", switch, ok=False)
    assert p.returncode != 0 and f"--ab '{switch}'" in p.stderr and "scatter" in p.stderr
