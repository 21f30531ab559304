"""SVG2: k-means and selection against slow references, the variable-size block kernel, attend, the runtime."""

import copy
import doctest
import math

import pytest
import torch

from sparsify.testing import dits
from sparsify import installed_sites, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.kernels import cluster_select, kernel_backend, kmeans as kmeans_kernels, varlen
from sparsify.kernels._triton import interpreter
from sparsify.kernels.varlen import q_tile_table, varlen_block_attn, varlen_block_attn_reference, varlen_pairs
from sparsify.geometry import Geometry
from sparsify.methods import get_method, svg2
from sparsify.methods.svg2 import (SVG2, cluster_blocks, init_centroids, kmeans, kmeans_assign, kmeans_update,
                                   segment_means, select_clusters, centroid_logits)
from sparsify.recipe import Budget
from oracles import kmeans_reference, select_clusters_reference

pytest.importorskip("triton")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _blobs(B, H, S, D, n, seed, spread=0.3):
    """Points around n random centers (clusterable data)."""
    g = _gen(seed)
    centers = torch.randn(B, H, n, D, generator=g) * 3
    pick = torch.randint(0, n, (B, H, S), generator=g)
    return torch.gather(centers, 2, pick[..., None].expand(B, H, S, D)) + spread * torch.randn(B, H, S, D, generator=g)


@pytest.mark.parametrize("module", [svg2, varlen, kmeans_kernels, cluster_select])
def test_docstring_examples(module, no_interpret):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_registered_and_select_says_what_to_call():
    assert isinstance(get_method("svg2"), SVG2)
    with pytest.raises(TypeError, match="cluster_select"):
        get_method("svg2").select(None, None, None, None)
    with pytest.raises(ValueError, match="q_clusters"):
        SVG2(q_clusters=0)


# ----------------------------------------------------------------------------------------------
# k-means


def test_kmeans_matches_reference(no_interpret):
    x = torch.randn(2, 2, 60, 8, generator=_gen(1), dtype=torch.float64)
    init = init_centroids(x, 5, seed=3)
    got, ref = kmeans(x, 5, init=init, iters=4), kmeans_reference(x, init, 4)
    assert torch.equal(got.labels, ref.labels)
    torch.testing.assert_close(got.centroids, ref.centroids, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [16, 64])
def test_triton_assignment_matches_torch(interpret, D):
    x = torch.randn(2, 3, 77, D, generator=_gen(D))
    c = torch.randn(2, 3, 21, D, generator=_gen(D + 1))
    fast = kmeans_assign(x, c)
    d = ((x[:, :, :, None] - c[:, :, None]) ** 2).sum(-1)
    want = d.argmin(-1).to(torch.int32)
    gap = d.sort(-1).values[..., 1] - d.amin(-1)  # ignore near ties
    assert torch.equal(fast[gap > 1e-3], want[gap > 1e-3]) and (gap > 1e-3).float().mean() > 0.95


@pytest.mark.parametrize("mode", ["interpret", "torch"])
def test_segment_means_equal_the_scatter_update(monkeypatch, mode):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if mode == "interpret" else "0")
    x = torch.randn(2, 2, 53, 16, generator=_gen(2))
    labels = torch.randint(0, 9, (2, 2, 53), generator=_gen(3), dtype=torch.int32)
    labels[..., labels[0, 0] == 4] = 5  # cluster 4 empty in (0, 0)
    old = torch.randn(2, 2, 9, 16, generator=_gen(4))
    perm, starts, lens = cluster_blocks(labels, 9)
    xs = torch.gather(x, 2, perm[..., None].expand(x.shape))
    torch.testing.assert_close(segment_means(xs, starts, lens, old), kmeans_update(x, labels, old), rtol=1e-5, atol=1e-5)


