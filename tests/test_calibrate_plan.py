"""One allocation: latency tables, the plan ILP over reuse/merging/heads, USV's entropy baseline, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("pulp")

from sparsify import load_recipe  # noqa: E402
from sparsify.calibrate.allocate import (InfeasibleTimeBudgetError, PlanChoice, PlanProblem, fastest_plan,  # noqa: E402
                                         predict_error, predict_time, solve_plan, usv_entropy_plan)
from sparsify.errors import LatencyTableError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(steps=8, reuse=None, merge_err=5.0, head_err=(0.0, 0.2), age=2):
    """One block of two heads; reusing a step costs only the outside time (1 ms of a 10 ms forward)."""
    reuse = np.full((steps, age), 1.0) if reuse is None else np.asarray(reuse, float)
    reuse[:1] = np.nan
    if age > 1:
        reuse[1, 1:] = np.nan
    return PlanProblem(
        head_error=np.array([head_err, head_err]), head_saving=np.array([[0.0, 1.5], [0.0, 1.5]]),
        head_block=np.array([0, 0]), reuse_error=reuse,
        merge_error=np.stack([np.zeros(steps), np.full(steps, merge_err)], axis=1)[None],
        groups=((0,),), ratios=(0.0, 0.5), ranges=((0, steps),), block_ms=np.array([9.0, 6.0]),
        kappa=np.array([1.0, 0.4]), outside_ms=1.0, blocks=1, calls=2)


def test_the_ilp_reuses_the_cheap_low_error_steps():
    reuse = np.full((8, 2), 1.0)
    reuse[[3, 6], 0] = 0.001  # reusing steps 3 and 6 (age 1) costs almost nothing
    p = problem(reuse=reuse)
    c = solve_plan(p, 0.8)  # two steps reused (10 ms -> 1 ms per call): 124 ms of 160; the heads stay dense
    assert c.compute.tolist() == [True, True, True, False, True, True, False, True]
    assert c.heads.tolist() == [0, 0] and c.merge.tolist() == [[0]]
    assert predict_time(p, c) <= 0.8 * p.dense_ms
    assert predict_error(p, c)["total"] == pytest.approx(0.002)


def test_the_ilp_takes_sparse_heads_when_reuse_is_costly():
    p = problem(reuse=np.full((8, 2), 50.0), head_err=(0.0, 0.01))
    c = solve_plan(p, 0.75)  # both heads sparse save 3 of 10 ms per call: 0.7 x dense, no reuse, no merging
    assert c.heads.tolist() == [1, 1] and c.compute.all() and c.merge.tolist() == [[0]]


def test_ilp_time_and_error_match_the_predictors_and_beat_usv():
    rng = np.random.default_rng(0)
    p = problem(reuse=rng.uniform(0.01, 1.0, (8, 2)), merge_err=0.05, head_err=(0.0, 0.05))
    p.merge_error[0, :, 1] = rng.uniform(0.0, 0.1, 8)
    for budget in (0.9, 0.75, 0.6):  # USV (no reuse) reaches 0.58 x dense at most
        c = solve_plan(p, budget, gap_rel=0.0)
        assert predict_time(p, c) <= budget * p.dense_ms + 1e-9
        usv = usv_entropy_plan(p, np.full((1, 8), 0.3), np.array([1.0, 0.1]), budget)
        assert predict_error(p, c)["total"] <= predict_error(p, usv)["total"] + 1e-9


def test_a_budget_no_plan_meets_is_refused_with_the_fastest_time():
    p = problem()
    fastest = predict_time(p, fastest_plan(p)) / p.dense_ms
    with pytest.raises(InfeasibleTimeBudgetError) as e:
        solve_plan(p, fastest * 0.9)
    assert e.value.fastest == pytest.approx(fastest)
    assert f"fastest plan is {fastest:.4g} x dense" in str(e.value)
    with pytest.raises(InfeasibleTimeBudgetError, match="fastest usv-entropy plan"):
        usv_entropy_plan(p, np.full((1, 8), 0.3), np.array([1.0, 0.1]), fastest * 0.9)


def test_reuse_runs_respect_the_max_age():
    reuse = np.full((8, 2), 0.001)
    p = problem(reuse=reuse)
    fastest = predict_time(p, fastest_plan(p)) / p.dense_ms
    c = solve_plan(p, fastest * 1.001)
    ages, last = [], 0
    for s, u in enumerate(c.compute):
        last = s if u else last
        ages.append(s - last)
    assert max(ages) <= 2 and c.compute[0] and fastest < 0.5


# -- latency tables ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from sparsify.adapters import adapter_for
    from sparsify.calibrate.latency import measure_latency_table
    from sparsify.testing.dits import tiny_wan

    torch.set_num_threads(1)
    m = tiny_wan(layers=2, heads=2, head_dim=16)
    x = adapter_for(m).example_inputs(m, grid=(4, 8, 8))
    table = measure_latency_table(m, x, densities=(0.25,), ratios=(0.25, 0.5))
    return m, x, table


def test_latency_table_round_trip(tiny, tmp_path):
    from sparsify.calibrate.latency import load_latency_table

    _, _, table = tiny
    assert set(table.block_ms) == {0.0, 0.25, 0.5} and set(table.attention_ms) == {(4, 4, 4)}
    assert all(v > 0 for v in (table.forward_ms, *table.block_ms.values(), *table.dense_attention_ms.values()))
    back = load_latency_table(table.save(tmp_path / "t.json"))
    assert back.to_dict() == table.to_dict() and back.meta["file"] == str(tmp_path / "t.json")
    assert back.attention_call_ms((4, 4, 4), 1.0) == pytest.approx(table.dense_attention_ms[0.0])


def test_latency_table_refuses_merging_where_the_tile_does_not_divide_the_grid(tiny):
    from sparsify.adapters import adapter_for
    from sparsify.calibrate.latency import measure_latency_table

    m, _, _ = tiny
    x = adapter_for(m).example_inputs(m, grid=(3, 8, 8))  # 3 frames: 4x4x4 tiles do not divide it
    with pytest.raises(ValueError, match=r"grid 3x8x8 divisible by the merge tile 4x4x4.*--merge-ratios 0"):
        measure_latency_table(m, x, densities=(0.25,), ratios=(0.25,))
    table = measure_latency_table(m, x, densities=(0.25,), ratios=(0.0,))
    assert set(table.block_ms) == {0.0}


def test_a_long_forward_is_repeated_only_as_often_as_fits(tiny, monkeypatch):
    from sparsify.calibrate import latency

    m, x, table = tiny
    assert (table.meta["forward_warmup"], table.meta["forward_reps"]) == (0, 1)  # the CPU default, it fits
    monkeypatch.setattr(latency, "FORWARD_MS", 0.0)  # every forward "too long": no warm-up, at least 3 runs
    t = latency.measure_latency_table(m, x, densities=(0.25,), ratios=(0.0,), warmup=2, reps=10)
    assert (t.meta["forward_warmup"], t.meta["forward_reps"]) == (0, 3)
    assert (t.meta["warmup"], t.meta["reps"]) == (2, 10)


@pytest.mark.parametrize("mutate,key,words", [
    (lambda d: d.update(version=2), "version", "reads version 1"),
    (lambda d: d["ms"].pop("forward"), "ms.forward", "is required"),
    (lambda d: d["ms"]["block"].update({"0.7": 1.0}), "ms.block.0.7", "merge ratio in [0, 0.5]"),
    (lambda d: d["ms"]["attention"].update({"4x4": {"0.1": 1.0}}), "ms.attention.4x4", "three integers"),
    (lambda d: d["model"].update(grid=[4, 8]), "model.grid", "three positive integers"),
    (lambda d: d["ms"]["dense_attention"].update({"0": -1}), "ms.dense_attention.0", "> 0"),
])
def test_latency_table_errors_name_file_and_key(tiny, tmp_path, mutate, key, words):
    from sparsify.calibrate.latency import load_latency_table

    d = tiny[2].to_dict()
    mutate(d)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(LatencyTableError) as e:
        load_latency_table(f)
    assert e.value.key == key and words in str(e.value) and str(f) in str(e.value)


def test_latency_table_for_another_shape_is_refused(tiny):
    from sparsify.calibrate.latency import model_shape

    m, x, table = tiny
    table.check_shape(model_shape(m, x))  # its own shape passes
    from sparsify.adapters import adapter_for

    other = adapter_for(m).example_inputs(m, grid=(4, 16, 16))
    with pytest.raises(LatencyTableError, match=r"grid: table \[4, 8, 8\], model \[4, 16, 16\]") as e:
        table.check_shape(model_shape(m, other))
    assert e.value.key == "model" and "seq_len: table 256, model 1024" in str(e.value)


def test_a_table_carried_to_another_shape_keeps_every_cost_share(tiny):
    import dataclasses

    from sparsify.adapters import adapter_for
    from sparsify.calibrate.latency import model_shape

    m, _, table = tiny
    other = model_shape(m, adapter_for(m).example_inputs(m, grid=(4, 16, 16)))
    with pytest.raises(LatencyTableError):
        table.check_shape(other)
    for blocks in (other.blocks, 3 * other.blocks):
        target = dataclasses.replace(other, blocks=blocks)
        c = table.carried_to(target)
        c.check_shape(target)  # it is the target's table now
        assert (c.block_ms, c.attention_ms, c.dense_attention_ms) == (table.block_ms, table.attention_ms,
                                                                      table.dense_attention_ms)
        scale = blocks / table.shape.blocks
        assert c.forward_ms == pytest.approx(scale * table.forward_ms)  # each part keeps its share of a forward
        assert c.outside_ms == pytest.approx(scale * table.outside_ms)
        assert c.meta["carried_from"] == table.shape.to_dict() and c.device == table.device


# -- the whole calibration on a tiny model ------------------------------------------------------------------------

def _plan(tiny, budget, policy="unified"):
    """A 4-step plan of the tiny model on a made-up table of its shape (CPU timings are too noisy to assert on)."""
    from sparsify.calibrate import CalibrationConfig
    from sparsify.calibrate.generation import calibrate_plan
    from sparsify.calibrate.latency import LatencyTable

    m, x, measured = tiny
    table = LatencyTable(measured.shape, "made up", forward_ms=10.0, block_ms={0.0: 4.0, 0.25: 3.5, 0.5: 3.0},
                         attention_ms={(4, 4, 4): {0.25: 1.0}}, dense_attention_ms={0.0: 2.0, 0.25: 1.6, 0.5: 1.2})
    cfg = CalibrationConfig(tiles=[(4, 4, 4)], levels=[0.25, 0.5], progress=False, verbose=False)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x["hidden_states"].shape, generator=g)
    return calibrate_plan(m, noise, x["encoder_hidden_states"], table=table, time_budget=budget, config=cfg,
                          policy=policy, steps=4, measure=2, merge_groups=2, step_ranges=2, merge_ratios=(0.25, 0.5),
                          max_age=2)


def test_budget_one_gives_the_attention_only_recipe(tiny):
    from sparsify.calibrate import CalibrationConfig, run_calibration

    pc = _plan(tiny, 1.0)
    assert pc.recipe.version == 2 and pc.recipe.plan.is_trivial and pc.predicted_ms == pytest.approx(pc.dense_ms)
    m, x, _ = tiny
    cfg = CalibrationConfig(budget=1.0, tiles=[(4, 4, 4)], levels=[0.25, 0.5], progress=False, verbose=False,
                            output_error=False)
    ref = run_calibration(m, lambda mod: mod(**x), cfg, example_inputs=x).recipe
    assert pc.recipe.sites == ref.sites and pc.recipe.defaults == ref.defaults
    back = load_recipe(pc.recipe.to_dict())
    assert back.plan == pc.recipe.plan and back.sites == pc.recipe.sites


def test_a_tight_budget_plans_reuse_and_the_recipe_runs(tiny):
    pc = _plan(tiny, 0.5)  # reuse (0.2 x a forward), merging and sparse heads are all needed
    assert pc.predicted_ms <= 0.5 * pc.dense_ms and not all(pc.recipe.plan.compute)
    assert "reused" in pc.summary() and "x dense" in pc.summary()
    _sample_finite(tiny, pc.recipe)


def test_default_candidates_are_those_of_the_generation_grid_narrowed_to_the_table(tiny):
    """Sites are discovered on small inputs (grid 2x4x4: one tile, density 0.5 only); the heads of a plan for
    grid 4x8x8 still choose among that grid's candidates (densities 0.2 and 0.5), in the tiles the table timed."""
    import warnings

    from sparsify.calibrate import CalibrationConfig
    from sparsify.calibrate.generation import calibrate_plan
    from sparsify.calibrate.latency import LatencyTable
    from sparsify.errors import SparsifyWarning

    m, x, measured = tiny
    times = {0.2: 1.0, 0.5: 1.5}
    table = LatencyTable(measured.shape, "made up", forward_ms=10.0, block_ms={0.0: 4.0},
                         attention_ms={(4, 4, 4): times, (1, 8, 8): times}, dense_attention_ms={0.0: 2.0})
    noise = torch.randn(x["hidden_states"].shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsifyWarning)  # no tile left out for lack of times
        pc = calibrate_plan(m, noise, x["encoder_hidden_states"], table=table, time_budget=0.9,
                            config=CalibrationConfig(progress=False, verbose=False), steps=4, measure=2,
                            merge_groups=2, step_ranges=2, merge_ratios=(), max_age=2)
    cand = pc.recipe.calibration["candidates"]
    assert cand["tiles"] == [[4, 4, 4], [1, 8, 8]] and cand["densities"] == [0.2, 0.5]


