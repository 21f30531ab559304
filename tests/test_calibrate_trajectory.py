"""Test-bed calibration on the dense sampling trajectory: the forward loop replays the sampler's own calls."""

import pytest
import torch

import sparsify.calibrate.core as core
from sparsify.calibrate.__main__ import main
from sparsify.calibrate.trajectory import record_calls
from sparsify.calibrate.trajectory import testbed_trajectory as trajectory_of  # not collected as a test
from sparsify.recipe import load_recipe
from sparsify.testbed import build_testbed, example_inputs, sample
from sparsify.testbed.data import NUM_CLASSES, class_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")
LATENT = (4, 4, 16, 16)  # a 4x8x8 token grid
SMALL = ["--grid", "4x8x8", "--tiles", "1x8x8", "--levels", "0.25,0.5", "--budget", "0.5", "--no-output-error",
         "--no-plots", "--quiet", "--checkpoint-dir", "none"]


def _sampler_latents(model, seed, steps, guidance, latent=LATENT):
    """x at the start of every step of an independent sampling run from the CLI's seeded noise and condition."""
    noise = torch.randn(1, *latent, generator=torch.Generator().manual_seed(seed))
    cond = class_embeddings(torch.tensor([seed % NUM_CLASSES]))
    xs = {}
    sample(model, noise, cond, steps=steps, guidance_scale=guidance, callback=lambda i, t, x: xs.setdefault(i, x.clone()))
    return xs, cond


def test_trajectory_calls_are_the_samplers_inputs_at_the_sampled_steps():
    model = build_testbed(pretrained=False, overrides={"num_layers": 1})
    forwards = []
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
    calls = trajectory_of(model, [3], num_steps=10, sampled=[1, 4], guidance_scale=4.0, latent_shape=LATENT)
    assert len(forwards) == 5 * 2  # stopped after step 4: steps 0..4, two guidance branches each
    xs, cond = _sampler_latents(model, 3, 10, 4.0)
    assert [(c.step, c.branch) for c in calls] == [(1, "cond"), (1, "uncond"), (4, "cond"), (4, "uncond")]
    for c in calls:
        kw = c.kwargs
        assert torch.equal(kw["hidden_states"], xs[c.step])
        assert kw["timestep"].tolist() == [pytest.approx((1 - c.step / 10) * 1000)] and c.t == pytest.approx(1 - c.step / 10)
        assert torch.equal(kw["encoder_hidden_states"], cond if c.branch == "cond" else torch.zeros_like(cond))
    one = trajectory_of(model, [3], num_steps=10, sampled=[4], guidance_scale=1.0, latent_shape=LATENT)
    assert [c.branch for c in one] == ["cond"]  # no guidance: one call per step (another trajectory than above)
    with pytest.raises(ValueError, match=r"within 0\.\.9"):
        trajectory_of(model, [3], num_steps=10, sampled=[10])


def test_record_calls_names_a_step_the_model_never_ran():
    lin = torch.nn.Linear(2, 2)

    def run(at_step):
        for i in range(3):
            at_step(i)
            if i != 1:
                lin(input=torch.zeros(1, 2))

    with pytest.raises(RuntimeError, match=r"never called the model at steps \[1\]"):
        record_calls(lin, run, [1, 2])


def _spy(monkeypatch):
    """Record the (hidden_states, timestep, condition) of every forward of the calibration's forward loop."""
    seen, real = [], core.run_calibration

    def spy(model, forward_loop, *a, **kw):
        def hook(m, args, kwargs):
            seen.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone(),
                         kwargs["encoder_hidden_states"].clone()))

        h = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                forward_loop(model)
        finally:
            h.remove()
        return real(model, forward_loop, *a, **kw)

    monkeypatch.setattr(core, "run_calibration", spy)
    return seen


def test_cli_calibrates_the_testbed_on_its_trajectory_and_records_it(monkeypatch, tmp_path):
    seen = _spy(monkeypatch)
    out = tmp_path / "t.yaml"
    assert main([*SMALL, "--seed", "5", "--out", str(out)]) == 0  # the test-bed default: --inputs-from trajectory
    model = build_testbed()
    xs, cond = _sampler_latents(model, 5, 8, 5.0)
    assert len(seen) == 4  # 1 run x steps [2, 6] x (cond, uncond)
    for (x, ts, c), (step, branch) in zip(seen, [(2, "c"), (2, "u"), (6, "c"), (6, "u")]):
        assert torch.allclose(x, xs[step], atol=1e-5)
        assert ts.tolist() == [pytest.approx((1 - step / 8) * 1000)]
        assert torch.equal(c, cond if branch == "c" else torch.zeros_like(cond))
        # not fresh inputs at that noise level: the procedural video noised to t is another latent
        fresh = example_inputs(seed=5, t=1 - step / 8, latent_shape=LATENT)["hidden_states"]
        assert (x - fresh).norm() > 0.1 * fresh.norm()
    inputs = load_recipe(out).calibration["inputs"]
    assert inputs["source"] == "trajectory" and inputs["sampled_steps"] == [2, 6] and inputs["seeds"] == [5]
    assert inputs["num_inference_steps"] == 8 and inputs["guidance_scale"] == 5.0
    assert inputs["branches"] == ["cond", "uncond"] and inputs["noise_levels"] == [0.75, 0.25]


def test_cli_random_inputs_stay_available_and_are_recorded(monkeypatch, tmp_path, capsys):
    seen = _spy(monkeypatch)
    out = tmp_path / "r.yaml"
    assert main([*SMALL, "--inputs-from", "random", "--inputs", "1", "--out", str(out)]) == 0
    assert len(seen) == 2
    for (x, ts, _), t in zip(seen, (0.75, 0.25)):
        assert torch.equal(x, example_inputs(seed=0, t=t, latent_shape=LATENT)["hidden_states"])
    inputs = load_recipe(out).calibration["inputs"]
    assert inputs["source"] == "random" and inputs["noise_levels"] == [0.75, 0.25]
    rc = main(["--model", "tiny-wan", "--inputs-from", "trajectory", "--out", str(tmp_path / "w.yaml")])
    assert rc == 2 and "--inputs-from trajectory needs a test-bed --model" in capsys.readouterr().err
