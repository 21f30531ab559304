"""Calibrating real diffusers pipelines: tiny Wan T2V, Wan 2.2 two-transformer and I2V, CogVideoX T2V and I2V,
HunyuanVideo and LTX-Video pipelines saved to disk and loaded back through `python -m sparsify.calibrate --pipeline`, pipeline
recipes, mask reuse on the pipeline's trajectory, resolution transfer."""

from __future__ import annotations

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sparsify import installed_sites, load_recipe, sparsify, unsparsify  # noqa: E402
from sparsify.calibrate.__main__ import main  # noqa: E402
from sparsify.calibrate.pipeline import (encode_prompts, load_pipeline, plan_pipeline_calibration,  # noqa: E402
                                        sample_steps, transformer_steps)
from sparsify.pipeline_recipe import PipelineRecipe, load_pipeline_recipe  # noqa: E402
from sparsify.recipe import Recipe, RecipeError  # noqa: E402
from tools.make_random_pipeline import build_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat walks on the beach", "a red car drives at night"]
# 5 frames at 64x64 with the tiny VAE (4x spatial, 4x temporal) and patch (1, 2, 2) -> grid (2, 8, 8)
GEN = ["--height", "64", "--width", "64", "--num-frames", "5", "--num-inference-steps", "4", "--max-sequence-length", "12"]
FAST = ["--tiles", "1x8x8", "--levels", "0.5", "--budget", "0.5", "--no-plots", "--quiet", "--no-output-error"]
# joint attention with 12 text tokens: the text rows and columns stay dense, so 1x8x8 tiles at 0.5 cost 0.582
JOINT_DENSITY = (2 * 1 * 64 * 64 + 12 * (128 + 12) + 128 * 12) / 140 ** 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(config)`: the folder of a tiny random pipeline saved with `save_pretrained` (built once per module)."""
    root, done = tmp_path_factory.mktemp("pipelines"), {}

    def get(config):
        if config not in done:
            build_pipeline(config).save_pretrained(root / config)
            done[config] = root / config
        return str(done[config])

    return get


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n")
    return str(f)


def _generate(pipe, image=None, seed=1):
    call = encode_prompts(pipe, PROMPTS[:1], max_sequence_length=12)[0]
    kw = {"image": image} if image is not None else {}
    with torch.no_grad():
        return pipe(**call, height=64, width=64, num_frames=5, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **kw).frames


def _sparse_generation_differs(pipe, recipe, n_sites, calls, density=None):
    """Sparsify the pipeline's transformer with `recipe`, generate, check its sites, and restore it exactly."""
    dense = _generate(pipe)
    sparsify(pipe, recipe)
    try:
        sparse = _generate(pipe)
        sites = installed_sites(pipe.transformer)
        assert len(sites) == n_sites and all(s.calls == calls for s in sites)
        if density is not None:
            assert all(s.density == pytest.approx(density) for s in sites)
    finally:
        unsparsify(pipe)
    assert (sparse - dense).abs().max() > 1e-4
    assert torch.equal(_generate(pipe), dense)


def test_sample_steps_spread_over_each_transformers_steps():
    assert sample_steps(range(50), 4) == [6, 18, 31, 43]
    assert sample_steps(range(10, 20), 2) == [12, 17]
    pipe = build_pipeline("tiny-t2v-a14b")  # boundary 0.8: timesteps 999, 900 >= 800 > 750, 500
    assert transformer_steps(pipe, 4) == {"transformer": [0, 1], "transformer_2": [2, 3]}
    assert transformer_steps(build_pipeline("tiny-t2v"), 3) == {"transformer": [0, 1, 2]}


def test_cli_wan_t2v_calibrates_on_its_trajectory_and_sparsifies_the_pipeline(saved, prompts, tmp_path):
    path = saved("tiny-t2v")
    out = tmp_path / "wan.yaml"
    assert main(["--pipeline", path, "--prompts", prompts, *GEN, "--steps", "2", *FAST, "--out", str(out)]) == 0
    recipe = load_recipe(out)  # a single-transformer pipeline gives a plain version-1 recipe
    cal = recipe.calibration
    assert (cal["pipeline"], cal["grid"], cal["height"], cal["width"], cal["num_frames"]) == ("WanPipeline", [2, 8, 8],
                                                                                              64, 64, 5)
    assert cal["steps_run"] == [0, 1, 2, 3] and cal["calibrated_steps"] == [0, 2]
    # the observer saw only the sampled steps: 2 steps x 2 prompts x 2 guidance branches per site (of 16 calls)
    assert cal["calls_per_site"] == 2 * 2 * 2
    assert "--pipeline" in cal["command"]

    # sparsify(pipe, ...) dispatches to sparsify_pipeline; 4 steps x 2 guidance calls per site
    _sparse_generation_differs(load_pipeline(path), recipe, n_sites=2, calls=8, density=0.5)


def test_cli_wan22_two_transformers_each_on_its_own_steps(saved, prompts, tmp_path):
    path = saved("tiny-t2v-a14b")
    out = tmp_path / "wan22.yaml"
    assert main(["--pipeline", path, "--prompts", prompts, *GEN, "--steps", "1", *FAST, "--out", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    assert set(data) == {"version", "transformers", "calibration"} and data["calibration"]["boundary_ratio"] == 0.8
    recipe = load_pipeline_recipe(out)
    assert isinstance(recipe, PipelineRecipe) and list(recipe.transformers) == ["transformer", "transformer_2"]
    high, low = (recipe.transformers[n].calibration for n in ("transformer", "transformer_2"))
    assert (high["steps_run"], low["steps_run"]) == ([0, 1], [2, 3])
    assert high["calibrated_steps"][0] in (0, 1) and low["calibrated_steps"][0] in (2, 3)
    assert high["calls_per_site"] == low["calls_per_site"] == 1 * 2 * 2
    with pytest.raises(RecipeError, match="pipeline recipe"):
        load_recipe(out)  # a single model cannot take it

    pipe = load_pipeline(path)
    dense = _generate(pipe)
    sparsify(pipe, str(out))
    try:
        assert all(len(installed_sites(m)) == 2 for m in (pipe.transformer, pipe.transformer_2))
        sparse = _generate(pipe)
        assert all(s.calls == 4 for m in (pipe.transformer, pipe.transformer_2) for s in installed_sites(m))
    finally:
        unsparsify(pipe)
    assert (sparse - dense).abs().max() > 1e-4


def test_python_entry_calibrates_every_transformer_of_the_pipeline_object():
    """`calibrate_pipeline(pipe, prompts, budget=...)` on a pipeline object (Wan 2.2: two transformers), no CLI."""
    from sparsify.calibrate import calibrate_pipeline

    pipe = build_pipeline("tiny-t2v-a14b")
    dense = _generate(pipe)
    recipe = calibrate_pipeline(pipe, PROMPTS, budget=0.5, height=64, width=64, num_frames=5, num_inference_steps=4,
                                steps=1, max_sequence_length=12, tiles=[(1, 8, 8)], levels=(0.5,), output_error=False,
                                progress=False, verbose=False)
    assert isinstance(recipe, PipelineRecipe) and list(recipe.transformers) == ["transformer", "transformer_2"]
    high, low = (recipe.transformers[n].calibration for n in ("transformer", "transformer_2"))
    assert (high["steps_run"], low["steps_run"]) == ([0, 1], [2, 3]) and high["grid"] == [2, 8, 8]
    sparsify(pipe, recipe)
    try:
        sparse = _generate(pipe)
        assert all(s.density == pytest.approx(0.5) for m in (pipe.transformer, pipe.transformer_2)
                   for s in installed_sites(m))
    finally:
        unsparsify(pipe)
    assert (sparse - dense).abs().max() > 1e-4 and torch.equal(_generate(pipe), dense)


def test_cli_wan_i2v_with_an_image_and_dry_run(saved, prompts, tmp_path, capsys):
    from PIL import Image

    path = saved("tiny-ti2v")
    img = tmp_path / "first.png"
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()).save(img)
    args = ["--pipeline", path, "--prompts", prompts, "--image", str(img), *GEN, "--steps", "2", *FAST]
    assert main([*args, "--dry-run"]) == 0
    assert "+8 unmeasured forwards" in capsys.readouterr().out  # 4 steps x 2 prompts x 2, 2 steps measured
    out = tmp_path / "i2v.yaml"
    assert main([*args, "--out", str(out)]) == 0
    cal = load_recipe(out).calibration
    assert cal["pipeline"] == "WanImageToVideoPipeline" and cal["grid"] == [2, 8, 8] and cal["calls_per_site"] == 8


def test_cli_cogvideox_one_batched_call_per_step_with_text_first(saved, prompts, tmp_path, capsys):
    """CogVideoX runs both guidance branches as one batch of 2, text tokens first, rotary positions."""
    path = saved("tiny-cogvideox")
    args = ["--pipeline", path, "--prompts", prompts, *GEN, "--steps", "2", *FAST, "--budget", "0.6"]
    assert main([*args, "--dry-run"]) == 0
    assert "+4 unmeasured forwards" in capsys.readouterr().out  # 4 steps x 2 prompts x 1 call, 4 measured
    out = tmp_path / "cog.yaml"
    assert main([*args, "--out", str(out)]) == 0
    recipe = load_recipe(out)
    cal = recipe.calibration
    assert (cal["pipeline"], cal["grid"], cal["calls_per_site"]) == ("CogVideoXPipeline", [2, 8, 8], 2 * 2 * 1)
    assert list(recipe.sites) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    _sparse_generation_differs(load_pipeline(path), recipe, n_sites=2, calls=4, density=JOINT_DENSITY)


def test_cli_cogvideox_image_to_video(saved, prompts, tmp_path):
    from PIL import Image

    path = saved("tiny-cogvideox-i2v")
    img = tmp_path / "first.png"
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()).save(img)
    out = tmp_path / "cog-i2v.yaml"
    assert main(["--pipeline", path, "--prompts", prompts, "--image", str(img), *GEN, "--steps", "2", *FAST,
                 "--budget", "0.6", "--out", str(out)]) == 0
    cal = load_recipe(out).calibration
    assert (cal["pipeline"], cal["grid"], cal["calls_per_site"]) == ("CogVideoXImageToVideoPipeline", [2, 8, 8], 4)


def test_hunyuan_prompts_encoded_once_and_guidance_as_an_embedding(saved, prompts, tmp_path):
    path = saved("tiny-hunyuan")
    pipe = load_pipeline(path)
    size = dict(height=64, width=64, num_frames=5, num_inference_steps=2, max_sequence_length=12)
    plan = plan_pipeline_calibration(pipe, PROMPTS, **size, free_text_encoder=True)
    assert list(plan.calls[0]) == ["prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"]
    assert plan.calls[0]["prompt_embeds"].shape[1] == 12
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert (plan.branches, plan.batch, plan.grid) == (1, 1, (2, 8, 8))  # guidance_scale is embedded: one call a step
    # true classifier-free guidance (a negative prompt and true_cfg_scale > 1): the negative prompt is encoded too,
    # and each step makes two calls
    plan = plan_pipeline_calibration(load_pipeline(path), PROMPTS[:1], negative_prompt="rain", **size,
                                     pipeline_kwargs={"true_cfg_scale": 4.0})
    assert {"negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"} <= \
        set(plan.calls[0]) and plan.branches == 2

    out = tmp_path / "hunyuan.yaml"
    assert main(["--pipeline", path, "--prompts", prompts, *GEN, "--steps", "2", *FAST, "--budget", "0.6",
                 "--out", str(out)]) == 0
    recipe = load_recipe(out)
    assert (recipe.calibration["pipeline"], recipe.calibration["calls_per_site"]) == ("HunyuanVideoPipeline", 4)
    assert list(recipe.sites) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    _sparse_generation_differs(load_pipeline(path), recipe, n_sites=2, calls=4, density=JOINT_DENSITY)


def test_cli_ltx_geometry_inferred_from_its_call_and_masks_named_by_encode_prompt(saved, prompts, tmp_path):
    """LTX-Video: no family adapter (the grid comes from the call's num_frames/height/width), patchified latents,
    both guidance branches in one batch of 2, and `encode_prompt` returning the masks between the embeddings."""
    path = saved("tiny-ltx")
    pipe = load_pipeline(path)
    call = encode_prompts(pipe, PROMPTS[:1], max_sequence_length=12)[0]
    assert list(call) == ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                          "negative_prompt_attention_mask"]
    assert call["prompt_embeds"].shape == (1, 12, 16) and call["prompt_attention_mask"].shape == (1, 12)
    out = tmp_path / "ltx.yaml"
    assert main(["--pipeline", path, "--prompts", prompts, *GEN, "--steps", "2", *FAST, "--budget", "0.6",
                 "--out", str(out)]) == 0
    recipe = load_recipe(out)
    cal = recipe.calibration
    assert (cal["pipeline"], cal["grid"], cal["calls_per_site"]) == ("LTXPipeline", [2, 8, 8], 2 * 2 * 1)
    assert list(recipe.sites) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    pipe = load_pipeline(path)
    sparsify(pipe, recipe)  # sparsified at its next call, whose arguments give the geometry
    assert installed_sites(pipe.transformer) == []
    unsparsify(pipe)
    _sparse_generation_differs(pipe, recipe, n_sites=2, calls=4, density=0.5)


def test_cli_mask_reuse_on_the_pipeline_trajectory_per_transformer(saved, prompts, tmp_path):
    """Each transformer of Wan 2.2 gets its own threshold, and the runtime reuses selections in a generation."""
    path = saved("tiny-t2v-a14b")
    out = tmp_path / "reuse.yaml"
    gen = [*GEN[:GEN.index("--num-inference-steps")], "--num-inference-steps", "8", "--max-sequence-length", "12"]
    assert main(["--pipeline", path, "--prompts", prompts, *gen, "--steps", "1", *FAST, "--mask-reuse",
                 "--reuse-max-age", "2", "--out", str(out)]) == 0
    recipe = load_pipeline_recipe(out)
    pipe = load_pipeline(path)
    steps = transformer_steps(pipe, 8)
    call = encode_prompts(pipe, PROMPTS[:1], max_sequence_length=12)[0]
    sparsify(pipe, recipe)
    try:
        with torch.no_grad():
            pipe(**call, height=64, width=64, num_frames=5, num_inference_steps=8, output_type="latent",
                 generator=torch.Generator().manual_seed(1))
        for name, section in recipe.transformers.items():
            found = section.calibration["mask_reuse"]
            assert section.defaults.mask_reuse is not None and found["threshold"] > 0
            assert found["error_growth"] <= 0.05 and 0 < found["reuse_share"] < 1
            sites = installed_sites(getattr(pipe, name))
            reused = sum(s.reused for s in sites)
            # the first step of each transformer selects fresh; no selection is older than max_age 2
            assert 0 < reused <= sum(s.reused + s.selections for s in sites) * (len(steps[name]) - 1) / len(steps[name])
            assert sum(s.selections for s in sites) >= len(sites) * 2 * -(-len(steps[name]) // 3)
    finally:
        unsparsify(pipe)


def test_pipeline_recipe_errors_name_the_section_and_key():
    good = {"version": 1, "transformers": {"transformer": {"version": 1}, "transformer_2": {"version": 1}}}
    assert isinstance(load_pipeline_recipe(good), PipelineRecipe)
    assert isinstance(load_pipeline_recipe({"version": 1, "defaults": {"budget": {"density": 0.2}}}), Recipe)
    bad = {"version": 1, "transformers": {"transformer_2": {"version": 1, "defaults": {"tile": [4, 4, 3]}}}}
    with pytest.raises(RecipeError, match=r"transformers\.transformer_2\.defaults\.tile"):
        load_pipeline_recipe(bad)
    with pytest.raises(RecipeError, match="no transformer 'transformer_3'"):
        sparsify(build_pipeline("tiny-t2v"), {"version": 1, "transformers": {"transformer_3": {"version": 1}}})


def test_check_transfer_on_the_testbed_at_two_resolution_pairs(tmp_path, capsys):
    """Recipes calibrated at one grid apply at another (geometry per call); the penalty is measured, not assumed."""
    common = ["--inputs-from", "random", "--inputs", "1", "--steps", "1", "--tiles", "4x4x4", "--levels", "0.25,0.5", "--budget", "0.4",
              "--no-output-error", "--no-plots", "--quiet", "--checkpoint-dir", "none"]
    rec = tmp_path / "a.yaml"
    assert main([*common, "--grid", "8x16x16", "--out", str(rec)]) == 0
    assert load_recipe(rec).calibration["grid"] == [8, 16, 16]
    capsys.readouterr()
    for target in ("16x8x16", "8x8x8"):
        rep = tmp_path / f"{target}.json"
        assert main([*common, "--grid", target, "--check-transfer", str(rec), "--out", str(rep)]) == 0
        text = capsys.readouterr().out
        assert f"8x16x16 -> {target}" in text
        r = yaml.safe_load(rep.read_text())
        assert r["to_grid"] == [int(x) for x in target.split("x")]
        for k in ("transferred", "native"):
            assert 0 < r[k]["output_error"] < 1 and 0 < r[k]["density"] < 1
        assert r["penalty"] == pytest.approx(r["transferred"]["output_error"] / r["native"]["output_error"])


def test_discovery_inputs_take_the_dtype_of_a_bf16_transformer_with_fp32_modules_kept():
    """diffusers loads a bf16 Wan with `_keep_in_fp32_modules` (its first parameter, `scale_shift_table`) in fp32:
    the adapter's discovery inputs must be bf16, or the patch embedding refuses them."""
    from sparsify import find_sites
    from sparsify.adapters import adapter_for

    model = build_pipeline("tiny-t2v").transformer.to(torch.bfloat16)
    model.scale_shift_table.data = model.scale_shift_table.data.float()
    assert next(model.parameters()).dtype == torch.float32
    inputs = adapter_for(model).example_inputs(model)
    assert inputs["hidden_states"].dtype == torch.bfloat16
    infos, _ = find_sites(model, inputs)
    assert any(i.kind == "self" for i in infos)