def _sample_finite(tiny, recipe):
    """Sample the tiny model under `recipe` (its plan run by sparsify) and check the sample is finite."""
    from sparsify import sparsify, unsparsify
    from sparsify.testbed import sample

    m, x, _ = tiny
    sparsify(m, recipe)
    try:
        out = sample(m, torch.randn(x["hidden_states"].shape), x["encoder_hidden_states"], steps=4, guidance_scale=5.0)
    finally:
        unsparsify(m)
    assert torch.isfinite(out).all()


def test_an_unreachable_budget_is_refused_before_measuring(tiny, monkeypatch):
    import sparsify.calibrate.generation as gen

    def never(*a, **k):
        raise AssertionError("the trajectory was sampled for a budget no plan meets")

    monkeypatch.setattr(gen, "record_trajectory", never)
    with pytest.raises(InfeasibleTimeBudgetError, match="fastest plan is") as e:
        _plan(tiny, 0.05)
    assert 0.05 < e.value.fastest < 1.0


def test_usv_entropy_policy_is_an_option_of_the_same_tool(tiny):
    pc = _plan(tiny, 0.95, policy="usv-entropy")
    assert pc.policy == "usv-entropy" and all(pc.recipe.plan.compute)
    assert pc.recipe.calibration["plan"]["policy"] == "usv-entropy" and pc.predicted_ms <= 0.95 * pc.dense_ms


