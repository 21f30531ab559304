"""`python -m benchmarks.quality selection|video|inputs --tiny`: the quality benchmarks' code paths on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args, out):
    """Run `python -m benchmarks.<args>` from the repository root; return its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", *args, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_selection_tiny_no_tile_method_beats_the_oracle(tmp_path):
    rec = run_benchmark("benchmarks.quality", "selection", "--tiny", out=tmp_path / "sel.json")
    assert rec["benchmark"] == "quality selection" and rec["densities"] == [0.1]
    assert rec["reference_check_max_abs"] < 1e-4  # the one-pass outputs agree with tiled_sparse_attention
    methods = rec["sets"]["random"]["methods"]
    assert {"oracle", "vsa", "veda", "veda-fit", "xattention", "svg2", "svg2-fine"} <= set(methods)
    oracle = methods["oracle"]["0.1"]["recall_per_head"]
    for m in ("vsa", "veda", "veda-exact", "veda-fit", "xattention"):  # same tile count as the oracle
        rec_m = methods[m]["0.1"]["recall_per_head"]
        assert all(r <= o + 1e-9 for r, o in zip(rec_m, oracle)), m
        assert 0.0 < methods[m]["0.1"]["err"] and math.isfinite(methods[m]["0.1"]["err"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_video_tiny_rows_for_every_method_and_the_calibrated_recipe(tmp_path, dtype):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("diffusers")
    rec = run_benchmark("benchmarks.quality", "video", "--tiny", "--dtype", dtype, out=tmp_path / "vid.json")
    assert rec["benchmark"] == "quality video" and rec["steps"] == 2 and rec["guidance_scale"] == 5.0
    assert rec["dtype"] == dtype
    assert [r["method"] for r in rec["rows"]] == ["vsa", "veda", "xattention", "svg2", "calibrated",
                                                  "calibrated + schedule", "vsa + schedule"]
    for r in rec["rows"]:
        assert math.isfinite(r["psnr_db"]) and -1.0 <= r["ssim"] < 1.0  # sparse sampling differs from dense
        assert len(r["step_error"]) == 3 and r["step_error"][0] == 0.0 < r["step_error"][-1]  # same noise at step 0
        assert r["attention_speedup"] is None  # no CUDA: no kernel times
    tk = {r["method"]: r for r in rec["rows"]}
    assert tk["vsa"]["density_achieved"] == tk["calibrated"]["density_target"] == 0.5
    assert 0.0 < tk["xattention"]["top_p"] < 1.0
    assert rec["calibration"]["inputs"].startswith("dense sampling trajectory")
    assert rec["calibration"]["schedule_search"] == {"seed": 100, "tolerance": 0.01, "fractions": [0.5],
                                                     "scales": [1.5]}
    for name in ("calibrated", "vsa"):
        r, search = tk[f"{name} + schedule"], tk[f"{name} + schedule"]["schedule_search"]
        # --tiny: one candidate, the first of 2 steps at 1.5x the density and the second at 0.5x
        assert search["steps"] == 2 and [(t["first_steps"], t["scale"], t["rest_scale"]) for t in search["tried"]] \
            == [(1, 1.5, 0.5)]
        assert 0 < search["error"] <= search["error_flat"] and search["density"] <= search["density_flat"] * 1.01
        assert r["schedule"] in ([], [[0, 1.5], [1, 0.5]]) and (r["schedule"] == []) == (search["error"] ==
                                                                                        search["error_flat"])
        if not r["schedule"]:  # flat chosen: the held-out run is the unscheduled recipe's
            assert r["psnr_db"] == tk[name]["psnr_db"] and r["density_achieved"] == tk[name]["density_achieved"]
    # VSA at 0.5 keeps 4 of 8 key tiles flat; scheduled, 6 then 2: the same work
    assert tk["vsa + schedule"]["schedule_search"]["tried"][0]["density"] == tk["vsa + schedule"]["density_achieved"] \
        == 0.5
    assert (tmp_path / "vid.pareto.png").exists() and (tmp_path / "vid.steps.png").exists()


@pytest.mark.slow
def test_video_without_vsa_leaves_out_the_vsa_schedule_row(tmp_path):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("diffusers")
    rec = run_benchmark("benchmarks.quality", "video", "--tiny", "--methods", "veda", "--no-plots",
                        out=tmp_path / "vid.json")
    assert [r["method"] for r in rec["rows"]] == ["veda", "calibrated", "calibrated + schedule"]


@pytest.mark.slow
def test_reuse_tiny_reports_psnr_ssim_and_reuse(tmp_path):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("diffusers")
    rec = run_benchmark("benchmarks.quality", "reuse", "--tiny", out=tmp_path / "reuse.json")
    assert rec["benchmark"] == "quality reuse" and rec["steps"] == 2
    labels = [r["recipe"] for r in rec["rows"]]
    assert labels == ["uniform 4x4x4", "calibrated", "calibrated + mask reuse"]
    for r in rec["rows"]:
        assert math.isfinite(r["psnr_db"]) and -1.0 <= r["ssim"] < 1.0  # sparse sampling differs from dense
    reuse = rec["rows"][-1]
    assert reuse["selections"] + reuse["reused"] > 0 and len(reuse["step_error_fresh"]) == 3  # 2 steps + output


@pytest.mark.slow
def test_inputs_tiny_compares_trajectory_and_random_calibration(tmp_path):
    pytest.importorskip("torchmetrics")
    rec = run_benchmark("benchmarks.quality", "inputs", "--tiny", "--workdir", str(tmp_path), out=tmp_path / "in.json")
    assert rec["benchmark"] == "quality inputs" and [r["calibrated_on"] for r in rec["rows"]] == ["trajectory", "random"]
    for r in rec["rows"]:
        assert "--inputs-from " + r["calibrated_on"] in r["command"] and "--inputs 2" in r["command"]
        assert 0 < r["output_rel_l2_on_trajectory"] and 0 < r["output_rel_l2_on_random"]
        assert len(r["psnr_db"]) == 1 and math.isfinite(r["psnr_db"][0])
    for source in ("trajectory", "random"):
        assert (tmp_path / f"inputs_{source}.yaml").exists()
    assert rec["calibration_seeds"] == [0, 1] and rec["classes"]["trajectory"] == [0, 1]  # seed % 8
    assert rec["classes"]["evaluation"] == [100 % 8] and 1 <= len(rec["classes"]["random"]) <= 2


@pytest.mark.slow
def test_plan_tiny_rows_at_the_plans_predicted_time(tmp_path):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("diffusers")
    pytest.importorskip("pulp")
    rec = run_benchmark("benchmarks.quality", "plan", "--tiny", "--workdir", str(tmp_path), out=tmp_path / "plan.json")
    rows = {r["label"]: r for r in rec["rows"]}
    assert list(rows) == ["dense", "unified plan", "USV entropy plan", "attention recipe", "attention + FirstBlockCache",
                          "attention + MagCache", "attention + TaylorSeer"]
    plan, usv, dense = rows["unified plan"], rows["USV entropy plan"], rows["dense"]
    # the per-call ledger counts what the plan computed as the calibration's time model predicts it
    assert plan["predicted_ms"] == pytest.approx(plan["predicted_calibration"]["predicted_ms"], rel=1e-6)
    assert dense["predicted_ms"] == pytest.approx(plan["predicted_calibration"]["dense_ms"], rel=1e-6)
    for r in (plan, usv):
        assert r["predicted_fraction"] <= r["predicted_calibration"]["time_budget"] * (1 + 1e-6)
    assert plan["predicted_calibration"]["time_budget"] == rec["time_budget"] and plan["full_calls"] < plan["calls"]
    for r in rows.values():
        assert len(r["step_error"]) == rec["steps"] + 1 and r["step_error"][0] == 0.0  # same noise
        assert r["final_error"] == r["step_error"][-1] and 0 < r["full_calls"] <= r["calls"]
        assert (r["final_error"] > 0) == math.isfinite(r["psnr_db"]) and -1.0 <= r["ssim"] <= 1.0
        assert r["measured_ms"] > 0 and len(r["predicted_ms_per_video"]) == rec["videos"]
    hooks = [r for r in rows.values() if r["kind"] == "hook"]
    for r in hooks:
        t = r["tuning"]
        assert t["value"] in dict(t["tried"])
        matched = abs(t["calibration_predicted_ms"] / plan["predicted_ms"] - 1) <= rec["time_tolerance"]
        assert t["matched"] == matched
    matched = [r for r in hooks if r["tuning"]["matched"]]
    m = rec["margins"]
    if matched:
        best = max(matched, key=lambda r: r["psnr_db"])
        assert m["best_hook"] == best["label"]
        assert m["plan_minus_best_hook_db"] == pytest.approx(plan["psnr_db"] - best["psnr_db"])
    assert m["plan_minus_usv_db"] == plan["psnr_db"] - usv["psnr_db"]
    assert (tmp_path / "plan_unified.yaml").exists() and (tmp_path / "latency_table.json").exists()
    # the written plans load back: a second run evaluates them without calibrating
    again = run_benchmark("benchmarks.quality", "plan", "--tiny", "--hooks", "mag", "--workdir", str(tmp_path),
                          "--plans", f"unified={tmp_path / 'plan_unified.yaml'},usv={tmp_path / 'plan_usv.yaml'}",
                          "--latency-table", str(tmp_path / "latency_table.json"), out=tmp_path / "again.json")
    assert again["plans"] == {"unified": "given", "usv": "given", "attention": "attention part of unified"}
    assert again["rows"][1]["predicted_ms"] == pytest.approx(plan["predicted_ms"])
    # --dtype builds the model in that precision, and a latency table of another precision is refused
    assert rec["dtype"] == "float32"
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.quality", "plan", "--tiny", "--hooks", "",
                        "--dtype", "bfloat16", "--latency-table", str(tmp_path / "latency_table.json"),
                        "--workdir", str(tmp_path), "--out", str(tmp_path / "bf16.json")],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "dtype: table float32, model bfloat16" in p.stderr, p.stderr[-2000:]
    assert rec["merge_ratios"] == [0.25, 0.5]
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "benchmarks.quality", "plan", "--tiny", "--merge-ratios",
                        "0.25,0.7", "--workdir", str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--merge-ratios: each must be in [0, 0.5]" in p.stderr, p.stderr[-2000:]


def test_hook_costs_price_a_skipped_call_at_its_measured_share_of_a_dense_call():
    pytest.importorskip("diffusers")
    from benchmarks.quality_plan import hook_skip_shares
    from sparsify.calibrate.latency import ModelShape, load_latency_table

    res = ROOT / "benchmarks" / "results"
    wan = load_latency_table(res / "latency_table_wan14b_720p_20261208_h100.json")
    testbed = ModelShape("WanTransformer3DModel", 12, 8, 32, (16, 32, 32), 16384, 1, "bfloat16")
    e2e = res / "e2e_generation_20261208_h100.json"
    part = json.loads(e2e.read_text())["generation_plan"]
    dense_call = part["rows"][0]["composed_ms"] / 100  # 50 steps x 2 guidance calls
    shares = hook_skip_shares(e2e, wan.carried_to(testbed))  # the shape it was carried from counts
    taylor = next(h for h in part["hooks"] if h["label"] == "attention + taylorseer")
    assert set(shares) == {"fbc", "mag", "taylorseer"}
    assert shares["taylorseer"] == pytest.approx(taylor["skipped_call_ms"] / dense_call)
    assert 0.05 < shares["taylorseer"] < 0.3 and shares["mag"] < 0.01  # MagCache skips all but the time outside
    with pytest.raises(SystemExit, match="grid 21x45x80, the latency table at 16x32x32"):
        hook_skip_shares(e2e, load_latency_table(res / "latency_table_testbed16k_20261207_h100.json"))
    with pytest.raises(SystemExit, match="not the JSON of"):
        hook_skip_shares(res / "latency_table_testbed16k_20261207_h100.json", wan)
