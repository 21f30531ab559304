"""CPU tests of the learned test-bed: shipped weights, inputs, data generator, sampler, head statistics, training."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from sparsify.testbed import (  # noqa: E402
    NUM_CLASSES,
    TESTBED_CONFIG,
    build_testbed,
    class_embeddings,
    count_params,
    example_inputs,
    example_target,
    grid,
    make_batch,
    psnr,
    sample,
)
from tools.testbed_heads import STAT_NAMES, head_stats, recording  # noqa: E402
from sparsify.testbed.model import WEIGHTS_PATH, load_testbed_config  # noqa: E402

TINY = (4, 2, 8, 8)  # latent [C, F, H, W] -> 2 x 4 x 4 = 32 tokens


@pytest.fixture(scope="module")
def trained():
    return build_testbed(pretrained=True)


@pytest.fixture(scope="module")
def mid_outputs(trained):
    """Trained and random-init outputs on the full 4,096-token example at t = 0.5 (one forward each)."""
    x = example_inputs(batch=1, seed=0, t=0.5)
    with torch.inference_mode():
        out = trained(**x)[0]
        init = build_testbed(pretrained=False)(**x)[0]
    return x, out, init


def test_shipped_weights_load_and_size(trained):
    assert WEIGHTS_PATH.exists() and WEIGHTS_PATH.stat().st_size <= 25 * 2**20
    assert load_testbed_config() == TESTBED_CONFIG
    assert 5_000_000 <= count_params(trained) <= 12_000_000
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert trained.config.attention_head_dim == 64


def test_grid_has_at_least_4096_tokens():
    T, H, W = grid()
    assert T * H * W >= 4096
    x = example_inputs()["hidden_states"]
    pt, ph, pw = TESTBED_CONFIG["patch_size"]
    assert (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw) == (T, H, W)


def test_example_inputs_forward_shape(mid_outputs):
    x, out, _ = mid_outputs
    assert set(x) == {"hidden_states", "timestep", "encoder_hidden_states", "return_dict"}
    assert out.shape == x["hidden_states"].shape
    assert torch.isfinite(out).all()


def test_trained_model_denoises_better_than_random_init(mid_outputs):
    _, out, init = mid_outputs
    target = example_target(batch=1, seed=0)
    loss_trained = torch.mean((out - target) ** 2).item()
    loss_init = torch.mean((init - target) ** 2).item()
    # Training logged ~0.05 at t = 0.5 against ~1.3 for the random init.
    assert loss_trained < 0.25 * loss_init, (loss_trained, loss_init)
    assert loss_trained < 0.2


def test_example_inputs_are_deterministic():
    a, b = example_inputs(batch=2, seed=5), example_inputs(batch=2, seed=5)
    assert torch.equal(a["hidden_states"], b["hidden_states"])
    assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    assert not torch.equal(a["hidden_states"], example_inputs(batch=2, seed=6)["hidden_states"])


def test_data_generator_deterministic_and_bounded():
    x1, l1, c1 = make_batch(3, seed=11, latent_shape=(4, 6, 16, 16))
    x2, l2, c2 = make_batch(3, seed=11, latent_shape=(4, 6, 16, 16))
    assert torch.equal(x1, x2) and torch.equal(l1, l2) and torch.equal(c1, c2)
    x3, _, _ = make_batch(3, seed=12, latent_shape=(4, 6, 16, 16))
    assert not torch.equal(x1, x3)
    assert x1.shape == (3, 4, 6, 16, 16) and x1.abs().max() <= 1.0
    assert x1.std() > 0.1  # not blank
    # frames differ (things move) but are related
    assert (x1[:, :, 1:] - x1[:, :, :-1]).abs().mean() > 1e-3


def test_data_labels_and_conditions():
    labels = torch.arange(NUM_CLASSES)
    _, out_labels, cond = make_batch(NUM_CLASSES, seed=0, labels=labels, latent_shape=TINY)
    assert torch.equal(out_labels, labels)
    assert cond.shape == (NUM_CLASSES, 8, TESTBED_CONFIG["text_dim"])
    assert len({tuple(c.flatten().tolist()) for c in cond}) == NUM_CLASSES  # one embedding per class
    dropped = class_embeddings(labels, drop=labels % 2 == 0)
    assert dropped[0].abs().sum() == 0 and dropped[1].abs().sum() > 0


def test_sampler_two_steps_tiny(trained):
    noise = torch.randn(1, *TINY, generator=torch.Generator().manual_seed(0))
    cond = class_embeddings(torch.tensor([3]))
    seen = []
    out = sample(trained, noise, cond, steps=2, callback=lambda i, t, x: seen.append((i, t)))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert seen == [(0, 1.0), (1, 0.5)]
    out_cfg = sample(trained, noise, cond, steps=2, guidance_scale=3.0)
    assert torch.isfinite(out_cfg).all() and psnr(out, out_cfg) < float("inf")


def test_sampler_integrates_a_constant_velocity_exactly():
    v = torch.randn(1, *TINY)

    def const_model(hidden_states, timestep, encoder_hidden_states, return_dict=False):
        assert timestep.shape == (1,) and 0 <= float(timestep[0]) <= 1000
        return (v,)

    noise = torch.randn(1, *TINY)
    for steps, shift in [(1, 1.0), (5, 3.0)]:
        out = sample(const_model, noise, torch.zeros(1, 8, 64), steps=steps, shift=shift)
        torch.testing.assert_close(out, noise - v)  # x0 = x1 - v along a straight path


def test_recording_processor_is_transparent_and_stats_in_range(trained):
    x = example_inputs(batch=1, seed=1, latent_shape=TINY)
    with torch.inference_mode():
        ref = trained(**x)[0]
        calls = []
        with recording(trained, lambda layer, q, k, v: calls.append((layer, tuple(q.shape)))):
            got = trained(**x)[0]
        again = trained(**x)[0]  # processors restored
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(again, ref)
    assert [c[0] for c in calls] == list(range(TESTBED_CONFIG["num_layers"]))
    assert calls[0][1] == (1, 32, TESTBED_CONFIG["num_attention_heads"], 64)
    stats = head_stats(trained, [x], grid(TINY))
    L, H = TESTBED_CONFIG["num_layers"], TESTBED_CONFIG["num_attention_heads"]
    for name in STAT_NAMES:
        assert stats[name].shape == (L, H)
        assert (stats[name] >= -1e-5).all() and (stats[name] <= 1 + 1e-5).all()


@pytest.mark.slow
def test_train_one_step_tiny_with_hook(tmp_path):
    from tools.train_testbed import TrainConfig, train

    hooked = []

    def hook(model):
        hooked.append(type(model).__name__)

    cfg = TrainConfig(steps=2, batch=2, out=str(tmp_path), device="cpu", latent_shape=TINY, log_every=1,
                      eval_every=0, warmup=1, eval_batch=2)
    summary = train(cfg, model_hook=hook)
    assert hooked == ["WanTransformer3DModel"]
    assert summary["steps_done"] == 2 and math.isfinite(summary["final_train_loss_window"])
    reloaded = build_testbed(pretrained=True, weights=tmp_path / "testbed_wan.safetensors")
    assert count_params(reloaded) == summary["params"]
    rows = (tmp_path / "train_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 3
