"""GPU tests of the Gluon Hopper kernels (128x128 and 64x64 blocks): odd shapes against the reference and
FlexAttention, the fused inverse layout, slot-prefix inputs, and the dispatch."""

from __future__ import annotations

import pytest
import torch

from sparsify.testing.dits import density_selection as _selection, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs an sm_90 GPU")

hopper = pytest.importorskip("sparsify.kernels.hopper", reason="this triton has no (compatible) Gluon")

from sparsify.kernels import hopper64  # noqa: E402
from sparsify.kernels.block_sparse import block_sparse_attn, block_sparse_attn_scattered  # noqa: E402
from sparsify.kernels import kernel_backend  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference, scatter_rows  # noqa: E402

_TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}


def _check_against_reference(fn, block, B, H, S, dtype, density, p_empty, seed, **opts):
    """`fn(q, k, v, idx, cnt, scale, out=..., **opts)` (a Gluon kernel with `block`-sized blocks) against the
    reference: NaN-poisoned output fully written, within tolerance, key-less rows exactly 0, and a shifted selection
    visibly wrong (the comparison can fail)."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=dtype) for _ in range(3))
    idx, cnt = _selection(B, H, S, block, block, density, p_empty=p_empty)
    out = torch.full_like(q, float("nan"))
    fn(q, k, v, idx, cnt, 128 ** -0.5, out=out, **opts)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(block, block))
    assert rel_err(out, ref) < _TOL[dtype]
    rows = (cnt == 0).repeat_interleave(block, dim=-1)[..., :S]
    assert rows.any() and torch.all(out[rows] == 0)
    wrong = fn(q, k, v, (idx + 1) % (-(-S // block)), cnt, 128 ** -0.5, **opts)
    assert rel_err(wrong, ref) > 0.1


@pytest.mark.parametrize("B,H,S,dtype,density,stages", [(2, 3, 1000, torch.bfloat16, 0.3, 2),
                                                        (1, 4, 4099, torch.float16, 0.2, 2),
                                                        (2, 2, 2048, torch.bfloat16, 0.5, 3)])
def test_against_reference(B, H, S, dtype, density, stages):
    _check_against_reference(hopper.block_sparse_attn_hopper, 128, B, H, S, dtype, density, 0.1, S + stages,
                             num_stages=stages)


@pytest.mark.parametrize("B,H,S,dtype,density,stages", [(2, 3, 1000, torch.bfloat16, 0.3, 2),
                                                        (1, 4, 4099, torch.float16, 0.2, 2),
                                                        (2, 2, 130, torch.bfloat16, 0.7, 3),
                                                        (1, 2, 4160, torch.bfloat16, 0.1, 2)])
def test_hopper64_against_reference(B, H, S, dtype, density, stages):
    """The 64x64 kernel: odd S and odd block counts (a CTA's second query block missing), empty rows (one of a CTA's
    two blocks empty and the other not, which exercises the turn protocol's unequal counts)."""
    _check_against_reference(hopper64.block_sparse_attn_hopper64, 64, B, H, S, dtype, density, 0.25, S + stages,
                             num_stages=stages)


def test_public_entry_uses_it_and_matches_flex():
    """block_sparse_attn runs the Gluon kernel here (the `hopper` path off gives the plain kernel, a different result
    within rounding) and both agree with FlexAttention on the same block mask at the Wan-1.3B shape."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    torch.manual_seed(5)
    B, H, S = 1, 12, 32760
    q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    idx, cnt = _selection(B, H, S, 128, 128, 0.05)
    ours = block_sparse_attn(q, k, v, idx, cnt)
    assert torch.equal(ours, hopper.block_sparse_attn_hopper(q, k, v, idx, cnt, 128 ** -0.5))
    with kernel_backend("-hopper"):
        plain = block_sparse_attn(q, k, v, idx, cnt)
    mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(128, 128), seq_lengths=(S, S))
    flex = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask)
    gold = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(128, 128))
    e_ours, e_plain, e_flex = rel_err(ours, gold), rel_err(plain, gold), rel_err(flex, gold)
    assert e_ours < max(2 * e_flex, 1e-3) and e_plain < max(2 * e_flex, 1e-3), (e_ours, e_plain, e_flex)
    assert rel_err(ours, flex) < _TOL[torch.bfloat16]


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("B,H,L,pad,dtype", [(2, 3, 1000, 37, torch.bfloat16), (1, 4, 4099, 61, torch.float16)])
def test_scattered_and_slot_prefix(block, B, H, L, pad, dtype):
    """`block_sparse_attn_scattered` on the Gluon kernels, fed slot prefixes `t[:, :, :L]` of longer tensors (no
    copy) as the op does: each slot's row lands on its token's row, padding slots (row -1) are dropped, and the
    plain kernel (the `hopper` path off) agrees."""
    torch.manual_seed(L + block)
    q, k, v = (torch.randn(B, H, L + 64, 128, device="cuda", dtype=dtype)[:, :, :L] for _ in range(3))
    assert not q.is_contiguous() and hopper.supports(q, k, v, (block, block))[0]
    idx, cnt = _selection(B, H, L, block, block, 0.3, p_empty=0.1)
    out_len = L - pad
    perm = torch.randperm(L, device="cuda")
    out_rows = torch.where(perm < out_len, perm, -1).to(torch.int32)
    ref = scatter_rows(block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(block, block)), out_rows, out_len)
    ours = block_sparse_attn_scattered(q, k, v, idx, cnt, out_rows, out_len, block_size=(block, block))
    fn = hopper.block_sparse_attn_hopper if block == 128 else hopper64.block_sparse_attn_hopper64
    assert torch.equal(ours, fn(q, k, v, idx, cnt, 128 ** -0.5, out_rows=out_rows, out_len=out_len))
    assert ours.shape == (B, H, out_len, 128) and not ours.isnan().any()
    assert rel_err(ours, ref) < _TOL[dtype]
    slots = block_sparse_attn(q, k, v, idx, cnt, block_size=(block, block))  # slot order, from the prefix views
    assert rel_err(slots, block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(block, block))) < _TOL[dtype]
    with kernel_backend("-hopper"):
        plain = block_sparse_attn_scattered(q, k, v, idx, cnt, out_rows, out_len, block_size=(block, block))
    assert rel_err(plain, ours) < _TOL[dtype]


def test_public_entry_uses_hopper64_and_matches_flex():
    """block_sparse_attn with 64x64 blocks runs the 64x64 Gluon kernel here and agrees with FlexAttention on the
    same block mask at the Wan-1.3B shape."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    torch.manual_seed(6)
    B, H, S = 1, 12, 32760
    q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    idx, cnt = _selection(B, H, S, 64, 64, 0.05)
    ours = block_sparse_attn(q, k, v, idx, cnt, block_size=(64, 64))
    assert torch.equal(ours, hopper64.block_sparse_attn_hopper64(q, k, v, idx, cnt, 128 ** -0.5))
    mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(64, 64), seq_lengths=(S, S))
    flex = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask,
                                                        kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})
    gold = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(64, 64))
    e_ours, e_flex = rel_err(ours, gold), rel_err(flex, gold)
    assert e_ours < max(2 * e_flex, 1e-3), (e_ours, e_flex)
