"""GPU tests of the block-sparse backward: real shapes, against autograd through dense attention with the boolean mask."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify.testing.dits import density_selection as _selection, rel_err


from sparsify.kernels.block_sparse import block_sparse_attn  # noqa: E402
from sparsify.kernels.block_sparse_bwd import block_sparse_attn_backward  # noqa: E402


def _token_mask(idx, cnt, S, bm, bn, lens=None):
    """Boolean [B, H, S, S] mask, built entry by entry from the selection (independent of the package's helpers)."""
    B, H, n_qb, max_kv = idx.shape
    n_kb = -(-S // bn)
    blocks = torch.zeros(B, H, n_qb, n_kb, dtype=torch.bool, device=idx.device)
    for e in range(max_kv):
        live = e < cnt  # [B, H, n_qb]
        col = torch.nn.functional.one_hot(idx[..., e].long(), n_kb).bool()
        blocks |= col & live[..., None]
    qi = torch.arange(S, device=idx.device) // bm
    kj = torch.arange(S, device=idx.device) // bn
    mask = blocks[:, :, qi][:, :, :, kj]  # [B, H, S, S]
    if lens is not None:
        kpos = torch.arange(S, device=idx.device)
        mask &= ((kpos % bn) < lens[kj])[None, None, None, :]
    return mask


def _dense_grads(q, k, v, go, mask, scale):
    """Autograd through float32 dense attention with a boolean mask; rows with no key give 0."""
    q, k, v = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e30).detach()
    p = torch.exp(s - m)
    out = (p @ v) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), go.float()))


_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

CASES = [  # B, H, S, D, dtype, block_size, density, layout, lens
    (1, 4, 8192, 128, torch.bfloat16, (128, 128), 0.1, "bhsd", False),
    (2, 3, 4099, 128, torch.float16, (128, 128), 0.2, "bshd", False),
    (2, 4, 5000, 64, torch.bfloat16, (64, 64), 0.1, "bhsd", True),
    (1, 5, 3001, 64, torch.float16, (64, 128), 0.3, "bshd", False),
    (2, 2, 2050, 128, torch.bfloat16, (128, 64), 0.25, "bhsd", True),
    (1, 4, 1999, 128, torch.float16, (64, 64), 0.5, "bhsd", True),
    (2, 8, 4100, 32, torch.bfloat16, (64, 64), 0.2, "bshd", False),  # head_dim 32
]


