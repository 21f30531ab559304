"""Discovery of hand-written attention in its common spellings, of SDPA however called, and the inspect CLI."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify import find_sites, sparsify, unsparsify
from sparsify.inspect import main as inspect_main

S, D, H = 64, 16, 2


def _qkv(x):
    return x, x * 0.5, x + 1.0


SPELLINGS = {
    "transpose_scale_after": lambda q, k, v: (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1) @ v,
    "mT_scale_before": lambda q, k, v: F.softmax((q * D ** -0.5) @ k.mT, dim=-1) @ v,
    "div_upcast": lambda q, k, v: torch.softmax((q @ k.transpose(2, 3)).float() / D ** 0.5, dim=-1).to(v.dtype) @ v,
    "matmul_fn_scale_left": lambda q, k, v: torch.matmul(F.softmax(0.25 * torch.matmul(q, k.transpose(-1, -2)), -1), v),
    "sdpa_positional": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa_keywords": lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3),
}


class Attn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = _qkv(self.proj(x))
        return self.fn(q, k, v)


class Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.inner = nn.ModuleDict({"attn": Attn(fn)})

    def forward(self, x):
        return self.inner["attn"](x)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_is_found_and_made_sparse(name):
    torch.manual_seed(0)
    net = Net(SPELLINGS[name]).eval()
    x = torch.randn(1, H, S, D)
    sites, _ = find_sites(net, (x,), grid=(1, 8, 8))
    assert [(s.path, s.kind, s.heads, s.head_dim) for s in sites] == [("inner.attn", "self", H, D)]
    assert sites[0].impl == ("sdpa" if name.startswith("sdpa") else "manual")
    with torch.no_grad():
        ref = net(x)
    recipe = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 1.0}}}
    sparsify(net, recipe, example_inputs=(x,), grid=(1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)  # every tile kept: same function
    unsparsify(net)


def test_inspect_prints_the_tiny_wan_table(capsys):
    assert inspect_main(["tiny-wan"]) == 0
    out = capsys.readouterr().out
    assert "4 attention sites" in out
    assert "blocks.0.attn1  self   full  2      32" in out and "blocks.1.attn2  cross  -" in out


def test_bundled_recipe_by_bare_name():
    from sparsify import load_recipe
    from sparsify.recipe import bundled_recipes

    assert {"wan1.3b.yaml", "wan14b.yaml"} <= set(bundled_recipes())
    r = load_recipe("wan14b.yaml")
    assert r.model.cls == "WanTransformer3DModel" and len([s for s in r.model.sites if s.kind == "self"]) == 40
    assert "RANDOM" in r.calibration["calibrated_on"]


def test_vsa_coarse_branch_matches_direct_computation():
    from sparsify.geometry import pool_tiles, tile_layout, to_tiles
    from sparsify.methods.vsa import coarse_attention

    lay = tile_layout((3, 4, 8), (2, 4, 8))  # a full tile, then a partial one: 32 valid tokens of 64
    x = [torch.randn(1, 2, 96, 8) for _ in range(3)]
    qt, kt, vt = (to_tiles(t, lay) for t in x)
    out = coarse_attention(qt, kt, vt, lay)
    qm, km, vm = (torch.stack([t[:, :, :64].mean(2), t[:, :, 64:].mean(2)], 2) for t in x)  # means of valid tokens
    expect = torch.softmax(qm @ km.transpose(-1, -2) / 8 ** 0.5, -1) @ vm
    torch.testing.assert_close(out.view(1, 2, 2, 64, 8)[:, :, :, 0], expect)
    assert torch.equal(out.view(1, 2, 2, 64, 8)[:, :, :, 40], out.view(1, 2, 2, 64, 8)[:, :, :, 0])
    torch.testing.assert_close(pool_tiles(vt, lay), vm)


def test_repeated_discovery_does_not_exhaust_dynamo_cache():
    """Every capture leaves no compiled entries behind: the 12th sparsify() of a model still finds its sites
    (without the cleanup, Dynamo's recompile limit of 8 made discovery silently capture nothing)."""
    from sparsify.testing import dits

    m = dits.tiny_wan()
    recipe = {"version": 1, "defaults": {"budget": {"density": 0.5}, "tile": [1, 4, 16]}}
    for _ in range(12):
        sparsify(m, recipe)
        unsparsify(m)
    assert len(find_sites(m)[0]) == 4


def test_einsum_roles():
    from sparsify.passes.patterns import einsum_role

    assert einsum_role("bhid,bhjd->bhij") == "qk" and einsum_role("...qd,...kd->...qk") == "qk"
    assert einsum_role("bhij,bhjd->bhid") == "pv" and einsum_role("b h q k, b h k d -> b h q d") == "pv"
    assert einsum_role("bhid,bhdj->bhij") == "pv"  # any matrix product is p·v by its shape
    for eq in ("bhid,bhjd->bhji", "bid,bhjd->bhij", "ij,jk->ik", "bhid,bhid->bhi"):
        assert einsum_role(eq) is None, eq


class FoldedMaskedAttn(nn.Module):
    """diffusers' AttnProcessor with an additive key-padding mask as baddbmm's input (beta=1)."""

    heads = H

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x, mask):
        q, k, v = (t.flatten(0, 1) for t in _qkv(self.proj(x)))
        scores = torch.baddbmm(mask, q, k.transpose(-1, -2), beta=1, alpha=D ** -0.5)
        return torch.bmm(scores.softmax(dim=-1), v).unflatten(0, (-1, H))


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleDict({"attn": FoldedMaskedAttn()})

    def forward(self, x, mask):
        return self.inner["attn"](x, mask)


def test_baddbmm_with_additive_mask_is_found_and_exact():
    torch.manual_seed(0)
    wrapper = MaskedNet().eval()
    x = torch.randn(2, H, S, D)
    mask = torch.zeros(2 * H, 1, S)
    mask[H:, :, 50:] = -10000.0  # the second sample's last keys are padding
    sites, _ = find_sites(wrapper, (x, mask), grid=(1, 8, 8))
    assert [(s.path, s.heads, s.has_mask, s.impl) for s in sites] == [("inner.attn", H, True, "manual")]
    with torch.no_grad():
        ref = wrapper(x, mask)
    recipe = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": 1.0}}}
    sparsify(wrapper, recipe, example_inputs=(x, mask), grid=(1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x, mask), ref, atol=1e-5, rtol=1e-5)
    from sparsify import installed_sites

    assert installed_sites(wrapper)[0].calls == 1
    unsparsify(wrapper)
