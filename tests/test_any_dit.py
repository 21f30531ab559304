"""Any DiT: hand-written attention spellings, dense masks, and geometry inferred without an adapter."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsify import find_sites, installed_sites, sparsify, unsparsify
from sparsify.testing import dits

GRID = (4, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(density, tile=(1, 8, 8)):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}}}


def run(m, inputs):
    with torch.no_grad():
        out = m(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _check_spelling(name, compile_):
    m = dits.spelling_dit(name)
    inputs = dits.dit_inputs(GRID, batch=2)
    sites, _ = find_sites(m, inputs, grid=GRID)
    video = {s.path: (s.kind, s.heads, s.head_dim) for s in sites if s.kind == "self"}
    assert video == {"blocks.0.attn": ("self", 2, 16), "blocks.1.attn": ("self", 2, 16)}
    ref = run(m, inputs)
    for density in (1.0, 0.25):
        sparsify(m, recipe(density), example_inputs=inputs, grid=GRID)
        out = run(m, inputs)
        sites = installed_sites(m)
        assert all(s.calls >= 1 for s in sites)  # the op ran at every site
        if density == 1.0:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        else:
            assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
            assert all(0 < s.density < 0.5 for s in sites), [s.density for s in sites]
        if compile_:
            torch.testing.assert_close(run(torch.compile(m, fullgraph=True), inputs), out, atol=1e-5, rtol=0)
        unsparsify(m)
        torch._dynamo.reset()
    torch.testing.assert_close(run(m, inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(dits.SPELLINGS))
def test_spelling_is_found_rewritten_exact_and_sparse(name):
    _check_spelling(name, compile_=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(dits.SPELLINGS))
def test_spelling_under_full_graph_compile(name):
    _check_spelling(name, compile_=True)


MASKS = {"padding": dits.padding_mask(4), "block": dits.block_mask(4), "random": dits.random_mask(6 + 4 * 8 * 8)}


@pytest.mark.parametrize("style", ["sdpa", "masked_fill", "masked_fill_", "finite"])
@pytest.mark.parametrize("name", list(MASKS))
def test_dense_mask_stays_sparse_when_it_is_padding_or_blocks(name, style):
    """An (S, S) mask given to SDPA, or written as `scores.masked_fill(mask, -inf)` (or in place, or a finite
    fill) before a hand-written softmax, is served alike."""
    m = dits.joint_dit(MASKS[name]) if style == "sdpa" else dits.masked_fill_dit(MASKS[name], style)
    inputs = dits.dit_inputs(GRID, batch=2)
    kw = {"example_inputs": inputs, "grid": GRID, "video_start": m.n_text}
    sites, _ = find_sites(m, inputs, grid=GRID, video_start=m.n_text)
    assert {s.path: (s.kind, s.has_mask) for s in sites} == {"attns.0": ("joint", True), "attns.1": ("joint", True)}
    if style != "sdpa":
        assert all(s.impl == "manual" for s in sites)
    ref = run(m, inputs)
    sparsify(m, recipe(1.0), **kw)
    torch.testing.assert_close(run(m, inputs), ref, atol=1e-5, rtol=0)
    unsparsify(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sparsify(m, recipe(0.25), **kw)
        out = run(m, inputs)
        out2 = run(m, inputs)
        density = [s.density for s in installed_sites(m)]
        unsparsify(m)
    dense_warnings = [x for x in w if "not a key-padding mask" in str(x.message)]
    if name == "random":  # no structure: dense, exactly the original, one warning per site
        assert len(dense_warnings) == 2 and density == [1.0, 1.0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:  # key padding in disguise, or text/video blocks: sparse
        assert not dense_warnings and all(d < 0.6 for d in density), density
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
        torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(run(m, inputs), ref, atol=0, rtol=0)


def test_block_mask_equals_masked_reference_rows():
    """Op level: a block mask (video rows one key mask, text rows another) gives SDPA's text rows exactly and
    video rows equal to SDPA under the video rows' key mask (density 1)."""
    from sparsify.runtime.masks import plan_mask

    S, n_text, B, H = 70, 6, 2, 2
    m = dits.block_mask(4)(n_text, S - n_text)
    plan = plan_mask(m, B, H, S, (n_text, S - n_text))
    assert plan is not None and plan.dense_rows.tolist() == list(range(n_text))
    assert plan.key_mask.shape == (B, S) and not plan.key_mask[:, 4:6].any() and plan.key_mask[:, 6:].all()
    assert plan_mask(dits.random_mask(S)(n_text, S - n_text), B, H, S, (n_text, S - n_text)) is None
    partial = torch.zeros(S, S)
    partial[:, 3] = -0.5  # a soft bias is no mask we can read
    assert plan_mask(partial, B, H, S, (n_text, S - n_text)) is None
    per_batch = torch.ones(B, 1, S, S, dtype=torch.bool)
    per_batch[1, :, :, 5] = False  # key padding that differs per batch element
    p = plan_mask(per_batch, B, H, S, (n_text, S - n_text))
    assert p.dense_rows is None and p.key_mask[0].all() and not p.key_mask[1, 5]


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox"])
def test_inferred_geometry_equals_the_family_adapter(family, monkeypatch):
    """The generic adapter, inferred from shapes alone, gives the family adapter's geometry and, at density
    0.25, the very same output."""
    from sparsify.adapters import adapter_for
    from sparsify.adapters.infer import InferredAdapter, find_sites_inferred

    m = {"wan": dits.tiny_wan, "hunyuan": dits.tiny_hunyuan, "cogvideox": dits.tiny_cogvideox}[family]()
    family_adapter = adapter_for(m)
    kw = family_adapter.example_inputs(m) if family == "cogvideox" else family_adapter.example_inputs(m, grid=(4, 4, 8))
    sites, inferred = find_sites_inferred(m, kw)
    assert isinstance(inferred, InferredAdapter)
    want, got = family_adapter.geometry(m, (), kw), inferred.geometry(m, (), kw)
    assert got.grid == want.grid
    seq = max(s.q_len for s in sites)
    assert (got.video_start if got.video_start >= 0 else seq - got.video_len) == want.video_start
    assert [(s.path, s.kind) for s in sites] == [(s.path, s.kind) for s in find_sites(m, kw)[0]]
    tile = (1, 8, 8) if family == "cogvideox" else (2, 4, 8)
    outs = []
    for adapter in (family_adapter, inferred):
        sparsify(m, recipe(0.5, tile=tile), example_inputs=kw, adapter=adapter)
        with torch.no_grad():
            outs.append(m(**kw)[0])
        unsparsify(m)
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_model_without_adapter_needs_no_grid():
    m = dits.conv_dit()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 4, 16, 16, generator=g), torch.randn(2, 5, 8, generator=g)
    inputs = {"hidden_states": x, "encoder_hidden_states": ctx}
    ref = m(**inputs)
    sites, adapter = find_sites(m, inputs)
    assert adapter.name == "inferred" and adapter.patch == (1, 2, 2) and adapter.embed == "patch_embed"
    assert adapter.geometry(m, (), inputs).grid == (4, 8, 8) and adapter.video_start == -1  # text first
    assert {s.path: s.kind for s in sites} == {"blocks.0.attn": "joint", "blocks.1.attn": "joint"}
    sparsify(m, recipe(1.0), example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs), ref, atol=1e-5, rtol=0)
        longer = {"hidden_states": x, "encoder_hidden_states": torch.randn(2, 9, 8, generator=g)}  # other text length
        dense = unsparsify(m)(**longer)
        sparsify(m, recipe(0.25), example_inputs=inputs)
        out = m(**longer)
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-3
    assert all(s.density < 0.5 for s in installed_sites(m))
    unsparsify(m)


