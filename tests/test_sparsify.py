"""sparsify() end to end on tiny diffusers families and hand-written DiTs: discovery, exactness, compile styles."""

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
import torch.nn.functional as F

from sparsify.testing import dits
from sparsify import find_sites, installed_sites, runtime, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.methods import vsa
from sparsify.errors import RecipeError, SparsifyArgumentError

DIFFUSERS = {"wan": dits.tiny_wan, "hunyuan": dits.tiny_hunyuan, "cogvideox": dits.tiny_cogvideox}
HANDWRITTEN = {"manual": dits.manual_dit, "named_sdpa": dits.named_sdpa_dit}
GRID = (5, 4, 8)  # odd frame count: partial tiles along t

EXPECTED_SITES = {
    "wan": {"blocks.0.attn1": "self", "blocks.1.attn1": "self"},
    "hunyuan": {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint"},
    "cogvideox": {"transformer_blocks.0.attn1": "joint", "transformer_blocks.1.attn1": "joint"},
    "manual": {"blocks.0.attn": "self", "blocks.1.attn": "self"},
    "named_sdpa": {"blocks.0.attn": "self", "blocks.1.attn": "self"},
}


def build(name):
    """(model, args, kwargs, sparsify kwargs) for a test model."""
    if name in HANDWRITTEN:
        m = HANDWRITTEN[name]()
        inputs = dits.dit_inputs(GRID)
        return m, inputs, {}, {"example_inputs": inputs, "grid": GRID}
    m = DIFFUSERS[name]()
    ad = adapter_for(m)
    kw = ad.example_inputs(m) if name == "cogvideox" else ad.example_inputs(m, grid=GRID)
    return m, (), kw, {}


def run(m, args, kwargs):
    with torch.no_grad():
        out = m(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def recipe(density, tile=(1, 4, 16), **extra):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}}, **extra}


ALL = list(DIFFUSERS) + list(HANDWRITTEN)


@pytest.mark.parametrize("name", ALL)
def test_discovery_finds_exactly_the_video_sites(name):
    m, args, kwargs, skw = build(name)
    sites, _ = find_sites(m, skw.get("example_inputs"), grid=skw.get("grid"))
    video = {s.path: s.kind for s in sites if s.kind in ("self", "joint")}
    assert video == EXPECTED_SITES[name]
    for s in sites:
        assert s.heads == 2 and s.head_dim in (16, 32)
    if name == "wan":
        assert {s.path: s.kind for s in sites if s.kind == "cross"} == {"blocks.0.attn2": "cross", "blocks.1.attn2": "cross"}
    if name == "hunyuan":  # the text refiner attends over text only, with the text padding mask
        refiner = [s for s in sites if s.path.startswith("context_embedder")]
        assert refiner and all(s.kind == "text" for s in refiner)
        assert all(s.has_mask for s in sites if s.kind == "joint")
    if name == "manual":
        assert all(s.impl == "manual" for s in sites if s.kind == "self")


@pytest.mark.parametrize("name", ALL)
def test_density_one_equals_original_eager_and_full_compile(name):
    m, args, kwargs, skw = build(name)
    ref = run(m, args, kwargs)
    sparsify(m, recipe(1.0), **skw)
    out = run(m, args, kwargs)
    assert all(s.calls == 1 for s in installed_sites(m))  # the sparse path really ran
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(run(compiled, args, kwargs), ref, atol=1e-5, rtol=0)
    assert all(s.calls == 2 for s in installed_sites(m))
    unsparsify(m)


def _regional_compile(m):
    if hasattr(m, "compile_repeated_blocks") and getattr(m, "_repeated_blocks", None):
        m.compile_repeated_blocks(fullgraph=True)
    else:
        for attr in ("blocks", "transformer_blocks", "single_transformer_blocks"):
            for blk in getattr(m, attr, []):
                blk.compile(fullgraph=True)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox", "manual", "named_sdpa"])
def test_density_one_equals_original_regional_compile(name):
    m, args, kwargs, skw = build(name)
    ref = run(m, args, kwargs)
    sparsify(m, recipe(1.0), **skw)
    _regional_compile(m)
    torch.testing.assert_close(run(m, args, kwargs), ref, atol=1e-5, rtol=0)
    assert all(s.calls == 1 for s in installed_sites(m))
    unsparsify(m)


class _RecordSelections:
    """Record every selection VSA makes, in call order."""

    def __init__(self, monkeypatch):
        self.calls = []
        orig = vsa.VSA.select

        def select(this, q, k, layout, budgets, stats=None):
            idx, cnt = orig(this, q, k, layout, budgets, stats)
            self.calls.append((layout.grid, layout.tile, idx.clone(), cnt.clone()))
            return idx, cnt

        monkeypatch.setattr(vsa.VSA, "select", select)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox", "named_sdpa"])
