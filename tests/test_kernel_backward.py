"""CPU tests of the block-sparse backward: Triton kernels under the interpreter against autograd through the reference."""

from __future__ import annotations

import functools

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsify.testing.dits import rel_err, stale_selection  # noqa: E402
from sparsify.kernels.block_sparse import block_sparse_attn  # noqa: E402
from sparsify.kernels.block_sparse_bwd import block_sparse_attn_backward, transpose_selection  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference, selection_to_block_mask  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


_selection = functools.partial(stale_selection, p_empty=0.2)


def _grads(fn, q, k, v, go, **kw):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}

# (B, H, S, D, dtype, block_size, lens, launch options): odd S, B > 1, both head dims, mixed block sizes,
# kv_block_lens, sub-tiles in both kernels, the separate preprocess, TMA loads
CASES = [
    (2, 1, 200, 64, torch.float32, (64, 64), False, {}),
    (1, 2, 150, 128, torch.float32, (64, 64), False, {}),
    (2, 1, 190, 64, torch.float16, (64, 64), True, {}),
    (1, 1, 250, 64, torch.float32, (64, 128), True, dict(kv_tile=64, m_step=32, q_tile=32, n_step=64)),
    (1, 2, 140, 64, torch.float32, (128, 64), False, dict(kv_tile=32, m_step=64, q_tile=64, n_step=32, dq_pre=False)),
    (2, 1, 256, 64, torch.float16, (64, 64), False, dict(use_tma=True)),  # S a multiple of the block; TMA loads
    (1, 1, 170, 128, torch.float32, (64, 64), True, dict(use_tma=True, dq_pre=False, m_step=32, n_step=32)),
    (2, 2, 210, 32, torch.float32, (64, 64), True, {}),  # head_dim 32
]


@pytest.mark.parametrize("B,H,S,D,dtype,bs,with_lens,opts", CASES)
def test_grads_match_reference(B, H, S, D, dtype, bs, with_lens, opts):
    gen = torch.Generator().manual_seed(B * 7919 + H * 131 + S + D + bs[0] * 3 + bs[1])
    q, k, v, go = ((torch.randn(B, H, S, D, generator=gen) * 1.5).to(dtype) for _ in range(4))
    idx, cnt = _selection(B, H, S, *bs, gen)
    n_kb = -(-S // bs[1])
    lens = None
    if with_lens:
        lens = torch.randint(0, bs[1] + 1, (n_kb,), generator=gen, dtype=torch.int32)
        lens[0] = 5
    kw = dict(kv_indices=idx, kv_counts=cnt, block_size=bs, kv_block_lens=lens)
    ref = _grads(block_sparse_attn_reference, *(x.float() for x in (q, k, v)), go.float(), **kw)
    if opts:  # launch options: call the backward directly with the forward's LSE
        out, lse = block_sparse_attn(q, k, v, return_lse=True, **kw)
        got = (out, *block_sparse_attn_backward(go, q, k, v, out, lse, **kw, **opts))
    else:  # the autograd path of the public entry point
        got = _grads(block_sparse_attn, q, k, v, go, **kw)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.shape == r.shape and g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, r) < _TOL[dtype], (name, rel_err(g, r))
    # the comparison can fail: gradients under a shifted selection are far off
    wrong = _grads(block_sparse_attn, q, k, v, go, **{**kw, "kv_indices": (idx + 1) % n_kb})
    assert max(rel_err(g, r) for g, r in zip(wrong[1:], ref[1:])) > 0.1


