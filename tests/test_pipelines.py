"""diffusers pipelines with a sparsified transformer: Wan (CFG as two calls), CogVideoX (doubled batch), HunyuanVideo."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
import torch.nn.functional as F

pytest.importorskip("diffusers")

from sparsify.testing import dits  # noqa: E402
from sparsify import installed_sites, runtime, sparsify, unsparsify  # noqa: E402

# Wan: 5 frames at 64x64 with the tiny VAE below (4x spatial, 4x temporal) -> latent [4, 2, 16, 16] -> grid (2, 8, 8);
# (1, 8, 8) tiles make 2 key tiles per head, so density 0.5 keeps 1 of them: a really sparse selection.
TILE = [1, 8, 8]
FRAMES, SIZE = 5, 64
TEXT_LEN, TEXT_DIM = 8, 16  # tiny_wan/tiny_cogvideox/tiny_hunyuan text width


def recipe(density=0.5, **defaults):
    return {"version": 1, "defaults": {"method": "vsa", "tile": TILE, "budget": {"density": density}, **defaults}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def installed():
    """Sparsify through this fixture: every model it sparsified is unsparsified at teardown, even on failure."""
    models = []

    def _sparsify(model, rec):
        models.append(sparsify(model, rec))
        return model

    yield _sparsify
    for m in models:
        m = getattr(m, "_orig_mod", m)
        if getattr(m, "_sparsify", None) is not None:
            unsparsify(m)


def _embeds(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g) for _ in range(n)]


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_wan_vae():
    """A random-weight AutoencoderKLWan with 4 latent channels, 4x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=4,
                            scale_factor_temporal=4).eval()


def wan_pipe(transformer_2=False, cls=None, **config):
    """A WanPipeline without text encoder or tokenizer (prompt embeddings are passed directly).

    The tiny VAE sets the latent size (its compression factors); `output_type="latent"` skips decoding.
    """
    from diffusers import WanPipeline

    cls = cls or WanPipeline
    extra = {"transformer_2": dits.tiny_wan(), **config} if transformer_2 else config
    pipe = cls(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), scheduler=_scheduler(),
               transformer=dits.tiny_wan(), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepLog:
    """A `callback_on_step_end` recording, after every denoising step, the latents and each site's counters."""

    def __init__(self, *models):
        self.models, self.rows = models, []

    def __call__(self, pipe, i, t, kwargs):
        sites = [s for m in self.models for s in installed_sites(getattr(m, "_orig_mod", m))]
        self.rows.append({"i": i, "latents": kwargs["latents"].clone(),
                          "sites": [dict(step=s.step_seen, gen=s.gen_seen, in_step=s.calls_in_step, calls=s.calls,
                                         selections=s.selections, reused=s.reused, work=s.work,
                                         dense_work=s.dense_work) for s in sites]})
        return {}


def wan_generate(pipe, height=SIZE, width=SIZE, steps=4, log=None, output_type="latent", seed=1):
    pe, ne = _embeds()
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=height, width=width, num_frames=FRAMES,
                    num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                    output_type=output_type, callback_on_step_end=log).frames


