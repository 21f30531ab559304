"""GPU tests of the fast paths of the whole op: fused gather + tile means, Triton pooling, top-k, Veda peaks."""

from __future__ import annotations

import math

import pytest
import torch
from sparsify.testing.dits import rel_err


G = pytest.importorskip("sparsify.kernels.gather")
from sparsify.kernels import _triton  # noqa: E402


def _all_fast(on: bool):
    _triton._OFF = frozenset() if on else frozenset(_triton.PATHS)


@pytest.fixture(autouse=True)
def _restore():
    yield
    _triton._OFF = frozenset()


@pytest.mark.parametrize("tile,grid,start,tail", [((4, 4, 4), (21, 30, 52), 0, 0), ((1, 8, 16), (5, 30, 52), 7, 300),
                                                  ((2, 4, 8), (5, 9, 11), 0, 77)])
def test_tile_sequence_fast_matches_torch(tile, grid, start, tail):
    from sparsify.runtime.tiled import tile_sequence
    from sparsify.geometry import Geometry, pool_tiles, tile_layout

    geo = Geometry(grid, video_start=start)
    S = start + geo.video_len + tail
    lay = tile_layout(grid, tile, "cuda")
    q, k, v = (torch.randn(1, 4, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ts = tile_sequence(q, k, v, geo, lay)
    _all_fast(False)
    ref = tile_sequence(q, k, v, geo, lay)
    P = lay.padded_len
    pq_ref = pool_tiles(ref.q[:, :, :P], lay)
    _all_fast(True)
    for a, b in ((ts.q, ref.q), (ts.k, ref.k), (ts.v, ref.v)):
        assert torch.equal(a[:, :, ts.valid], b[:, :, ref.valid])
    assert torch.allclose(pool_tiles(ts.q[:, :, :P], lay), pq_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(pool_tiles(ref.q[:, :, :P].clone(), lay), pq_ref, atol=1e-4, rtol=1e-4)  # Triton pooling


@pytest.mark.parametrize("method", ["vsa", "xattention"])
def test_op_fast_matches_torch_path(method):
    """The whole op with every fast path on equals the PyTorch-path op (same selection up to ties)."""
    from sparsify import runtime
    from sparsify.recipe import Budget, HeadConfig

    grid, H = (8, 16, 24), 4
    S = 8 * 16 * 24 + 50
    st = runtime.SiteState(site_id=runtime.STATE.new_id(), path="t", kind="self", heads=H, head_dim=128,
                           configs=[HeadConfig(method=method, tile=(4, 4, 4), budget=Budget(density=0.1))] * H)
    runtime.STATE.sites[st.site_id] = st
    try:
        q, k, v = (torch.randn(1, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        site = torch.tensor([st.site_id])
        out = runtime.run_site(q, k, v, site, [*grid, 50], None)
        _all_fast(False)
        ref = runtime.run_site(q, k, v, site, [*grid, 50], None)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 2e-2
    finally:
        runtime.STATE.sites.pop(st.site_id)


def test_tile_layout_differentiable_with_fast_paths_on():
    """With a gradient needed, the gather and inverse take the index_select path: grads flow (reference kernel)."""
    from sparsify.kernels.reference import block_sparse_attn_reference
    from sparsify.runtime.tiled import tiled_sparse_attention
    from sparsify.geometry import Geometry, tile_layout

    geo = Geometry((4, 8, 8), video_start=5)
    lay = tile_layout(geo.grid, (4, 4, 4), "cuda")
    q = torch.randn(1, 2, 5 + 256 + 3, 64, device="cuda", requires_grad=True)
    n = lay.n_tiles
    idx = torch.arange(n, dtype=torch.int32, device="cuda").expand(1, 2, n, n).contiguous()
    cnt = torch.full((1, 2, n), 2, dtype=torch.int32, device="cuda")
    out = tiled_sparse_attention(q, q, q, geo, lay, idx, cnt, block_fn=block_sparse_attn_reference)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        ref = tiled_sparse_attention(q, q, q, geo, lay, idx, cnt, block_fn=block_sparse_attn_reference)
    assert torch.allclose(out, ref, atol=1e-5)


def test_topk_matches_torch_on_real_shape():
    from sparsify.kernels.tile_select import topk_indices

    s = torch.randn(1, 8, 1440, 1440, device="cuda")
    assert torch.equal(topk_indices(s, [72] * 8).long(), torch.topk(s, 72, sorted=True).indices)


@pytest.mark.parametrize("peak", ["keys", "keys/4"])
def test_veda_fast_scores_match_torch_path(peak):
    """Veda's fused peak/mean/mix kernel against the PyTorch path (which rounds logits to bf16): close
    scores, and nearly the same top-5% selection."""
    from sparsify.geometry import tile_layout, to_tiles
    from sparsify.methods.veda import Veda

    lay = tile_layout((21, 45, 80), (4, 4, 4), "cuda")
    q, k = (to_tiles(torch.randn(1, 2, 21 * 45 * 80, 128, device="cuda", dtype=torch.bfloat16), lay) for _ in "qk")
    got = Veda(peak=peak).scores(q, k, lay)
    _triton._OFF = frozenset({"peak"})
    want = Veda(peak=peak).scores(q, k, lay)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05
    a = torch.topk(got, 72).indices.sort(-1).values
    b = torch.topk(want, 72).indices.sort(-1).values
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean()
    assert overlap > 0.9


@pytest.mark.parametrize("group", [1, 4])
def test_peaks_match_torch_on_real_shape(group):
    from sparsify.kernels.tile_select import group_means, tile_peaks
    from sparsify.geometry import tile_layout, to_tiles
    from sparsify.methods.veda import _key_peak

    lay = tile_layout((21, 45, 80), (4, 4, 4), "cuda")
    k = to_tiles(torch.randn(1, 2, 21 * 45 * 80, 128, device="cuda", dtype=torch.bfloat16), lay)
    qm = torch.randn(1, 2, lay.n_tiles, 128, device="cuda")
    _triton._OFF = frozenset({"peak"})
    want = _key_peak(k, qm, lay, 1 / math.sqrt(128), group)
    keys = k if group == 1 else group_means(k, lay.tile_lens, 64, group)
    for config in (None, (128, 128, 8), (64, 64, 4), (64, 128, 4)):
        got, = tile_peaks(qm, keys, lay.tile_lens, 64 // group, 1 / math.sqrt(128), group=group, config=config)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() < 0.05, config  # the torch path rounds logits to bf16



def test_gather_key_groups_match_group_means_on_real_shape():
    """The fused gather's k group means (Veda's `keys/4` rows) against the separate `group_means` pass."""
    from sparsify.runtime.tiled import tile_sequence
    from sparsify.kernels.tile_select import group_means
    from sparsify.geometry import Geometry, tile_layout

    grid = (21, 45, 80)
    lay, geo = tile_layout(grid, (4, 4, 4), "cuda"), Geometry(grid)
    q, k, v = (torch.randn(1, 4, geo.video_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ts = tile_sequence(q, k, v, geo, lay, key_group=4)
    kt = ts.k[:, :, :lay.padded_len]
    got = ts.k_group_means
    want = group_means(kt, lay.tile_lens, 64, 4)
    assert got is not None and got.shape == want.shape
    assert (got.float() - want.float()).abs().max() < 2e-2  # both float32 sums rounded to bf16