@pytest.mark.parametrize("B,H,S,D,dtype,bs,density,layout,with_lens", CASES)
def test_against_dense(B, H, S, D, dtype, bs, density, layout, with_lens):
    torch.manual_seed(S + D)
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=dtype) for _ in range(3))
    if layout == "bshd":  # what diffusers passes: [B, S, H, D] storage viewed as [B, H, S, D]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    go = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
    idx, cnt = _selection(B, H, S, *bs, density, p_empty=0.05)
    n_kb = -(-S // bs[1])
    lens = torch.randint(0, bs[1] + 1, (n_kb,), device="cuda", dtype=torch.int32) if with_lens else None
    if lens is not None:
        lens[: n_kb // 2] = bs[1]  # half the blocks full
    scale = 1.0 / math.sqrt(D)
    mask = _token_mask(idx, cnt, S, *bs, lens)
    ref = _dense_grads(q, k, v, go, mask, scale)
    del mask
    out, lse = block_sparse_attn(q, k, v, idx, cnt, block_size=bs, kv_block_lens=lens, return_lse=True)
    grads = tuple(torch.full((B, H, S, D), float("nan"), device="cuda", dtype=dtype) for _ in range(3))
    got = block_sparse_attn_backward(go, q, k, v, out, lse, idx, cnt, block_size=bs, kv_block_lens=lens, grads=grads)
    torch.cuda.synchronize()
    assert all(g is b for g, b in zip(got, grads))
    for name, g, r in zip(("dq", "dk", "dv"), got, ref[1:]):
        assert not g.isnan().any(), f"{name}: unwritten or NaN"
        err = rel_err(g, r)
        assert err < _TOL[dtype], (name, err)
    # the autograd path gives the same gradients (defaults), and a shifted selection is far off
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    o2 = block_sparse_attn(qg, kg, vg, idx, cnt, block_size=bs, kv_block_lens=lens)
    auto = torch.autograd.grad(o2, (qg, kg, vg), go)
    assert all(rel_err(a, g) < 1e-6 for a, g in zip(auto, got))
    wrong = block_sparse_attn_backward(go, q, k, v, out, lse, (idx + 1) % n_kb, cnt, block_size=bs, kv_block_lens=lens)
    assert max(rel_err(w, r) for w, r in zip(wrong, ref[1:])) > 0.1


VARIANTS = [
    dict(kv_tile=128, m_step=64, q_tile=128, n_step=64, num_warps=8, num_stages=2, dq_warps=8, dq_stages=2),
    dict(kv_tile=64, m_step=64, q_tile=64, n_step=64, num_warps=4, num_stages=2, dq_warps=4, dq_stages=2),
    dict(kv_tile=64, m_step=64, q_tile=128, n_step=64, num_warps=8, num_stages=3, dq_warps=8, dq_stages=2),
    dict(kv_tile=64, m_step=64, q_tile=64, n_step=64, num_warps=4, num_stages=3),
    dict(kv_tile=128, m_step=32, q_tile=128, n_step=32, num_warps=8, num_stages=2),
    dict(use_tma=True),
    dict(use_tma=True, q_tile=128, dq_warps=8, kv_tile=128, num_warps=8),
    dict(dq_pre=False),
]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_variants(opts):
    torch.manual_seed(7)
    B, H, S, D, bs = 1, 3, 6000, 128, (128, 128)
    q, k, v, go = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    idx, cnt = _selection(B, H, S, *bs, 0.2, p_empty=0.05)
    ref = _dense_grads(q, k, v, go, _token_mask(idx, cnt, S, *bs), 1.0 / math.sqrt(D))
    out, lse = block_sparse_attn(q, k, v, idx, cnt, block_size=bs, return_lse=True)
    grads = tuple(torch.full((B, H, S, D), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = block_sparse_attn_backward(go, q, k, v, out, lse, idx, cnt, block_size=bs, grads=grads, **opts)
    for g, r in zip(got, ref[1:]):
        assert not g.isnan().any()
        assert rel_err(g, r) < 2e-2


def test_wan_shape_against_reference_blockwise():
    """Wan-1.3B 480p at 5%: gradients of a few query blocks' outputs against dense autograd on those rows."""
    torch.manual_seed(1)
    B, H, S, D, bs = 1, 12, 32760, 128, (128, 128)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    idx, cnt = _selection(B, H, S, *bs, 0.05)
    go = torch.zeros(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    rows = slice(128 * 100, 128 * 103)  # the loss touches three query blocks only (the rest of go is zero)
    go[:, :, rows] = torch.randn(B, H, 384, D, device="cuda", dtype=torch.bfloat16)
    out = block_sparse_attn(q, k, v, idx, cnt, block_size=bs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    qi = torch.arange(384, device="cuda") // 128
    blocks = torch.zeros(B, H, 3, 256, dtype=torch.bool, device="cuda")
    for e in range(idx.shape[-1]):
        blocks |= torch.nn.functional.one_hot(idx[:, :, 100:103, e].long(), 256).bool() & (e < cnt[:, :, 100:103])[..., None]
    mask = blocks[:, :, qi].repeat_interleave(128, -1)[..., :S]
    qr, kf, vf = (x.detach().float().requires_grad_(True) for x in (q[:, :, rows], k, v))
    s = (qr @ kf.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    o = torch.softmax(s, -1) @ vf
    rq, rk, rv = torch.autograd.grad(o, (qr, kf, vf), go[:, :, rows].float())
    assert torch.all(dq[:, :, : 128 * 100] == 0)
    assert rel_err(dq[:, :, rows], rq) < 2e-2 and rel_err(dk, rk) < 2e-2 and rel_err(dv, rv) < 2e-2
