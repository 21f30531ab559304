"""Calibration of the per-step budget schedule: the choice rule, the recipe it writes, a real run and the CLI."""

import dataclasses

import pytest
import torch

from sparsify import installed_sites, runtime, sparsify, unsparsify
from sparsify.calibrate import ScheduleCalibration, calibrate_schedule, with_schedule
from sparsify.calibrate.__main__ import main
from sparsify.calibrate.schedule import two_piece_schedules
from sparsify.calibrate.trajectory import seed_inputs
from sparsify.recipe import ScheduleStep, load_recipe
from sparsify.testbed import build_testbed, sample

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.5}}}
LATENT = (4, 8, 16, 16)  # an 8x8x8 token grid: 8 tiles of 4x4x4, as benchmarks.quality --tiny
SMALL = ["--grid", "4x8x8", "--tiles", "4x4x4", "--levels", "0.25,0.5", "--budget", "0.5", "--no-output-error",
         "--no-plots", "--quiet", "--checkpoint-dir", "none", "--num-inference-steps", "4"]


def _stub(errors: dict, excess: dict | None = None):
    """A `sample` whose final latent has relative error `errors[key]` against dense and whose achieved density is
    0.5 x (1 + `excess[key]`), `key` being (k, a) of the installed two-piece schedule, "flat", or "dense"."""
    x0 = torch.ones(16, dtype=torch.float64)

    def stub(model):
        sites = installed_sites(model)
        if not sites:
            return x0.clone()
        sch = sites[0].schedule
        key = (sch[1].from_step, sch[0].scale) if sch else "flat"
        for s in sites:
            s.dense_work += 1.0
            s.add_work(0.5 * (1.0 + (excess or {}).get(key, 0.0)))
        return x0 * (1.0 + errors[key])

    return stub


@pytest.fixture(scope="module")
def tiny():
    return build_testbed(pretrained=False, overrides={"num_layers": 1})


def test_the_least_error_eligible_schedule_wins(tiny):
    # steps 10: (k, a) = (2, 1.5), (2, 2.0), (5, 1.5); (5, 2.0) would leave the rest at scale 0 and is skipped
    errors = {"flat": 0.3, (2, 1.5): 0.25, (2, 2.0): 0.1, (5, 1.5): 0.2}
    excess = {(2, 2.0): 0.05, (2, 1.5): 0.005}  # (2, 2.0) is 5% denser than flat: not eligible at tolerance 0.01
    lines = []
    sc = calibrate_schedule(tiny, RECIPE, _stub(errors, excess), steps=10, fractions=(0.2, 0.5), scales=(1.5, 2.0),
                            say=lines.append)
    assert [(t["first_steps"], t["scale"], t["eligible"]) for t in sc.tried] == [
        (2, 1.5, True), (2, 2.0, False), (5, 1.5, True)]
    assert sc.schedule == (ScheduleStep(0, 1.5), ScheduleStep(5, 0.5))
    assert sc.error == pytest.approx(0.2) and sc.error_flat == pytest.approx(0.3)
    assert sc.density == pytest.approx(0.5) and sc.density_flat == pytest.approx(0.5) and sc.steps == 10
    assert sc.tried[0]["density"] == pytest.approx(0.5025) and sc.tried[1]["error"] == pytest.approx(0.1)
    assert len(lines) == 4 and "not eligible" in lines[2] and "density 0.5250" in lines[2]  # flat, then 3 candidates
    assert getattr(tiny, "_sparsify", None) is None and installed_sites(tiny) == []
    # the same run with a looser tolerance takes the denser, better candidate
    loose = calibrate_schedule(tiny, RECIPE, _stub(errors, excess), steps=10, fractions=(0.2, 0.5),
                               scales=(1.5, 2.0), tolerance=0.1)
    assert loose.schedule == (ScheduleStep(0, 2.0), ScheduleStep(2, 0.75)) and loose.error == pytest.approx(0.1)


