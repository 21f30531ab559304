"""No silent misconfiguration: each malformed input ends in its layer's error type, or a legal one in one warning."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsify import (RecipeError, SparsifyArgumentError, SparsifyWarning, installed_sites, load_recipe, sparsify,
                      unsparsify)
from sparsify.adapters import GridAdapter
from sparsify.adapters.wan import WanAdapter
from sparsify.recipe import Recipe, Rule, SiteSpec, recipe_from_dict
from sparsify.testing import dits

GRID = (2, 4, 8)  # 64 video tokens
VALID = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 4, 16], "budget": {"density": 0.5}}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dits.TinyDiT(dits.NamedSDPAAttention, dim=16, heads=2, layers=2).eval()


def inputs(grid=GRID):
    return dits.dit_inputs(grid)


def run(m, grid=GRID):
    with torch.no_grad():
        return m(*inputs(grid))


def sparsify_warnings(m, recipe, **kw):
    """sparsify() with every warning recorded; returns the SparsifyWarning messages."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sparsify(m, recipe, **kw)
    return [str(w.message) for w in rec if issubclass(w.category, SparsifyWarning)]


# ----------------------------------------------------------------------------------------------
# recipe content and files: RecipeError naming the file (or <dict>), the key path and what is valid


@pytest.mark.parametrize("mutate,key,words", [
    (lambda d: d["defaults"]["budget"].update(density=True), "defaults.budget.density", "booleans are not numbers"),
    (lambda d: d.update(version=True), "version", "must be the integer 1"),
    (lambda d: d["defaults"]["budget"].update(density=float("nan")), "defaults.budget.density", "(0, 1]"),
    (lambda d: d["defaults"]["budget"].update(density=float("inf")), "defaults.budget.density", "(0, 1]"),
    (lambda d: d["defaults"].update(schedule=[{"from_step": 0, "scale": float("inf")}]),
     "defaults.schedule[0].scale", "positive finite"),
    (lambda d: d["defaults"].update(dense_steps=True), "defaults.dense_steps", "integer"),
    (lambda d: d["defaults"].update(tile=[True, 8, 8]), "defaults.tile", "three integers"),
    (lambda d: d.update(calibration={"grid": [21, 30]}), "calibration.grid", "[T, H, W]"),
])
def test_bools_nan_and_inf_are_not_numbers(mutate, key, words):
    d = copy.deepcopy(VALID)
    mutate(d)
    with pytest.raises(RecipeError) as e:
        load_recipe(d)
    assert e.value.source == "<dict>" and e.value.key == key and words in str(e.value), str(e.value)


def test_numpy_scalars_are_numbers():
    d = copy.deepcopy(VALID)
    d["defaults"].update(budget={"density": np.float32(0.25)}, dense_steps=np.int64(2), tile=[np.int64(4)] * 3,
                         schedule=[{"from_step": np.int32(0), "scale": np.float64(0.5)}])
    r = load_recipe(d)
    assert r.defaults.budget.density == pytest.approx(0.25) and type(r.defaults.budget.density) is float
    assert r.defaults.dense_steps == 2 and type(r.defaults.dense_steps) is int and r.defaults.tile == (4, 4, 4)
    assert load_recipe(r.to_dict()) == r  # plain Python values: dumps and reloads