def test_wan_pipeline_sparse_generation_with_cfg(installed):
    """A full WanPipeline generation (VAE decode included) with CFG as two transformer calls per step."""
    pipe = wan_pipe()
    dense_log = StepLog()
    dense = wan_generate(pipe, log=dense_log, output_type="pt")
    # mask_reuse threshold 2.0 (cosine distance <= 2 always): selections are reused by age alone, deterministically
    pipe.transformer = installed(pipe.transformer, recipe(dense_steps=1, mask_reuse={"threshold": 2.0, "max_age": 2}))
    log = StepLog(pipe.transformer)
    video = wan_generate(pipe, log=log, output_type="pt")

    assert video.shape == dense.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(video).all()
    assert (video - dense).abs().max() > 1e-3  # the sparse attention changed the video
    B, H = 1, 2
    assert [row["i"] for row in log.rows] == [0, 1, 2, 3]
    for row in log.rows:
        i = row["i"]
        assert len(row["sites"]) == 2
        for s in row["sites"]:
            # the runtime's step is the pipeline's step; both CFG calls (cond: 0, uncond: 1) share it
            assert (s["step"], s["in_step"], s["calls"]) == (i, 1, 2 * (i + 1))
            assert s["dense_work"] == 2 * (i + 1) * B * H
            # step 0 dense (dense_steps=1); then 1 of 2 key tiles: half the work
            assert s["work"] == pytest.approx(2 * B * H + i * 2 * B * H * 0.5)
            # step 1: one fresh selection per CFG call (separate cache entries); steps 2, 3 reuse them (max_age 2)
            assert (s["selections"], s["reused"]) == [(0, 0), (2, 0), (2, 2), (2, 4)][i]
    # the dense warm-up step is exactly the dense pipeline's step; the sparse steps are not
    torch.testing.assert_close(log.rows[0]["latents"], dense_log.rows[0]["latents"], atol=1e-6, rtol=0)
    assert all((a["latents"] - b["latents"]).abs().max() > 1e-4 for a, b in zip(log.rows[1:], dense_log.rows[1:]))
    assert all(s.density == pytest.approx(0.625) for s in installed_sites(pipe.transformer))

    # a second generation in the same process starts again at step 0, dense, with nothing reused from the first
    log2 = StepLog(pipe.transformer)
    wan_generate(pipe, log=log2)
    gen = log.rows[0]["sites"][0]["gen"]
    for row in log2.rows:
        for s, s1 in zip(row["sites"], log.rows[row["i"]]["sites"]):
            assert (s["step"], s["gen"], s["in_step"]) == (row["i"], gen + 1, 1)
            assert (s["selections"] - 2, s["reused"] - 4) == (s1["selections"], s1["reused"])
    torch.testing.assert_close(log2.rows[-1]["latents"], log.rows[-1]["latents"], atol=1e-6, rtol=0)


def test_wan_pipeline_density_one_and_unsparsify_equal_dense(installed):
    pipe = wan_pipe()
    dense = wan_generate(pipe, steps=2)
    model = pipe.transformer
    pipe.transformer = installed(model, recipe(1.0))
    out = wan_generate(pipe, steps=2)
    sites = installed_sites(model)
    assert [(s.calls, s.selections, s.density) for s in sites] == [(4, 4, 1.0)] * 2  # every call took the tiled path
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
    unsparsify(model)
    assert torch.equal(wan_generate(pipe, steps=2), dense)


def test_wan_pipeline_several_resolutions(installed):
    """Successive generations at two grids: layouts per grid, steps restart, no selection crosses grids."""
    pipe = wan_pipe()
    rec = recipe(mask_reuse={"threshold": 2.0, "max_age": 8})
    pipe.transformer = installed(pipe.transformer, rec)
    sizes = [(SIZE, SIZE), (SIZE, 96), (SIZE, SIZE)]  # grids (2, 8, 8), (2, 8, 12) (partial tiles), (2, 8, 8)
    outs, logs, steps = [], [], 2
    for h, w in sizes:
        logs.append(StepLog(pipe.transformer))
        outs.append(wan_generate(pipe, h, w, steps=steps, log=logs[-1]))
    assert [tuple(o.shape) for o in outs] == [(1, 4, 2, 16, 16), (1, 4, 2, 16, 24), (1, 4, 2, 16, 16)]
    assert all(torch.isfinite(o).all() for o in outs)
    for n, log in enumerate(logs):
        for row in log.rows:
            for s in row["sites"]:
                assert (s["step"], s["in_step"]) == (row["i"], 1)
                # each generation selects afresh at step 0 (cond + uncond) and reuses after: never across grids
                assert (s["selections"], s["reused"]) == (2 * (n + 1), 2 * n * (steps - 1) + 2 * row["i"])
    torch.testing.assert_close(outs[2], outs[0], atol=1e-6, rtol=0)
    # the middle resolution equals a fresh model's generation at that resolution alone
    fresh = wan_pipe()
    fresh.transformer = installed(fresh.transformer, rec)
    runtime.new_generation()
    torch.testing.assert_close(wan_generate(fresh, SIZE, 96, steps=steps), outs[1], atol=1e-6, rtol=0)


