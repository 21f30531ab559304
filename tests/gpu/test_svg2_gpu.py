"""GPU tests of SVG2: the variable-size block kernel, the k-means kernels and attend at real-ish sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsify.testing.dits import rel_err


from sparsify.kernels import kernel_backend  # noqa: E402
from sparsify.kernels.cluster_select import select_clusters  # noqa: E402
from sparsify.kernels.kmeans import kmeans_assign, kmeans_update, segment_means  # noqa: E402
from sparsify.kernels.varlen import varlen_block_attn, varlen_block_attn_reference  # noqa: E402
from sparsify.geometry import Geometry  # noqa: E402
from sparsify.methods.svg2 import SVG2, centroid_logits, cluster_blocks  # noqa: E402
from oracles import select_clusters_reference  # noqa: E402
from sparsify.recipe import Budget  # noqa: E402


def _blocks(B, H, n, S):
    cuts = torch.randint(0, S + 1, (B, H, n - 1), device="cuda").sort(-1).values
    starts = torch.cat([torch.zeros(B, H, 1, dtype=torch.long, device="cuda"), cuts], -1)
    ends = torch.cat([cuts, torch.full((B, H, 1), S, device="cuda")], -1)
    return starts.int().contiguous(), (ends - starts).int().contiguous()


@pytest.mark.parametrize("B,H,S,D,dtype,nq,nk,mask", [
    (1, 2, 4133, 128, torch.bfloat16, 17, 61, False),
    (2, 2, 3001, 64, torch.float16, 12, 40, True),
    (1, 1, 2500, 128, torch.float16, 9, 33, True),
    (1, 2, 3100, 128, torch.bfloat16, 40, 900, False),  # many short key blocks, up to 300 per query block
])
def test_varlen_kernel_matches_reference(B, H, S, D, dtype, nq, nk, mask):
    q, k, v = (torch.randn(B, H, S, D, device="cuda").to(dtype) for _ in range(3))
    qs, ql = _blocks(B, H, nq, S)
    ks, kl = _blocks(B, H, nk, S)
    w = nk // 3
    idx = torch.rand(B, H, nq, nk, device="cuda").argsort(-1)[..., :w].int().contiguous()
    cnt = torch.randint(0, w + 1, (B, H, nq), device="cuda").int()
    km = (torch.rand(B, S, device="cuda") > 0.1) if mask else None
    ref = varlen_block_attn_reference(q, k, v, qs, ql, ks, kl, idx, cnt, key_mask=km)
    out = varlen_block_attn(q, k, v, qs, ql, ks, kl, idx, cnt, key_mask=km)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2
    assert torch.equal(out.float().abs().sum(-1) == 0, ref.float().abs().sum(-1) == 0)


def test_select_kernel_matches_reference():
    B, H, nq, nk, D = 1, 3, 9, 70, 16
    cq, ck = torch.randn(B, H, nq, D, device="cuda") * 2, torch.randn(B, H, nk, D, device="cuda") * 2
    sizes = torch.randint(0, 30, (B, H, nk), device="cuda").float()
    budgets = [Budget(density=0.1), Budget(top_p=0.9, min_density=0.05), Budget(top_p=0.5)]
    idx, cnt = select_clusters(centroid_logits(cq, ck, 0.25), sizes, budgets)
    ref = select_clusters_reference(cq.cpu(), ck.cpu(), sizes.cpu(), budgets, 0.25)
    assert [set(idx[0, h, i, :cnt[0, h, i]].tolist()) for h in range(H) for i in range(nq)] == ref


def test_select_kernel_matches_torch_at_wan14b_cluster_counts():
    B, H, nq, nk = 1, 4, 296, 591
    logits = torch.randn(B, H, nq, nk, device="cuda") * 3
    sizes = torch.randint(0, 250, (B, H, nk), device="cuda").float()
    budgets = [Budget(density=0.05), Budget(top_p=0.9, min_density=0.05), Budget(top_p=0.5), Budget(density=0.3)]
    idx, cnt = select_clusters(logits, sizes, budgets)
    with kernel_backend("-kmeans"):  # the torch path
        idx_t, cnt_t = select_clusters(logits, sizes, budgets)
    # float sums in another order may move a boundary by one cluster on a rare row
    assert (cnt - cnt_t).abs().max() <= 1 and (cnt != cnt_t).float().mean() < 1e-3
    same = cnt == cnt_t
    live = torch.arange(nk, device="cuda") < cnt[..., None]
    a = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device="cuda").scatter_(-1, torch.where(live, idx, nk).long(), True)
    b = torch.zeros_like(a).scatter_(-1, torch.where(live, idx_t, nk).long(), True)
    assert torch.equal(a[same][:, :nk], b[same][:, :nk])


@pytest.mark.parametrize("D", [64, 128])
def test_assignment_kernel_picks_a_nearest_centroid(D):
    x = torch.randn(1, 4, 20000, D, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(1, 4, 300, D, device="cuda")
    lab = kmeans_assign(x, c).long()
    d = torch.cdist(x.float(), c.to(torch.bfloat16).float()).square()
    got = torch.gather(d, -1, lab[..., None])[..., 0]
    assert ((got - d.amin(-1)) <= 1e-2 * d.amin(-1).abs() + 1e-2).float().mean() > 0.999


def test_segment_means_equal_scatter_update():
    x = torch.randn(1, 3, 30000, 128, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 500, (1, 3, 30000), device="cuda", dtype=torch.int32)
    old = torch.randn(1, 3, 500, 128, device="cuda")
    perm, starts, lens = cluster_blocks(labels, 500)
    xs = torch.gather(x, 2, perm[..., None].expand(x.shape))
    torch.testing.assert_close(segment_means(xs, starts, lens, old), kmeans_update(x, labels, old), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", [0, 77])
def test_attend_matches_masked_dense(text):
    B, H, D = 1, 3, 128
    geom = Geometry((4, 24, 32), video_start=text // 2)
    S = geom.video_len + text
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    budgets = [Budget(density=0.1), Budget(top_p=0.9, min_density=0.1), Budget(density=0.3)]
    method = SVG2()
    cache: dict = {}
    for _ in range(2):  # cold, then warm
        before = copy.deepcopy(cache)
        out, work = method.attend(q, k, v, geom, budgets, scale=None, key_mask=None, cache=cache, block_fn=None)
        vs, nv = geom.video_start, geom.video_len
        sel = method.cluster_select(q[:, :, vs:vs + nv], k[:, :, vs:vs + nv], budgets, cache=before)
        allowed = torch.ones(B, H, S, S, dtype=torch.bool, device="cuda")
        allowed[:, :, vs:vs + nv, vs:vs + nv] = sel.token_mask()
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D)
        want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v.float()
        assert rel_err(out, want) < 1e-2
        assert 0 < work < B * H
        q = q + 0.05 * torch.randn_like(q)
    assert cache["iters"] == (1, 1)
