"""GPU tests of the op's direct path: the 64x64 Gluon kernel reading q, k, v in token order through 5-D TMA boxes
(sparsify.kernels.direct) against the reference and against the op's tile-order path."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="needs an sm_90 GPU"),
]

pytest.importorskip("sparsify.kernels.hopper", reason="this triton has no (compatible) Gluon")

from dits import rel_err  # noqa: E402
from sparsify import runtime  # noqa: E402
from sparsify.kernels import direct  # noqa: E402
from sparsify.kernels.gather import FAST  # noqa: E402
from sparsify.kernels.reference import tiled_sparse_attention  # noqa: E402
from sparsify.layout import Geometry, tile_layout  # noqa: E402
from sparsify.methods.vsa import VSA  # noqa: E402
from sparsify.recipe import Budget, HeadConfig  # noqa: E402
from sparsify.runtime import block_fn_for  # noqa: E402

_TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def _direct_on(monkeypatch):
    monkeypatch.setitem(FAST, "direct", True)  # off by default (slower on the H200), on for these tests


@pytest.mark.parametrize("B,H,grid,tile,dtype,density,layout", [
    (1, 3, (5, 9, 20), (4, 4, 4), torch.bfloat16, 0.2, "contiguous"),   # merged edge tiles, a short one inside
    (2, 2, (3, 10, 17), (2, 4, 8), torch.float16, 0.3, "contiguous"),   # B > 1, another tile shape
    (1, 2, (21, 45, 80), (4, 4, 4), torch.bfloat16, 0.05, "bshd"),      # Wan-14B 720p, q from [B, S, H, D]
    (1, 4, (16, 8, 8), (1, 8, 8), torch.bfloat16, 0.25, "contiguous"),  # every tile a whole box: no edge tile
])
def test_direct_matches_reference_and_tiled_path(B, H, grid, tile, dtype, density, layout):
    torch.manual_seed(sum(grid) + B)
    geo = Geometry(grid)
    S = geo.video_len
    if layout == "bshd":  # the heads interleaved in memory, as a model's projections give them
        q, k, v = (torch.randn(B, S, H, 128, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, S, 128, device="cuda", dtype=dtype) for _ in range(3))
    lay = tile_layout(grid, tile, "cuda")
    assert direct.serves(q, k, v, geo, lay, VSA())
    dt = direct.prepare(q, k, v, lay)
    idx, cnt = VSA().select_from_means(*dt.means, lay, [Budget(density=density)] * H)
    out = direct.attention(q, k, v, lay, dt, idx, cnt)
    torch.cuda.synchronize()
    assert out.shape == q.shape and not out.isnan().any(), "a token's row was not written"
    ref = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt)  # the PyTorch reference kernel
    assert rel_err(out, ref) < _TOL[dtype]
    tiled = tiled_sparse_attention(q, k, v, geo, lay, idx, cnt, block_fn=block_fn_for(q))  # tile-order copies
    assert rel_err(out, tiled) < 1e-5, "same tiles, same kernel: the two paths should agree to rounding"
    wrong = direct.attention(q, k, v, lay, dt, (idx + 1) % lay.n_tiles, cnt)
    assert rel_err(wrong, ref) > 0.1  # the comparison can fail


def test_run_site_takes_the_direct_path_and_matches_it_off(monkeypatch):
    """A VSA site with 4x4x4 tiles runs the direct path on sm_90 when FAST["direct"] is on; with it off, the
    tile-order path gives the same output to rounding."""
    grid, H = (5, 9, 20), 4
    cfg = [HeadConfig(method="vsa", tile=(4, 4, 4), budget=Budget(density=0.2))] * H
    st = runtime.SiteState(site_id=runtime.STATE.new_id(), path="test.direct", kind="self", heads=H, head_dim=128,
                           configs=cfg)
    runtime.STATE.sites[st.site_id] = st
    site = torch.tensor([st.site_id])
    q, k, v = (torch.randn(1, H, 900, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    calls = []
    real = direct.attention
    monkeypatch.setattr(direct, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        on = runtime.run_site(q, k, v, site, [*grid, 0], None)
        assert calls == [1]
        monkeypatch.setitem(FAST, "direct", False)
        off = runtime.run_site(q, k, v, site, [*grid, 0], None)
        assert calls == [1] and rel_err(on, off) < 1e-5
    finally:
        runtime.STATE.sites.pop(st.site_id)
