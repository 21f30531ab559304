"""xDiT Ulysses: xfuser 0.7's sequence layouts, routing of its attention function, and gloo runs against one process.

xfuser itself does not import on a CPU-only torch (its `envs.get_device_version` raises "No Accelerators" at
import), so the ranks here reproduce its data movement: the shards its HunyuanVideo transformer forward and
CogVideoX pipeline give each rank, and the head-scatter / sequence-gather all-to-all of its `USP`
(`_ft_c_input_all_to_all` / `_ft_c_output_all_to_all`), run with torch.distributed on gloo.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparsify import sparsify, unsparsify
from sparsify.parallel import head_shard
from sparsify.parallel.xdit import XditLayout, attach_sites, route
from sparsify.runtime import STATE, new_generation, set_timestep
from sparsify.testing.dits import tiny_cogvideox, tiny_hunyuan

GRID = (4, 8, 8)  # 256 video tokens: 4 tiles of (1, 8, 8), 4 of (2, 4, 8)
TIMESTEPS = (999, 900, 800, 700)
BUILD = {"hunyuan_video": tiny_hunyuan, "cogvideox": tiny_cogvideox}
# (family, text tokens): 8 splits over 2 ranks (text interleaved per rank), 7 does not (text joined whole)
CASES = [("hunyuan_video", 8), ("hunyuan_video", 7), ("cogvideox", 8), ("cogvideox", 7)]


SITES = {"hunyuan_video": ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
         "cogvideox": ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")}


def recipe(family: str):
    """Two heads of different tiles and densities, one dense step, mask reuse."""
    heads = [{"head": 0, "tile": [1, 8, 8], "density": 0.25}, {"head": 1, "tile": [2, 4, 8], "density": 0.5}]
    return {"version": 1, "defaults": {"tile": [1, 8, 8], "budget": {"density": 0.5}, "dense_steps": 1,
                                       "mask_reuse": {"threshold": 0.05, "max_age": 2}},
            "sites": {path: {"heads": heads} for path in SITES[family]}}


def xfuser_local(family: str, text_len: int, world: int) -> tuple[list, list]:
    """The one-process positions of the queries and of the keys each rank hands to xfuser's `USP`, built as xfuser
    0.7 shards: HunyuanVideo chunks the flattened video tokens and the text (`torch.chunk(..., dim=-2)`, text
    after the video); CogVideoX slices latent-height bands of every frame (`_init_video_sync_pipeline`), text
    chunk first. Text that does not divide by `world` stays whole on every rank: USP joins it to each rank's
    queries before the all-to-all, and to the keys after it."""
    T, H, W = GRID
    N = T * H * W
    hunyuan = family == "hunyuan_video"
    if hunyuan:
        text, shares = torch.arange(N, N + text_len), list(torch.chunk(torch.arange(N), world))
    else:
        video = (text_len + torch.arange(N)).view(T, H, W)
        text = torch.arange(text_len)
        shares = [video[:, r * H // world:(r + 1) * H // world].reshape(-1) for r in range(world)]
    if text_len % world == 0:
        local = [torch.cat([s, t] if hunyuan else [t, s]) for s, t in zip(shares, torch.chunk(text, world))]
        return local, local
    return [torch.cat([s, text] if hunyuan else [text, s]) for s in shares], shares


def engine_keys(family: str, text_len: int, world: int) -> torch.Tensor:
    """The keys xDiT's attention function sees: the ranks' keys concatenated, the whole text joined after the
    all-to-all where it was not split (HunyuanVideo `joint_strategy="rear"`, CogVideoX `"front"`)."""
    N = GRID[0] * GRID[1] * GRID[2]
    seq = torch.cat(xfuser_local(family, text_len, world)[1])
    if text_len % world == 0:
        return seq
    return torch.cat([seq, torch.arange(N, N + text_len)]) if family == "hunyuan_video" \
        else torch.cat([torch.arange(text_len), seq])


@pytest.mark.parametrize("family,text_len", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_layout_orders_are_xfusers_sequences(family, text_len, world):
    text_first, split = {"hunyuan_video": (False, "tokens"), "cogvideox": (True, "rows")}[family]
    lay = XditLayout(GRID, text_len, world, text_first, split, joined=text_len % world != 0)
    assert torch.equal(lay.query_order(), torch.cat(xfuser_local(family, text_len, world)[0]))
    assert torch.equal(lay.key_order(), engine_keys(family, text_len, world))


def test_layout_errors():
    with pytest.raises(ValueError, match=r"8 token rows .* degree=3"):
        XditLayout(GRID, 6, 3, True, "rows")
    with pytest.raises(ValueError, match="text_len=7 does not divide by degree=2.*joined=True"):
        XditLayout(GRID, 7, 2, False)


def sdpa(q, k, v, dropout_p=0.0, is_causal=False, attention_kwargs=None):
    """xfuser's SDPA backend (`_sdpa_attn_call`): `(out, lse)`."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal), None


