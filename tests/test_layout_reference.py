"""Tile layout and the reference semantics against independent dense-mask computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.testing.dits import mask_from_selection, tile_of_tokens
from sparsify.kernels.reference import block_sparse_attn_reference, selection_to_block_mask
from sparsify.runtime.tiled import tile_sequence, tiled_sparse_attention
from sparsify.geometry import Geometry, from_tiles, pool_tiles, tile_layout, to_tiles
from sparsify.methods import get_method
from sparsify.recipe import Budget


@pytest.mark.parametrize("grid,tile", [((5, 6, 10), (4, 4, 4)), ((3, 8, 8), (1, 8, 8)), ((7, 3, 5), (16, 2, 2)), ((4, 4, 4), (2, 4, 8))])
def test_layout_is_a_permutation_with_partial_tiles(grid, tile):
    lay = tile_layout(grid, tile)
    n = grid[0] * grid[1] * grid[2]
    assert sorted(lay.gather[lay.gather >= 0].tolist()) == list(range(n))
    assert int(lay.tile_lens.sum()) == n
    # every tile's valid slots come first, in frame-major order, and hold tokens of exactly that tile
    vol = lay.volume
    tile_of = tile_of_tokens(grid, tile)
    assert lay.n_tiles == int(tile_of.max()) + 1
    for ti in range(lay.n_tiles):
        slots = lay.gather[ti * vol:(ti + 1) * vol]
        k = int(lay.tile_lens[ti])
        assert (slots[:k] >= 0).all() and (slots[k:] < 0).all()
        assert slots[:k].tolist() == (tile_of == ti).nonzero().flatten().tolist()
    x = torch.randn(2, 3, n, 8)
    assert torch.equal(from_tiles(to_tiles(x, lay), lay), x)


@pytest.mark.parametrize("grid,tile,n_tiles,lens", [
    ((21, 45, 80), (4, 4, 4), 1182, {64: 1181, 16: 1}),  # Wan-14B 720p: 1,440 padded boxes -> 1,182 tiles
    ((21, 30, 52), (4, 4, 4), 513, None),               # Wan-1.3B 480p
    ((8, 16, 16), (16, 2, 2), 32, {64: 32}),            # 8x2x2 boxes merge in pairs into 8x2x4 columns
    ((3, 8, 8), (1, 8, 8), 3, {64: 3}),                 # no partial box: unchanged
])
def test_partial_edge_boxes_merge_into_full_tiles(grid, tile, n_tiles, lens):
    lay = tile_layout(grid, tile)
    assert lay.n_tiles == n_tiles
    if lens is not None:
        assert dict(zip(*(t.tolist() for t in lay.tile_lens.unique(return_counts=True)))) == lens
    assert lay.padded_len - math.prod(grid) < 2 * lay.volume * 3  # at most one partial tile per kind of edge
    if grid == (21, 45, 80):  # the first tile of the last frame is the 1x4x16 strip of its first four boxes
        first = lay.gather[lay.scatter[20 * 45 * 80] // 64 * 64:][:64]
        assert first.tolist() == [20 * 3600 + h * 80 + w for h in range(4) for w in range(16)]


def test_pool_tiles_ignores_padding():
    lay = tile_layout((5, 4, 4), (4, 4, 4))  # second tile holds 16 of 64 tokens
    x = torch.randn(1, 1, 80, 4)
    pooled = pool_tiles(to_tiles(x, lay), lay)
    torch.testing.assert_close(pooled[0, 0, 1], x[0, 0, 64:].mean(0))
    assert torch.equal(pool_tiles(to_tiles(x, lay), lay, "max")[0, 0, 1], x[0, 0, 64:].amax(0))


def _random_selection(B, H, nq, nk, gen):
    cnt = torch.randint(0, nk + 1, (B, H, nq), generator=gen, dtype=torch.int32)
    idx = torch.stack([torch.randperm(nk, generator=gen) for _ in range(B * H * nq)]).view(B, H, nq, nk).int()
    return idx, cnt


@pytest.mark.parametrize("S,bm,bn", [(200, 64, 64), (300, 128, 64), (129, 64, 128)])
def test_block_reference_matches_masked_sdpa(S, bm, bn):
    g = torch.Generator().manual_seed(S)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    nq, nk = math.ceil(S / bm), math.ceil(S / bn)
    idx, cnt = _random_selection(B, H, nq, nk, g)
    out = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(bm, bn))
    bmask = selection_to_block_mask(idx, cnt, nk)
    mask = bmask.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :S, :S]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    empty = ~mask.any(-1)
    ref = torch.where(empty[..., None], torch.zeros_like(ref), ref)  # no keys -> zeros, not NaN
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("video_start,n_text", [(0, 0), (0, 11), (9, 9)])
def test_tiled_reference_matches_token_mask(video_start, n_text):
    grid, tile = (5, 6, 10), (4, 4, 4)
    geo = Geometry(grid, video_start)
    lay = tile_layout(grid, tile)
    S = geo.video_len + n_text
    g = torch.Generator().manual_seed(1)
    B, H, D = 2, 2, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    vid = slice(video_start, video_start + geo.video_len)
    idx, cnt = get_method("vsa").select(to_tiles(q[:, :, vid], lay), to_tiles(k[:, :, vid], lay), lay,
                                        [Budget(density=0.25), Budget(top_p=0.5, min_density=0.1)])
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if n_text:
        key_mask[0, S - 2:] = False if video_start == 0 else key_mask[0, S - 2:]
    out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt, key_mask=key_mask)
    mask = mask_from_selection(grid, tile, idx, cnt, S, video_start, key_mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # and it really is sparse: dense attention differs
    assert (F.scaled_dot_product_attention(q, k, v) - out).abs().max() > 1e-3


def test_vsa_keeps_best_tiles_and_counts():
    lay = tile_layout((4, 8, 8), (1, 8, 8))
    q = torch.randn(1, 1, 256, 8)
    k = torch.randn(1, 1, 256, 8)
    k[:, :, 128:192] += 3 * q[:, :, 128:192].mean(2, keepdim=True)  # make key tile 2 attractive
    qt, kt = to_tiles(q, lay), to_tiles(k, lay)
    idx, cnt = get_method("vsa").select(qt, kt, lay, [Budget(density=0.25)])
    assert cnt.tolist() == [[[1, 1, 1, 1]]]
    assert idx[0, 0, 2, 0] == 2
    idx, cnt = get_method("dense").select(qt, kt, lay, [Budget(density=0.25)])
    assert cnt.tolist() == [[[4, 4, 4, 4]]]


def test_block_reference_kv_block_lens_equals_key_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 200, 8, generator=g) for _ in range(3))
    lens = torch.tensor([64, 10, 0, 8], dtype=torch.int32)
    idx, cnt = _random_selection(2, 2, 4, 4, g)
    mask = (torch.arange(64).view(1, 64) < lens.view(-1, 1)).reshape(-1)[:200].expand(2, 200)
    a = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(64, 64), kv_block_lens=lens)
    b = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(64, 64), key_mask=mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_tile_sequence_round_trip_and_text_blocks():
    from sparsify.runtime.tiled import tile_sequence

    geo = Geometry((5, 6, 10), video_start=9)
    lay = tile_layout(geo.grid, (4, 4, 4))
    x = torch.randn(1, 2, geo.video_len + 20, 4)
    ts = tile_sequence(x, x, x, geo, lay)
    assert ts.n_text_blocks == 1 and ts.q.shape[2] == lay.padded_len + 64
    assert torch.equal(ts.q.index_select(2, ts.inverse), x)
    assert int(ts.block_lens.sum()) == x.shape[2] and int(ts.valid.sum()) == x.shape[2]


@pytest.mark.parametrize("grid,tile,video_start,n_text", [((1, 13, 16), (4, 4, 4), 0, 0), ((1, 8, 8), (4, 4, 4), 0, 5),
                                                          ((1, 8, 40), (1, 8, 16), 0, 0)])
def test_only_the_last_block_short_runs_as_a_tail_without_block_lengths(grid, tile, video_start, n_text):
    """When every block but the last is full, the kernel gets the prefix of slots up to the last valid one and
    no per-block lengths (an ordinary tail); the result still equals the token-level masked reference."""
    geo = Geometry(grid, video_start)
    lay = tile_layout(grid, tile)
    S = geo.video_len + n_text
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, S, 16, generator=g, dtype=torch.float64) for _ in range(3))
    vid = slice(video_start, video_start + geo.video_len)
    idx, cnt = get_method("vsa").select(to_tiles(q[:, :, vid], lay), to_tiles(k[:, :, vid], lay), lay,
                                        [Budget(density=0.5)] * 2)
    seen = []

    def block_fn(qs, ks, vs, *args, kv_block_lens=None, **kw):
        seen.append((qs.shape[2], kv_block_lens))
        return block_sparse_attn_reference(qs, ks, vs, *args, kv_block_lens=kv_block_lens, **kw)

    out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt, block_fn=block_fn)
    ts = tile_sequence(q, k, v, geo, lay)
    assert ts.prefix_len is not None and ts.prefix_len < ts.q.shape[2] and seen == [(ts.prefix_len, None)]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_from_selection(grid, tile, idx, cnt, S, video_start))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("grid,tile,n_text", [((1, 13, 16), (4, 4, 4), 0), ((2, 8, 12), (4, 4, 4), 5),
                                              ((1, 8, 40), (1, 8, 16), 0)])
def test_kernel_scatters_rows_to_token_order(grid, tile, n_text, monkeypatch):
    """A block_fn that stores rows straight to token order (the Triton kernel, run by the interpreter) gives the
    token-level masked reference with no inverse pass; with autograd on it is asked for slot order instead."""
    pytest.importorskip("triton")
    from sparsify.kernels.block_sparse import block_sparse_attn_scattered

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    geo = Geometry(grid, 0)
    lay = tile_layout(grid, tile)
    S = geo.video_len + n_text
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, S, 64, generator=g) for _ in range(3))
    vid = slice(0, geo.video_len)
    idx, cnt = get_method("vsa").select(to_tiles(q[:, :, vid], lay), to_tiles(k[:, :, vid], lay), lay,
                                        [Budget(density=0.5)] * 2)
    calls = []

    def block_fn(qs, ks, vs, i, c, *, block_size, scale, kv_block_lens=None, out_rows=None, out_len=None):
        calls.append(out_rows is not None)
        if out_rows is None:
            return block_sparse_attn_reference(qs, ks, vs, i, c, block_size=block_size, scale=scale,
                                               kv_block_lens=kv_block_lens)
        return block_sparse_attn_scattered(qs, ks, vs, i, c, out_rows, out_len, block_size=block_size, scale=scale,
                                           kv_block_lens=kv_block_lens)

    block_fn.scatters_rows = True
    out = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt, block_fn=block_fn)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_from_selection(grid, tile, idx, cnt, S, 0))
    assert calls == [True]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    qg = q.clone().requires_grad_()
    out_g = tiled_sparse_attention(qg, k, v, geo, lay, idx, cnt, block_fn=block_fn)
    assert calls == [True, False]
    torch.testing.assert_close(out_g.detach(), ref, atol=2e-5, rtol=2e-5)