def test_flat_wins_when_every_candidate_is_worse(tiny):
    errors = {"flat": 0.1, (1, 1.5): 0.2, (2, 1.5): 0.15}
    sc = calibrate_schedule(tiny, RECIPE, _stub(errors), steps=4, fractions=(0.25, 0.5), scales=(1.5,))
    assert sc.schedule == () and sc.error == sc.error_flat == pytest.approx(0.1) and len(sc.tried) == 2
    assert all(t["eligible"] for t in sc.tried)
    r = with_schedule(load_recipe(RECIPE), sc)
    assert r.defaults.schedule == () and r.calibration["schedule"]["error"] == pytest.approx(0.1)


def test_rest_scale_keeps_the_mean_and_the_recipe_round_trips(tiny, tmp_path):
    steps = 10
    errors = {"flat": 0.3, **{(k, a): 0.1 * k / a for _, k, a, _ in two_piece_schedules(steps, (0.1, 0.2, 0.3),
                                                                                      (1.5, 2.0, 3.0))}}
    sc = calibrate_schedule(tiny, RECIPE, _stub(errors), steps=steps)
    assert len(sc.tried) == 9  # k = 1, 2, 3 x a = 1.5, 2, 3: every rest scale is positive (the least 1/7)
    for t in sc.tried:
        k, a, r = t["first_steps"], t["scale"], t["rest_scale"]
        assert k == round(t["fraction"] * steps) and (k * a + (steps - k) * r) / steps == pytest.approx(1.0)
    assert sc.schedule == (ScheduleStep(0, 3.0), ScheduleStep(1, 7 / 9))  # least 0.1 k / a
    path = with_schedule(load_recipe(RECIPE), sc).save(tmp_path / "s.yaml")
    back = load_recipe(path)
    assert back.defaults.schedule == sc.schedule
    prov = back.calibration["schedule"]
    assert prov["steps"] == steps and prov["error"] == round(sc.error, 6) and prov["density"] == 0.5
    assert [(t["fraction"], t["first_steps"], t["scale"], t["eligible"]) for t in prov["tried"]] == [
        (t["fraction"], t["first_steps"], t["scale"], t["eligible"]) for t in sc.tried]
    assert all(t["rest_scale"] == round(u["rest_scale"], 4) for t, u in zip(prov["tried"], sc.tried))


def test_arguments_are_checked(tiny):
    stub = _stub({"flat": 0.1})
    for kw, what in ((dict(steps=1), "steps must be an integer >= 2"),
                     (dict(steps=4, fractions=(1.0,)), r"fractions must be numbers in \(0, 1\)"),
                     (dict(steps=4, scales=(0.0,)), "scales must be positive finite numbers"),
                     (dict(steps=4, tolerance=-0.1), "tolerance must be a number >= 0")):
        with pytest.raises(ValueError, match=what):
            calibrate_schedule(tiny, RECIPE, stub, **kw)
    with pytest.raises(ValueError, match="sample must be a callable"):
        calibrate_schedule(tiny, RECIPE, None, steps=4)
    with pytest.raises(RuntimeError, match="ran no attention call"):
        calibrate_schedule(tiny, RECIPE, lambda m: torch.ones(2), steps=4)
    assert getattr(tiny, "_sparsify", None) is None  # restored after the failed run
    sparsify(tiny, RECIPE)
    try:
        with pytest.raises(ValueError, match="model is sparsified"):
            calibrate_schedule(tiny, RECIPE, stub, steps=4)
    finally:
        unsparsify(tiny)


def test_real_run_on_the_testbed():
    model = build_testbed()
    noise, cond = seed_inputs(model, 100, latent_shape=LATENT)
    steps = 4

    def run(m):
        return sample(m, noise, cond, steps=steps)

    sc = calibrate_schedule(model, RECIPE, run, steps=steps, fractions=(0.25,), scales=(1.5, 3.0))
    assert getattr(model, "_sparsify", None) is None and installed_sites(model) == []
    assert len(sc.tried) == 2 and 0 < sc.error <= sc.error_flat and all(t["error"] > 0 for t in sc.tried)
    # 4 of 8 key tiles flat; (1, 1.5): 6 at step 0, then ceil(8 x 0.4167) = 4: denser than flat, not eligible;
    # (1, 3.0): 8 (capped at density 1), then ceil(8 x 0.1667) = 2
    assert sc.density_flat == pytest.approx(0.5)
    assert [t["density"] for t in sc.tried] == pytest.approx([18 / 32, 14 / 32])
    assert [t["eligible"] for t in sc.tried] == [False, True]
    assert sc.density in (pytest.approx(0.5), pytest.approx(14 / 32))
    chosen = [t for t in sc.tried if t["error"] == sc.error]
    assert sc.schedule == () or (chosen and chosen[0]["eligible"])
    # the emitted recipe reproduces the chosen error
    sparsify(model, with_schedule(load_recipe(RECIPE), sc))
    try:
        runtime.new_generation()
        with torch.no_grad():
            x = run(model)
    finally:
        unsparsify(model)
    runtime.new_generation()
    with torch.no_grad():
        dense = run(model)
    assert float((x - dense).norm() / dense.norm()) == pytest.approx(sc.error, rel=1e-4)