def test_reference_semantics(monkeypatch):
    """Fix the reference's backward by the rules: zero grads for keyless rows and unselected keys."""
    gen = torch.Generator().manual_seed(11)
    B, H, S, D, bs = 1, 2, 260, 64, (64, 64)
    q, k, v, go = (torch.randn(B, H, S, D, generator=gen) for _ in range(4))
    idx, cnt = _selection(B, H, S, *bs, gen, p_empty=0.0)
    cnt[0, 0, 1] = 0  # a query block without keys
    cnt[0, 1, -1] = 0  # the tail query block
    lens = torch.full((5,), 64, dtype=torch.int32)
    lens[2] = 0  # an empty key block: a query block that selects only it sees no key
    idx[0, 1, 0, 0], cnt[0, 1, 0] = 2, 1
    out, dq, dk, dv = _grads(block_sparse_attn, q, k, v, go, kv_indices=idx, kv_counts=cnt, block_size=bs,
                             kv_block_lens=lens)
    assert torch.all(dq[0, 0, 64:128] == 0) and torch.all(dq[0, 1, 256:] == 0) and torch.all(dq[0, 1, :64] == 0)
    assert torch.all(out[0, 1, :64] == 0)
    seen = selection_to_block_mask(idx, cnt, 5).any(2).repeat_interleave(64, -1)[..., :S]  # [B, H, S] keys seen
    seen &= (torch.arange(S) // 64 != 2)
    assert (~seen).any() and torch.all(dk[~seen] == 0) and torch.all(dv[~seen] == 0)
    assert torch.all(dk[0, :, 128:192] == 0)
    ref = _grads(block_sparse_attn_reference, q, k, v, go, kv_indices=idx, kv_counts=cnt, block_size=bs,
                 kv_block_lens=lens)
    for g, r in zip((dq, dk, dv), ref[1:]):
        assert rel_err(g, r) < 1e-5


def test_lse():
    gen = torch.Generator().manual_seed(12)
    B, H, S, D, bs = 1, 2, 150, 64, (64, 64)
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    idx, cnt = _selection(B, H, S, *bs, gen, p_empty=0.0)
    cnt[0, 0, 0] = 0
    out, lse = block_sparse_attn(q, k, v, idx, cnt, block_size=bs, scale=0.2, return_lse=True)
    keys = selection_to_block_mask(idx, cnt, 3).repeat_interleave(64, 2)[:, :, :S].repeat_interleave(64, 3)[..., :S]
    s = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~keys, float("-inf"))
    want = torch.logsumexp(s, -1)
    assert torch.all(lse[0, 0, :64] == float("-inf"))
    live = torch.isfinite(want)
    assert torch.equal(live, torch.isfinite(lse)) and (lse[live] - want[live]).abs().max() < 1e-5
    assert torch.equal(out, block_sparse_attn(q, k, v, idx, cnt, block_size=bs, scale=0.2))


@pytest.mark.parametrize("interpret", ["1", "0"])  # the Triton kernels, and the torch fallback
def test_transpose_selection(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    gen = torch.Generator().manual_seed(13)
    B, H, n_qb, n_kb = 2, 3, 7, 5
    idx = torch.rand(B, H, n_qb, n_kb, generator=gen).argsort(-1)[..., :4].to(torch.int32)
    cnt = torch.randint(0, 6, (B, H, n_qb), generator=gen, dtype=torch.int32)  # > max_kv: clamped
    q_idx, q_cnt = transpose_selection(idx, cnt, n_kb)
    mask = selection_to_block_mask(idx, cnt.clamp(max=4), n_kb)  # [B, H, n_qb, n_kb]
    for b in range(B):
        for h in range(H):
            for j in range(n_kb):
                want = mask[b, h, :, j].nonzero().flatten().tolist()
                assert q_cnt[b, h, j] == len(want)
                assert q_idx[b, h, j, : len(want)].tolist() == want


def test_no_grad_path_and_errors():
    q = torch.randn(1, 1, 100, 64, requires_grad=True)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, 1, dtype=torch.int32)
    with torch.no_grad():
        assert block_sparse_attn(q, q, q, idx, cnt).grad_fn is None
    assert block_sparse_attn(q, q, q, idx, cnt).grad_fn is not None
    out, lse = block_sparse_attn(q.detach(), q.detach(), q.detach(), idx, cnt, return_lse=True)
    with pytest.raises(ValueError, match="lse must be"):
        block_sparse_attn_backward(out, q, q, q, out, lse[..., :50], idx, cnt)
    with pytest.raises(TypeError, match="unknown backward launch options"):
        block_sparse_attn_backward(out, q, q, q, out, lse, idx, cnt, tile=3)
    with pytest.raises(ValueError, match="kv_tile"):
        block_sparse_attn_backward(out, q, q, q, out, lse, idx, cnt, kv_tile=48)


@pytest.mark.parametrize("with_lens", [False, True])
def test_reference_gradcheck_float64(with_lens, monkeypatch):
    """The reference path (what the op's CPU backward differentiates) has correct gradients: gradcheck in float64."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(14)
    B, H, S, D, bs = 2, 1, 21, 4, (8, 8)
    q, k, v = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    idx = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]], dtype=torch.int32).expand(B, H, 3, 3).contiguous()
    cnt = torch.tensor([[[2, 0, 3]], [[1, 3, 2]]], dtype=torch.int32)
    lens = torch.tensor([8, 3, 5], dtype=torch.int32) if with_lens else None

    def f(q, k, v):
        return block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs, scale=0.7, kv_block_lens=lens)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)
