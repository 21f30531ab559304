"""GPU tests of the whole sparse op (layout, selection, Triton kernel, inverse layout) and of sparsify() on CUDA."""

from __future__ import annotations

import pytest
import torch


from sparsify.testing.dits import rel_err  # noqa: E402
from sparsify import runtime  # noqa: E402
from sparsify.kernels.reference import block_sparse_attn_reference  # noqa: E402
from sparsify.runtime.tiled import tiled_sparse_attention  # noqa: E402
from sparsify.geometry import Geometry, tile_layout, to_tiles  # noqa: E402
from sparsify.methods import get_method  # noqa: E402
from sparsify.recipe import Budget  # noqa: E402


CASES = [  # B, H, grid, video_start, n_text, D, dtype, tile, density
    (1, 12, (21, 30, 52), 0, 0, 128, torch.bfloat16, (4, 4, 4), 0.05),   # Wan-1.3B 480p, 4x4x4 (partial tiles)
    (1, 2, (21, 45, 80), 0, 0, 128, torch.bfloat16, (4, 4, 4), 0.05),    # Wan-14B 720p: only the last tile short
    (2, 4, (5, 12, 20), 0, 30, 64, torch.float16, (1, 8, 16), 0.2),       # text after video, odd grid, 128-tiles
    (2, 3, (7, 9, 11), 17, 17, 128, torch.bfloat16, (16, 2, 2), 0.3),     # text first (CogVideoX-like)
    (1, 2, (3, 10, 14), 0, 0, 64, torch.bfloat16, (2, 4, 8), 0.5),
]


@pytest.mark.parametrize("B,H,grid,vs,n_text,D,dtype,tile,density", CASES)
def test_tiled_op_triton_matches_reference(B, H, grid, vs, n_text, D, dtype, tile, density):
    torch.manual_seed(hash((B, H, grid)) % 1000)
    geo = Geometry(grid, vs)
    S = geo.video_len + n_text
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
    lay = tile_layout(grid, tile, "cuda")
    vid = slice(vs, vs + geo.video_len)
    idx, cnt = get_method("vsa").select(to_tiles(q[:, :, vid], lay), to_tiles(k[:, :, vid], lay), lay,
                                        [Budget(density=density)] * H)
    key_mask = None
    if n_text:
        key_mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
        key_mask[:, vs + geo.video_len + n_text - 3: vs + geo.video_len + n_text] = vs == 0  # pad the last text keys
    fast = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt, key_mask=key_mask, block_fn=runtime.block_fn_for(q))
    ref = tiled_sparse_attention(q.float(), k.float(), v.float(), geo, lay, idx, cnt, key_mask=key_mask,
                                 block_fn=block_sparse_attn_reference)
    assert torch.isfinite(fast).all()
    assert rel_err(fast, ref) < (1.5e-2 if dtype == torch.bfloat16 else 4e-3)


def test_sparsify_tiny_wan_cuda_eager_and_compiled():
    from diffusers import WanTransformer3DModel

    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.adapters import adapter_for

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2,
                              rope_max_seq_len=64).eval().cuda().to(torch.bfloat16)
    kw = adapter_for(m).example_inputs(m, grid=(5, 16, 24))
    kw["hidden_states"] = torch.randn_like(kw["hidden_states"])
    with torch.no_grad():
        dense = m(**kw)[0]
    sparsify(m, {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 1.0}}})
    with torch.no_grad():
        full = m(**kw)[0]
        assert rel_err(full, dense) < 2e-2  # every tile kept: the Triton path reproduces dense attention
    unsparsify(m)
    sparsify(m, {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.25}}})
    with torch.no_grad():
        eager = m(**kw)[0]
        compiled = torch.compile(m, fullgraph=True)(**kw)[0]
    assert rel_err(compiled, eager) < 2e-2
    assert rel_err(eager, dense) > 1e-3
    assert all(s.calls == 2 for s in installed_sites(m))
    unsparsify(m)


def test_op_backward_on_cuda_matches_fp32_reference_gradients():
    """Training through torch.ops.sparsify.sparse_attention on CUDA (the Triton backward serves the op's
    recomputation) gives the gradients of the fp32 reference op on the same selection."""
    from sparsify.recipe import HeadConfig

    torch.manual_seed(3)
    grid, H, D = (5, 12, 20), 4, 64
    geo = Geometry(grid)
    cfg = [HeadConfig(method="vsa", tile=(1, 8, 16), budget=Budget(density=0.3))] * H
    st = runtime.SiteState(site_id=runtime.STATE.new_id(), path="gpu.bwd", kind="self", heads=H, head_dim=D,
                           configs=cfg)
    runtime.STATE.sites[st.site_id] = st
    site = torch.tensor([st.site_id])
    try:
        q, k, v = (torch.randn(2, H, geo.video_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        grad = torch.randn_like(q)
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = torch.ops.sparsify.sparse_attention(*xs, site, [*grid, 0])
        got = torch.autograd.grad(out, xs, grad)
        # reference: the same selection (from the bf16 q, k), fp32 reference kernel, plain autograd
        lay = tile_layout(grid, (1, 8, 16), "cuda")
        idx, cnt = get_method("vsa").select(to_tiles(q, lay), to_tiles(k, lay), lay, [Budget(density=0.3)] * H)
        ref_in = [x.float().requires_grad_(True) for x in (q, k, v)]
        ref = tiled_sparse_attention(*ref_in, geo, lay, idx, cnt, block_fn=block_sparse_attn_reference)
        want = torch.autograd.grad(ref, ref_in, grad.float())
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            assert rel_err(g, w) < 2e-2
    finally:
        del runtime.STATE.sites[st.site_id]


@pytest.mark.parametrize("tiles", [[(4, 4, 4)] * 4, [(4, 4, 4), (1, 8, 8), (4, 4, 4), (1, 8, 8)]],
                         ids=["one_group", "two_tile_groups"])
def test_sparse_call_does_not_sync_the_host(tiles):
    """After the first call (layout, compiles, the timestep's one reading), a VSA call of the op queues its
    work without any host-device synchronization, so eager models keep the GPU fed; with per-head tiles too
    (head groups gathered and scattered by cached device indices)."""
    from sparsify.recipe import HeadConfig

    grid, H, D = (8, 16, 16), len(tiles), 128
    cfg = [HeadConfig(method="vsa", tile=t, budget=Budget(density=0.1)) for t in tiles]
    st = runtime.SiteState(site_id=runtime.STATE.new_id(), path="test.nosync", kind="self", heads=H, head_dim=D,
                           configs=cfg)
    runtime.STATE.sites[st.site_id] = st
    site = torch.tensor([st.site_id])
    q, k, v = (torch.randn(1, H, 8 * 16 * 16, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t = torch.tensor([700.0], device="cuda")
    runtime.set_timestep(t)
    try:
        runtime.run_site(q, k, v, site, [*grid, 0], None, None, t)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runtime.run_site(q, k, v, site, [*grid, 0], None, None, t)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert st.selections == 2 * len(set(tiles))  # one selection per head group and call
        assert 0 < st.density < 0.5  # reading the work counter syncs once, here
    finally:
        runtime.STATE.sites.pop(st.site_id)