def test_cli_schedule_search_writes_the_chosen_schedule(tmp_path, capsys):
    out = tmp_path / "s.yaml"
    assert main([a for a in SMALL if a != "--quiet"] + ["--schedule-search", "--seed", "3", "--out", str(out)]) == 0
    r = load_recipe(out)
    prov = r.calibration["schedule"]
    printed = capsys.readouterr()
    assert f"final-sample error against dense {prov['error_flat']:.4f} flat -> {prov['error']:.4f} chosen" in printed.out
    assert "budget schedule over 4 sampling steps" in printed.out and "schedule flat: density" in printed.err
    assert prov["steps"] == 4 and len(prov["tried"]) >= 1 and prov["error"] <= prov["error_flat"]
    if r.defaults.schedule:
        k, a = r.defaults.schedule[1].from_step, r.defaults.schedule[0].scale
        row = next(t for t in prov["tried"] if (t["first_steps"], t["scale"]) == (k, a))
        assert row["eligible"] and row["error"] == prov["error"] and r.defaults.schedule[0].from_step == 0
    else:
        assert prov["error"] == prov["error_flat"]
    # the schedule was searched on seed 3's sampling run, as the trajectory sampled it: flat error reproduced
    model = build_testbed()
    noise, cond = seed_inputs(model, 3, latent_shape=(4, 4, 16, 16))

    def run():
        runtime.new_generation()
        with torch.no_grad():
            return sample(model, noise, cond, steps=4, guidance_scale=5.0)

    dense = run()
    sparsify(model, dataclasses.replace(r, defaults=dataclasses.replace(r.defaults, schedule=())))
    try:
        flat = run()
    finally:
        unsparsify(model)
    assert float((flat - dense).norm() / dense.norm()) == pytest.approx(prov["error_flat"], rel=1e-4, abs=1e-6)


def test_cli_schedule_search_is_refused_without_a_testbed_trajectory(tmp_path, capsys):
    rc = main([*SMALL, "--schedule-search", "--inputs-from", "random", "--out", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "--schedule-search needs a test-bed --model" in err and "--inputs-from trajectory" in err
    rc = main(["--model", "tiny-wan", "--schedule-search", "--out", str(tmp_path / "w.yaml")])
    assert rc == 2 and "--model tiny-wan is not a test-bed" in capsys.readouterr().err
    rc = main([*SMALL, "--schedule-search", "--num-inference-steps", "1", "--out", str(tmp_path / "o.yaml")])
    assert rc == 2 and "--num-inference-steps >= 2" in capsys.readouterr().err
    assert not (tmp_path / "r.yaml").exists()


def test_dry_run_counts_the_schedule_search_generations(capsys):
    args = [a for a in SMALL if a != "--quiet"] + ["--dry-run"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--schedule-search"]) == 0
    searched = capsys.readouterr().out
    # 4 steps: fractions 0.1/0.2/0.3 give k = 0, 1, 1, so 3 candidates (k = 1 at x1.5, x2, x3); with dense and
    # flat 5 generations of 4 steps x 2 branches = 40 forwards more than without the search
    n = len(two_piece_schedules(4, (0.1, 0.2, 0.3), (1.5, 2.0, 3.0)))
    assert n == 3
    extra = [int(out.split("(+")[1].split()[0]) if "(+" in out else 0 for out in (plain, searched)]
    assert extra[1] - extra[0] == (2 + n) * 4 * 2