def test_kmeans_path_switch(monkeypatch):
    """The `kmeans` kernel path governs the assignment, segment means and selection kernels: under the interpreter
    they serve CPU tensors of a supported dtype and head dim unless `kernel_backend` turns the path off."""
    x = torch.zeros(1, 1, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kmeans_kernels.uses_triton(x) and not kmeans_kernels.uses_triton(x.double())
    assert not kmeans_kernels.uses_triton(torch.zeros(1, 1, 8, 24))
    with kernel_backend("-kmeans"):
        assert not kmeans_kernels.uses_triton(x)
        calls = []
        monkeypatch.setattr(cluster_select, "jit", lambda *a: calls.append(a))
        idx, cnt = select_clusters(torch.zeros(1, 1, 2, 3), torch.ones(1, 1, 3), [Budget(density=0.5)])
        assert calls == [] and cnt.tolist() == [[[2, 2]]]  # the torch path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kmeans_kernels.uses_triton(x)


def test_warm_start_needs_fewer_iterations(no_interpret):
    x = _blobs(1, 2, 400, 8, 12, seed=5, spread=1.0)
    cold = kmeans(x, 12, iters=100, tol=0.0, seed=1)
    x2 = x + 0.05 * torch.randn(x.shape, generator=_gen(6))  # the next denoising step: a small drift
    warm = kmeans(x2, 12, init=cold.centroids, iters=100, tol=0.0)
    again_cold = kmeans(x2, 12, iters=100, tol=0.0, seed=1)
    assert warm.iters < again_cold.iters and warm.iters <= 3 < again_cold.iters


def test_permutation_round_trip():
    labels = torch.randint(0, 7, (2, 3, 50), generator=_gen(7), dtype=torch.int32)
    perm, starts, lens = cluster_blocks(labels, 7)
    x = torch.randn(2, 3, 50, 4, generator=_gen(8))
    xp = torch.gather(x, 2, perm[..., None].expand(x.shape))
    back = torch.empty_like(xp).scatter_(2, perm[..., None].expand(x.shape), xp)
    assert torch.equal(back, x)
    lp = torch.gather(labels, 2, perm)
    for b in range(2):
        for h in range(3):
            for j in range(7):
                s, n = int(starts[b, h, j]), int(lens[b, h, j])
                assert n == int((labels[b, h] == j).sum()) and bool((lp[b, h, s:s + n] == j).all())


# ----------------------------------------------------------------------------------------------
# selection


def test_select_clusters_matches_reference():
    B, H, nq, nk, D = 2, 4, 5, 11, 8
    g = _gen(9)
    cq, ck = torch.randn(B, H, nq, D, generator=g) * 2, torch.randn(B, H, nk, D, generator=g) * 2
    sizes = torch.randint(0, 20, (B, H, nk), generator=g).float()
    sizes[0, 1, :3] = 0  # empty clusters are never kept
    budgets = [Budget(density=0.2), Budget(top_p=0.8), Budget(top_p=0.5, min_density=0.4), Budget(density=1.0)]
    scale = 1 / math.sqrt(D)
    idx, cnt = select_clusters(centroid_logits(cq, ck, scale), sizes, budgets)
    ref = select_clusters_reference(cq, ck, sizes, budgets, scale)
    got = [set(idx[b, h, i, :cnt[b, h, i]].tolist()) for b in range(B) for h in range(H) for i in range(nq)]
    assert got == ref
    assert all(int(cnt[b, 3, i]) == int((sizes[b, 3] > 0).sum()) for b in range(B) for i in range(nq))
    assert all(not (set(range(3)) & s) for s in got[nq:2 * nq])  # (b 0, h 1)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_select_kernel_matches_reference_and_torch(interpret, ties):
    B, H, nq, nk, D = 2, 5, 6, 37, 8
    g = _gen(21 + ties)
    cq, ck = torch.randn(B, H, nq, D, generator=g) * 2, torch.randn(B, H, nk, D, generator=g) * 2
    sizes = torch.randint(0, 20, (B, H, nk), generator=g).float()
    if ties:  # integer logits and equal sizes: many exact ties, broken by lower index
        cq, ck = cq.round().clamp(-1, 1), ck.round().clamp(-1, 1)
        sizes = torch.where(sizes > 3, 8.0, 0.0)
    sizes[0, 1, :5] = 0
    sizes[1, 2] = 0
    sizes[1, 2, 7] = 3  # one non-empty cluster
    budgets = [Budget(density=0.2), Budget(top_p=0.8), Budget(top_p=0.5, min_density=0.4), Budget(density=1.0),
               Budget(density=0.01)]
    scale = 1 / math.sqrt(D)
    logits = centroid_logits(cq, ck, scale)
    idx, cnt = select_clusters(logits, sizes, budgets)  # the Triton kernel, under the interpreter
    ref = select_clusters_reference(cq, ck, sizes, budgets, scale)
    got = [set(idx[b, h, i, :cnt[b, h, i]].tolist()) for b in range(B) for h in range(H) for i in range(nq)]
    assert got == ref
    assert all(len(s) == int(cnt.flatten()[n]) for n, s in enumerate(got))  # no cluster twice
    live = torch.arange(nk) < cnt[..., None]
    assert (idx[~live] == 0).all()
    with interpreter(False):
        idx_t, cnt_t = select_clusters(logits, sizes, budgets)  # the torch path
    assert torch.equal(cnt, cnt_t)


# ----------------------------------------------------------------------------------------------
# the variable-size block kernel


def _random_blocks(B, H, n, S, g, gap=False):
    """n disjoint blocks covering [0, S) (or with gaps: rows/keys outside every block), some empty."""
    cuts = torch.randint(0, S + 1, (B, H, 2 * n if gap else n - 1), generator=g).sort(-1).values
    if gap:
        return cuts[..., 0::2].int().contiguous(), (cuts[..., 1::2] - cuts[..., 0::2]).int().contiguous()
    starts = torch.cat([torch.zeros(B, H, 1, dtype=torch.long), cuts], -1)
    ends = torch.cat([cuts, torch.full((B, H, 1), S)], -1)
    return starts.int().contiguous(), (ends - starts).int().contiguous()


CASES = [  # B, H, Sq, Sk, D, dtype, nq, nk, block_size, key mask kind
    (1, 2, 157, 157, 64, torch.float32, 4, 9, (32, 16), None),
    (2, 1, 131, 170, 128, torch.float16, 3, 7, (32, 32), "batch"),
    (2, 2, 99, 99, 64, torch.float16, 5, 6, (16, 16), "head"),
    (1, 1, 90, 61, 128, torch.float32, 2, 3, (64, 16), None),
]


@pytest.mark.parametrize("B,H,Sq,Sk,D,dtype,nq,nk,bs,mask", CASES)
def test_varlen_kernel_matches_reference(interpret, B, H, Sq, Sk, D, dtype, nq, nk, bs, mask):
    g = _gen(Sq * 7 + Sk + D)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, Sk, D, generator=g).to(dtype) for _ in range(2))
    qs, ql = _random_blocks(B, H, nq, Sq, g, gap=mask == "head")
    ks, kl = _random_blocks(B, H, nk, Sk, g, gap=mask == "batch")
    w = max(1, nk - 2)
    idx = torch.rand(B, H, nq, nk, generator=g).argsort(-1)[..., :w].int().contiguous()
    cnt = torch.randint(0, w + 1, (B, H, nq), generator=g).int()
    km = None
    if mask == "batch":
        km = torch.rand(B, Sk, generator=g) > 0.3
    elif mask == "head":
        km = torch.rand(B, H, Sk, generator=g) > 0.3
    ref = varlen_block_attn_reference(q, k, v, qs, ql, ks, kl, idx, cnt, key_mask=km)
    out = varlen_block_attn(q, k, v, qs, ql, ks, kl, idx, cnt, key_mask=km, block_size=bs)
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-3), rel
    # rows outside every query block, or seeing no key, are zeros in both
    assert torch.equal(out.double().abs().sum(-1) == 0, ref.double().abs().sum(-1) == 0)


