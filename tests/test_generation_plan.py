"""The generation plan in the recipe (schema v2): step reuse and token merging per step, on real pipelines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from sparsify import RecipeError, SparsifyWarning, installed_sites, load_recipe, sparsify, unsparsify  # noqa: E402
from sparsify.recipe import bundled_recipes  # noqa: E402
from test_pipelines import StepLog, wan_generate, wan_pipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V1 = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 0.5}, "dense_steps": 1,
                                 "mask_reuse": {"threshold": 2.0, "max_age": 2}}}


def v2(steps=4, compute=None, merge=(), cls="WanTransformer3DModel", blocks=2, order=None):
    d = copy.deepcopy(V1)
    d["version"] = 2
    d["plan"] = {"model": {"class": cls, "blocks": blocks}, "steps": steps,
                 "compute": list(compute) if compute is not None else [True] * steps, "merge": list(merge)}
    if order is not None:
        d["plan"]["order"] = list(order)
    return d


def test_version_1_recipes_load_unchanged():
    r = load_recipe(V1)
    assert r.version == 1 and r.plan is None and r.to_dict()["version"] == 1 and "plan" not in r.to_dict()
    assert load_recipe(r.to_dict()) == r
    for name in bundled_recipes():
        b = load_recipe(name)
        assert b.plan is None and load_recipe(b.to_dict()) == b


def test_version_2_plan_round_trips_through_yaml():
    r = load_recipe(v2(compute=[True, True, False, True],
                       merge=[{"blocks": [1], "from_step": 1, "to_step": 3, "ratio": 0.25}]))
    assert r.version == 2 and r.plan.compute == (True, True, False, True)
    assert load_recipe(r.to_dict()) == r
    from sparsify.recipe import parse_yaml, recipe_from_dict

    assert recipe_from_dict(parse_yaml(r.to_yaml())) == r


def test_plan_order_round_trips_and_defaults_to_zero():
    r = load_recipe(v2(compute=[True, True, False, False], order=[0, 0, 1, 0]))
    assert r.plan.order == (0, 0, 1, 0) and r.to_dict()["plan"]["order"] == [0, 0, 1, 0]
    assert [r.plan.extrapolates(s) for s in range(4)] == [False, False, True, False]
    assert load_recipe(r.to_dict()) == r
    from sparsify.recipe import parse_yaml, recipe_from_dict

    assert recipe_from_dict(parse_yaml(r.to_yaml())) == r
    plain = load_recipe(v2(compute=[True, True, False, False]))  # a version-2 plan without `order`: all 0
    assert plain.plan.order == (0, 0, 0, 0) and "order" not in plain.to_dict()["plan"]
    assert load_recipe(v2(compute=[True, True, False, False], order=[0, 0, 0, 0])) == plain
    assert load_recipe(plain.to_dict()) == plain


@pytest.mark.parametrize("order,key,words", [
    ([0, 0, 1], "plan.order", "list of 4 entries, 0 or 1"),
    ("0010", "plan.order", "list of 4 entries, 0 or 1"),
    ([0, 0, 2, 0], "plan.order[2]", "must be 0 (reuse the last computed residual) or 1"),
    ([0, 0, True, 0], "plan.order[2]", "got True"),
    ([0, 0, 0.5, 0], "plan.order[2]", "got 0.5"),
    ([0, 1, 1, 0], "plan.order[1]", "step 1 computes (plan.compute[1] is true)"),
])
def test_plan_order_errors_name_the_key(order, key, words):
    d = v2(compute=[True, True, False, False])
    d["plan"]["order"] = order
    with pytest.raises(RecipeError) as e:
        load_recipe(d)
    assert e.value.key == key and words in str(e.value)


@pytest.mark.parametrize("mutate,key,words", [
    (lambda d: d.update(version=1), "plan", "needs 'version: 2'"),
    (lambda d: d["plan"].update(compute=[True, False]), "plan.compute", "list of 4 booleans"),
    (lambda d: d["plan"].update(compute=[False, True, True, True]), "plan.compute[0]", "step 0 must compute"),
    (lambda d: d["plan"].update(merge=[{"blocks": [2], "ratio": 0.25}]), "plan.merge[0].blocks[0]", "has 2 blocks"),
    (lambda d: d["plan"].update(merge=[{"blocks": [0], "ratio": 0.75}]), "plan.merge[0].ratio", "[0, 0.5]"),
    (lambda d: d["plan"].update(merge=[{"blocks": [0], "to_step": 9, "ratio": 0.1}]), "plan.merge[0].to_step",
     "at most the plan's 4 steps"),
    (lambda d: d["plan"].update(stpes=4), "plan.stpes", "did you mean 'steps'"),
])
def test_plan_errors_name_the_key(mutate, key, words):
    d = v2()
    mutate(d)
    with pytest.raises(RecipeError) as e:
        load_recipe(d)
    assert e.value.key == key and words in str(e.value)


@pytest.mark.parametrize("cls,blocks,key,words", [
    ("HunyuanVideoTransformer3DModel", 2, "plan.model.class", "'HunyuanVideoTransformer3DModel' but the model is "
                                                              "'WanTransformer3DModel'"),
    ("WanTransformer3DModel", 40, "plan.model.blocks", "with 40 blocks but this one has 2"),
])
def test_a_plan_for_another_model_is_refused(cls, blocks, key, words):
    pipe = wan_pipe()
    with pytest.raises(RecipeError) as e:
        sparsify(pipe.transformer, v2(cls=cls, blocks=blocks))
    assert e.value.key == key and words in str(e.value)
    assert getattr(pipe.transformer, "_sparsify", None) is None  # nothing was installed


def test_all_compute_no_merge_plan_equals_the_attention_only_recipe():
    pipe = wan_pipe()
    sparsify(pipe.transformer, V1)
    ref = wan_generate(pipe, steps=4)
    unsparsify(pipe.transformer)
    sparsify(pipe.transformer, v2(merge=[{"blocks": [0, 1], "ratio": 0.0}]))
    out = wan_generate(pipe, steps=4)
    unsparsify(pipe.transformer)
    assert torch.equal(out, ref)


def _tail_ran(log):
    calls = [row["sites"][1]["calls"] for row in log.rows]
    return [c > (calls[i - 1] if i else 0) for i, c in enumerate(calls)]


def test_step_plan_mapped_by_fraction_with_one_warning():
    """A 4-step plan on an 8-step schedule: plan step floor(i * 4 / 8) decides step i, with one warning."""
    pipe = wan_pipe()
    plan = [True, True, False, True]
    sparsify(pipe.transformer, v2(compute=plan))
    log = StepLog(pipe.transformer)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = wan_generate(pipe, steps=8, log=log)
    mine = [x for x in w if issubclass(x.category, SparsifyWarning) and "plan.steps" in str(x.message)]
    assert len(mine) == 1 and "made for 4 steps and this schedule has 8" in str(mine[0].message)
    assert _tail_ran(log) == [plan[i * 4 // 8] for i in range(8)]
    assert [row["sites"][1]["step"] for row in log.rows] == [0, 1, 2, 3, 3, 3, 6, 7]  # last step the site ran
    assert torch.isfinite(out).all()
    unsparsify(pipe.transformer)


def test_reused_steps_change_the_output_and_unsparsify_restores():
    pipe = wan_pipe()
    sparsify(pipe.transformer, V1)
    ref = wan_generate(pipe, steps=4)
    unsparsify(pipe.transformer)
    sparsify(pipe.transformer, v2(compute=[True, True, False, True]))
    log = StepLog(pipe.transformer)
    out = wan_generate(pipe, steps=4, log=log)
    assert _tail_ran(log) == [True, True, False, True]
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-5
    unsparsify(pipe.transformer)
    sparsify(pipe.transformer, V1)
    assert torch.equal(wan_generate(pipe, steps=4), ref)  # the plan's hooks are gone
    unsparsify(pipe.transformer)
    t = pipe.transformer
    # (the pipeline's own cache_context() gives the transformer an empty hook registry; the plan's hooks are gone)
    assert all("forward" not in vars(m) for m in (t, *t.blocks))
    assert all(not m._diffusers_hook.hooks for m in (t, *t.blocks) if hasattr(m, "_diffusers_hook"))


def test_plan_merges_tokens_in_its_step_range():
    pipe = wan_pipe()
    sparsify(pipe.transformer, v2(merge=[{"blocks": [1], "from_step": 1, "to_step": 3, "ratio": 0.25}]))
    lens = []
    h = pipe.transformer.blocks[1].attn1.register_forward_pre_hook(lambda mod, args: lens.append(args[0].shape[1]))
    out = wan_generate(pipe, steps=4)
    h.remove()
    # two calls per step (CFG); grid (2, 8, 8) in (1, 8, 8) tiles: 2 tiles lose 16 tokens each at steps 1 and 2
    assert lens == [128, 128, 96, 96, 96, 96, 128, 128]
    assert torch.isfinite(out).all() and all(s.calls == 8 for s in installed_sites(pipe.transformer))
    unsparsify(pipe.transformer)


@pytest.mark.parametrize("blocks,steps", [(40, 50), (2, 6), (8, 8), (3, 2)])
def test_a_plan_mapped_by_block_and_step_fraction(blocks, steps):
    from sparsify.generation import MergeRange, StepPlan

    p = StepPlan("WanTransformer3DModel", 8, 8, (True, True, False, True, False, False, True, True),
                 (MergeRange((2, 3), 1, 5, 0.25), MergeRange((3, 4, 5), 0, 8, 0.5), MergeRange((7,), 6, 7, 0.125)),
                 order=(0, 0, 1, 0, 0, 1, 0, 0))
    q = p.mapped(blocks, steps)
    assert (q.blocks, q.steps, q.model, q.tile) == (blocks, steps, p.model, p.tile)
    for s in range(steps):
        assert q.computes(s) == p.computes(s, steps)
        assert q.extrapolates(s) == p.extrapolates(s, steps) and q.order[s] == (0 if q.compute[s] else
                                                                                 p.order[s * 8 // steps])
        for b in range(blocks):
            assert q.ratio(b, s) == p.ratio(b * 8 // blocks, s, steps), (b, s)
    assert load_recipe(v2(steps=steps, blocks=blocks, compute=q.compute, merge=q.to_dict().get("merge", []),
                          order=q.order)).plan == q
    if steps == 50:
        assert sum(q.order) == 12  # plan steps 2 and 5 are steps 13-18 and 32-37 of 50


class _StackLog:
    """Per transformer call: its timestep, the first block's input and the last block's output."""

    def __init__(self, t):
        self.rows, self.t = [], t
        self.hooks = [t.register_forward_pre_hook(self._call, with_kwargs=True),
                      t.blocks[0].register_forward_pre_hook(lambda mod, args: self.rows[-1].update(x=args[0].clone())),
                      t.blocks[-1].register_forward_hook(lambda mod, args, out: self.rows[-1].update(y=out.clone()))]

    def _call(self, mod, args, kwargs):
        self.rows.append({"t": float(kwargs["timestep"].reshape(-1)[0])})

    def remove(self):
        for h in self.hooks:
            h.remove()


def _stack_rows(compute, order, steps=3):
    pipe = wan_pipe()
    sparsify(pipe.transformer, v2(steps=steps, compute=compute, order=order))
    log = _StackLog(pipe.transformer)
    wan_generate(pipe, steps=steps)
    log.remove()
    runner = next(u.__self__ for u in pipe.transformer._sparsify.undo if hasattr(u, "__self__"))
    kept = {k: len(v) for k, v in runner.residual.items()}
    unsparsify(pipe.transformer)
    rows = log.rows
    assert len(rows) == 2 * steps  # CFG: two calls per step
    return [rows[2 * s:2 * s + 2] for s in range(steps)], kept


def test_first_order_reuse_extrapolates_the_last_two_residuals_in_the_timestep():
    rows, kept = _stack_rows([True, True, False], [0, 0, 1])
    for c in range(2):  # each guidance branch from its own residuals
        (a, b, now) = (rows[s][c] for s in range(3))
        r1, r2 = a["y"] - a["x"], b["y"] - b["x"]
        w = (now["t"] - b["t"]) / (b["t"] - a["t"])
        want = now["x"] + (r2 + (r2 - r1) * w)
        torch.testing.assert_close(now["y"], want, rtol=1e-5, atol=1e-5)
        assert (want - (now["x"] + r2)).abs().max() > 1e-2  # the extrapolation is not the plain reuse
    assert sorted(kept.values()) == [2, 2]  # two residuals per call slot, no more


def test_zeroth_order_reuse_adds_the_last_residual_and_keeps_one():
    rows, kept = _stack_rows([True, True, False], [0, 0, 0])
    for c in range(2):
        b, now = rows[1][c], rows[2][c]
        assert torch.equal(now["y"], now["x"] + (b["y"] - b["x"]))
    assert sorted(kept.values()) == [1, 1]


def test_first_order_reuse_with_one_computed_step_reuses_it():
    rows, _ = _stack_rows([True, False, True], [0, 1, 0])
    for c in range(2):
        a, now = rows[0][c], rows[1][c]
        assert torch.equal(now["y"], now["x"] + (a["y"] - a["x"]))
