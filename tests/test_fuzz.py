"""Fuzzing the recipe loader and sparsify()'s arguments: every case ends in its documented error, a warning, or success."""

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import yaml

from sparsify import RecipeError, SparsifyArgumentError, SparsifyWarning, installed_sites, load_recipe, sparsify, unsparsify
from sparsify.adapters import GridAdapter
from sparsify.recipe import SiteSpec
from sparsify.testing import dits

SEED = 20
N_DOCS, N_ARGS = 440, 80  # 520 cases in all
GRID = (2, 4, 8)
SITES = [SiteSpec(f"blocks.{i}.attn1", "self", 4, 16) for i in range(3)] + [SiteSpec("blocks.0.attn2", "cross", 4, 16)]

BASES = [
    {"version": 1},
    {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.1}, "dense_steps": 2,
                                "dense_layers": [0], "mask_reuse": {"threshold": 0.02, "max_age": 3},
                                "schedule": [{"from_step": 0, "scale": 2.0}, {"from_step": 10, "scale": 1.0}]},
     "rules": [{"match": "blocks.1.*", "top_p": 0.8, "min_density": 0.02}, {"match": "re:blocks\\.2\\..*", "enable": False}],
     "sites": {"blocks.2.attn1": {"tile": [1, 8, 8], "heads": [{"head": 3, "top_p": 0.9, "min_density": 0.05},
                                                               {"head": 0, "enable": False}]}},
     "calibration": {"budget": 0.1, "grid": [2, 4, 8], "command": "python -m sparsify.calibrate --grid 2x4x8"}},
    {"version": 1, "model": {"class": "M", "sites": [s.to_dict() for s in SITES]},
     "defaults": {"budget": {"top_p": 0.9, "min_density": 0.1}},
     "sites": {"blocks.0.attn1": {"heads": [{"head": 1, "method": "xattention", "density": 0.3}]}}},
]
KEYS = ["version", "model", "defaults", "rules", "sites", "calibration", "method", "tile", "budget", "density",
        "top_p", "min_density", "dense_steps", "dense_layers", "mask_reuse", "threshold", "max_age", "schedule",
        "from_step", "scale", "match", "enable", "heads", "head", "params", "class", "path", "kind", "head_dim",
        "grid", "densty", "Density", "", "blocks.0.attn1", "blocks.1.*"]


def deep(n):
    v = 0.5
    for _ in range(n):
        v = [v]
    return v


def junk(rng):
    """A random value: wrong types, booleans, numpy scalars, NaN/inf, negatives, containers, deep nesting."""
    return rng.choice([
        True, False, None, 0, 1, -1, 2, 7, 10 ** 30, 10 ** 400, 0.0, 0.5, 1.0, 1.5, -0.1, float("nan"), float("inf"),
        -float("inf"), np.float32(0.25), np.float64(0.75), np.int64(3), np.int32(-2), np.bool_(True), "", "x", "vsa",
        "dense", "4x4x4", "blocks.*", "re:(", [], {}, [4, 4, 4], [1, 8, 8], [3, 4, 4], [True, 4, 16], [0.5], [None],
        {"density": 0.2}, {"x": 1}, {"head": 0}, deep(rng.randint(2, 80)), b"\xff\xfe", (4, 4, 4),
        {"from_step": 0, "scale": 1.0}, [{"head": 9}], [{"match": 3}],
    ])


def containers(doc, path=()):
    """Every (path, container) inside `doc`, the document itself first."""
    out = [(path, doc)]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)) and len(path) < 8:
            out.extend(containers(v, path + (k,)))
    return out


def mutate(doc, rng):
    """One random edit of a recipe document: replace, delete, add an unknown or misspelt key, or wrap."""
    _, target = rng.choice(containers(doc))
    if isinstance(target, dict):
        op = rng.random()
        if target and op < 0.45:
            target[rng.choice(list(target))] = junk(rng)
        elif target and op < 0.6:
            del target[rng.choice(list(target))]
        elif op < 0.85:
            target[rng.choice(KEYS)] = junk(rng)
        else:
            target[rng.choice([1, 2.5, None, True])] = junk(rng)
    elif isinstance(target, list):
        if target and rng.random() < 0.6:
            target[rng.randrange(len(target))] = junk(rng)
        else:
            target.append(junk(rng))
    return doc


def yaml_text(doc, rng):
    """`doc` as YAML text, with a line duplicated now and then (a duplicate key, or a repeated list item)."""
    try:
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=rng.random() < 0.3)
    except yaml.YAMLError:
        text = yaml.dump(doc, sort_keys=False)
    lines = text.splitlines()
    if lines and rng.random() < 0.3:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    return "\n".join(lines) + "\n"


def encode(text, rng):
    """Text as file bytes: UTF-8 mostly; sometimes latin-1 with an accent, UTF-16, or random bytes spliced in."""
    r = rng.random()
    if r < 0.7:
        return text.encode("utf-8")
    if r < 0.8:
        return ("# caf\u00e9\n" + text).encode("latin-1", errors="replace")
    if r < 0.9:
        return text.encode("utf-16")
    raw = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 8)):
        raw.insert(rng.randrange(len(raw) + 1), rng.randrange(256))
    return bytes(raw)


