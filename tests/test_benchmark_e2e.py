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


@pytest.mark.slow
def test_e2e_generation_tiny_composes_and_validates(tmp_path):
    from benchmarks.e2e_generation import Components, compose, step_densities
    from sparsify.generation import StepPlan
    from sparsify.generation.plan import plan_from_dict

    out = tmp_path / "gen.json"
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.e2e", "--generation", "--tiny", "--reps", "1",
                        "--validate-steps", "4", "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "K at plan time" in p.stdout and "measured ms" in p.stdout
    g = json.loads(out.read_text())["generation_plan"]
    rows = {r["label"]: r for r in g["rows"]}
    assert list(rows) == ["dense (cuDNN)", "attention only", "unified plan"]
    assert (g["steps"], g["blocks_composed"], g["cfg_calls_per_step"]) == (50, 40, 2)
    c = g["components"]
    comp = Components(c["outside_dense_ms"], c["outside_sparse_ms"],
                      {(b["density"], b["ratio"]): b["ms"] for b in c["block_ms"]}, c["reuse_ms"], c["extrapolate_ms"])
    dens = [g["block_densities"][b * len(g["block_densities"]) // 40] for b in range(40)]
    density = step_densities(dens, 0)
    # the rows are the composition of the JSON's own components; a plan computing every step, merging nothing,
    # composes to the attention-only row exactly
    full = plan_from_dict(g["plan_composed"])
    assert compose(full, density, comp) == pytest.approx(rows["unified plan"]["composed_ms"], rel=1e-12)
    trivial = StepPlan(full.model, 40, 50, (True,) * 50)
    assert compose(trivial, density, comp) == rows["attention only"]["composed_ms"]
    assert compose(trivial, lambda b, s: 1.0, comp) == rows["dense (cuDNN)"]["composed_ms"]
    assert rows["unified plan"]["computed_steps"] == sum(full.compute) < 50  # the tiny plan reuses steps
    assert any(full.order) and c["extrapolate_ms"] > 0  # and extrapolates some: that reused step was timed too
    with pytest.raises(ValueError, match="extrapolates"):
        compose(full, density, Components(*list(vars(comp).values())[:4]))
    # the validation: real 4-step generations with CFG, a ratio per row; no GPU, no peak memory
    val = {v["label"]: v for v in g["validation"]}
    assert list(val) == list(rows)
    for v in val.values():
        assert v["calls"] == 8 and v["measured_over_composed"] == pytest.approx(v["measured_ms"] / v["composed_ms"])
        assert v["measured_over_composed"] > 0 and v["peak_gib"] is None
    assert g["peak_plan_over_dense"] is None and g["peak_plan_over_dense_full_depth"] is None
    # each cache hook really ran both kinds of call (the forced schedules skip), and its rows are composed
    assert [h["label"] for h in g["hooks"]] == ["attention + fbc", "attention + mag", "attention + taylorseer"]
    for h in g["hooks"]:
        assert h["computed_calls"] > 0 and h["skipped_calls"] > 0 and h["computed_calls"] + h["skipped_calls"] == 8
        k = h["computed_steps"]
        assert h["composed_ms"] == pytest.approx(2 * (k * h["computed_call_ms"] + (50 - k) * h["skipped_call_ms"]))
