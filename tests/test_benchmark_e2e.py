"""The end-to-end benchmark's code paths at toy sizes on the CPU (its GPU numbers are in RESULTS.md)."""

import json

import pytest

pytest.importorskip("diffusers")


def test_e2e_tiny_runs_every_path(tmp_path):
    from benchmarks.e2e import main

    out = tmp_path / "e2e.json"
    assert main(["--tiny", "--frames", "81", "--densities", "0.5", "--pipeline-steps", "2", "--reps", "1",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
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