def test_uninferable_geometry_asks_for_grid():
    """A model fed tokens (no 5-D video latent) has no inferable grid: sparsify() names grid=."""
    from sparsify.errors import SparsifyArgumentError

    m = dits.named_sdpa_dit()
    tokens = torch.randn(1, 64, 32)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = m.blocks

        def forward(self, h):
            for blk in self.blocks:
                h = blk(h)
            return h

    net = Tokens().eval()
    with pytest.raises(SparsifyArgumentError, match="no adapter knows Tokens and its token grid could not be inferred"):
        sparsify(net, recipe(0.5), example_inputs=(tokens,))
    assert not hasattr(net, "_sparsify")


def test_linear_patch_embedding_on_flattened_latent_is_inferred():
    """TinyDiT embeds the flattened latent with a Linear: its grid (patch 1x1x1) is inferred, no grid= needed."""
    m = dits.named_sdpa_dit()
    inputs = dits.dit_inputs(GRID)
    sites, adapter = find_sites(m, inputs)
    assert adapter.name == "inferred" and adapter.patch == (1, 1, 1) and adapter.where == 0
    assert adapter.geometry(m, inputs, {}).grid == GRID
    assert {s.path: s.kind for s in sites} == {"blocks.0.attn": "self", "blocks.1.attn": "self", "cross": "cross"}