def test_wan22_two_transformers_share_the_step_count(installed):
    """Wan 2.2 A14B style: a high-noise transformer and a low-noise transformer_2, both sparsified."""
    pipe = wan_pipe(transformer_2=True, boundary_ratio=0.8)
    pipe.transformer = installed(pipe.transformer, recipe(dense_steps=1))
    pipe.transformer_2 = installed(pipe.transformer_2, recipe(dense_steps=1))
    log = StepLog(pipe.transformer, pipe.transformer_2)
    out = wan_generate(pipe, steps=4, log=log)
    assert torch.isfinite(out).all()
    assert [float(t) for t in pipe.scheduler.timesteps] == [999.0, 900.0, 750.0, 500.0]  # boundary 800: 2 + 2 steps
    high, low = log.rows[-1]["sites"][:2], log.rows[-1]["sites"][2:]
    B, H = 1, 2
    # the step index is the generation's, across both transformers: the low-noise one starts at step 2 (sparse)
    assert [(s["step"], s["calls"], s["work"], s["dense_work"]) for s in high] == [(1, 4, 2 * B * H + B * H, 4 * B * H)] * 2
    assert [(s["step"], s["calls"], s["work"], s["dense_work"]) for s in low] == [(3, 4, 2 * B * H, 4 * B * H)] * 2
    unsparsify(pipe.transformer)
    unsparsify(pipe.transformer_2)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_wan_ti2v_per_token_timesteps_count_steps(installed):
    """Wan 2.2 TI2V (`expand_timesteps`): the timestep is per token and the conditioning frame's tokens are at 0."""
    from diffusers import WanImageToVideoPipeline

    pipe = wan_pipe(cls=WanImageToVideoPipeline, expand_timesteps=True)
    pipe.transformer = installed(pipe.transformer, recipe(dense_steps=2))
    log = StepLog(pipe.transformer)
    pe, ne = _embeds()
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pipe(image=image, prompt_embeds=pe, negative_prompt_embeds=ne, height=SIZE, width=SIZE,
                   num_frames=FRAMES, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                   generator=torch.Generator().manual_seed(1), callback_on_step_end=log).frames
    assert out.shape == (1, 4, 2, 16, 16) and torch.isfinite(out).all()
    B, H = 1, 2
    for row in log.rows:
        for s in row["sites"]:
            assert (s["step"], s["in_step"]) == (row["i"], 1)
    # steps 0, 1 dense; steps 2, 3 at half the work
    assert [s["work"] for s in log.rows[-1]["sites"]] == [4 * B * H + 4 * B * H * 0.5] * 2


def cogvideox_pipe():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dits.tiny_cogvideox(),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_generate(pipe, steps=3, log=None, **kw):
    pe, ne = _embeds(3)
    with torch.no_grad():  # 5 frames at 128x128 (the default size) -> latent [2, 4, 16, 16] -> grid (2, 8, 8)
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(1), output_type="latent", callback_on_step_end=log,
                    **kw).frames


def test_cogvideox_pipeline_cfg_as_doubled_batch(installed):
    pipe = cogvideox_pipe()
    dense = cogvideox_generate(pipe)
    model = pipe.transformer
    pipe.transformer = installed(model, recipe(dense_steps=1, mask_reuse={"threshold": 2.0, "max_age": 2}))
    log = StepLog(model)
    out = cogvideox_generate(pipe, log=log)
    assert out.shape == dense.shape == (1, 2, 4, 16, 16) and torch.isfinite(out).all()
    assert (out - dense).abs().max() > 1e-3
    B, H = 2, 2  # one call per step on the doubled [uncond, cond] batch
    for row in log.rows:
        i = row["i"]
        for s in row["sites"]:
            assert (s["step"], s["in_step"], s["calls"], s["dense_work"]) == (i, 0, i + 1, (i + 1) * B * H)
            assert (s["selections"], s["reused"]) == [(0, 0), (1, 0), (1, 1)][i]
            assert (s["work"] < s["dense_work"]) == (i > 0)
    unsparsify(model)
    pipe.transformer = installed(model, recipe(1.0))
    torch.testing.assert_close(cogvideox_generate(pipe), dense, atol=1e-4, rtol=0)
    assert all(s.selections == s.calls == 3 for s in installed_sites(model))
    # another resolution in the same process (the CogVideoX positional embedding is rebuilt for it)
    assert cogvideox_generate(pipe, steps=2, height=128, width=192).shape == (1, 2, 4, 16, 24)