def test_varlen_reference_is_dense_attention_with_one_block_each(no_interpret):
    q, k, v = torch.randn(3, 2, 1, 40, 16, generator=_gen(11)).unbind(0)
    one = lambda x: torch.full((2, 1, 1), x, dtype=torch.int32)  # noqa: E731
    out = varlen_block_attn_reference(q, k, v, one(0), one(40), one(0), one(40), one(0)[..., None], one(1))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_tile_table_and_pairs():
    qs, ql = torch.tensor([[[0, 3, 40]]], dtype=torch.int32), torch.tensor([[[3, 37, 0]]], dtype=torch.int32)
    blk, row, ln = q_tile_table(qs, ql, 16, 40)
    live = ln[0] > 0
    assert blk[0][live].tolist() == [0, 1, 1, 1] and row[0][live].tolist() == [0, 3, 19, 35] and ln[0][live].tolist() == [3, 16, 16, 5]
    kl = torch.tensor([[[5, 17]]], dtype=torch.int32)
    idx = torch.tensor([[[[1, 0], [0, 1], [1, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2, 2]]], dtype=torch.int32)
    assert varlen_pairs(ql, kl, idx, cnt).item() == 3 * 17 + 37 * 22
    assert varlen_pairs(ql, kl, idx, cnt, (16, 16)).item() == 16 * 32 + 48 * 32  # 22 keys packed: 2 chunks


@pytest.mark.parametrize("B,H,nq,nk,S", [(1, 1, 3, 5, 40), (2, 3, 7, 11, 300), (1, 2, 4, 300, 400)])
def test_key_table_lists_each_selected_block_in_order(interpret, B, H, nq, nk, S):
    g = _gen(B * 100 + nk)
    ks, kl = _random_blocks(B, H, nk, S, g, gap=nk == 11)  # some empty blocks; gaps between blocks
    w = max(1, nk - 1)
    idx = torch.rand(B, H, nq, nk, generator=g).argsort(-1)[..., :w].int().contiguous()
    cnt = torch.randint(0, w + 1, (B, H, nq), generator=g).int()
    cnt[0, 0, 0] = w  # one full row, one empty row
    cnt[-1, -1, -1] = 0
    idx[0, 0, 1, -1] = 10_000  # past the count: never read
    keys, first, n = varlen.kv_key_table(ks, kl, idx, cnt)
    assert keys.dtype == n.dtype == torch.int32 and first.dtype == torch.int64
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                want = [p for j in idx[b, h, i, :cnt[b, h, i]].tolist()
                        for p in range(int(ks[b, h, j]), int(ks[b, h, j] + kl[b, h, j]))]
                r = b * H + h
                assert int(n[r, i]) == len(want)
                assert keys[first[r, i]:first[r, i] + n[r, i]].tolist() == want
    assert int(first[-1, -1] + n[-1, -1]) == int(n.sum())  # packed with no gaps


def test_varlen_rejects_bad_input(interpret):
    q = torch.randn(1, 1, 10, 16)
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indices"):
        varlen_block_attn(q, q, q, one, one, one, one, one, one)
    with pytest.raises(ValueError, match="head_dim 24"):
        x = torch.randn(1, 1, 10, 24)
        varlen_block_attn(x, x, x, one, one, one, one, one[..., None], one)


# ----------------------------------------------------------------------------------------------
# attend: against an independent masked dense computation


def _independent(q, k, v, geom, budgets, method, cache, scale, key_mask):
    """Dense float64 attention with the SVG2 mask built from labels and the reference selection."""
    B, H, S, D = q.shape
    vs, nv = geom.video_start, geom.video_len
    km = None if key_mask is None else key_mask[:, vs:vs + nv]
    sel = method.cluster_select(q[:, :, vs:vs + nv], k[:, :, vs:vs + nv], budgets, scale=scale, cache=cache, key_mask=km)
    kept = select_clusters_reference(sel.q_centroids, sel.k_centroids, sel.k_sizes, budgets, scale)
    nq = sel.q_lens.shape[-1]
    allowed = torch.ones(B, H, S, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nv):
                keep = kept[(b * H + h) * nq + int(sel.q_labels[b, h, i])]
                allowed[b, h, vs + i, vs:vs + nv] = torch.tensor([int(c) in keep for c in sel.k_labels[b, h].tolist()])
    pairs = allowed.sum().item()  # the pairs computed (masked keys of selected clusters count)
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.nan_to_num(p) @ v.double(), pairs


@pytest.mark.parametrize("path,text", [("reference", "none"), ("reference", "both"), ("reference", "mask"),
                                       ("interpret", "both"), ("interpret", "mask")])
def test_attend_matches_independent_masked_attention(monkeypatch, path, text):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "interpret" else "0")
    geom = Geometry((2, 4, 8), video_start=0 if text == "none" else 5)
    S = geom.video_len + (0 if text == "none" else 12)
    B, H, D = 2, 2, 16
    g = _gen(12)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    q = q * 2
    key_mask = None
    if text == "mask":  # padded text keys (and one video key) masked
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[0, -4:] = False
        key_mask[1, :2] = False
        key_mask[1, 9] = False
    budgets = [Budget(density=0.3), Budget(top_p=0.7, min_density=0.1)]
    method = SVG2(q_clusters=5, k_clusters=7, init_iters=6)
    cache = {}
    scale = 0.3
    for step in range(2):  # a cold, then a warm-started call
        want, pairs = _independent(q, k, v, geom, budgets, method, copy.deepcopy(cache), scale, key_mask)
        out, work = method.attend(q, k, v, geom, budgets, scale=scale, key_mask=key_mask, cache=cache, block_fn=None)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        if path == "reference":  # exact pairs; the kernel rounds clusters up to its tiles
            assert work == pytest.approx(pairs / S**2)
        else:
            assert pairs / S**2 <= work <= B * H * 4
        q, k = q + 0.01 * torch.randn(q.shape, generator=g), k + 0.01 * torch.randn(k.shape, generator=g)
    assert cache["iters"] == (1, 1)


