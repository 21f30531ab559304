"""GPU tests of the Gluon Hopper kernel: odd shapes against the reference and FlexAttention, and the dispatch."""

from __future__ import annotations

import pytest
import torch

from dits import density_selection as _selection, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="needs an sm_90 GPU"),
]

hopper = pytest.importorskip("sparsify.kernels.hopper", reason="this triton has no (compatible) Gluon")

from sparsify.kernels.block_sparse import block_sparse_attn  # noqa: E402
from sparsify.kernels.gather import FAST  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference  # noqa: E402

_TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("variant", ["pingpong", "pingpong_persistent", "coop"])
@pytest.mark.parametrize("B,H,S,dtype,density", [(2, 3, 1000, torch.bfloat16, 0.3), (1, 4, 4099, torch.float16, 0.2),
                                                 (2, 2, 2048, torch.bfloat16, 0.5)])
def test_against_reference(B, H, S, dtype, density, variant):
    torch.manual_seed(S + len(variant))
    q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=dtype) for _ in range(3))
    idx, cnt = _selection(B, H, S, 128, 128, density, p_empty=0.1)
    out = torch.full_like(q, float("nan"))
    hopper.block_sparse_attn_hopper(q, k, v, idx, cnt, 128 ** -0.5, out=out, variant=variant)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(128, 128))
    assert rel_err(out, ref) < _TOL[dtype]
    rows = (cnt == 0).repeat_interleave(128, dim=-1)[..., :S]
    assert rows.any() and torch.all(out[rows] == 0)
    wrong = hopper.block_sparse_attn_hopper(q, k, v, (idx + 1) % (-(-S // 128)), cnt, 128 ** -0.5, variant=variant)
    assert rel_err(wrong, ref) > 0.1


def test_public_entry_uses_it_and_matches_flex():
    """block_sparse_attn runs the Gluon kernel here (FAST["hopper"] off gives the plain kernel, a different result
    within rounding) and both agree with FlexAttention on the same block mask at the Wan-1.3B shape."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    torch.manual_seed(5)
    B, H, S = 1, 12, 32760
    q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    idx, cnt = _selection(B, H, S, 128, 128, 0.05)
    ours = block_sparse_attn(q, k, v, idx, cnt)
    assert torch.equal(ours, hopper.block_sparse_attn_hopper(q, k, v, idx, cnt, 128 ** -0.5))
    FAST["hopper"] = False
    try:
        plain = block_sparse_attn(q, k, v, idx, cnt)
    finally:
        FAST["hopper"] = True
    mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(128, 128), seq_lengths=(S, S))
    flex = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask)
    gold = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(128, 128))
    e_ours, e_plain, e_flex = rel_err(ours, gold), rel_err(plain, gold), rel_err(flex, gold)
    assert e_ours < max(2 * e_flex, 1e-3) and e_plain < max(2 * e_flex, 1e-3), (e_ours, e_plain, e_flex)
    assert rel_err(ours, flex) < _TOL[torch.bfloat16]
