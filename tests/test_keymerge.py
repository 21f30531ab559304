"""Key-side token merging with proportional attention: an expanded-key oracle, the matching rule, the runtime."""

import warnings

import pytest
import torch

from sparsify import installed_sites, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.errors import SparsifyWarning
from sparsify.generation.merge import plan_merge
from sparsify.geometry import Geometry, tile_layout
from sparsify.methods import keymerge
from sparsify.methods.keymerge import KeyMerge, key_merged_attention, merged_per_tile
from sparsify.recipe import Budget
from sparsify.testing import dits

pytestmark = pytest.mark.usefixtures("one_thread")
sdpa = torch.nn.functional.scaled_dot_product_attention


def _expanded(x, layout, r, vs, feat):
    """`x` `[B, H, S, D]` with every video token replaced by the mean of its merge group (a merged source and
    its destination are one group), computed slot by slot: attention over these S keys and values equals
    proportional attention over the merged ones (a group of s equal keys weighs s times one)."""
    m = plan_merge(feat, layout, r, centre=False)
    out = x.clone()
    g = layout.gather.tolist()  # tile-order slot -> video token
    vol = layout.volume
    for b in range(x.shape[0]):
        groups = {}
        for t in range(layout.n_tiles):  # destinations: the kept slots of each tile, in merged order
            for j in range(m.kept):
                groups[t * m.kept + j] = [int(m.keep[b, t * m.kept + j])]
        for s_slot, d in zip(m.src[b].tolist(), m.dst[b].tolist()):
            groups[d].append(s_slot)
        for slots in groups.values():
            assert len({s // vol for s in slots}) == 1  # a group never leaves its tile
            tokens = [vs + g[s] for s in slots]
            out[b, :, tokens] = x[b, :, tokens].mean(1, keepdim=True)
    return out


@pytest.mark.parametrize("r", [0, 3, 4])
def test_matches_attention_over_expanded_keys(r):
    g = torch.Generator().manual_seed(r)
    B, H, D, vs, after = 2, 3, 16, 5, 2
    lay = tile_layout((2, 4, 4), (2, 2, 2))  # 4 tiles of 8 tokens
    N = 32
    S = vs + N + after
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    out, keys = key_merged_attention(q, k, v, lay, r, vs, scale=0.3)
    assert keys == S - r * lay.n_tiles
    feat = k[:, :, vs:vs + N].float().mean(1)
    ke, ve = _expanded(k, lay, r, vs, feat), _expanded(v, lay, r, vs, feat)
    video = slice(vs, vs + N)
    torch.testing.assert_close(out[:, :, video], sdpa(q, ke, ve, scale=0.3)[:, :, video], rtol=1e-5, atol=1e-5)
    text = list(range(vs)) + list(range(vs + N, S))  # text queries: every key as it is
    torch.testing.assert_close(out[:, :, text], sdpa(q, k, v, scale=0.3)[:, :, text], rtol=1e-5, atol=1e-5)


def test_duplicated_keys_merge_exactly_only_with_the_size_bias():
    g = torch.Generator().manual_seed(1)
    lay = tile_layout((2, 2, 4), (2, 2, 2))  # 2 tiles of 8
    q = torch.randn(1, 2, 16, 8, generator=g)
    k, v = torch.randn(1, 2, 8, 8, generator=g).repeat_interleave(2, 2), torch.randn(1, 2, 8, 8, generator=g)
    v = v.repeat_interleave(2, 2)  # slots 2i and 2i+1 equal: every odd slot is a duplicate of its even neighbour
    want = sdpa(q, k, v)
    out, keys = key_merged_attention(q, k, v, lay, 4)
    assert keys == 8
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    unbiased, _ = key_merged_attention(q, k, v, lay, 4, proportional=False)
    torch.testing.assert_close(unbiased, want, rtol=1e-5, atol=1e-5)  # equal weights everywhere: the bias cancels
    k[:, :, :2] *= 3.0  # one group of much larger keys: now only the bias keeps the weights right
    v[:, :, :2] += 1.0
    want = sdpa(q, k, v)
    torch.testing.assert_close(key_merged_attention(q, k, v, lay, 4)[0], want, rtol=1e-5, atol=1e-5)


def test_merges_the_most_similar_keys_by_head_average():
    g = torch.Generator().manual_seed(2)
    lay = tile_layout((2, 2, 2), (2, 2, 2))  # one tile of 8
    k = torch.randn(1, 2, 8, 16, generator=g)
    k[:, :, 5] = 2.0 * k[:, :, 2]  # slot 5 points exactly where slot 2 does (cosine 1), in both heads
    m = plan_merge(k.mean(1), lay, 1, centre=False)
    assert m.src.tolist() == [[5]] and int(m.keep[0, m.dst[0, 0]]) == 2


def test_merged_per_tile_rounds_and_caps():
    assert [merged_per_tile(d, 64) for d in (1.0, 0.9, 0.75, 0.5, 0.3)] == [0, 6, 16, 32, 32]


def _run(m, kw, recipe):
    sparsify(m, recipe)
    try:
        with torch.no_grad():
            out = m(**kw)[0]
        sites = installed_sites(m)
        return out, sum(s.work for s in sites) / sum(s.dense_work for s in sites)
    finally:
        unsparsify(m)


def _recipe(density, tile=(4, 4, 4), **budget):
    return {"version": 1, "defaults": {"method": "keymerge", "tile": list(tile),
                                       "budget": budget or {"density": density}}}


def test_tiny_wan_through_sparsify():
    m = dits.tiny_wan()
    kw = adapter_for(m).example_inputs(m, grid=(4, 4, 8))
    with torch.no_grad():
        ref = m(**kw)[0]
    out, work = _run(m, kw, _recipe(1.0))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert work == 1.0
    out, work = _run(m, kw, _recipe(0.75))
    assert work == pytest.approx(0.75) and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_runs_dense_with_one_warning_where_it_cannot_merge(monkeypatch):
    monkeypatch.setattr(keymerge, "_WARNED", set())
    m = dits.tiny_wan()
    kw = adapter_for(m).example_inputs(m, grid=(5, 4, 8))  # 5 frames: the 4x4x4 tile does not divide
    with torch.no_grad():
        ref = m(**kw)[0]
    with pytest.warns(SparsifyWarning, match=r"grid \(5, 4, 8\) is not divisible by the tile \(4, 4, 4\)") as rec:
        out, work = _run(m, kw, _recipe(0.75))
    assert len([w for w in rec if "keymerge" in str(w.message)]) == 1  # two blocks, one warning
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert work == 1.0
    kw = adapter_for(m).example_inputs(m, grid=(4, 4, 8))
    with pytest.warns(SparsifyWarning, match="a top_p budget does not apply"):
        out, work = _run(m, kw, _recipe(None, top_p=0.9))
    assert work == 1.0
    with pytest.warns(SparsifyWarning, match="a density below 0.5 keeps half the keys"):
        _, work = _run(m, kw, _recipe(0.2))
    assert work == pytest.approx(0.5)


def test_attend_protocol_and_refused_select():
    q, k, v = torch.randn(3, 1, 2, 64, 16, generator=torch.Generator().manual_seed(3)).unbind(0)
    out, work = KeyMerge().attend(q, k, v, Geometry((4, 4, 4)), [Budget(density=0.75), Budget(density=1.0)],
                                  scale=None, key_mask=None, cache={}, block_fn=None, tile=(4, 4, 4))
    assert work == pytest.approx(0.75 + 1.0)
    torch.testing.assert_close(out[:, 1:], sdpa(q[:, 1:], k[:, 1:], v[:, 1:]), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full-density head merges nothing and warns of nothing
        KeyMerge().attend(q, k, v, Geometry((4, 4, 4)), [Budget(density=1.0)] * 2, scale=None, key_mask=None,
                          cache={}, block_fn=None, tile=(4, 4, 4))
    with pytest.raises(NotImplementedError, match="KeyMerge.attend"):
        KeyMerge().select(q, k, None, [])