def test_duplicate_yaml_keys_name_the_key_path_and_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("version: 1\ndefaults:\n  budget:\n    density: 0.1\n    density: 0.5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and e.value.key == "defaults.budget.density" and "line 5; first at line 4" in msg, msg
    p.write_text("version: 1\nrules:\n- {match: 'a.*', density: 0.1}\n- {match: 'b.*', match: 'c.*'}\n")
    with pytest.raises(RecipeError, match=r"key 'rules\[1\]\.match': duplicate key"):
        load_recipe(p)


@pytest.mark.parametrize("content,words", [
    (bytes(range(256)), "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64), "not UTF-8"),
    ("version: 1\ndefaults: {method: 'vsa'}  # caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ("version: 1\n".encode("utf-16"), "UTF-16 byte-order mark"),
    (b"version: 1\x00\n", "NUL bytes"),
    (b"", "empty"),
    (b"version: 1\ncalibration: " + b"[" * 100000 + b"]" * 100000, "nested more than 64 levels"),
    (b"- " * 100000 + b"x\n", "nested more than 64 levels"),  # libyaml would recurse 100000 levels (a crash)
    (b"- 1\n- 2\n", "must be a mapping"),
])
def test_unreadable_files_name_the_file(tmp_path, content, words):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.source == str(p) and words in str(e.value), str(e.value)


def test_utf8_with_bom_loads(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("version: 1\n".encode("utf-8-sig"))
    assert load_recipe(p).version == 1


@pytest.mark.parametrize("value", [None, 3, 0.1, ["version", 1], b"version: 1", "", "x" * 5000, "a\x00b"])
def test_wrong_recipe_argument_names_the_argument(value):
    with pytest.raises(RecipeError) as e:
        load_recipe(value)
    msg = str(e.value)
    assert "recipe" in str(e.value.source) or "x" * 50 in msg or "no such recipe" in msg, msg
    if value is None or isinstance(value, (int, float, list, bytes)):
        assert e.value.source == "recipe" and "a Recipe, a dict, a path" in msg, msg


def test_directory_is_named(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path)
    assert e.value.source == str(tmp_path) and "is a directory" in str(e.value)


def test_recipe_built_in_code_is_named():
    r = Recipe(sites={"blocks.9.attn": recipe_from_dict({"version": 1, "sites": {"x": {}}}).sites["x"]})
    with pytest.raises(RecipeError, match=r"^<Recipe>: key 'sites.blocks.9.attn'"):
        r.check_against("M", [SiteSpec("blocks.0.attn", "self", 2, 8)])


def test_unintended_settings_are_listed():
    sites = [SiteSpec(f"blocks.{i}.attn", "self", 2, 8) for i in range(2)] + [SiteSpec("cross", "cross", 2, 8)]
    r = load_recipe({"version": 1, "defaults": {"dense_layers": [0, 2]},
                     "rules": [{"match": "blocks.*", "density": 0.2}, {"match": "blocks.1.*", "density": 0.3},
                               {"match": "transformer.*", "enable": False}, {"match": "cross*", "density": 0.3}],
                     "sites": {"cross": {"density": 0.2}}})
    found = dict(r.unintended(sites))
    assert set(found) == {"rules[1].match", "rules[2].match", "rules[3].match", "sites.cross",
                          "defaults.dense_layers[1]"}, found
    assert "rules[0]" in found["rules[1].match"] and "first match wins" in found["rules[1].match"]
    assert "matches no attention site" in found["rules[2].match"]
    assert "always run dense" in found["rules[3].match"] and "ignored" in found["sites.cross"]
    assert "indices 0..1" in found["defaults.dense_layers[1]"]
    assert Recipe(rules=(Rule(match="blocks.*"),)).unintended(sites) == []


def test_sparsify_warns_once_per_unintended_setting(model):
    recipe = {**VALID, "defaults": {**VALID["defaults"], "dense_layers": [5]},
              "rules": [{"match": "block.*", "density": 0.2}], "sites": {"cross": {"density": 0.2}}}
    msgs = sparsify_warnings(model, recipe, example_inputs=inputs(), grid=GRID)
    unsparsify(model)
    assert len(msgs) == 3, msgs
    for key in ("rules[0].match", "sites.cross", "defaults.dense_layers[0]"):
        assert sum(f"<dict>: key '{key}'" in m for m in msgs) == 1, (key, msgs)


# ----------------------------------------------------------------------------------------------
# arguments: SparsifyArgumentError naming the argument, its value and what is valid


@pytest.mark.parametrize("kw,argument,words", [
    ({"grid": (4, 8)}, "grid", "has 2 values"),
    ({"grid": (2, 4, 8.0)}, "grid", "8.0 is not an integer"),
    ({"grid": (True, 4, 8)}, "grid", "True is not an integer"),
    ({"grid": (0, 4, 8)}, "grid", ">= 1"),
    ({"grid": "2x4x8"}, "grid", "three positive integers"),
    ({"grid": lambda a, k: (4, 8)}, "grid", "grid(args, kwargs) returned"),
    ({"grid": lambda: (2, 4, 8)}, "grid", "raised TypeError"),
    ({"grid": GRID, "video_start": -1}, "video_start", "integer >= 0"),
    ({"grid": GRID, "video_start": 1.5}, "video_start", "integer >= 0"),
    ({"grid": GRID, "video_start": 7}, "video_start", "at most 0"),
    ({"video_start": 3}, "video_start", "only together with grid="),
    ({"grid": GRID, "mode": "fast"}, "mode", "'install', 'graph'"),
    ({"grid": GRID, "adapter": GridAdapter(GRID)}, "grid", "adapter= decides the grid"),
    ({"adapter": GridAdapter}, "adapter", "pass an instance"),
    ({"adapter": 3}, "adapter", "sparsify.adapters.Adapter"),
    ({"grid": GRID, "example_inputs": "x"}, "example_inputs", "got str"),
    ({"grid": GRID, "example_inputs": (1, 2)}, "example_inputs", "at least one tensor"),
    ({"grid": GRID, "example_inputs": {0: torch.zeros(1)}}, "example_inputs", "argument names"),
    ({"grid": GRID, "example_inputs": (torch.zeros(3),)}, "example_inputs", "failed with"),
    ({"grid": GRID, "example_inputs": None}, "example_inputs", "needs example inputs"),
])
def test_invalid_arguments_are_named(model, kw, argument, words):
    kw = {"example_inputs": inputs(), **kw}
    with pytest.raises(SparsifyArgumentError) as e:
        sparsify(model, VALID, **kw)
    msg = str(e.value)
    assert e.value.argument == argument and msg.startswith(f"sparsify: {argument}=") and words in msg, msg
    assert not hasattr(model, "_sparsify")


def test_compiled_model_and_pipeline_are_told_what_works(model):
    with pytest.raises(SparsifyArgumentError, match=r"model=torch.compile\(TinyDiT\).*sparsify the module itself"):
        sparsify(torch.compile(model), VALID, example_inputs=inputs(), grid=GRID)

    class FakePipeline:  # what matters of a diffusers pipeline: not a module, holds its transformer(s)
        def __init__(self):
            self.transformer, self.transformer_2, self.vae = model, model, object()

    with pytest.raises(SparsifyArgumentError, match=r"sparsify\(pipe.transformer, recipe\) and sparsify\(pipe.transformer_2"):
        sparsify(FakePipeline(), VALID)
    with pytest.raises(SparsifyArgumentError, match="must be a torch.nn.Module"):
        sparsify(object(), VALID)


class RootAttention(torch.nn.Module):
    """Attention computed in the model's own forward, not in a submodule."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 48)

    def forward(self, x, ctx):
        B, C = x.shape[:2]
        h = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_in_the_root_module_is_reported():
    m = RootAttention()
    with pytest.raises(SparsifyArgumentError) as e:
        sparsify(m, VALID, example_inputs=inputs(), grid=GRID)
    msg = str(e.value)
    assert "outside any submodule" in msg and "test_errors.py" in msg and "found: none in submodules" in msg, msg


# ----------------------------------------------------------------------------------------------
# grids and sequences


def test_grid_smaller_than_the_sequence_warns_once(model):
    msgs = sparsify_warnings(model, VALID, example_inputs=inputs((3, 4, 8)), grid=GRID)
    try:
        assert len(msgs) == 1, msgs
        m = msgs[0]
        assert "grid=(2, 4, 8) covers 64 tokens" in m and "attend over 96" in m and "other 32 tokens" in m, m
        assert "'blocks.0.attn', 'blocks.1.attn'" in m
        assert all(s.kind == "joint" for s in installed_sites(model))
    finally:
        unsparsify(model)


def test_fixed_grid_meeting_a_longer_sequence(model):
    sparsify(model, VALID, example_inputs=inputs(), grid=GRID)  # self sites: the grid was the whole sequence
    try:
        run(model)
        with pytest.raises(SparsifyArgumentError, match=r"grid=\(2, 4, 8\).*'blocks.0.attn' is video-only.*160 "
                                                        r"tokens.*96 video tokens would run dense"):
            run(model, (5, 4, 8))
    finally:
        unsparsify(model)
    # joint sites (32 tokens past the grid when sparsify() ran): more tokens later warn once per site
    with pytest.warns(SparsifyWarning):
        sparsify(model, VALID, example_inputs=inputs((3, 4, 8)), grid=GRID)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            run(model, (3, 4, 8))
            assert not [w for w in rec if issubclass(w.category, SparsifyWarning)]
            run(model, (4, 4, 8))
            run(model, (4, 4, 8))
        msgs = [str(w.message) for w in rec if issubclass(w.category, SparsifyWarning)]
        assert len(msgs) == 2 and all("64 tokens run dense as text, 32 more" in m for m in msgs), msgs
        assert {m.split("'")[1] for m in msgs} == {"blocks.0.attn", "blocks.1.attn"}
    finally:
        unsparsify(model)


def test_callable_grid_follows_the_inputs(model):
    grid = lambda args, kwargs: tuple(args[0].shape[2:])  # noqa: E731
    sparsify(model, VALID, example_inputs=inputs(), grid=grid)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SparsifyWarning)
            run(model, (5, 4, 8))
        assert all(s.calls == 1 for s in installed_sites(model))
    finally:
        unsparsify(model)


def test_calibration_grid_mismatch_warns_once(model):
    recipe = {**VALID, "calibration": {"grid": list(GRID), "tool": "test"}}
    sparsify(model, recipe, example_inputs=inputs(), grid=lambda a, k: tuple(a[0].shape[2:]))
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            run(model)
            assert not rec
            run(model, (3, 4, 8))
            run(model, (4, 4, 8))
        msgs = [str(w.message) for w in rec if issubclass(w.category, SparsifyWarning)]
        assert len(msgs) == 1 and "calibrated at grid (2, 4, 8)" in msgs[0] and "(3, 4, 8)" in msgs[0], msgs
    finally:
        unsparsify(model)
    assert Recipe(calibration={"command": "python -m sparsify.calibrate --grid 21x30x52"}).calibration_grid == (21, 30, 52)
    assert load_recipe("wan1.3b.yaml").calibration_grid == (21, 30, 52)


def test_installed_sites_count_selections_per_head_group(model):
    recipe = {**VALID, "sites": {"blocks.0.attn": {"heads": [{"head": 1, "tile": [2, 4, 8]}]}}}
    sparsify(model, recipe, example_inputs=inputs(), grid=GRID)
    try:
        run(model)
        s0, s1 = installed_sites(model)
        assert (s0.calls, s0.selections) == (1, 2)  # two (method, tile) groups: two selections in one call
        assert (s1.calls, s1.selections) == (1, 1)
    finally:
        unsparsify(model)


def test_adapter_instance_is_accepted(model):
    class Fixed(GridAdapter):
        pass

    sparsify(model, VALID, example_inputs=inputs(), adapter=Fixed(GRID))
    unsparsify(model)
    assert WanAdapter.matches(model) is False