def inputs(text_len: int, step: int, heads: int = 2, dim: int = 16) -> tuple:
    """q, k, v `[1, H, S, D]` in one-process order; later steps drift a little from the first (mask reuse)."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, heads, text_len + 256, dim, generator=g) for _ in range(3)]
    g.manual_seed(step + 1)
    return tuple(x + 0.02 * step * torch.randn(x.shape, generator=g) for x in base)


def one_process(family: str, text_len: int):
    """Outputs of the first site over TIMESTEPS run as one process, and its selections/reuses (one thread, as
    each rank: CPU attention's reduction order depends on the thread count at some lengths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = sparsify(BUILD[family](), recipe(family))
    st = m._sparsify.sites[0]
    video_start = text_len if family == "cogvideox" else 0
    outs = []
    for i, t in enumerate(TIMESTEPS):
        q, k, v = inputs(text_len, i)
        outs.append(torch.ops.sparsify.sparse_attention(q, k, v, m.get_submodule(st.path)._sparsify_site,
                                                        [*GRID, video_start], None, None, torch.tensor([float(t)])))
    counts = (st.selections, st.reused)
    unsparsify(m)
    torch.set_num_threads(threads)
    return torch.stack(outs), counts


def _all_to_all(x: torch.Tensor, world: int, scatter_heads: bool) -> torch.Tensor:
    """xfuser's `_ft_c_input_all_to_all` (scatter heads, gather the sequence) or `_ft_c_output_all_to_all`."""
    import torch.distributed as dist

    b, h, s, d = x.shape
    src = x.permute(1, 0, 2, 3) if scatter_heads else x.permute(2, 0, 1, 3)
    src = src.contiguous()
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src)
    if scatter_heads:
        return out.reshape(world, h // world, b, -1, d).permute(2, 1, 0, 3, 4).reshape(b, h // world, -1, d)
    return out.reshape(world, s // world, b, -1, d).permute(2, 0, 3, 1, 4).reshape(b, -1, s // world, d)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        models = {}
        for family, text_len in CASES:
            if family not in models:  # one sparsified model per family, a new generation per case
                m = sparsify(BUILD[family](), recipe(family))
                models[family] = (m, attach_sites(m, family))
            m, _ = models[family]
            new_generation()
            st = m._sparsify.sites[0]
            site = m.get_submodule(st.path)._sparsify_site
            attn = route(sdpa)
            local_q, local_k = xfuser_local(family, text_len, world)
            N = GRID[0] * GRID[1] * GRID[2]
            outs = []
            for i, t in enumerate(TIMESTEPS):
                STATE.geometry = (*GRID, 0)
                set_timestep(torch.tensor([float(t)]))
                full = inputs(text_len, i)
                q = _all_to_all(full[0].index_select(2, local_q[rank]), world, True)
                k, v = (_all_to_all(x.index_select(2, local_k[rank]), world, True) for x in full[1:])
                if text_len % world:  # USP joins the whole text's keys (its own head slice) after the all-to-all
                    lo, hi = rank * 2 // world, (rank + 1) * 2 // world
                    text = torch.arange(N, N + text_len) if family == "hunyuan_video" else torch.arange(text_len)
                    jk, jv = (x[:, lo:hi].index_select(2, text) for x in full[1:])
                    k, v = ((torch.cat([a, b], 2) if family == "hunyuan_video" else torch.cat([b, a], 2))
                            for a, b in ((k, jk), (v, jv)))
                STATE.stack.append(site)
                try:
                    with head_shard(rank, world):
                        out, _ = attn(q, k, v, dropout_p=0.0, is_causal=False)
                finally:
                    STATE.stack.pop()
                outs.append(_all_to_all(out, world, False))
            torch.save({"out": torch.stack(outs), "counts": (st.selections, st.reused)},
                       os.path.join(out_dir, f"{family}{text_len}_rank{rank}.pt"))
        for m, undo in models.values():
            undo()
            unsparsify(m)
    finally:
        dist.destroy_process_group()


def test_xdit_ulysses_equals_one_process(tmp_path, free_port):
    """2 gloo ranks, xfuser's shards and all-to-all, the routed attention function: every token's output equals
    the one-process sparse run (text interleaved or joined; a dense first step; mask reuse decided by all ranks)."""
    world = 2
    torch.multiprocessing.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    for family, text_len in CASES:
        ref, (selections, reused) = one_process(family, text_len)
        assert reused > 0 and selections > 0  # mask reuse acts in the one-process run
        q, k, v = inputs(text_len, 0)
        assert (ref[1] - F.scaled_dot_product_attention(*inputs(text_len, 1))).abs().max() > 1e-2  # sparse
        torch.testing.assert_close(ref[0], F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)  # dense step
        for rank, idx in enumerate(xfuser_local(family, text_len, world)[0]):
            got = torch.load(tmp_path / f"{family}{text_len}_rank{rank}.pt")
            assert torch.equal(got["out"], ref.index_select(3, idx)), (family, text_len, rank)
            assert got["counts"][0] > 0


def test_route_serves_a_wrapped_site_and_leaves_other_calls():
    """One process: a site module wrapped by an xDiT-style module (`.module`, as CogVideoX's
    xFuserAttentionWrapper) runs sparse through the routed function; other calls run the engine function."""
    m = sparsify(tiny_cogvideox(), recipe("cogvideox"))
    st = m._sparsify.sites[0]
    inner = m.get_submodule(st.path)
    attn = route(sdpa)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, q, k, v):
            return attn(q, k, v)[0]

    parent, name = st.path.rsplit(".", 1)
    setattr(m.get_submodule(parent), name, Wrapper(inner))
    undo = attach_sites(m, "cogvideox")
    q, k, v = inputs(8, 1)
    STATE.geometry = (*GRID, 8)
    set_timestep(torch.tensor([999.0]))
    m.get_submodule(st.path)(q, k, v)  # the dense first step
    set_timestep(torch.tensor([900.0]))
    got = m.get_submodule(st.path)(q, k, v)
    want = torch.ops.sparsify.sparse_attention(q, k, v, inner._sparsify_site, [*GRID, 8], None, None,
                                               torch.tensor([900.0]))
    assert torch.equal(got, want) and not torch.allclose(got, sdpa(q, k, v)[0], atol=1e-3)
    assert not STATE.stack
    assert torch.equal(attn(q, k, v)[0], sdpa(q, k, v)[0])  # no site running: the engine's function
    undo()
    assert torch.equal(m.get_submodule(st.path)(q, k, v), sdpa(q, k, v)[0])  # undone: the site is not served
    setattr(m.get_submodule(parent), name, inner)
    unsparsify(m)
    STATE.geometry = None
    set_timestep(None)


def test_enable_without_xfuser_says_so():
    pytest.importorskip("torch")
    try:
        import xfuser  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or refuses this machine at import (no accelerator)
        pass
    else:
        pytest.skip("xfuser imports here")
    from sparsify.parallel import xdit

    with pytest.raises(ImportError, match="needs xDiT: pip install xfuser"):
        xdit.enable(tiny_cogvideox())