def test_density_quarter_equals_masked_sdpa(name, monkeypatch):
    """The sparse model equals the ORIGINAL model whose site attention is SDPA with an explicit
    boolean mask built (by independent code) from the same selections."""
    m, args, kwargs, skw = build(name)
    rec = _RecordSelections(monkeypatch)
    sparsify(m, recipe(0.25, tile=(4, 4, 4)), **skw)
    out = run(m, args, kwargs)
    geo = m._sparsify.adapter.geometry(m, args, kwargs)
    unsparsify(m)
    assert len(rec.calls) == 2 and all((c[3] < c[3].max() + 1).all() for c in rec.calls)
    assert any(int(c[3].min()) < c[2].shape[-1] or True for c in rec.calls)
    calls = iter(rec.calls)
    orig = torch._C._nn.scaled_dot_product_attention

    def masked_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.shape[-2] == key.shape[-2] and query.shape[-2] >= geo.video_len:
            grid, tile, idx, cnt = next(calls)
            km = None if attn_mask is None else runtime.key_padding_mask(attn_mask, query.shape[0], query.shape[-2])
            mask = dits.mask_from_selection(grid, tile, idx, cnt, query.shape[-2], geo.video_start, km)
            return orig(query, key, value, mask, scale=scale)
        return orig(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", masked_sdpa)
    monkeypatch.setattr(dits, "scaled_dot_product_attention", masked_sdpa)
    ref = run(m, args, kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    monkeypatch.undo()
    dense = run(m, args, kwargs)
    assert (dense - out).abs().max() > 1e-3  # sparsity changed the output: the test can tell


def test_manual_attention_site_is_sparse_and_matches_masked(monkeypatch):
    m, args, kwargs, skw = build("manual")
    rec = _RecordSelections(monkeypatch)
    captured = []
    orig_run = runtime.run_site

    def spy(q, k, v, site, geometry, scale, attn_mask=None, timestep=None, gate=None):
        out = orig_run(q, k, v, site, geometry, scale, attn_mask, timestep, gate)
        captured.append((q, k, v, scale, out))
        return out

    monkeypatch.setattr(runtime.op, "run_site", spy)  # the op's call into the dispatch
    dense = run(m, args, kwargs)
    sparsify(m, recipe(0.25, tile=(4, 4, 4)), **skw)
    out = run(m, args, kwargs)
    assert len(captured) == 2 and (dense - out).abs().max() > 1e-3
    for (q, k, v, scale, o), (grid, tile, idx, cnt) in zip(captured, rec.calls):
        assert scale == pytest.approx(16 ** -0.5)
        mask = dits.mask_from_selection(grid, tile, idx, cnt, q.shape[-2])
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)
    unsparsify(m)


def test_regional_compile_one_graph_per_site_configs(monkeypatch):
    """compile_repeated_blocks: one compiled graph for all blocks, yet each layer's config reaches the op."""
    m, args, kwargs, skw = build("wan")
    rules = [{"match": "blocks.1.*", "density": 0.75}]
    sparsify(m, recipe(0.25, tile=(4, 4, 4), rules=rules))
    eager = run(m, args, kwargs)
    rec = _RecordSelections(monkeypatch)
    dynamo_utils.counters.clear()
    m.compile_repeated_blocks(fullgraph=True)
    out = run(m, args, kwargs)
    out2 = run(m, args, kwargs)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, eager, atol=1e-5, rtol=0)
    counts = [int(c[3].max()) for c in rec.calls[:2]]
    assert counts[0] < counts[1]  # layer 0 at 25%, layer 1 at 75%: different selections, one graph
    unsparsify(m)


def test_graph_mode_backend_and_pre_grad_pass():
    m, args, kwargs, skw = build("wan")
    dense = run(m, args, kwargs)
    sparsify(m, recipe(0.5, tile=(4, 4, 4)))
    expected = run(m, args, kwargs)
    unsparsify(m)
    sparsify(m, recipe(0.5, tile=(4, 4, 4)), mode="graph")
    torch.testing.assert_close(run(m, args, kwargs), dense, atol=0, rtol=0)  # eager untouched in graph mode
    torch.testing.assert_close(run(torch.compile(m, backend="sparsify"), args, kwargs), expected, atol=1e-5, rtol=0)
    torch._dynamo.reset()
    torch.testing.assert_close(run(torch.compile(m), args, kwargs), expected, atol=1e-5, rtol=0)  # inductor pre-grad
    assert all(s.calls == 2 for s in installed_sites(m))
    unsparsify(m)
    import torch._inductor.config as cfg

    assert cfg.pre_grad_custom_pass is None


