"""The calibrator's config, CLI and report: defaults that work, errors without tracebacks, quiet runs, plots."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsify.adapters import adapter_for
from sparsify.calibrate import CalibrationConfig, CalibrationConfigError, calibrate, run_calibration
from sparsify.calibrate.__main__ import _lowest_density, default_grid, main
from sparsify.inspect import BUNDLED_MODELS, load_model
from sparsify.testing import dits

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("field,value,valid", [
    ("budget", 0.0, r"density in \(0, 1\]"), ("budget", 2, r"density in \(0, 1\]"),
    ("methods", ["nope"], "tile selection methods from: .*vsa"), ("methods", "vsa", "list of tile selection"),
    ("tiles", [(4, 4, 3)], "volume 64 or 128"), ("levels", [0.1, 1.5], r"density in \(0, 1\]"),
    ("levels", [], "non-empty"), ("dense_layers", [-1], "site indices >= 0"), ("dense_steps", -1, "int >= 0"),
    ("solver", "gurobi", "auto, highs, cbc, lagrangian"), ("query_fraction", 0, r"density in \(0, 1\]"),
    ("solver_gap", 1.0, r"\[0, 1\)"), ("version", 2, "reads version 1"), ("progress", "yes", "True or False"),
])
def test_config_rejects_each_bad_field(field, value, valid):
    with pytest.raises(CalibrationConfigError, match=rf"CalibrationConfig\.{field}=.* is invalid: .*{valid}"):
        CalibrationConfig(**{field: value})
    assert issubclass(CalibrationConfigError, ValueError)


def test_config_normalises_and_replaces():
    cfg = CalibrationConfig(tiles=[[4, 4, 4], (1, 8, 8), (4, 4, 4)], levels=[0.2, 0.05], dense_layers=[0])
    assert cfg.tiles == ((4, 4, 4), (1, 8, 8)) and cfg.levels == (0.05, 0.2) and cfg.dense_layers == (0,)
    assert cfg.replace(budget=0.3).budget == 0.3 and cfg.replace(budget=0.3).tiles == cfg.tiles
    with pytest.raises(CalibrationConfigError, match="no field bugdet"):
        cfg.replace(bugdet=0.3)


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_every_bundled_model_defaults_meet_the_default_budget(name):
    """The default candidates on each bundled model's calibration grid reach below the default budget."""
    if name.startswith("testbed"):  # the test-beds' grid is fixed by their config (no weights needed)
        from sparsify.testbed import grid

        g = grid(name=name)
    else:
        model = load_model(name)
        g = default_grid(adapter_for(model), model)
    cfg = CalibrationConfig()
    tiles, levels = cfg.candidates(g)
    assert len(tiles) >= 1 and len(levels) >= 2
    assert _lowest_density(g, tiles, levels) <= cfg.budget


def _tiny(layers=1):
    model = dits.tiny_wan(layers=layers, heads=2, head_dim=16)
    x = adapter_for(model).example_inputs(model, grid=(4, 8, 8))
    return model, x, (lambda m: m(**x))


def test_calibrate_takes_a_config_or_keywords():
    model, x, loop = _tiny()
    cfg = CalibrationConfig(budget=0.5, tiles=[(1, 8, 8)], levels=[0.25, 0.5], output_error=False, progress=False,
                            verbose=False)
    a = calibrate(model, loop, cfg, example_inputs=x)
    b = calibrate(model, loop, example_inputs=x, budget=0.5, tiles=[(1, 8, 8)], levels=[0.25, 0.5],
                  output_error=False, progress=False, verbose=False)
    assert a.sites == b.sites and a.calibration["budget"] == b.calibration["budget"] == 0.5
    c = calibrate(model, loop, cfg, example_inputs=x, budget=0.25)  # a keyword overrides the config's field
    assert c.calibration["budget"] == 0.25 and c.calibration["achieved_density"] <= 0.25
    with pytest.raises(CalibrationConfigError, match="no field tile"):
        calibrate(model, loop, cfg, example_inputs=x, tile=(4, 4, 4))
    with pytest.raises(CalibrationConfigError, match="dense_layers"):
        calibrate(model, loop, cfg.replace(dense_layers=(3,)), example_inputs=x)


