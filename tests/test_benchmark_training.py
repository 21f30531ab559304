"""`python -m benchmarks.training --tiny`: dense and VSA training from scratch, 3 steps each on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_training_tiny_compares_dense_and_vsa(tmp_path):
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.training", "--tiny", "--results",
                        str(tmp_path), "--work", str(tmp_path / "work"), "--tag", "t"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "training_t.json").read_text())
    assert (tmp_path / "training_t.png").stat().st_size > 0
    assert res["steps"] == 3 and res["command"].startswith("python -m benchmarks.training --tiny")
    dense, vsa = res["comparison"]["dense"], res["comparison"]["vsa"]
    assert dense["steps_done"] == vsa["steps_done"] == 3
    assert dense["attn_fwd_fraction_final"] == pytest.approx(1.0)
    assert vsa["attn_fwd_fraction_final"] < 1.0  # the VSA run computed less attention than dense
    rel = res["comparison"]["relative_vsa_vs_dense"]["heldout_ema"]
    assert rel == pytest.approx(vsa["heldout_ema"] / dense["heldout_ema"] - 1.0)