def test_unsparsify_restores_exactly():
    m, args, kwargs, skw = build("named_sdpa")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = run(m, args, kwargs)
    sdpa_before = (F.scaled_dot_product_attention, dits.scaled_dot_product_attention)
    sparsify(m, recipe(0.25, tile=(4, 4, 4)), **skw)
    assert dits.scaled_dot_product_attention is not sdpa_before[1]  # import-bound name was patched
    assert set(m.state_dict()) == set(before)  # nothing leaks into checkpoints
    assert (run(m, args, kwargs) - ref).abs().max() > 1e-3
    unsparsify(m)
    assert (F.scaled_dot_product_attention, dits.scaled_dot_product_attention) == sdpa_before
    assert all("forward" not in vars(mod) and not hasattr(mod, "_sparsify_site") for mod in m.modules())
    assert not hasattr(m, "_sparsify") and not m._forward_pre_hooks
    assert torch.equal(run(m, args, kwargs), ref)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name", ["wan", "named_sdpa"])
def test_unsparsify_after_regional_compile_is_exact(name):
    """In-place compiles made after sparsify() traced the sparse op: unsparsify removes them, bit for bit."""
    m, args, kwargs, skw = build(name)
    ref = run(m, args, kwargs)
    sparsify(m, recipe(0.25, tile=(4, 4, 4)), **skw)
    _regional_compile(m)
    assert (run(m, args, kwargs) - ref).abs().max() > 1e-3
    compiled = [n for n, mod in m.named_modules() if mod._compiled_call_impl is not None]
    assert compiled
    unsparsify(m)
    assert all(mod._compiled_call_impl is None for mod in m.modules())
    assert torch.equal(run(m, args, kwargs), ref)


def test_backward_through_sparse_op():
    m, args, kwargs, skw = build("named_sdpa")
    sparsify(m, recipe(0.25, tile=(4, 4, 4)), **skw)
    x = args[0].clone().requires_grad_(True)
    m(x, args[1]).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.blocks[0].attn.parameters())
    unsparsify(m)


def test_sparse_op_opcheck():
    m, args, kwargs, skw = build("named_sdpa")
    sparsify(m, recipe(0.5, tile=(4, 4, 4)), **skw)
    site = m.blocks[0].attn._sparsify_site
    n = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.sparsify.sparse_attention.default, (q, k, v, site, [*GRID, 0], None, None))
    unsparsify(m)


def test_errors_are_loud():
    m, args, kwargs, skw = build("named_sdpa")
    with pytest.raises(SparsifyArgumentError, match="example_inputs"):
        sparsify(m, recipe(0.5))
    with pytest.raises(RecipeError, match="sites.blocks.7.attn"):
        sparsify(m, recipe(0.5, sites={"blocks.7.attn": {"density": 0.2}}), **skw)
    with pytest.raises(RecipeError, match="model.class"):
        sparsify(m, {**recipe(0.5), "model": {"class": "WanTransformer3DModel", "sites": []}}, **skw)
    sparsify(m, recipe(0.5, tile=(4, 4, 4)), **skw)
    with pytest.raises(RuntimeError, match="already sparsified"):
        sparsify(m, recipe(0.5), **skw)
    unsparsify(m)
    # a grid larger than the sequence: no video site, and the message says what was found
    with pytest.raises(SparsifyArgumentError, match=r"grid=\(9, 9, 9\).*blocks.0.attn \(text, 160 tokens\).*grid"):
        sparsify(m, recipe(0.5), example_inputs=args, grid=(9, 9, 9))
    # a call whose geometry does not fit is reported with the site path
    sparsify(m, recipe(0.5, tile=(4, 4, 4)), **skw)
    q = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="blocks.0.attn.*does not fit"):
        torch.ops.sparsify.sparse_attention(q, q, q, m.blocks[0].attn._sparsify_site, [*GRID, 0], None, None)
    unsparsify(m)


def test_model_without_sites_is_an_error():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(SparsifyArgumentError, match="no self- or joint-attention site"):
        sparsify(lin, recipe(0.5), example_inputs=(torch.randn(2, 4),), grid=(1, 1, 2))


def test_unsupported_mask_falls_back_to_dense_with_one_warning():
    m, args, kwargs, skw = build("hunyuan")
    sparsify(m, recipe(0.5, tile=(4, 4, 4)))
    site = installed_sites(m)[0]
    n = GRID[0] * GRID[1] * GRID[2]
    q = torch.randn(1, 2, n, 16)
    full_mask = torch.rand(n, n) > 0.5
    full_mask[:, 0] = True
    with pytest.warns(UserWarning, match="not a key-padding mask") as w:
        out = torch.ops.sparsify.sparse_attention(q, q, q, m.transformer_blocks[0].attn._sparsify_site, [*GRID, 0], None, full_mask)
        out2 = torch.ops.sparsify.sparse_attention(q, q, q, m.transformer_blocks[0].attn._sparsify_site, [*GRID, 0], None, full_mask)
    assert len([x for x in w if "not a key-padding" in str(x.message)]) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=full_mask))
    torch.testing.assert_close(out2, out)
    assert site.path == "transformer_blocks.0.attn"
    unsparsify(m)
