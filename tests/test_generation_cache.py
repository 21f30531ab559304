"""Step caching (diffusers `enable_cache`) and sparse attention on one model: one notion of a denoising step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig  # noqa: E402

from sparsify import installed_sites, runtime, sparsify, unsparsify  # noqa: E402
from sparsify.adapters import adapter_for  # noqa: E402
from sparsify.testing import dits  # noqa: E402
from test_pipelines import StepLog, wan_generate, wan_pipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (2, 8, 8)
MAX_AGE = 2
DENSE_STEPS = 1


def recipe(**extra):
    # mask_reuse threshold 2.0 (cosine distance <= 2 always): a selection is reused by age alone, deterministically
    return {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 0.5},
                                       "dense_steps": DENSE_STEPS,
                                       "mask_reuse": {"threshold": 2.0, "max_age": MAX_AGE}, **extra}}


def _model(order: str):
    """tiny Wan, sparsified and with First Block Cache, in either order."""
    m = dits.tiny_wan()
    if order == "cache-first":
        m.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        sparsify(m, recipe())
    else:
        sparsify(m, recipe())
        m.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    return m


def _inputs(m, batch=1):
    kw = adapter_for(m).example_inputs(m, grid=GRID, batch=batch)
    g = torch.Generator().manual_seed(0)
    kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=g)
    kw["encoder_hidden_states"] = torch.randn(kw["encoder_hidden_states"].shape, generator=g)
    return kw


def _leader(m):
    return m.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")


def expected_selections(computed: list[bool]) -> list[str | None]:
    """What mask reuse must do for one call slot whose tail blocks ran at the steps `computed` marks: at a
    computed sparse step, reuse the last fresh selection of the same slot if it is at most MAX_AGE steps old,
    else select afresh; nothing at skipped steps (None) and dense at the first DENSE_STEPS steps."""
    out, last = [], None
    for s, ran in enumerate(computed):
        if not ran:
            out.append(None)
        elif s < DENSE_STEPS:
            out.append("dense")
        elif last is not None and 0 < s - last <= MAX_AGE:
            out.append("reused")
        else:
            out.append("fresh")
            last = s
    return out


def _run(m, kw, script: dict[str, list[bool]], *, step_index: bool):
    """A denoising loop: per step, one call per branch of `script` (its name is the cache context), with the
    First Block Cache forced to compute (threshold -1) or reuse (threshold inf) the tail blocks as scripted.
    Returns, per branch and step, what the tail site `blocks.1.attn1` did and sparsify's step after the call."""
    tail = next(s for s in installed_sites(m) if s.path == "blocks.1.attn1")
    steps = len(next(iter(script.values())))
    did = {b: [] for b in script}
    counted = []
    runtime.new_generation()
    for i, t in enumerate(torch.linspace(900, 100, steps).tolist()):
        for branch, plan in script.items():
            _leader(m).threshold = -1.0 if plan[i] else float("inf")
            before = (tail.calls, tail.selections, tail.reused, tail.dense_work)
            ctx = {"step_index": i, "num_inference_steps": steps} if step_index else {}
            with torch.no_grad(), m.cache_context(branch, **ctx):
                m(**{**kw, "timestep": torch.full_like(kw["timestep"], int(t))})
            calls, sel, reu, dw = (a - b for a, b in zip((tail.calls, tail.selections, tail.reused, tail.dense_work),
                                                        before))
            did[branch].append(None if not calls else "dense" if sel == reu == 0 else "reused" if reu else "fresh")
            counted.append((runtime.STATE.steps.step, i))
    return did, counted


# cond and uncond skip the tail blocks at different steps: a selection must never pass between them
CFG_SCRIPT = {"cond": [True, True, False, True, False, True, True],
              "uncond": [True, False, True, False, True, True, False]}


