"""Recipe schema v1: round trip, precedence, and loud, precise errors for malformed or mismatched recipes."""

import copy

import pytest
import yaml

from sparsify.recipe import Budget, RecipeError, SiteSpec, bundled_recipes, load_recipe, recipe_from_dict

SITES = [SiteSpec(f"blocks.{i}.attn1", "self", 4, 64) for i in range(3)] + [SiteSpec("blocks.0.attn2", "cross", 4, 64)]

FULL = {
    "version": 1,
    "model": {"class": "WanTransformer3DModel", "sites": [s.to_dict() for s in SITES]},
    "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.1}, "dense_steps": 2, "dense_layers": [0],
                 "schedule": [{"from_step": 0, "scale": 2.0}, {"from_step": 10, "scale": 1.0}]},
    "rules": [
        {"match": "blocks.1.*", "budget": None},  # replaced below
        {"match": "re:blocks\\.[12]\\.attn1", "method": "dense"},
    ],
    "sites": {
        "blocks.2.attn1": {"tile": [1, 8, 8], "heads": [{"head": 3, "top_p": 0.9, "min_density": 0.05},
                                                       {"head": 0, "enable": False}]},
    },
    "calibration": {"budget": 0.1, "inputs_hash": "abc", "tool": "sparsify 0.1.0"},
}
FULL["rules"][0] = {"match": "blocks.1.*", "top_p": 0.8, "min_density": 0.02}


def test_dump_then_load_is_identity(tmp_path):
    r = load_recipe(copy.deepcopy(FULL))
    p = r.save(tmp_path / "r.yaml")
    r2 = load_recipe(p)
    assert r2 == r
    assert yaml.safe_load(r2.to_yaml()) == yaml.safe_load(r.to_yaml())


def test_precedence_first_rule_wins_then_site_then_head():
    r = load_recipe(copy.deepcopy(FULL))
    # dense_layers=[0]: site index 0 is dense
    assert not r.head_configs("blocks.0.attn1", 4, site_index=0)[0].enable
    # blocks.1: first rule (top_p 0.8) wins over the later regex rule (dense)
    c1 = r.head_configs("blocks.1.attn1", 4, site_index=1)
    assert c1[0].budget == Budget(top_p=0.8, min_density=0.02) and c1[0].method == "vsa"
    # blocks.2: the regex rule, then the explicit entry's tile, then per-head budget/enable
    c2 = r.head_configs("blocks.2.attn1", 4, site_index=2)
    assert c2[1].method == "dense" and c2[1].tile == (1, 8, 8)
    assert c2[3].budget == Budget(top_p=0.9, min_density=0.05)
    assert not c2[0].enable
    # cross-attention is never sparse
    assert not any(c.enable for c in r.head_configs("blocks.0.attn2", 4, kind="cross"))


def test_signature_matches_model():
    load_recipe(copy.deepcopy(FULL)).check_against("WanTransformer3DModel", SITES)


def test_bundled_name_lookup_error_lists_bundled():
    with pytest.raises(RecipeError) as e:
        load_recipe("no_such_recipe.yaml")
    assert "no_such_recipe.yaml" in str(e.value) and "bundled recipes" in str(e.value)
    assert isinstance(bundled_recipes(), list)


def _bad(mutate):
    d = copy.deepcopy(FULL)
    mutate(d)
    return d