@pytest.mark.slow
def test_cli_time_budget_smoke(tmp_path, capsys):
    from sparsify.calibrate.__main__ import main

    out = tmp_path / "plan.yaml"
    table = tmp_path / "t.json"
    common = ["--model", "tiny-wan", "--grid", "4x8x8", "--levels", "0.25,0.5", "--tiles", "4x4x4", "--no-plots",
              "--checkpoint-dir", "none"]
    with pytest.warns(UserWarning, match="CPU timings are not representative"):
        assert main([*common, "--measure-latency", str(table)]) == 0
    assert main([*common, "--latency-table", str(table), "--time-budget", "0.8", "--sampling-steps", "4",
                 "--max-reuse-age", "3", "--measure-steps", "2", "--out", str(out), "--quiet"]) == 0
    r = load_recipe(out)
    assert r.version == 2 and r.plan.steps == 4 and r.calibration["plan"]["time_budget"] == 0.8
    assert main([*common, "--latency-table", str(table), "--time-budget", "0.01", "--sampling-steps", "4",
                 "--measure-steps", "2", "--out", str(out), "--quiet"]) == 2
    assert "is infeasible: the fastest plan is" in capsys.readouterr().err
    # another grid: its table is refused, unless its costs are carried by share of a forward
    wide = [a if a != "4x8x8" else "4x16x16" for a in common]
    plan = ["--latency-table", str(table), "--time-budget", "0.8", "--sampling-steps", "4", "--max-reuse-age", "3",
            "--measure-steps", "2", "--out", str(out), "--quiet"]
    assert main([*wide, *plan]) == 2
    assert "grid: table [4, 8, 8], model [4, 16, 16]" in capsys.readouterr().err
    assert main([*wide, *plan, "--carry-costs"]) == 0
    r = load_recipe(out)
    assert r.calibration["plan"]["latency_table"]["carried_from"]["grid"] == [4, 8, 8]
    assert main([*common, "--carry-costs", "--time-budget", "0.8", "--out", str(out)]) == 2
    assert "--carry-costs needs --latency-table" in capsys.readouterr().err


