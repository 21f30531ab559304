"""Token merging inside 3-D tiles around whole Wan blocks: exact at ratio 0, fewer tokens and right positions at r."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from sparsify import SparsifyArgumentError, installed_sites, runtime, sparsify, unsparsify  # noqa: E402
from sparsify.adapters import adapter_for  # noqa: E402
from sparsify.generation.merge import merge, merge_blocks, plan_merge, unmerge  # noqa: E402
from sparsify.geometry import Geometry, merged_layout, tile_layout  # noqa: E402
from sparsify.testing import dits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TILE = (2, 8, 8), (1, 8, 8)


def _x(B=2, text_before=3, text_after=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, text_before + GRID[0] * GRID[1] * GRID[2] + text_after, D, generator=g)


def _plan(x, r, vs=3):
    lay = tile_layout(GRID, TILE)
    return plan_merge(x[:, vs:vs + lay.gather.numel()], lay, r)


def test_merge_unmerge_round_trip_exact_at_ratio_zero():
    x = _x()
    m = _plan(x, 0)
    xm = merge(x, m, 3)
    assert xm.shape == x.shape
    assert torch.equal(unmerge(xm, x, xm, m, 3), x)


@pytest.mark.parametrize("r", [8, 16, 32])
def test_merge_shrinks_every_tile_uniformly_and_keeps_text(r):
    x = _x()
    m = _plan(x, r)
    xm = merge(x, m, 3)
    n_tiles, vol = 2, 64
    assert xm.shape[1] == x.shape[1] - n_tiles * r
    # kept tokens of tile i are exactly the merged sequence's tile i (kernel tile alignment)
    kept = vol - r
    assert torch.equal(m.keep // vol, torch.arange(n_tiles).repeat_interleave(kept).expand_as(m.keep))
    lay = merged_layout(tile_layout(GRID, TILE).n_tiles, TILE, kept)
    assert lay.tile_lens.tolist() == [kept] * n_tiles and lay.padded_len == n_tiles * vol
    assert torch.equal(xm[:, :3], x[:, :3]) and torch.equal(xm[:, -4:], x[:, -4:])  # text never merged
    assert float(m.size.sum()) == n_tiles * vol * x.shape[0]  # every video token is counted once
    # an identity block: unmerged sources and merged sources get their own input back; destinations the mean
    back = unmerge(xm, x, xm, m, 3)
    assert torch.equal(back[:, :3], x[:, :3]) and torch.equal(back[:, -4:], x[:, -4:])
    lay0 = tile_layout(GRID, TILE)
    tiled_back, tiled_x = (t[:, 3:3 + 128].index_select(1, lay0.gather) for t in (back, x))
    dst_rows = set()
    for b in range(x.shape[0]):
        merged_into = m.keep[b][m.dst[b] % (n_tiles * kept)]
        dst_rows = set(merged_into.tolist())
        others = [s for s in range(n_tiles * vol) if s not in dst_rows]
        assert torch.allclose(tiled_back[b, others], tiled_x[b, others], atol=1e-6, rtol=0)
        assert len(dst_rows) >= 1 and not torch.allclose(tiled_back[b, sorted(dst_rows)], tiled_x[b, sorted(dst_rows)])


def test_merge_picks_the_most_similar_sources():
    """A tile whose odd slots copy their even neighbour (sources identical to a destination) except a few:
    the copies are merged first, and merging an exact copy changes nothing."""
    lay = tile_layout((1, 8, 8), TILE)
    g = torch.Generator().manual_seed(1)
    tiled = torch.randn(1, 64, 8, generator=g)
    tiled[:, 1::2] = tiled[:, 0::2]
    odd_distinct = [1, 3, 5, 7]
    tiled[:, odd_distinct] = torch.randn(1, 4, 8, generator=g)
    x = tiled.index_select(1, lay.scatter)  # tile order -> frame-major
    m = plan_merge(x, lay, 28)
    merged_slots = set(m.src[0].tolist())
    assert merged_slots.isdisjoint(odd_distinct) and len(merged_slots) == 28
    xm = merge(x, m)
    assert torch.allclose(unmerge(xm, x, xm, m), x, atol=1e-6, rtol=0)


def _wan_inputs(m, B=1):
    kw = adapter_for(m).example_inputs(m, grid=GRID, batch=B)
    g = torch.Generator().manual_seed(0)
    kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=g)
    return kw


def test_wan_block_at_ratio_zero_is_exact():
    m = dits.tiny_wan()
    kw = _wan_inputs(m)
    with torch.no_grad():
        ref = m(**kw)[0]
        merging = merge_blocks(m, 0.0, tile=TILE)
        out = m(**kw)[0]
    assert torch.equal(out, ref)
    assert [mg.tokens_in for mg in merging.mergers] == [[128], [128]]
    merging.remove()


def test_wan_block_merged_tokens_positions_and_output():
    m = dits.tiny_wan()
    kw = _wan_inputs(m, B=2)
    seen = {}

    def grab(mod, args):
        seen["x"], seen["rot"] = args[0], args[3]

    h = m.blocks[1].attn1.register_forward_pre_hook(grab)
    with torch.no_grad():
        ref = m(**kw)[0]
        full_rot = seen["rot"]
        merging = merge_blocks(m, {1: 0.25}, tile=TILE)
        out = m(**kw)[0]
    mergers = merging.mergers
    h.remove()
    r = 16
    assert mergers[0].tokens_in == [128 - 2 * r]
    assert seen["x"].shape[:2] == (2, 128 - 2 * r)  # norm1/QKV/attention see the merged tokens
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4
    # RoPE: each merged-sequence token carries the position of the token it keeps (a destination its own)
    cos, cos_full = seen["rot"][0], full_rot[0]
    assert cos.shape[:2] == (2, 128 - 2 * r)
    for b in range(2):
        rows = cos[b, :, 0]
        # every row equals a row of the full table at a distinct position of the right tile
        match = (rows[:, None, :] == cos_full[0, None, :, 0, :]).all(-1)
        assert match.any(-1).all()
    merging.remove()
    with torch.no_grad():
        assert torch.equal(m(**kw)[0], ref)  # removed: the model is unchanged


def test_merged_block_runs_sparse_attention_on_aligned_tiles():
    m = dits.tiny_wan()
    kw = _wan_inputs(m)
    rec = {"version": 1, "defaults": {"method": "vsa", "tile": list(TILE), "budget": {"density": 0.5}}}
    sparsify(m, rec)
    runtime.new_generation()
    with torch.no_grad():
        sparse = m(**{**kw, "timestep": torch.full_like(kw["timestep"], 900)})[0]
    seen = []
    h = m.blocks[0].attn1.register_forward_pre_hook(lambda mod, args: seen.append(runtime.STATE.merged))
    merging = merge_blocks(m, 0.25, tile=TILE)
    site = installed_sites(m)[0]
    sel = site.selections
    runtime.new_generation()
    gen = runtime.STATE.steps.generation
    with torch.no_grad():
        outs = [m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})[0] for t in (900, 800)]
    h.remove()
    assert runtime.STATE.steps.generation == gen + 1 and runtime.STATE.steps.step == 1  # one generation, 2 steps
    assert site.selections == sel + 2  # sparse selections on the merged sequence
    merged = seen[0]
    assert merged.seq_len == 96 and merged.layout.tile_lens.tolist() == [48, 48]
    assert runtime.STATE.merged is None  # cleared after the block
    assert all(torch.isfinite(o).all() for o in outs) and (outs[0] - sparse).abs().max() > 1e-4
    merging.remove()
    unsparsify(m)


def test_merge_blocks_argument_errors():
    m = dits.tiny_wan()
    with pytest.raises(SparsifyArgumentError, match=r"ratio must be a number in \[0, 0.5\]"):
        merge_blocks(m, 0.75, tile=TILE)
    with pytest.raises(SparsifyArgumentError, match=r"block index 5 does not exist: the model has 2 blocks"):
        merge_blocks(m, {5: 0.25}, tile=TILE)


def test_merging_reads_its_own_models_grid_not_the_one_another_model_left():
    a, b = dits.tiny_wan(), dits.tiny_wan()
    sparsify(a, {"version": 1, "defaults": {"method": "dense"}})
    try:
        with torch.no_grad():
            a(**adapter_for(a).example_inputs(a, grid=(1, 8, 8)))  # the runtime's geometry is now a's (1, 8, 8)
            merging = merge_blocks(b, {0: 0.25}, tile=TILE)
            b(**_wan_inputs(b))
        merging.remove()
        assert merging.mergers[0].tokens_in == [128 - 2 * 16]  # both 1x8x8 tiles of b's (2, 8, 8) grid merged
        assert runtime.STATE.geometry == (1, 8, 8, 0)
    finally:
        unsparsify(a)
    assert runtime.STATE.geometry is None and runtime.STATE.timestep is None  # unsparsify forgot a's last forward


@pytest.mark.parametrize("grid,tile", [((2, 8, 8), (1, 8, 8)), ((4, 8, 8), (4, 4, 4))])
def test_sparse_attention_on_a_merged_span_follows_the_merged_tiles(grid, tile):
    """Merged tile i of the sequence is kernel tile i: a selection of tile 0 only attends to its `kept` tokens."""
    from sparsify.runtime.tiled import tiled_sparse_attention

    n = tile_layout(grid, tile).n_tiles
    kept = tile[0] * tile[1] * tile[2] * 3 // 4
    lay = merged_layout(n, tile, kept)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n * kept, 8, generator=g) for _ in range(3))
    idx = torch.zeros(1, 2, n, 1, dtype=torch.long)
    out = tiled_sparse_attention(q, k, v, Geometry((n, 1, kept), 0), lay, idx, torch.ones(1, 2, n, dtype=torch.long))
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :kept], v[:, :, :kept])
    torch.testing.assert_close(out, want)
