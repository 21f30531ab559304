"""CPU tests (Triton interpreter) of the fused q/k RMSNorm + RoPE kernel and the Wan processor that uses it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("diffusers")

from sparsify.testing import dits  # noqa: E402
from sparsify import sparsify, unsparsify  # noqa: E402
from sparsify.adapters import adapter_for, wan  # noqa: E402
from sparsify.kernels._triton import interpreter  # noqa: E402
from sparsify.kernels.rope import rmsnorm_rope, rmsnorm_rope_reference  # noqa: E402


def stock(x, w, eps, cos, sin, heads):
    """diffusers Wan's unfused q/k code (nn.RMSNorm over all heads, then apply_rotary_emb)."""
    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps).unflatten(2, (heads, -1))
    x1, x2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(y)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(y).flatten(2)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # about one ulp of the dtype


def _tables(B, S, D, dtype, gen):
    ang = torch.randn(B, S, 1, D // 2, generator=gen).repeat_interleave(2, -1)  # diffusers' interleaved tables
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,S,heads,D,affine,batch_tables", [(1, 7, 3, 64, True, False), (2, 5, 2, 128, True, True),
                                                            (2, 3, 5, 16, False, False)])
def test_kernel_matches_reference(dtype, B, S, heads, D, affine, batch_tables):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(B, S, heads * D, generator=g)).to(dtype)
    w = torch.rand(heads * D, generator=g).to(dtype) + 0.5 if affine else None
    cos, sin = _tables(B if batch_tables else 1, S, D, dtype, g)
    with interpreter():
        y = rmsnorm_rope(x, w, 1e-6, cos, sin, heads)
    ref = rmsnorm_rope_reference(x, w, 1e-6, cos, sin, heads)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_kernel_reads_strided_rows():
    """A row view of a wider buffer (e.g. q of a fused qkv projection) is read in place."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 6, 3 * 64, generator=g)
    q = qkv[..., :64]
    cos, sin = _tables(1, 6, 32, torch.float32, g)
    with interpreter():
        y = rmsnorm_rope(q, None, 1e-6, cos, sin, 2)
    torch.testing.assert_close(y, rmsnorm_rope_reference(q.contiguous(), None, 1e-6, cos, sin, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_diffusers_math(dtype):
    """In float32 the reference equals diffusers' code; in bf16 they differ by rounding only (diffusers rounds
    each RoPE product), and the reference is the closer of the two to the float32 result."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 4 * 32, generator=g)
    w = torch.rand(4 * 32, generator=g) + 0.5
    cos, sin = _tables(1, 9, 32, torch.float32, g)
    exact = stock(x, w, 1e-6, cos, sin, 4)
    args = (x.to(dtype), w.to(dtype), 1e-6, cos.to(dtype), sin.to(dtype), 4)
    ref, unfused = rmsnorm_rope_reference(*args), stock(*args)
    torch.testing.assert_close(ref.float(), unfused.float(), rtol=2 * TOL[dtype], atol=2 * TOL[dtype])
    if dtype == torch.float32:
        return
    assert (ref.float() - exact).abs().mean() <= (unfused.float() - exact).abs().mean()


def test_shape_errors_name_the_argument():
    x = torch.randn(1, 4, 24)
    cos = torch.ones(1, 4, 1, 8)
    with pytest.raises(ValueError, match="heads of an even size"):
        rmsnorm_rope(x, None, 1e-6, cos, cos, 5)
    with pytest.raises(ValueError, match="sin must be"):
        rmsnorm_rope(x, None, 1e-6, cos, torch.ones(1, 5, 1, 8), 3)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_rope(x, torch.ones(8), 1e-6, cos, cos, 3)


def _wan_run(model, kw):
    with torch.no_grad():
        return model(**kw)[0]


RECIPE = {"version": 1, "defaults": {"method": "vsa", "tile": [2, 4, 8], "budget": {"density": 0.5}}}


def test_sparsified_wan_uses_fused_processor_and_matches(monkeypatch):
    """With the fused path on (interpreter standing in for CUDA), a sparsified tiny Wan gives the stock
    processor's output; unsparsify restores diffusers' processors."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = dits.tiny_wan(heads=2, head_dim=32)
    kw = adapter_for(model).example_inputs(model, grid=(4, 4, 8))
    originals = [blk.attn1.processor for blk in model.blocks]
    sparsify(model, RECIPE)
    procs = [blk.attn1.processor for blk in model.blocks]
    assert all(type(p).__name__ == "FusedWanAttnProcessor" for p in procs)
    assert all(type(blk.attn2.processor) is WanAttnProcessor for blk in model.blocks)  # cross-attention untouched
    import sparsify.kernels.rope as R

    calls, kernel = [], R.rmsnorm_rope

    def counted(*a, **k):
        calls.append(1)
        return kernel(*a, **k)

    monkeypatch.setattr(R, "rmsnorm_rope", counted)
    monkeypatch.setattr(wan, "_fast", lambda x: True)
    with interpreter():
        fused = _wan_run(model, kw)
    assert len(calls) == 2 * len(model.blocks)  # q and k of every site
    monkeypatch.setattr(wan, "_fast", lambda x: False)
    unfused = _wan_run(model, kw)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    unsparsify(model)
    assert [blk.attn1.processor for blk in model.blocks] == originals


def test_fused_path_is_skipped_for_autograd_and_cpu(monkeypatch):
    model = dits.tiny_wan(layers=1)
    kw = adapter_for(model).example_inputs(model, grid=(2, 4, 4))
    sparsify(model, RECIPE)
    proc, attn = model.blocks[0].attn1.processor, model.blocks[0].attn1
    h = torch.randn(1, 32, attn.inner_dim)
    rope = model.rope(kw["hidden_states"])
    assert not proc.fusable(attn, h, None, rope)  # CPU tensor, no interpreter stand-in
    monkeypatch.setattr(wan, "_fast", lambda x: True)
    assert proc.fusable(attn, h, None, rope) is False  # parameters require grad and grad mode is on
    with torch.no_grad():
        assert proc.fusable(attn, h, None, rope)
        assert not proc.fusable(attn, h, h, rope)  # cross-attention
        assert not proc.fusable(attn, h, None, None)  # no RoPE
    unsparsify(model)


def test_fused_processor_can_be_switched_off():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from sparsify.kernels import kernel_backend

    model = dits.tiny_wan(layers=1)
    with kernel_backend("-rope"):
        sparsify(model, RECIPE)
    assert type(model.blocks[0].attn1.processor) is WanAttnProcessor
    unsparsify(model)
    sparsify(model, RECIPE)
    assert type(model.blocks[0].attn1.processor) is not WanAttnProcessor
    unsparsify(model)
    sparsify(model, RECIPE, mode="graph")  # graph mode leaves the model's code alone
    assert type(model.blocks[0].attn1.processor) is WanAttnProcessor
    unsparsify(model)