# -- first-order reuse ----------------------------------------------------------------------------------------------

def test_first_order_reuse_error_vanishes_where_the_residual_is_linear_in_t(tiny):
    """Residuals on a line in the timestep (all but step 3): extrapolating step 5 from steps 2 and 4 (the cadence of
    age 1) is exact; step 3 off the line spoils age 2 (from steps 0 and 3); age 3 has no computed step before."""
    from sparsify.calibrate.plan_errors import _AddResidual, record_trajectory, reuse_errors

    m, x, _ = tiny
    g = torch.Generator().manual_seed(1)
    traj = record_trajectory(m, torch.randn(x["hidden_states"].shape, generator=g), x["encoder_hidden_states"],
                             steps=6, shift=3.0, keep_residuals=range(6))
    ts = [traj.timestep(s) for s in range(6)]
    assert len({round(ts[i] - ts[i + 1], 3) for i in range(5)}) == 5  # uneven steps: the weight is read from t
    base = {c: traj.residuals[(0, c)] for c in range(2)}
    slope = {c: torch.randn(base[c].shape, generator=g) / 500 for c in range(2)}
    for s in range(6):
        for c in range(2):
            traj.residuals[(s, c)] = base[c] + slope[c] * ts[s] + (0.3 * base[c] if s == 3 else 0.0)
    stand_in, blocks = _AddResidual(), m.blocks
    m.blocks = torch.nn.ModuleList([stand_in])
    try:  # the dense outputs of a model whose block stack adds exactly these residuals
        for s in range(6):
            for c, kw in enumerate(traj.calls[s]):
                stand_in.residual = traj.residuals[(s, c)]
                traj.outputs[s][c] = m(**kw)[0].float()
    finally:
        m.blocks = blocks
    e = reuse_errors(m, traj, [2, 5], max_age=3)
    assert e.shape == (2, 3, 2)
    assert e[1, 0, 1] < 1e-9 < 1e-3 < e[1, 0, 0]  # step 5 from steps 2 and 4: exact; step 4 alone: not
    assert e[1, 1, 1] > 1e-3  # step 5 from steps 0 and 3: step 3 is off the line
    assert np.isnan(e[1, 2, 1]) and np.isfinite(e[1, 2, 0])  # age 3 at step 5: c1 = 2 - 4 < 0
    assert np.isfinite(e[0, :2, 0]).all() and np.isnan(e[0, 2]).all()  # step 2: ages 1, 2 at order 0 only
    assert np.isnan(e[0, :, 1]).all()  # (age 1: c1 = 1 - 2 < 0)