def test_inference_needs_no_solver_or_plotting_package():
    """`import sparsify` and sparsifying a model with a recipe work with pulp, highspy and matplotlib absent."""
    code = (
        "import sys\n"
        "for m in ('pulp', 'highspy', 'matplotlib'): sys.modules[m] = None\n"
        "import torch, sparsify\n"
        "from sparsify.testing import dits\n"
        "from sparsify.adapters import adapter_for\n"
        "m = dits.tiny_wan(layers=1, heads=2, head_dim=16)\n"
        "x = adapter_for(m).example_inputs(m, grid=(4, 8, 8))\n"
        "recipe = {'version': 1, 'defaults': {'method': 'vsa', 'tile': [1, 8, 8], 'budget': {'density': 0.5}}}\n"
        "sparsify.sparsify(m, recipe, example_inputs=x)\n"
        "with torch.no_grad(): m(**x)\n"
        "assert sum(s.calls for s in sparsify.installed_sites(m)) > 0\n"
        "assert not any(k in sys.modules and sys.modules[k] is not None for k in ('pulp', 'highspy', 'matplotlib'))\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_infeasible_budget_is_a_message_not_a_traceback(capsys, tmp_path):
    rc = main(["--model", "tiny-wan", "--budget", "0.01", "--out", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "budget 0.01 is infeasible" in err and "lowest density" in err and "--budget 0.0" in err
    assert not (tmp_path / "r.yaml").exists()
    rc = main(["--model", "tiny-wan", "--levels", "0.1,2", "--out", str(tmp_path / "r.yaml")])
    assert rc == 2 and "CalibrationConfig.levels=2" in capsys.readouterr().err


def test_tiny_wan_defaults_quiet_resume_and_set_aside(capsys, tmp_path):
    """tiny-wan calibrates with default candidates; --quiet prints only the files; a rerun resumes; a checkpoint
    folder of other settings is set aside."""
    out = tmp_path / "sub" / "tw.yaml"
    base = ["--model", "tiny-wan", "--inputs", "1", "--steps", "1", "--out", str(out)]
    assert main(base + ["--quiet"]) == 0
    cap = capsys.readouterr()
    files = [Path(line) for line in cap.out.split()]
    assert files[0] == out and all(f.exists() for f in files)
    assert {f.name for f in files} >= {"tw.yaml", "tw.yaml.density.png", "tw.yaml.tiles.png",
                                       "tw.yaml.error_vs_budget.png", "tw.yaml.calib"}
    assert all(f.parent == out.parent for f in files)  # plots beside the recipe
    assert cap.err == "" and "HiGHS" not in cap.out
    assert main(base + ["--no-plots", "--no-output-error"]) == 0
    cap = capsys.readouterr()
    assert "resumed from" in cap.err and "predicted attention speedup" in cap.out
    assert "GPU" in cap.out and "CPU path is the pure-PyTorch reference" in cap.out and "relative L2" in cap.out
    assert "files written:" in cap.out and "Traceback" not in cap.err
    assert main(base + ["--no-plots", "--no-output-error", "--quiet", "--tiles", "1x8x8", "--levels", "0.05,0.5"]) == 0
    cap = capsys.readouterr()
    assert "moved them to" in cap.err and (tmp_path / "sub" / "tw.yaml.calib.old1").is_dir()


def test_dry_run_estimates(capsys):
    assert main(["--model", "tiny-wan", "--inputs", "1", "--steps", "1", "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "estimated time" in out and "measurement" in out


def test_plots_fit_the_data_and_mark_the_budget(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from sparsify.calibrate import report

    model, x, loop = _tiny(layers=2)
    res = run_calibration(model, loop, example_inputs=x, budget=0.3, tiles=[(1, 8, 8), (4, 4, 4)],
                          levels=[0.125, 0.25, 0.5], output_error=False, progress=False, verbose=False)
    figs = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.setdefault(Path(path).name, fig) and path)
    report.plots(res, 0.3, tmp_path / "r.yaml")
    dens = figs["r.yaml.density.png"].axes[0].images[0]
    data = np.asarray(dens.get_array(), float)
    lo, hi = dens.get_clim()
    d0, d1 = np.nanmin(data), np.nanmax(data)
    assert lo <= d0 <= d1 <= hi < 1.0 and hi - lo <= max(d1 - d0, 0.25 * d1) + 1e-9  # not the fixed 0..1 scale
    ax = figs["r.yaml.error_vs_budget.png"].axes[0]
    assert any(list(line.get_xdata()) == [0.3, 0.3] for line in ax.lines)
    assert any("chosen budget 0.3" in t.get_text() for t in ax.get_legend().get_texts())
    text = report.summary(res, 0.3)
    assert "model output: not measured" in text and "attention output" in text
