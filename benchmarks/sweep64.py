"""One-off: the 64x64 kernel of the whole op (Wan-14B 720p, VSA 5%, 4x4x4) under a few launch configs (session 5)."""
import torch, itertools, json, os, sys
sys.path.insert(0, os.getcwd())
from benchmarks import time_ms
from benchmarks.whole_op import SHAPES
from sparsify.layout import Geometry, tile_layout
from sparsify.kernels.reference import tile_sequence
from sparsify.kernels.block_sparse import _launch
from sparsify.methods import get_method
from sparsify.recipe import Budget
name, H, grid = SHAPES["14b"]
geo = Geometry(grid); S = geo.video_len
torch.manual_seed(0)
q, k, v = (torch.randn(1, H, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
lay = tile_layout(grid, (4, 4, 4), "cuda")
ts = tile_sequence(q, k, v, geo, lay); P = lay.padded_len
qt, kt, vt = ts.q[:, :, :P], ts.k[:, :, :P], ts.v[:, :, :P]
idx, cnt = get_method("vsa").select(qt, kt, lay, [Budget(density=0.05)] * H)
lens = lay.tile_lens.to("cuda")
res = {}
for nw, ns, mr, lz in [(4, 3, None, False), (4, 3, None, True), (4, 2, None, False), (4, 4, None, False),
                       (8, 3, None, False), (8, 2, None, True), (4, 3, 168, False), (4, 2, 128, True)]:
    try:
        f = lambda: _launch(qt, kt, vt, idx, cnt, (64, 64), 128 ** -0.5, lens, num_warps=nw, num_stages=ns, maxnreg=mr,
                            lazy_rescale=lz)
        t = time_ms(f); res[f"w{nw}s{ns}r{mr}l{int(lz)}"] = t; print(nw, ns, mr, lz, round(t, 3), flush=True)
    except Exception as e:
        print(nw, ns, mr, "fail", type(e).__name__, str(e)[:100], flush=True)
json.dump(res, open(os.environ.get("OUT", ".") + "/sweep64.json", "w"))