def test_the_problem_takes_the_lesser_order_and_the_plan_emits_it(tiny):
    """Order-1 errors below order 0's at step 4 only: the problem keeps the lesser error and its order, the ILP
    reuses step 4, and the emitted plan extrapolates there."""
    from types import SimpleNamespace

    from sparsify.calibrate.generation import build_problem
    from sparsify.calibrate.latency import LatencyTable

    table = LatencyTable(tiny[2].shape, "made up", forward_ms=10.0, block_ms={0.0: 4.0}, attention_ms={},
                         dense_attention_ms={0.0: 2.0})
    blocks, heads = table.shape.blocks, table.shape.heads
    stub = SimpleNamespace(sites=[SimpleNamespace(path=f"blocks.{b}", heads=heads) for b in range(blocks)],
                           options=[("dense", None, None)], layer=np.repeat(np.arange(blocks), heads),
                           error=np.zeros((blocks * heads, 1)))
    S = 6
    reuse = np.full((S, 2, 2), np.nan)
    reuse[1:, 0, 0], reuse[2:, 1, 0] = 1.0, 1.0
    reuse[3:, 0, 1], reuse[5:, 1, 1] = 2.0, 3.0
    reuse[4, 0, 1] = 0.01
    p = build_problem(stub, table, reuse, np.zeros((1, S, 0)), groups=((0,),), ratios=(), ranges=((0, S),), calls=2)
    assert p.reuse_order.tolist() == [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [0, 0]]
    assert p.reuse_error[4, 0] == 0.01 and p.reuse_error[3, 0] == 1.0 and np.isnan(p.reuse_error[0]).all()
    one_reuse = (S - 1 + table.outside_ms / table.forward_ms) / S  # time of exactly one reused step
    c = solve_plan(p, one_reuse * 1.001)
    assert c.compute.tolist() == [True, True, True, True, False, True]
    assert c.order_at(p).tolist() == [0, 0, 0, 0, 1, 0]
    assert predict_error(p, c)["reuse"] == pytest.approx(0.01)


def test_the_calibrated_plan_orders_match_the_measured_reuse_orders(tiny):
    from sparsify.calibrate.allocate import _ages

    pc = _plan(tiny, 0.5)
    plan, p = pc.recipe.plan, pc.problem
    assert p.reuse_order.shape == p.reuse_error.shape and not p.reuse_order[:3, 0].any()  # c1 = s - 3 < 0
    ages = _ages(plan.compute)
    assert list(plan.order) == [int(p.reuse_order[s, a - 1]) if a else 0 for s, a in enumerate(ages)]
    n = sum(plan.order)
    assert f"extrapolated from the last two computed (order 1): {n} of {len(plan.compute) - sum(plan.compute)}" \
        in pc.summary()
    assert load_recipe(pc.recipe.to_dict()).plan == plan
    _sample_finite(tiny, pc.recipe)
