"""CPU tests of the block-sparse Triton kernel, run under the Triton interpreter against the reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsify.testing.dits import rel_err, stale_selection  # noqa: E402
from sparsify.kernels.block_sparse import _launch, block_sparse_attn, supports  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # read at call time by block_sparse_attn: works even if triton was imported without it
    monkeypatch.setenv("TRITON_INTERPRET", "1")


_selection = functools.partial(stale_selection, p_empty=0.15)


def _inputs(B, H, S, D, dtype, gen):
    return tuple((torch.randn(B, H, S, D, generator=gen) * 1.5).to(dtype) for _ in range(3))


_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (B, H, S, D, dtype, block_size, launch options): odd S (and one exact multiple), B > 1, all head dims, all block
# sizes, TMA descriptors (also run by the interpreter), the tail block last (the interpreter's default) or masked
# where needed, lazy rescaling, sub-tiles
CASES = [
    (1, 2, 300, 64, torch.float32, (128, 128), {}),
    (2, 1, 333, 128, torch.float16, (128, 128), dict(use_tma=True, lazy_rescale=True)),
    (2, 2, 257, 64, torch.float16, (64, 64), dict(tail_last=False)),
    (1, 3, 390, 64, torch.float32, (64, 128), dict(use_tma=True, tail_last=False)),
    (1, 2, 200, 128, torch.float32, (128, 64), dict(tile_n=32, lazy_rescale=True)),
    (2, 1, 130, 64, torch.bfloat16, (64, 64), dict(use_tma=True)),
    (1, 2, 256, 64, torch.float32, (64, 64), {}),  # S a multiple of BLOCK_N, no lens: the last block is kept
    (2, 2, 301, 32, torch.float16, (64, 128), dict(use_tma=True)),  # head_dim 32 (the 16k test-bed)
    (1, 1, 450, 32, torch.float32, (64, 64), dict(tail_last=False)),
]


@pytest.mark.parametrize("B,H,S,D,dtype,bs,opts", CASES)
def test_matches_reference(B, H, S, D, dtype, bs, opts):
    gen = torch.Generator().manual_seed(B * 1000003 + H * 10007 + S * 101 + D + bs[0] + bs[1] // 2)
    q, k, v = _inputs(B, H, S, D, dtype, gen)
    idx, cnt = _selection(B, H, S, *bs, gen)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    out = _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(D), None, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < _TOL[dtype], err
    # the check can fail: the same kernel on a shifted selection is far from the reference
    live = cnt > 0
    n_kb = -(-S // bs[1])
    wrong = _launch(q, k, v, (idx + 1) % n_kb, cnt, bs, 1.0 / math.sqrt(D), None, **opts)
    assert live.any() and rel_err(wrong, ref) > 0.1


@pytest.mark.parametrize("lazy", [False, True])
def test_long_rows_tail_block_anywhere(lazy):
    """Rows of more than 64 entries with the partial tail block at any position (the kernel defers it)."""
    gen = torch.Generator().manual_seed(5)
    B, H, S, D, bs = 1, 1, 4200, 64, (64, 64)
    n = -(-S // 64)  # 66 blocks, the last one partial
    q, k, v = _inputs(B, H, S, D, torch.float32, gen)
    idx = torch.rand(B, H, n, n, generator=gen).argsort(-1).to(torch.int32)
    cnt = torch.zeros(B, H, n, dtype=torch.int32)
    for r, (c, pos) in {3: (66, 64), 9: (65, 64), 20: (66, 0), 41: (1, 0), 50: (30, 29)}.items():
        row = idx[0, 0, r]
        cur = int((row == n - 1).nonzero())
        row[cur], row[pos] = row[pos].clone(), n - 1
        cnt[0, 0, r] = c
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    out = _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(D), None, lazy_rescale=lazy)
    assert rel_err(out, ref) < 1e-5


def test_public_entry_point_scale_and_dense():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(1, 2, 190, 64, torch.float32, gen)
    n = 2  # ceil(190 / 128): select every block -> dense attention
    idx = torch.arange(n, dtype=torch.int32).expand(1, 2, n, n).contiguous()
    cnt = torch.full((1, 2, n), n, dtype=torch.int32)
    out = block_sparse_attn(q, k, v, idx, cnt, scale=0.05)
    dense = torch.softmax((q @ k.transpose(-1, -2)) * 0.05, -1) @ v
    assert rel_err(out, dense) < 1e-5


def test_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(2)
    B, H, S, D, bs = 1, 2, 250, 64, (64, 64)
    q, k, v = _inputs(B, H, S, D, torch.float16, gen)
    idx, cnt = _selection(B, H, S, *bs, gen, p_empty=0.5)
    cnt[0, 0, 0] = 0
    cnt[0, 1, -1] = 0  # the tail query block too
    out = block_sparse_attn(q, k, v, idx, cnt, block_size=bs)
    rows = (cnt == 0).repeat_interleave(bs[0], dim=-1)[..., :S]  # [B, H, S]
    assert rows.any()
    assert torch.all(out[rows] == 0)
    assert torch.isfinite(out).all()
    assert not torch.all(out[~rows] == 0)


@pytest.mark.parametrize("tma,lazy", [(False, False), (True, True)])
def test_kv_block_lens(tma, lazy):
    gen = torch.Generator().manual_seed(3)
    B, H, S, D, bs = 2, 2, 300, 64, (64, 64)
    n_qb, n_kb = -(-S // 64), -(-S // 64)
    q, k, v = _inputs(B, H, S, D, torch.float32, gen)
    idx, cnt = _selection(B, H, S, *bs, gen, p_empty=0.0, full_width=True)
    lens = torch.randint(0, bs[1] + 1, (n_kb,), generator=gen, dtype=torch.int32)
    lens[0], lens[1] = 0, 7  # an empty block and a short one
    # a query block that selects only the empty key block sees no key: zeros
    idx[0, 0, 1, 0], cnt[0, 0, 1] = 0, 1
    pos = torch.arange(S)
    key_mask = ((pos % bs[1]) < lens[pos // bs[1]]).expand(B, S)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs, key_mask=key_mask)
    out = _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(D), lens, use_tma=tma, lazy_rescale=lazy)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    assert torch.all(out[0, 0, 64:128] == 0)
    # ignoring the lengths is detectably wrong
    unmasked = block_sparse_attn(q, k, v, idx, cnt, block_size=bs)
    assert rel_err(unmasked, ref) > 0.05


@pytest.mark.parametrize("tma", [False, True])
def test_strided_inputs(tma):
    """[B, S, H, D] storage viewed as [B, H, S, D] (what diffusers passes) gives the same result."""
    gen = torch.Generator().manual_seed(4)
    B, H, S, D = 2, 3, 200, 64
    q, k, v = (torch.randn(B, S, H, D, generator=gen).transpose(1, 2) for _ in range(3))
    idx, cnt = _selection(B, H, S, 128, 128, gen)
    out = _launch(q, k, v, idx, cnt, (128, 128), 0.125, None, use_tma=tma)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=(128, 128))
    assert out.is_contiguous()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("tma,bs", [(False, (64, 64)), (True, (128, 64))])
def test_out_rows_scatter(tma, bs):
    """`out_rows` writes query row r to output row out_rows[r] (the fused inverse layout); -1 rows are dropped."""
    gen = torch.Generator().manual_seed(6)
    B, H, S, D, S_out = 2, 2, 300, 64, 280
    q, k, v = _inputs(B, H, S, D, torch.float16, gen)
    idx, cnt = _selection(B, H, S, *bs, gen)
    rows = torch.full((S,), -1, dtype=torch.int32)
    keep = torch.randperm(S, generator=gen)[:S_out]  # 20 padding rows, the rest a permutation of the output
    rows[keep] = torch.randperm(S_out, generator=gen).to(torch.int32)
    ref = block_sparse_attn_reference(q, k, v, idx, cnt, block_size=bs)
    want = torch.zeros(B, H, S_out, D, dtype=q.dtype)
    want[:, :, rows[keep].long()] = ref[:, :, keep]
    out = torch.full((B, H, S_out, D), float("nan"), dtype=q.dtype)
    _launch(q, k, v, idx, cnt, bs, 1.0 / math.sqrt(D), None, out=out, out_rows=rows, out_len=S_out, use_tma=tma)
    assert not out.isnan().any(), "an output row was not written"
    assert rel_err(out, want) < _TOL[torch.float16]
    with pytest.raises(ValueError, match="out_rows"):
        _launch(q, k, v, idx, cnt, bs, 0.1, None, out_rows=rows[:-1], out_len=S_out)


def test_errors_and_supports():
    q = torch.randn(1, 2, 100, 64)
    idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32)
    cnt = torch.ones(1, 2, 1, dtype=torch.int32)
    assert supports(q, (128, 128)) == (True, "")
    ok, why = supports(torch.randn(1, 2, 100, 96), (128, 128))
    assert not ok and "head_dim 96" in why
    ok, why = supports(q, (32, 128))
    assert not ok and "block_size" in why
    ok, why = supports(q.to(torch.float64), (128, 128))
    assert not ok and "dtype" in why
    with pytest.raises(ValueError, match="head_dim 96"):
        block_sparse_attn(*(torch.randn(1, 2, 100, 96),) * 3, idx, cnt)
    with pytest.raises(ValueError, match="BLOCK_M and BLOCK_N"):
        block_sparse_attn(q, q, q, idx, cnt, block_size=(128, 256))
    with pytest.raises(ValueError, match="kv_counts must be"):
        block_sparse_attn(q, q, q, idx, cnt[:, :1])
    with pytest.raises(ValueError, match="kv_indices must be"):
        block_sparse_attn(q, q, q, idx[0], cnt)
    with pytest.raises(ValueError, match="equal shapes"):
        block_sparse_attn(q, q[:, :1], q, idx, cnt)
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attn(q, q.half(), q, idx, cnt)
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attn(q, q, q, idx.float(), cnt)
    with pytest.raises(ValueError, match="kv_block_lens must be"):
        block_sparse_attn(q, q, q, idx, cnt, kv_block_lens=torch.ones(3, dtype=torch.int32))


def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = supports(torch.randn(1, 1, 64, 64))
    assert not ok and "TRITON_INTERPRET" in why


def test_aot_resources_compiles_the_forward_kernel_for_sm90():
    """`tools.aot_resources` (the NOTES' register and occupancy figures) keeps compiling the plain kernel."""
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel bundles no cuobjdump")
    from tools.aot_resources import resources
    from sparsify.kernels._triton import interpreter

    with interpreter(False):  # compiled, not interpreted
        r = resources(64, 64, 64, 2, 4)
        r128 = resources(128, 128, 64, 2, 8, 128, tail_last=True, lazy=True, lens=False)  # the 128-row default
    assert r["regs"] > 0 and r["stack"] == 0 and r["programs_per_sm"] >= 1, r
    # two programs per SM under the 128-register cap, wgmma not serialized (spills depend on the triton version)
    assert r128["regs"] <= 128 and r128["programs_per_sm"] == 2 and r128["wgmma_serialized"] is None, r128
