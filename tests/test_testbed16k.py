"""CPU tests of testbed-16k: config, procedural data v2, loading, checkpoint/resume training, noise floor."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from sparsify.testbed import (  # noqa: E402
    TESTBED16K_CONFIG,
    build_testbed,
    build_testbed16k,
    count_params,
    example_inputs,
    get_variant,
    grid,
)
from sparsify.testbed import data16k  # noqa: E402
from sparsify.testbed.noise_floor import noise_floor, parse_run, psnr_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = (4, 4, 8, 8)  # latent [C, F, H, W] -> 4 x 4 x 4 = 64 tokens
TINY_MODEL = {"num_layers": 2}  # the 16k config with 2 blocks (8 heads x 32 kept)


def test_config_meets_the_v2_targets():
    T, H, W = grid(name="testbed-16k")
    assert T * H * W >= 16_384
    c = TESTBED16K_CONFIG
    assert c["num_layers"] >= 12 and c["num_attention_heads"] >= 8 and c["attention_head_dim"] == 32
    model = build_testbed16k(pretrained=False)
    n = count_params(model)
    assert n == 13_228_304 and 2 * n <= 40 * 2**20  # fp16 bytes
    assert get_variant("16k").name == get_variant("testbed-16k").name == "testbed-16k"
    assert get_variant("testbed").stem == "testbed_wan"  # v1 unchanged and still the default
    with pytest.raises(ValueError, match="unknown test-bed variant 'v3'.*testbed-16k"):
        get_variant("v3")


def test_shipped_weights_load_and_beat_the_random_init():
    """The shipped fp16 weights (at most 40 MiB) load into the v2 config and predict the flow far better than the
    seeded random init, on a smaller grid of the v2 data (1,024 tokens, to keep the CPU forward short)."""
    from sparsify.testbed.model import load_testbed_config

    v = get_variant("testbed-16k")
    assert v.weights_path.exists() and v.weights_path.stat().st_size <= 40 * 2**20
    assert load_testbed_config(v.config_path, name=v.name) == TESTBED16K_CONFIG
    trained, init = build_testbed16k(), build_testbed16k(pretrained=False)
    x0, _, cond = data16k.make_batch(2, seed=5, latent_shape=(4, 4, 32, 32))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=0.5 * x0 + 0.5 * eps, timestep=torch.full((2,), 500.0), encoder_hidden_states=cond,
              return_dict=False)
    with torch.inference_mode():
        loss = [torch.nn.functional.mse_loss(m(**kw)[0], eps - x0).item() for m in (trained, init)]
    assert loss[0] < 0.5 * loss[1]


def test_tiny_v2_model_forward_through_the_same_path():
    model = build_testbed(pretrained=False, name="testbed-16k", overrides=TINY_MODEL)
    assert len(model.blocks) == 2 and model.config.num_attention_heads == 8
    x = example_inputs(batch=2, seed=3, latent_shape=TINY, name="testbed-16k")
    assert x["encoder_hidden_states"].shape == (2, data16k.TEXT_LEN, TESTBED16K_CONFIG["text_dim"])
    with torch.inference_mode():
        out = model(**x)[0]
    assert out.shape == x["hidden_states"].shape and torch.isfinite(out).all()


def test_data_deterministic_per_seed_and_bounded():
    shape = (4, 6, 16, 16)
    a, la, ca = data16k.make_batch(3, seed=11, latent_shape=shape)
    b, lb, cb = data16k.make_batch(3, seed=11, latent_shape=shape)
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ca, cb)
    c, _, _ = data16k.make_batch(3, seed=12, latent_shape=shape)
    assert not torch.equal(a, c)
    assert a.shape == (3, *shape) and a.abs().max() <= 1.0 and a.std() > 0.1
    assert (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 1e-3  # things move


def test_data_objects_classes_and_conditions():
    p = data16k.sample_params(64, seed=0, latent_shape=TINY)
    n_obj = p["active"].sum(-1)
    assert n_obj.min() >= data16k.MIN_OBJECTS and n_obj.max() <= data16k.MAX_OBJECTS
    assert data16k.NUM_CLASSES == 18 and len({data16k.class_name(i) for i in range(18)}) == 18
    labels = torch.arange(data16k.NUM_CLASSES)
    _, out_labels, cond = data16k.make_batch(18, seed=0, labels=labels, latent_shape=TINY)
    assert torch.equal(out_labels, labels)
    assert len({tuple(c.flatten().tolist()) for c in cond}) == 18
    dropped = data16k.class_embeddings(labels, drop=labels % 2 == 0)
    assert dropped[0].abs().sum() == 0 and dropped[1].abs().sum() > 0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 18\)"):
        data16k.class_embeddings(torch.tensor([18]))


def test_scene_cuts_present_and_hard():
    shape = (4, 16, 16, 16)
    p = data16k.sample_params(48, seed=1, latent_shape=shape)
    has_cut = p["cut"] < shape[1]
    assert 0.1 < has_cut.float().mean() < 0.7  # CUT_PROB = 0.35
    assert (p["cut"][has_cut] >= 4).all() and (p["cut"][has_cut] <= 12).all()
    x = data16k.render(p, latent_shape=shape)
    step = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [B, F-1]: change from frame f to f+1
    for b in torch.nonzero(has_cut).flatten().tolist():
        f = int(p["cut"][b])
        others = torch.cat([step[b, : f - 1], step[b, f:]])
        assert step[b, f - 1] > 2 * others.median(), (b, f, step[b])
    assert (data16k.sample_params(8, seed=1, latent_shape=shape, cut_prob=0.0)["cut"] == 16).all()
    assert (data16k.sample_params(8, seed=1, latent_shape=shape, cut_prob=1.0)["cut"] < 16).all()


def _object_track(label: int, n: int, shape) -> list[torch.Tensor]:
    """Screen centroids `[frames visible, 2]` of the first object of `n` clips (alone, no cut, still camera)."""
    p = data16k.sample_params(n, seed=2, labels=torch.full((n,), label), latent_shape=shape, cut_prob=0.0)
    p["active"][:] = False
    background = data16k.render(p, latent_shape=shape)
    p["active"][:, :, 0] = True
    mask = (data16k.render(p, latent_shape=shape) - background).abs().amax(1) > 0.05  # [B, F, H, W]
    ys, xs = torch.meshgrid(torch.arange(shape[2]).float(), torch.arange(shape[3]).float(), indexing="ij")
    tracks = []
    for m in mask:
        area = m.sum((1, 2))
        vis = area > 3
        c = torch.stack([(m * xs).sum((1, 2)), (m * ys).sum((1, 2))], -1) / area.clamp_min(1)[:, None]
        tracks.append(c[vis])
    return tracks


def test_crossing_objects_enter_and_leave_the_frame():
    shape = (4, 16, 32, 32)
    crossing = (3 * 2 + 0) * 2  # crossing, camera still, striped
    for track in _object_track(crossing, 8, shape):
        assert 2 <= len(track) < shape[1]  # visible for part of the clip only
        assert (track[-1] - track[0]).norm() > 0.4 * shape[3]  # across a large part of the frame
    for track in _object_track(0, 8, shape):  # bouncing: on screen all the time
        assert len(track) == shape[1]


def test_missing_weights_error_names_the_training_command(tmp_path, monkeypatch):
    from sparsify import inspect as sp_inspect
    from sparsify.testbed import variants

    with pytest.raises(FileNotFoundError, match=r"train_testbed --config 16k --out DIR"):
        build_testbed16k(weights=tmp_path / "testbed16k.safetensors")
    monkeypatch.setattr(variants, "_HERE", tmp_path)  # the package dir without shipped 16k weights
    with pytest.raises(FileNotFoundError, match=r"then copy DIR/testbed16k.safetensors and DIR/testbed16k.json"):
        build_testbed16k()
    assert sp_inspect.BUNDLED_MODELS["testbed-16k"] == "sparsify.testbed:build_testbed16k"
    with pytest.raises(FileNotFoundError, match="testbed-16k weights not found"):
        sp_inspect.load_model("testbed-16k")


def test_lr_schedule_depends_on_the_step_only():
    from tools.train_testbed import TrainConfig, _lr_at

    cfg = TrainConfig(config="16k", device="cpu", steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.batch == 8 and cfg.ema >= 0.999 and cfg.latent_shape == (4, 16, 64, 64)
    assert _lr_at(0, cfg) == pytest.approx(1e-4) and _lr_at(9, cfg) == pytest.approx(1e-3)
    assert _lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-2) and _lr_at(500, cfg) == pytest.approx(1e-4)


def _tiny_cfg(out, **kw):
    from tools.train_testbed import TrainConfig

    base = dict(config="16k", steps=4, batch=1, out=str(out), device="cpu", latent_shape=TINY,
                model_overrides=TINY_MODEL, log_every=1, warmup=2, eval_batch=1, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_checkpoint_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from tools.train_testbed import CHECKPOINT, main, train

    straight = train(_tiny_cfg(tmp_path / "a"))
    assert straight["steps_done"] == 4 and not straight["stopped_early"]
    cli = ["--config", "16k", "--steps", "4", "--batch", "1", "--device", "cpu", "--latent-shape", *map(str, TINY),
           "--model-overrides", '{"num_layers": 2}', "--log-every", "1", "--warmup", "2", "--eval-batch", "1",
           "--checkpoint-every", "0"]
    first = main(cli + ["--out", str(tmp_path / "b"), "--run-steps", "2"])
    assert first["steps_done"] == 2 and first["stopped_early"]
    assert (tmp_path / "b" / "testbed16k.safetensors").exists()  # usable weights after every call
    with pytest.raises(SystemExit, match=r"\['lr'\] differ"):
        main(["--resume", str(tmp_path / "b"), "--lr", "0.1"])
    second = main(["--resume", str(tmp_path / "b"), "--run-steps", "5"])
    assert second["steps_done"] == 4 and second["steps_this_call"] == 2 and not second["stopped_early"]

    ca = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    cb = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    assert ca["step"] == cb["step"] == 4
    for key in ("model", "ema"):
        assert ca[key].keys() == cb[key].keys()
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)
    wa, wb = load_file(str(tmp_path / "a" / "testbed16k.safetensors")), load_file(str(tmp_path / "b" / "testbed16k.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows_a] == [r.split(",")[:2] for r in rows_b]  # same steps and losses
    reloaded = build_testbed16k(weights=tmp_path / "b" / "testbed16k.safetensors")
    assert count_params(reloaded) == straight["params"]
    with pytest.raises(ValueError, match="nothing to do"):
        train(_tiny_cfg(tmp_path / "b", resume=str(tmp_path / "b")))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['seed'\]"):
        train(_tiny_cfg(tmp_path / "b", resume=str(tmp_path / "b"), seed=1, steps=6))


def test_noise_floor_tiny_model():
    model = build_testbed16k(pretrained=False, overrides=TINY_MODEL)
    noise = torch.randn(1, *TINY, generator=torch.Generator().manual_seed(0))
    cond = data16k.class_embeddings(torch.tensor([5]))
    nf = noise_floor(model, noise, cond, steps=3, guidance_scale=3.0, runs=("fp32", "bf16"))
    same, bf16 = nf.runs
    assert same.name == "fp32" and same.psnr_db == math.inf and same.step_rel_err == [0.0, 0.0, 0.0]
    assert bf16.name == "bf16" and math.isfinite(bf16.psnr_db) and 15.0 < bf16.psnr_db < 100.0
    assert len(bf16.step_rel_err) == 3 and all(0.0 < e < 0.5 for e in bf16.step_rel_err)
    assert bf16.final_rel_err == bf16.step_rel_err[-1]
    assert nf.to_dict()["runs"][0]["psnr_db"] == "inf" and "bf16" in nf.table()
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_noise_floor_psnr_and_run_names():
    a = torch.zeros(1, 4, 2, 4, 4)
    assert psnr_video(a, a)[0] == math.inf
    db, lib = psnr_video(a, a + 0.02)
    assert db == pytest.approx(40.0, abs=1e-3) and lib in ("torchmetrics", "skimage", "closed form")
    assert psnr_video(a + 5.0, a + 3.0)[0] == math.inf  # compared as videos: clamped to [-1, 1]
    assert parse_run("bf16-cudnn") == ("bf16", "cudnn") and parse_run("amp") == ("amp", None)
    with pytest.raises(ValueError, match="expected <precision>"):
        parse_run("bf17")
    with pytest.raises(ValueError, match="must be fp32"):
        noise_floor(build_testbed16k(pretrained=False, overrides=TINY_MODEL).bfloat16(), torch.randn(1, *TINY),
                    data16k.class_embeddings(torch.tensor([0])), steps=1)