@pytest.mark.parametrize("order", ["cache-first", "sparsify-first"])
@pytest.mark.parametrize("step_index", [True, False], ids=["step_index", "timesteps"])
def test_cfg_two_calls_cache_and_step_counter_agree(order, step_index):
    m = _model(order)
    did, counted = _run(m, _inputs(m), CFG_SCRIPT, step_index=step_index)
    for branch, plan in CFG_SCRIPT.items():
        assert did[branch] == expected_selections(plan), branch
    assert all(got == want for got, want in counted)  # sparsify's step is the loop's step after every call
    unsparsify(m)


def test_cfg_as_one_doubled_batch_cache_and_step_counter_agree():
    m = _model("sparsify-first")
    plan = [True, True, False, False, True, False, True]
    did, counted = _run(m, _inputs(m, batch=2), {"cond_uncond": plan}, step_index=True)
    assert did["cond_uncond"] == expected_selections(plan)
    assert all(got == want for got, want in counted)
    unsparsify(m)


def test_discovery_with_the_cache_enabled_leaves_the_cache_state_fresh():
    """sparsify() after enable_cache() runs the model once to find its sites; the cache must not keep it."""
    m = dits.tiny_wan()
    m.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    sparsify(m, recipe())
    leader = _leader(m)
    assert not leader.state_manager._state_cache and leader.state_manager._context is None
    assert [s.path for s in installed_sites(m)] == ["blocks.0.attn1", "blocks.1.attn1"]
    unsparsify(m)


@pytest.mark.parametrize("order", ["cache-first", "sparsify-first"])
def test_pipeline_cache_at_threshold_zero_equals_uncached_sparse(order):
    """WanPipeline with CFG as two calls: First Block Cache at threshold 0 never reuses, so the latents equal
    the uncached sparse run exactly, and so do sparsify's counters."""
    pipe = wan_pipe()
    sparsify(pipe.transformer, recipe())
    ref_log = StepLog(pipe.transformer)
    ref = wan_generate(pipe, steps=5, log=ref_log)
    unsparsify(pipe.transformer)
    if order == "cache-first":
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        sparsify(pipe.transformer, recipe())
    else:
        sparsify(pipe.transformer, recipe())
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    log = StepLog(pipe.transformer)
    out = wan_generate(pipe, steps=5, log=log)
    assert torch.equal(out, ref)
    assert any(s["reused"] for s in ref_log.rows[-1]["sites"])  # mask reuse took part
    for a, b in zip(log.rows, ref_log.rows):
        for sa, sb in zip(a["sites"], b["sites"]):
            assert (sa["step"], sa["calls"], sa["selections"], sa["reused"]) == \
                   (sb["step"], sb["calls"], sb["selections"], sb["reused"])
    unsparsify(pipe.transformer)


def test_pipeline_magcache_skipping_whole_steps_keeps_the_step_count():
    """MagCache skips every block at some steps (no attention runs there): sparsify's step at the steps that
    do run is still the pipeline's step index, so dense first steps and schedules land on the right steps."""
    steps = 6
    pipe = wan_pipe()
    # ratios of 1 accumulate no error: after the first step every other step is skipped (max_skip_steps=1)
    pipe.transformer.enable_cache(MagCacheConfig(threshold=1.0, max_skip_steps=1, retention_ratio=0.0,
                                                 num_inference_steps=steps, mag_ratios=[1.0] * steps))
    sparsify(pipe.transformer, recipe(dense_steps=3))
    log = StepLog(pipe.transformer)
    wan_generate(pipe, steps=steps, log=log)
    head = [row["sites"][0] for row in log.rows]
    calls = [r["calls"] for r in head]
    ran = [i for i in range(steps) if calls[i] > (calls[i - 1] if i else 0)]
    assert ran == [0, 2, 4]  # the cache did skip whole steps
    assert [head[i]["step"] for i in ran] == ran
    sel = [r["selections"] + r["reused"] for r in head]
    assert sel[2] == 0 and sel[4] > 0  # dense through step 2 (dense_steps=3), sparse at step 4
    unsparsify(pipe.transformer)