def check_recipe_outcome(load, source):
    """Load; on success exercise matching and resolution. Only RecipeError (naming its source) may escape."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the loader itself never warns: any warning would be a surprise
            r = load()
        try:
            r.check_against("M", SITES)
        except RecipeError as e:
            assert str(e).startswith(str(r.where)), str(e)
        r.unintended(SITES)
        for i, s in enumerate(SITES):
            cfgs = r.head_configs(s.path, s.heads, site_index=i, kind=s.kind)
            assert len(cfgs) == s.heads
            for c in cfgs:
                assert c.budget.density is None or 0 < c.budget.density <= 1
        assert load_recipe(r.to_dict()) == r  # what loads also dumps and reloads
        return "ok"
    except RecipeError as e:
        assert str(e).startswith(source) and e.reason, str(e)
        return "RecipeError"


def test_fuzz_recipe_loader(tmp_path):
    rng = random.Random(SEED)
    outcomes = {}
    for case in range(N_DOCS):
        doc = copy.deepcopy(rng.choice(BASES))
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            mutate(doc, rng)
        if case % 2 == 0:
            out = check_recipe_outcome(lambda: load_recipe(doc), "<dict>")
        else:
            path = tmp_path / f"case{case}.yaml"
            path.write_bytes(encode(yaml_text(doc, rng), rng))
            out = check_recipe_outcome(lambda: load_recipe(path), str(path))
        outcomes[out] = outcomes.get(out, 0) + 1
    # the generator reaches both ends: valid documents load, malformed ones raise
    assert outcomes.get("ok", 0) > 40 and outcomes.get("RecipeError", 0) > 200, outcomes


# ----------------------------------------------------------------------------------------------
# sparsify() arguments


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dits.TinyDiT(dits.NamedSDPAAttention, dim=16, heads=2, layers=1).eval()


def arg_pools():
    x, ctx = dits.dit_inputs(GRID)
    ok = (x, ctx)
    return {
        "grid": [GRID, list(GRID), (np.int64(2), 4, 8), lambda a, k: tuple(a[0].shape[2:]), (4, 8), (2, 4, 8, 1),
                 (0, 4, 8), (-2, 4, 8), (2.0, 4, 8), (True, 4, 8), "2x4x8", 248, lambda a, k: (4, 8), lambda: GRID,
                 lambda a, k: None, lambda a, k: 1 / 0, (1, 4, 8), (9, 9, 9), {"T": 2}],
        "video_start": [0, np.int64(0), 1, -1, 2.5, True, "0", None, 10 ** 9],
        "mode": ["install", "graph", "GRAPH", "", None, 1, ["install"]],
        "adapter": [GridAdapter(GRID), GridAdapter, 5, object(), "wan"],
        "example_inputs": [list(ok), {"x": x, "ctx": ctx}, x, (), None, "x", (1, 2), {1: x}, (x[:, :, 0], ctx),
                           (x.long(), ctx), (x, ctx, ctx), [[x, ctx]], b"\x00", {"x": x}, (x.double(), ctx)],
    }


def test_fuzz_sparsify_arguments(model):
    rng = random.Random(SEED)
    pools = arg_pools()
    ok_inputs = dits.dit_inputs(GRID)
    recipe = {"version": 1, "defaults": {"tile": [1, 4, 16], "budget": {"density": 0.5}}}
    outcomes = {}
    for case in range(N_ARGS):
        kw = {"grid": GRID, "video_start": 0, "mode": "install", "adapter": None, "example_inputs": ok_inputs}
        if case % 16:  # every 16th case is the valid baseline
            names = rng.sample(sorted(pools), rng.choice([1, 1, 2]))
            for name in names:
                kw[name] = rng.choice(pools[name])
            if kw["adapter"] is not None and rng.random() < 0.5:
                kw["grid"] = None
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                sparsify(model, recipe, **kw)
            try:
                stray = [w for w in rec if not issubclass(w.category, (SparsifyWarning, DeprecationWarning))]
                assert not stray, [str(w.message) for w in stray]
                if kw["mode"] == "install":
                    with torch.no_grad():
                        model(*ok_inputs)
                    assert all(s.calls == 1 for s in installed_sites(model))
            finally:
                unsparsify(model)
            out = "ok"
        except SparsifyArgumentError as e:
            assert str(e).startswith(f"sparsify: {e.argument}="), str(e)
            assert e.argument in ("grid", "video_start", "mode", "adapter", "example_inputs", "model"), str(e)
            out = "SparsifyArgumentError"
        except Exception as e:  # noqa: BLE001 - report the case that escaped
            pytest.fail(f"case {case} {kw!r}: {type(e).__name__}: {e}")
        assert not hasattr(model, "_sparsify")
        outcomes[out] = outcomes.get(out, 0) + 1
    assert outcomes.get("ok", 0) >= 5 and outcomes.get("SparsifyArgumentError", 0) > 40, outcomes