BAD = [
    # (id, mutation, key path expected in the message, words expected)
    ("unknown_top_key", lambda d: d.update(defualts={}), "defualts", "did you mean 'defaults'"),
    ("wrong_version", lambda d: d.update(version=3), "version", "unsupported"),
    ("missing_version", lambda d: d.pop("version"), "version", "required"),
    ("density_out_of_range", lambda d: d["defaults"]["budget"].update(density=1.5), "defaults.budget.density", "(0, 1]"),
    ("density_and_top_p", lambda d: d["defaults"]["budget"].update(top_p=0.9), "defaults.budget", "exactly one"),
    ("bad_tile_volume", lambda d: d["defaults"].update(tile=[3, 4, 4]), "defaults.tile", "64, 128"),
    ("bad_tile_type", lambda d: d["defaults"].update(tile="4x4x4"), "defaults.tile", "three integers"),
    ("unknown_method", lambda d: d["defaults"].update(method="magic"), "defaults.method", "registered methods"),
    ("head_top_p_type", lambda d: d["sites"]["blocks.2.attn1"]["heads"][0].update(top_p="high"),
     "sites.blocks.2.attn1.heads[0].top_p", "(0, 1]"),
    ("head_out_of_range", lambda d: d["sites"]["blocks.2.attn1"]["heads"].append({"head": 7, "density": 0.1}),
     "sites.blocks.2.attn1.heads[2].head", "has 4 heads"),
    ("duplicate_head", lambda d: d["sites"]["blocks.2.attn1"]["heads"].append({"head": 3}),
     "sites.blocks.2.attn1.heads[2].head", "twice"),
    ("unknown_site", lambda d: d["sites"].update({"blocks.9.attn1": {"density": 0.2}}), "sites.blocks.9.attn1",
     "valid site paths"),
    ("bad_regex", lambda d: d["rules"].append({"match": "re:blocks.(", "density": 0.2}), "rules[2].match",
     "regular expression"),
    ("rule_without_match", lambda d: d["rules"].append({"density": 0.2}), "rules[2].match", "required"),
    ("enable_not_bool", lambda d: d["rules"][0].update(enable="no"), "rules[0].enable", "true or false"),
    ("min_density_with_density", lambda d: d["rules"][0].update(density=0.1, top_p=None) or d["rules"][0].pop("top_p"),
     "rules[0].min_density", "only valid together with 'top_p'"),
    ("site_kind", lambda d: d["model"]["sites"][0].update(kind="global"), "model.sites[0].kind", "must be one of"),
    ("heads_not_int", lambda d: d["model"]["sites"][1].update(heads="4"), "model.sites[1].heads", "integer"),
    ("dense_layers_type", lambda d: d["defaults"].update(dense_layers=3), "defaults.dense_layers", "list"),
    ("schedule_order", lambda d: d["defaults"]["schedule"].append({"from_step": 5, "scale": 0.5}),
     "defaults.schedule[2].from_step", "increasing step order"),
    ("schedule_scale", lambda d: d["defaults"]["schedule"][0].update(scale=0), "defaults.schedule[0].scale", "positive"),
    ("schedule_missing_scale", lambda d: d["defaults"]["schedule"][1].pop("scale"), "defaults.schedule[1].scale",
     "required"),
    ("unknown_head_key", lambda d: d["sites"]["blocks.2.attn1"]["heads"][0].update(topp=0.9),
     "sites.blocks.2.attn1.heads[0].topp", "did you mean 'top_p'"),
]


@pytest.mark.parametrize("name,mutate,key,words", BAD, ids=[b[0] for b in BAD])
def test_malformed_recipe_names_file_and_key(tmp_path, name, mutate, key, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_bad(mutate), sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert f"key '{key}'" in msg, msg
    assert words in msg, msg


MISMATCH = [
    ("class", lambda s: ("HunyuanVideoTransformer3DModel", s), "model.class", "is for model class"),
    ("heads", lambda s: ("WanTransformer3DModel", [SiteSpec(x.path, x.kind, 8 if x.path == "blocks.1.attn1" else x.heads, x.head_dim) for x in s]),
     "model.sites[1].heads", "heads=4"),
    ("missing_site", lambda s: ("WanTransformer3DModel", [x for x in s if x.path != "blocks.2.attn1"]),
     "model.sites[2].path", "not an attention site"),
    ("extra_site", lambda s: ("WanTransformer3DModel", s + [SiteSpec("blocks.3.attn1", "self", 4, 64)]),
     "model.sites", "blocks.3.attn1"),
]


@pytest.mark.parametrize("name,model,key,words", MISMATCH, ids=[m[0] for m in MISMATCH])
def test_mismatched_model_names_key(tmp_path, name, model, key, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(FULL, sort_keys=False))
    r = load_recipe(path)
    cls, sites = model(SITES)
    with pytest.raises(RecipeError) as e:
        r.check_against(cls, sites)
    assert str(path) in str(e.value) and f"key '{key}'" in str(e.value) and words in str(e.value), str(e.value)


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("version: 1\ndefaults: [unclosed\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        load_recipe(p)


def test_budget_dataclass_validates():
    with pytest.raises(RecipeError):
        Budget(density=0.0)
    assert recipe_from_dict({"version": 1}).defaults.budget == Budget(density=0.1)
