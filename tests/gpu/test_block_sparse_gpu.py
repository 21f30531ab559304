"""GPU tests of the block-sparse Triton kernel: real shapes, against the reference and compiled FlexAttention."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify.testing.dits import density_selection as _selection, rel_err


from sparsify.kernels.block_sparse import _launch, block_sparse_attn  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference  # noqa: E402


def _qkv(B, H, S, D, dtype, *, layout="bhsd"):
    if layout == "bshd":  # what diffusers passes: [B, S, H, D] storage viewed as [B, H, S, D]
        return tuple(torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    return tuple(torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))


def _poisoned_run(q, k, v, idx, cnt, bs, lens=None, **opts):
    out = torch.full(q.shape, float("nan"), device=q.device, dtype=q.dtype)
    _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(q.shape[-1]), lens, out=out, **opts)
    torch.cuda.synchronize()
    return out


_TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}

CASES = [  # B, H, S, D, dtype, block_size, density, layout
    (1, 12, 32760, 128, torch.bfloat16, (128, 128), 0.05, "bhsd"),  # Wan-1.3B 480p
    (2, 3, 4099, 128, torch.float16, (128, 128), 0.2, "bshd"),
    (2, 4, 5000, 64, torch.bfloat16, (64, 64), 0.1, "bhsd"),
    (1, 5, 3001, 64, torch.float16, (64, 128), 0.3, "bshd"),
    (2, 2, 2050, 128, torch.bfloat16, (128, 64), 0.25, "bhsd"),
    (1, 4, 1999, 128, torch.float16, (64, 64), 0.5, "bhsd"),
    (2, 8, 16384, 32, torch.bfloat16, (64, 64), 0.1, "bshd"),  # the 16k test-bed
    (1, 3, 2001, 32, torch.float16, (128, 128), 0.3, "bhsd"),
]


@pytest.mark.parametrize("B,H,S,D,dtype,bs,density,layout", CASES)
def test_against_reference(B, H, S, D, dtype, bs, density, layout):
    torch.manual_seed(S)
    q, k, v = _qkv(B, H, S, D, dtype, layout=layout)
    idx, cnt = _selection(B, H, S, *bs, density, p_empty=0.05)
    out = _poisoned_run(q, k, v, idx, cnt, bs)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    err = rel_err(out, ref)
    assert err < _TOL[dtype], err
    rows = (cnt == 0).repeat_interleave(bs[0], dim=-1)[..., :S]
    assert torch.all(out[rows] == 0)
    # a shifted selection is far off: the comparison can fail
    wrong = _poisoned_run(q, k, v, (idx + 1) % (-(-S // bs[1])), cnt, bs)
    assert rel_err(wrong, ref) > 0.1


VARIANTS = [
    dict(use_tma=False),
    dict(tail_last=False),
    dict(tail_last=True),
    dict(lazy_rescale=True),
    dict(tile_n=64, num_stages=2, maxnreg=128),
    dict(tile_n=64, num_stages=2, maxnreg=128, lazy_rescale=True),
    dict(tile_n=64, num_stages=4, lazy_rescale=True),
    dict(tile_n=128, num_stages=3, maxnreg=0, tail_last=False),
    dict(tile_n=128, num_stages=3, maxnreg=0, tail_last=True),
]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_variants(opts):
    torch.manual_seed(7)
    B, H, S, D, bs = 1, 4, 6000, 128, (128, 128)
    q, k, v = _qkv(B, H, S, D, torch.bfloat16, layout="bshd")
    idx, cnt = _selection(B, H, S, *bs, 0.2, p_empty=0.05)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    out = _poisoned_run(q, k, v, idx, cnt, bs, **opts, fallback=False)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1.2e-2


@pytest.mark.parametrize("lazy", [False, True])
def test_kv_block_lens(lazy):
    torch.manual_seed(3)
    B, H, S, D, bs = 2, 3, 3000, 128, (64, 64)
    q, k, v = _qkv(B, H, S, D, torch.bfloat16)
    idx, cnt = _selection(B, H, S, *bs, 0.3)
    n_kb = -(-S // bs[1])
    lens = torch.randint(0, bs[1] + 1, (n_kb,), device="cuda", dtype=torch.int32)
    pos = torch.arange(S, device="cuda")
    key_mask = ((pos % bs[1]) < lens[pos // bs[1]]).expand(B, S)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs, key_mask=key_mask)
    out = _poisoned_run(q, k, v, idx, cnt, bs, lens, lazy_rescale=lazy)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1.2e-2


FLEX_CASES = [  # B, H, S, D, dtype, block_size
    (1, 12, 32760, 128, torch.bfloat16, (128, 128)),
    (2, 4, 4097, 64, torch.float16, (128, 128)),
    (2, 3, 3000, 128, torch.bfloat16, (64, 64)),
]


@pytest.mark.parametrize("B,H,S,D,dtype,bs", FLEX_CASES)
def test_against_flex(B, H, S, D, dtype, bs):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    torch.manual_seed(11)
    q, k, v = _qkv(B, H, S, D, dtype)
    idx, cnt = _selection(B, H, S, *bs, 0.1)
    mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=bs, seq_lengths=(S, S))
    opts = None if bs == (128, 128) else {"BLOCK_M": min(bs), "BLOCK_N": min(bs)}
    flex = torch.compile(flex_attention, dynamic=False)
    ref = flex(q, k, v, block_mask=mask, kernel_options=opts)
    out = _poisoned_run(q, k, v, idx, cnt, bs)
    assert not out.isnan().any()
    from sparsify.kernels import kernel_backend

    with kernel_backend("-hopper"):  # on sm_90 the public entry would run the Gluon kernel (test_hopper_gpu.py)
        assert torch.equal(out, block_sparse_attn(q, k, v, idx, cnt, block_size=bs))  # public entry, same kernel
    gold = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    # same error scale as Flex's own against the fp32 reference
    e_ours, e_flex = rel_err(out, gold), rel_err(ref, gold)
    assert e_ours < max(2 * e_flex, 1e-3), (e_ours, e_flex)
    assert rel_err(out, ref) < _TOL[dtype]


@pytest.mark.parametrize("bs,dtype", [((64, 64), torch.bfloat16), ((128, 128), torch.float16)])
def test_scattered_store(bs, dtype):
    """The fused inverse layout: rows stored through a permutation with padding rows dropped, every output row
    written (poisoned output), equal to the reference scattered the same way."""
    from sparsify.kernels.block_sparse import block_sparse_attn_scattered
    from sparsify.kernels.reference import scatter_rows

    torch.manual_seed(12)
    B, H, S, D, S_out = 2, 3, 9001, 128, 8700
    q, k, v = _qkv(B, H, S, D, dtype)
    idx, cnt = _selection(B, H, S, *bs, 0.1, p_empty=0.05)
    rows = torch.full((S,), -1, dtype=torch.int32, device="cuda")
    keep = torch.randperm(S, device="cuda")[:S_out]
    rows[keep] = torch.randperm(S_out, device="cuda").to(torch.int32)
    ref = scatter_rows(block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs), rows, S_out)
    poisoned = torch.full((B, H, S_out, D), float("nan"), device="cuda", dtype=dtype)
    _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(D), None, out=poisoned, out_rows=rows, out_len=S_out)
    assert not poisoned.isnan().any(), "an output row was not written"
    assert rel_err(poisoned, ref) < _TOL[dtype]
    from sparsify.kernels import kernel_backend

    with kernel_backend("-hopper"):  # on sm_90 the public entry runs a Gluon kernel (test_hopper_gpu.py)
        out = block_sparse_attn_scattered(q, k, v, idx, cnt, rows, S_out, block_size=bs)
    assert torch.equal(out, poisoned)