def test_attend_keeps_everything_at_density_one(no_interpret):
    geom = Geometry((2, 4, 4), video_start=3)
    q, k, v = torch.randn(3, 1, 2, 40, 16, generator=_gen(13)).unbind(0)
    out, _ = SVG2(q_clusters=3, k_clusters=5).attend(q, k, v, geom, [Budget(density=1.0)] * 2, scale=None,
                                                     key_mask=None, cache={}, block_fn=None)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the runtime: a tiny Wan with `method: svg2`


def test_sparsify_tiny_wan_with_svg2(monkeypatch, no_interpret):
    m = dits.tiny_wan()
    kw = adapter_for(m).example_inputs(m, grid=(5, 4, 8))
    with torch.no_grad():
        ref = m(**kw)[0]
    sparsify(m, {"version": 1, "defaults": {"method": "svg2", "budget": {"density": 1.0}}})
    try:
        with torch.no_grad():
            torch.testing.assert_close(m(**kw)[0], ref, atol=1e-5, rtol=0)
    finally:
        unsparsify(m)

    calls = []
    real = SVG2.attend

    def spy(self, q, k, v, geometry, budgets, *, scale, key_mask, cache, block_fn):
        before = copy.deepcopy(cache)
        out, work = real(self, q, k, v, geometry, budgets, scale=scale, key_mask=key_mask, cache=cache, block_fn=block_fn)
        calls.append((q, k, v, geometry, budgets, scale, key_mask, before, out, dict(cache)))
        return out, work

    monkeypatch.setattr(SVG2, "attend", spy)
    sparsify(m, {"version": 1, "defaults": {"method": "svg2", "budget": {"top_p": 0.6, "min_density": 0.1}},
                 "rules": [{"match": "blocks.1.*", "density": 0.25}]})
    try:
        with torch.no_grad():
            out = m(**kw)[0]
            m(**{**kw, "timestep": kw["timestep"] - 100})  # the next denoising step: warm start
        sites = installed_sites(m)
    finally:
        unsparsify(m)
    assert len(calls) == 4 and all(s.calls == 2 for s in sites), [(s.calls, s.density) for s in sites]
    # 160 tokens: the default cluster sizes give 1 query and 2 key clusters, top-p 0.6 may keep both
    assert 0 < sites[0].density <= 1 and 0 < sites[1].density < 0.75, [s.density for s in sites]
    assert [c[-1]["iters"] for c in calls[2:]] == [(1, 1), (1, 1)] and calls[0][-1]["iters"][1] > 1
    for q, k, v, geom, budgets, scale, key_mask, before, got, _ in calls:
        assert q.shape[1] == 2 and geom.grid == (5, 4, 8)
        want, _ = _independent(q, k, v, geom, budgets, SVG2(), before, scale or 1 / math.sqrt(q.shape[-1]), key_mask)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("bn", [128, 64])
def test_varlen_kernel_pipelines_its_loads_for_sm90(bn):
    """Compiled ahead of time for sm_90: the K/V loads become `cp.async` copies (the key-table load must not keep
    triton's pipeliner from them), with no spills at the default launch (8 warps, 2 stages)."""
    from pathlib import Path

    import triton

    from tools.aot_resources import varlen_resources

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel bundles no cuobjdump")
    r = varlen_resources(128, bn, 8, 2)
    assert r["async_copies"] >= 2 and r["stack"] == 0, r
