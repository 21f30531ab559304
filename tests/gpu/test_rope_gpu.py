"""GPU tests of the fused q/k RMSNorm + RoPE kernel and the fused Wan processor at real widths."""

from __future__ import annotations

import pytest
import torch


pytest.importorskip("diffusers")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,heads,D", [(1, 4681, 40, 128), (2, 1001, 12, 128), (1, 777, 24, 64)])
def test_kernel_matches_reference(dtype, B, S, heads, D):
    from sparsify.kernels.rope import rmsnorm_rope, rmsnorm_rope_reference

    x = 3 * torch.randn(B, S, heads * D, device="cuda", dtype=dtype)
    w = torch.rand(heads * D, device="cuda", dtype=dtype) + 0.5
    ang = torch.randn(1, S, 1, D // 2, device="cuda").repeat_interleave(2, -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    y = rmsnorm_rope(x, w, 1e-6, cos, sin, heads)
    ref = rmsnorm_rope_reference(x, w, 1e-6, cos, sin, heads)
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def test_fused_processor_matches_stock_block():
    """A Wan-1.3B-width block (12 heads of 128) at 2 x 12 x 20 tokens: the fused processor gives the stock
    processor's output up to bf16 rounding."""
    from diffusers import WanTransformer3DModel

    from sparsify.adapters.wan import fuse_processor

    torch.manual_seed(0)
    with torch.device("cuda"):  # Wan2.1-1.3B's config, one block, random weights
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).eval().to(torch.bfloat16)
    x = torch.randn(1, 16, 3, 24, 40, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    kw = dict(hidden_states=x, timestep=torch.tensor([500.0], device="cuda"), encoder_hidden_states=text,
              return_dict=False)
    with torch.no_grad():
        stock = model(**kw)[0].float()
        undo = fuse_processor(model.blocks[0].attn1)
        assert undo is not None and type(model.blocks[0].attn1.processor).__name__ == "FusedWanAttnProcessor"
        fused = model(**kw)[0].float()
        undo()
    err = (fused - stock).norm() / stock.norm()
    assert err < 2e-2, err