def test_hunyuan_video_pipeline_true_cfg_with_text_padding(installed):
    """HunyuanVideoPipeline without its Llama/CLIP encoders: embeddings, pooled embeddings and masks are passed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=dits.tiny_hunyuan(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    pe, ne = _embeds(4)
    masks = [torch.arange(TEXT_LEN)[None] < n for n in (6, 3)]  # padded text of different lengths

    def generate(log=None):
        with torch.no_grad():  # 5 frames at 128x128 (VAE factors 4, 8 without a VAE) -> grid (2, 8, 8)
            return pipe(prompt_embeds=pe, pooled_prompt_embeds=torch.randn(1, 8, generator=g.manual_seed(5)),
                        prompt_attention_mask=masks[0], negative_prompt_embeds=ne, negative_prompt_attention_mask=masks[1],
                        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g.manual_seed(6)), true_cfg_scale=4.0,
                        height=128, width=128, num_frames=FRAMES, num_inference_steps=3, output_type="latent",
                        generator=torch.Generator().manual_seed(1), callback_on_step_end=log).frames

    dense = generate()
    model = pipe.transformer
    pipe.transformer = installed(model, recipe())
    log = StepLog(model)
    out = generate(log)
    assert out.shape == (1, 4, 2, 16, 16) and torch.isfinite(out).all() and (out - dense).abs().max() > 1e-3
    for row in log.rows:
        for s in row["sites"]:
            assert (s["step"], s["in_step"], s["calls"]) == (row["i"], 1, 2 * (row["i"] + 1))
            assert s["work"] < s["dense_work"]
    unsparsify(model)
    pipe.transformer = installed(model, recipe(1.0))
    torch.testing.assert_close(generate(), dense, atol=1e-5, rtol=0)
    assert all(s.selections == s.calls == 6 for s in installed_sites(model))


@pytest.mark.slow  # compile-heavy
def test_wan_pipeline_compile_repeated_blocks_matches_eager(installed):
    pipe = wan_pipe()
    pipe.transformer = installed(pipe.transformer, recipe(dense_steps=1, mask_reuse={"threshold": 2.0, "max_age": 2}))
    eager_log = StepLog(pipe.transformer)
    eager = wan_generate(pipe, steps=3, log=eager_log)
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    dynamo_utils.counters.clear()
    log = StepLog(pipe.transformer)
    out = wan_generate(pipe, steps=3, log=log)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # one block graph for every block, step and CFG call
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    totals = eager_log.rows[-1]["sites"]  # counters are cumulative: subtract the eager generation's
    for row, erow in zip(log.rows, eager_log.rows):  # the same steps, dense warm-up, selections and reuse
        for s, e, tot in zip(row["sites"], erow["sites"], totals):
            assert (s["step"], s["in_step"]) == (row["i"], 1)
            assert s["work"] - tot["work"] == pytest.approx(e["work"])
            assert (s["selections"] - tot["selections"], s["reused"] - tot["reused"]) == (e["selections"], e["reused"])


@pytest.mark.slow  # compile-heavy
def test_wan_pipeline_whole_model_compile_matches_eager(installed):
    """`torch.compile(pipe.transformer, fullgraph=True)`: the geometry/timestep hook is traced into the graph; one
    graph serves every step and CFG call (no recompilation per timestep). The eager backend keeps it fast; inductor
    on the whole model is covered in test_sparsify.py and test_runtime_steps.py."""
    pipe = wan_pipe()
    model = installed(pipe.transformer, recipe(dense_steps=1, mask_reuse={"threshold": 2.0, "max_age": 2}))
    eager_log = StepLog(model)
    eager = wan_generate(pipe, steps=3, log=eager_log)
    pipe.transformer = torch.compile(model, fullgraph=True, backend="eager")
    dynamo_utils.counters.clear()
    log = StepLog(model)
    out = wan_generate(pipe, steps=3, log=log)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    totals = eager_log.rows[-1]["sites"]
    for row, erow in zip(log.rows, eager_log.rows):
        for s, e, tot in zip(row["sites"], erow["sites"], totals):
            assert (s["step"], s["in_step"]) == (row["i"], 1)
            assert s["work"] - tot["work"] == pytest.approx(e["work"])
            assert (s["selections"] - tot["selections"], s["reused"] - tot["reused"]) == (e["selections"], e["reused"])
