"""CPU tests (Triton interpreter) of the fused gather, tile pooling, row top-k and Veda peak kernels."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sparsify.kernels import gather as G  # noqa: E402
from sparsify.runtime.tiled import _sequence_index, _slot_source, tile_sequence  # noqa: E402
from sparsify.kernels.tile_select import group_means, tile_peaks, topk_indices  # noqa: E402
from sparsify.geometry import Geometry, pool_tiles, tile_layout, to_tiles  # noqa: E402
from sparsify.methods.veda import FEATURES, _key_peak  # noqa: E402
from oracles import veda_reference_features  # noqa: E402
from sparsify.methods.vsa import coarse_scores  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret():
    with G.interpreter():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile,grid,start,tail", [((4, 4, 4), (5, 6, 7), 3, 5), ((1, 4, 16), (2, 5, 9), 0, 0)])
def test_gather_matches_index_select_and_pools(dtype, tile, grid, start, tail):
    g = torch.Generator().manual_seed(0)
    geo = Geometry(grid, video_start=start)
    S = start + geo.video_len + tail
    lay = tile_layout(grid, tile)
    q, k, v = ((torch.randn(2, 3, S, 16, generator=g) * 2).to(dtype) for _ in range(3))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # other strides
    src, valid, *_ = _sequence_index(grid, tile, start, S, "cpu")
    ys, means = G.gather_rows([q, k, v], _slot_source(src, valid), pool_tiles=lay.n_tiles, tile_lens=lay.tile_lens,
                              volume=lay.volume)
    ref = tile_sequence(q, k, v, geo, lay)  # the PyTorch path on CPU
    for y, r in zip(ys, (ref.q, ref.k, ref.v)):
        assert y.is_contiguous() and y.shape == r.shape
        assert torch.equal(y[:, :, valid], r[:, :, valid])
        assert bool((y[:, :, ~valid] == 0).all())
    P = lay.padded_len
    for m, r in zip(means, (ref.q, ref.k)):
        exact = pool_tiles(r[:, :, :P].double(), lay)
        assert torch.allclose(m, exact.float(), atol=1e-5, rtol=1e-5)
    none, only = G.gather_rows([q, k, v], _slot_source(src, valid), pool_tiles=lay.n_tiles, tile_lens=lay.tile_lens,
                               volume=lay.volume, write=False)  # the means alone (the direct kernel path)
    assert none == [] and len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, means))
    with pytest.raises(ValueError, match="write=False needs pooling"):
        G.gather_rows([q, k], _slot_source(src, valid), write=False)


def test_gather_inverse_and_errors():
    x = torch.randn(1, 2, 10, 8)
    perm = torch.randperm(10)
    (y,), _ = G.gather_rows([x], perm, block=4)
    (z,), _ = G.gather_rows([y], torch.argsort(perm), block=4)
    assert torch.equal(z, x)
    with pytest.raises(ValueError, match="one shape"):
        G.gather_rows([x, x[:, :1]], perm)
    with pytest.raises(ValueError, match="power of two"):
        G.gather_rows([x], perm, block=6)


@pytest.mark.parametrize("tile,grid", [((4, 4, 4), (5, 6, 7)), ((1, 2, 2), (2, 3, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_stats_match_torch(tile, grid, dtype):
    lay = tile_layout(grid, tile)
    x = to_tiles(torch.randn(2, 2, math.prod(grid), 16).to(dtype), lay)
    x = torch.cat([x, torch.randn_like(x[:, :, :5])], 2)[:, :, :lay.padded_len]  # a strided view
    stats = G.pool_stats(x, lay.tile_lens, lay.volume, ("mean", "max", "min"))
    for s, name in zip(stats, ("mean", "max", "min")):
        assert torch.allclose(s, pool_tiles(x, lay, name), atol=1e-5), name
    with pytest.raises(ValueError, match="unknown"):
        G.pool_stats(x, lay.tile_lens, lay.volume, ("median",))


def test_topk_matches_torch_topk():
    g = torch.Generator().manual_seed(1)
    for nk, ks in ((7, [1, 3]), (90, [5, 90]), (300, [16, 4]), (300, [200, 3])):  # n_k 7: torch.topk fallback
        s = torch.randn(2, 2, 5, nk, generator=g)
        idx = topk_indices(s, ks)
        assert idx.dtype == torch.int32 and idx.shape[-1] == max(ks)
        for h, k in enumerate(ks):
            assert torch.equal(idx[:, h, :, :k].long(), torch.topk(s[:, h], k, sorted=True).indices)
            assert bool((idx[:, h, :, k:] == 0).all())
    s = torch.randint(-2, 3, (1, 1, 6, 50), generator=g).float()  # many ties, negatives, -inf
    s[0, 0, 0, :3] = float("-inf")
    idx = topk_indices(s, [9]).long()
    assert torch.equal(torch.gather(s, -1, idx), torch.topk(s, 9).values)
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # no index twice
    s = torch.zeros(1, 1, 2, 40)  # all tied: the bisection starts with min == max; lowest indices first
    assert topk_indices(s, [5])[0, 0].tolist() == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError, match="one k"):
        topk_indices(s, [0])


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("tile,grid", [((4, 4, 4), (5, 6, 7)), ((1, 8, 16), (3, 8, 20))])
def test_tile_peaks_match_torch_peak(tile, grid, group):
    lay = tile_layout(grid, tile)
    g = torch.Generator().manual_seed(2)
    k = to_tiles(torch.randn(2, 2, math.prod(grid), 16, generator=g), lay)
    qm = torch.randn(2, 2, lay.n_tiles, 16, generator=g)
    ref = _key_peak(k, qm, lay, 0.25, group)  # CPU: the PyTorch path
    keys = k if group == 1 else group_means(k, lay.tile_lens, lay.volume, group)
    got, = tile_peaks(qm, keys, lay.tile_lens, lay.volume // group, 0.25, group=group, config=(16, 16, 4))
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("peak", ["keys", "keys/4"])
def test_tile_peaks_mean_mix_and_mass_match_veda_reference(peak):
    lay = tile_layout((5, 4, 4), (4, 4, 4))  # a partial tile of 16 keys
    g = torch.Generator().manual_seed(3)
    q, k = (to_tiles(torch.randn(1, 2, 80, 16, generator=g), lay) for _ in "qk")
    ref = veda_reference_features(q, k, lay, peak=peak).float()
    group = 4 if peak == "keys/4" else 1
    keys = k if group == 1 else group_means(k, lay.tile_lens, 64, group)
    peak_, mean, mix, mass = tile_peaks(pool_tiles(q, lay), keys, lay.tile_lens, 64 // group, 0.25, group=group,
                                        outputs=("peak", "mean", "mix", "mass"), config=(16, 16, 4))
    for got, name in ((peak_, "peak"), (mean, "mean"), (mix, "mix")):
        assert torch.allclose(got, ref[..., FEATURES.index(name)], atol=1e-5), name
    assert torch.allclose(mass, ref[..., FEATURES.index("mix")] + lay.tile_lens.float().log(), atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two rows"):
        tile_peaks(pool_tiles(q, lay), k[:, :, :100], lay.tile_lens, 64, 0.25)
    with pytest.raises(ValueError, match="outputs from"):
        tile_peaks(pool_tiles(q, lay), k, lay.tile_lens, 64, 0.25, outputs=("max",))


def test_group_means_ignore_padding_and_match_torch():
    lay = tile_layout((3, 5, 7), (2, 4, 8))  # tile lengths 56, 14, 28, 7
    g = torch.Generator().manual_seed(4)
    x = to_tiles(torch.randn(1, 3, 105, 16, generator=g), lay)
    x = torch.where((lay.gather < 0).view(1, 1, -1, 1), torch.full_like(x, 1e4), x)  # garbage in padded slots
    got = group_means(x, lay.tile_lens, lay.volume, 4)
    valid = (lay.gather >= 0).view(1, 1, -1, 4, 1)
    want = (x.view(1, 3, -1, 4, 16) * valid).sum(-2) / valid.sum(-2).clamp_min(1)
    assert got.shape == (1, 3, lay.padded_len // 4, 16) and torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two group dividing"):
        group_means(x, lay.tile_lens, lay.volume, 3)


def test_tile_peaks_with_one_row_per_tile_are_vsa_coarse_scores():
    lay = tile_layout((5, 6, 7), (4, 4, 4))
    g = torch.Generator().manual_seed(5)
    q, k = (to_tiles(torch.randn(1, 2, 210, 16, generator=g), lay) for _ in "qk")
    got, = tile_peaks(pool_tiles(q, lay), pool_tiles(k, lay), lay.tile_lens, 1, 0.25, group=64, config=(16, 16, 4))
    assert torch.allclose(got, coarse_scores(q, k, lay), atol=1e-5)  # CPU: the torch matmul


def test_fast_paths_stay_off_on_cpu_and_with_grad():
    from sparsify.kernels._triton import needs_grad, use_triton

    x = torch.randn(1, 1, 4, 2, requires_grad=True)
    assert not use_triton("gather", x.detach())
    assert needs_grad(x) and not needs_grad(x.detach())
    with torch.no_grad():
        assert not needs_grad(x)


def test_kernel_backend_switch_parses_and_restores():
    from sparsify.kernels import PATHS, enabled, kernel_backend

    with kernel_backend("torch"):
        assert not any(enabled(p) for p in PATHS)
        with kernel_backend("-rope,-scatter"):
            assert not enabled("rope") and not enabled("scatter") and enabled("gather")
    assert all(enabled(p) for p in PATHS)
    with pytest.raises(ValueError, match="not a kernel backend.*-rope,-scatter"):
        with kernel_backend("rope"):
            pass
    with pytest.raises(KeyError, match="unknown kernel path"):
        enabled("direct")


def test_device_consts_are_cached_per_values_and_dtype():
    """Equal Python tuples of another dtype ((True, False) == (1, 0)) must not share a cached tensor."""
    from sparsify.kernels._triton import device_consts, device_ints

    a = device_consts([True, False], "cpu", torch.bool)
    assert a is device_consts([True, False], "cpu", torch.bool)
    b = device_ints([1, 0], "cpu")
    assert b.dtype == torch.int32 and a.dtype == torch.bool
    assert device_consts([0.5], "cpu", torch.float32).item() == 0.5


def test_gather_rows_with_a_source_row_per_head():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 37, 16, generator=g).transpose(1, 2).contiguous().transpose(1, 2)  # other strides
    perm = torch.stack([torch.randperm(37, generator=g) for _ in range(6)]).view(2, 3, 37)
    (y,), _ = G.gather_rows([x], perm, block=16)
    assert torch.equal(y, torch.gather(x, 2, perm[..., None].expand(x.shape)))
    with pytest.raises(ValueError, match="per-head src must be"):
        G.gather_rows([x], perm[:1], block=16)


@pytest.mark.parametrize("tile,grid,group", [((4, 4, 4), (5, 6, 7), 4), ((1, 4, 16), (2, 5, 9), 8)])
def test_gather_pools_key_group_means_like_group_means(tile, grid, group):
    g = torch.Generator().manual_seed(7)
    geo = Geometry(grid)
    lay = tile_layout(grid, tile)
    q, k, v = (torch.randn(2, 2, geo.video_len, 16, generator=g) for _ in range(3))
    src, valid, *_ = _sequence_index(grid, tile, 0, geo.video_len, "cpu")
    (qt, kt, vt), means = G.gather_rows([q, k, v], _slot_source(src, valid), pool_tiles=lay.n_tiles,
                                        tile_lens=lay.tile_lens, volume=lay.volume, group=group)
    assert len(means) == 3 and means[2].dtype == k.dtype
    want = group_means(kt[:, :, :lay.padded_len], lay.tile_lens, lay.volume, group)
    assert torch.allclose(means[2], want, atol=1e-6)
    from sparsify.methods.base import TileStats
    from sparsify.methods.veda import _key_rows

    stats = TileStats(means[0], means[1], means[2])
    assert _key_rows(kt[:, :, :lay.padded_len], lay, group, stats) is means[2]  # served, not recomputed
    with pytest.raises(ValueError, match="group 3 must be a power of two"):
        G.gather_rows([q, k], _slot_source(src, valid), pool_tiles=lay.n_tiles, tile_lens=lay.tile_lens,
                      volume=lay.volume, group=3)
