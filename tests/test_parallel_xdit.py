"""xDiT: xfuser 0.7's layouts, its routed attention function, gloo runs (Ulysses, balanced heads, CFG) vs one process.

xfuser itself does not import on a CPU-only torch (its `envs.get_device_version` raises "No Accelerators" at
import), so the ranks here reproduce its data movement: the shards its HunyuanVideo transformer forward and
CogVideoX pipeline give each rank, and the head-scatter / sequence-gather all-to-all of its `USP`
(`_ft_c_input_all_to_all` / `_ft_c_output_all_to_all`) within its Ulysses groups, and the CFG batch split (rank 0 the
negative half), run with torch.distributed on gloo.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsify import sparsify, unsparsify
from sparsify.parallel import balance_heads, guidance_shard, head_shard, unbalance_heads
from sparsify.parallel.xdit import XditLayout, attach_sites, cfg_branch, route
from sparsify.runtime import STATE, new_generation, set_timestep
from sparsify.testing.dits import tiny_cogvideox, tiny_hunyuan

GRID = (4, 8, 8)  # 256 video tokens: 4 tiles of (1, 8, 8), 4 of (2, 4, 8)
TIMESTEPS = (999, 900, 800, 700)
HEADS = 8
BUILD = {"hunyuan_video": tiny_hunyuan, "cogvideox": tiny_cogvideox}
# (family, text tokens): 8 splits over 2 and 4 ranks (text interleaved per rank), 7 does not (text joined whole)
CASES = [("hunyuan_video", 8), ("hunyuan_video", 7), ("cogvideox", 8), ("cogvideox", 7)]
BRANCHES = ("cond", "uncond")  # one process with CFG as two calls: cond is call 0 of a step, uncond call 1


SITES = {"hunyuan_video": ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"),
         "cogvideox": ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")}


def recipe(family: str):
    """Two dense heads first, then sparse heads of two tiles and densities 0.25 / 0.5 (per-head densities 4x apart,
    the costly heads all on rank 0 in head order; head groups straddle ranks), one dense step, mask reuse."""
    heads = [{"head": h, "method": "dense"} for h in (0, 1)] + [
        {"head": h, "tile": [1, 8, 8] if h % 2 else [2, 4, 8], "density": 0.5 if h in (3, 4) else 0.25}
        for h in range(2, HEADS)]
    return {"version": 1, "defaults": {"tile": [1, 8, 8], "budget": {"density": 0.5}, "dense_steps": 1,
                                       "mask_reuse": {"threshold": 0.05, "max_age": 2}},
            "sites": {path: {"heads": heads} for path in SITES[family]}}


def video_start(family: str, text_len: int) -> int:
    return text_len if family == "cogvideox" else 0


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


def inputs(text_len: int, step: int, branch: str = "cond", dim: int = 16) -> tuple:
    """q, k, v `[1, H, S, D]` in one-process order; later steps drift from the first (the unconditional branch
    ten times as fast: the conditional one reuses its masks, the unconditional one selects afresh)."""
    g = torch.Generator().manual_seed(BRANCHES.index(branch))
    base = [torch.randn(1, HEADS, text_len + 256, dim, generator=g) for _ in range(3)]
    g.manual_seed(step + 1)
    drift = 0.02 * step * (1 if branch == "cond" else 10)
    return tuple(x + drift * torch.randn(x.shape, generator=g) for x in base)


def one_process(family: str, text_len: int, branches=BRANCHES[:1]):
    """Outputs of the first site over TIMESTEPS run as one process, a call per guidance branch at each timestep
    (`{branch: [steps, 1, H, S, D]}`), the site's (selections, reused), and the fresh selections `(step, call
    slot, head group)` it logged (one thread, as each rank: CPU attention's reduction order depends on the thread
    count at some lengths)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = sparsify(BUILD[family](HEADS), recipe(family))
    st = m._sparsify.sites[0]
    site = m.get_submodule(st.path)._sparsify_site
    outs, log = {b: [] for b in branches}, []
    STATE.selection_log = _logger(st, log)
    try:
        for i, t in enumerate(TIMESTEPS):
            for b in branches:
                outs[b].append(torch.ops.sparsify.sparse_attention(
                    *inputs(text_len, i, b), site, [*GRID, video_start(family, text_len)], None, None,
                    torch.tensor([float(t)])))
    finally:
        STATE.selection_log = None
        counts = (st.selections, st.reused)
        unsparsify(m)
        torch.set_num_threads(threads)
    return {b: torch.stack(o) for b, o in outs.items()}, counts, sorted(set(log))


def _logger(st, log: list):
    """A `STATE.selection_log` that records `(step, call slot, head group)` of each fresh selection of site `st`."""
    def record(state, key, step, pq, pk, idx, cnt):
        if state is st:
            log.append((step, key[-1], key[1]))
    return record


def _all_to_all(x: torch.Tensor, world: int, scatter_heads: bool, group=None) -> torch.Tensor:
    """xfuser's `_ft_c_input_all_to_all` (scatter heads, gather the sequence) or `_ft_c_output_all_to_all`, over
    its Ulysses group."""
    import torch.distributed as dist

    if world == 1:
        return x
    b, h, s, d = x.shape
    src = x.permute(1, 0, 2, 3) if scatter_heads else x.permute(2, 0, 1, 3)
    src = src.contiguous()
    out = torch.empty_like(src)
    dist.all_to_all_single(out, src, group=group)
    if scatter_heads:
        return out.reshape(world, h // world, b, -1, d).permute(2, 1, 0, 3, 4).reshape(b, h // world, -1, d)
    return out.reshape(world, s // world, b, -1, d).permute(2, 0, 3, 1, 4).reshape(b, -1, s // world, d)


def _usp(family: str, text_len: int, full: tuple, rank: int, world: int, site, group=None) -> torch.Tensor:
    """One attention call of `site` as xDiT runs it on Ulysses rank `rank` of `world` (`group`): the rank's shard
    of the one-process q, k, v `full`, the input all-to-all, the routed attention function under the rank's head
    shard, the output all-to-all. Returns the rank's output tokens `[1, H, S_local, D]`."""
    local_q, local_k = xfuser_local(family, text_len, world)
    N = GRID[0] * GRID[1] * GRID[2]
    q = _all_to_all(full[0].index_select(2, local_q[rank]), world, True, group)
    k, v = (_all_to_all(x.index_select(2, local_k[rank]), world, True, group) for x in full[1:])
    if text_len % world:  # USP joins the whole text's keys (its own head slice) after the all-to-all
        lo, hi = rank * HEADS // world, (rank + 1) * HEADS // world
        text = torch.arange(N, N + text_len) if family == "hunyuan_video" else torch.arange(text_len)
        jk, jv = (x[:, lo:hi].index_select(2, text) for x in full[1:])
        k, v = ((torch.cat([a, b], 2) if family == "hunyuan_video" else torch.cat([b, a], 2))
                for a, b in ((k, jk), (v, jv)))
    STATE.stack.append(site)
    try:
        with head_shard(rank, world, group):
            out, _ = route(sdpa)(q, k, v, dropout_p=0.0, is_causal=False)
    finally:
        STATE.stack.pop()
    return _all_to_all(out, world, False, group)


def _served(family: str, world: int, balance: bool):
    """A sparsified model of `family` served as xDiT serves it (`attach_sites`), its heads balanced over `world`
    Ulysses ranks or not; returns the model, the undo, its first site and that site's head order (the original
    head at each position)."""
    m = sparsify(BUILD[family](HEADS), recipe(family))
    perm = list(range(HEADS))
    if balance:
        st = m._sparsify.sites[0]
        start = video_start(family, 8)  # costs for 8 text tokens, before (CogVideoX) or after the video
        plan = balance_heads(m, world, GRID, video_start=start, text_len=8 - start)
        perm = plan.perms.get(st.path, perm)
    return m, attach_sites(m, family), m._sparsify.sites[0], perm


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Ulysses over all `world` ranks (heads in recipe order, then balanced), then CFG parallel: 2 rank groups of
    `world / 2` Ulysses ranks (xfuser's rank order: the Ulysses rank varies fastest)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for balance in (False, True):
            for family in BUILD:
                m, undo, st, perm = _served(family, world, balance)
                site = m.get_submodule(st.path)._sparsify_site
                for text_len in (n for f, n in CASES if f == family):
                    new_generation()
                    outs = []
                    for i, t in enumerate(TIMESTEPS):
                        STATE.geometry = (*GRID, 0)
                        set_timestep(torch.tensor([float(t)]))
                        full = tuple(x.index_select(1, torch.tensor(perm)) for x in inputs(text_len, i))
                        outs.append(_usp(family, text_len, full, rank, world, site))
                    torch.save({"out": torch.stack(outs), "perm": perm, "counts": (st.selections, st.reused)},
                               os.path.join(out_dir, f"{family}{text_len}_b{int(balance)}_rank{rank}.pt"))
                undo()
                unsparsify(m)
        ulysses = world // 2
        groups = [dist.new_group(list(range(c * ulysses, (c + 1) * ulysses))) for c in range(2)]
        cfg_rank, sp_rank = divmod(rank, ulysses)
        batch = ("uncond", "cond")  # xfuser's batch [negative, positive], split over the CFG ranks
        for family in BUILD:
            m, undo, st, _ = _served(family, ulysses, False)
            site = m.get_submodule(st.path)._sparsify_site
            new_generation()
            outs, log = [], []
            STATE.selection_log = _logger(st, log)
            try:
                with guidance_shard(cfg_branch(cfg_rank, 2), 2):
                    for i, t in enumerate(TIMESTEPS):
                        STATE.geometry = (*GRID, 0)
                        set_timestep(torch.tensor([float(t)]))
                        full = inputs(8, i, batch[cfg_rank])
                        outs.append(_usp(family, 8, full, sp_rank, ulysses, site, groups[cfg_rank]))
            finally:
                STATE.selection_log = None
            torch.save({"out": torch.stack(outs), "log": sorted(set(log)), "branch": batch[cfg_rank]},
                       os.path.join(out_dir, f"cfg_{family}_rank{rank}.pt"))
            undo()
            unsparsify(m)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def spawned(request, tmp_path_factory):
    """The gloo ranks' outputs (`_worker`) at `world` ranks: `(world, folder)`."""
    world = request.param
    out = tmp_path_factory.mktemp(f"xdit{world}")
    torch.multiprocessing.spawn(_worker, args=(world, str(out / "rendezvous"), str(out)), nprocs=world, join=True)
    return world, out


@pytest.fixture(scope="module")
def references():
    """The one-process sparse runs: `{(family, text_len): (outputs, counts, log)}` with one call per step, and
    `{family: ...}` with CFG as two calls per step (cond, uncond) at 8 text tokens."""
    refs = {(f, n): one_process(f, n) for f, n in CASES}
    refs.update({f: one_process(f, 8, BRANCHES) for f in BUILD})
    return refs


@pytest.mark.parametrize("balance", [False, True], ids=["head-order", "balanced"])
def test_xdit_ulysses_equals_one_process(spawned, references, balance):
    """xfuser's shards and all-to-all at 2 and 4 gloo ranks, the routed attention function: every token's output
    equals the one-process sparse run of the model in recipe head order (text interleaved or joined; a dense first
    step; mask reuse decided by all ranks); balanced, the heads arrive permuted and are compared as such."""
    world, out = spawned
    for family, text_len in CASES:
        ref, (selections, reused), _ = references[family, text_len]
        ref = ref["cond"]
        assert reused > 0 and selections > 0  # mask reuse acts in the one-process run
        q, k, v = inputs(text_len, 0)
        assert (ref[1] - F.scaled_dot_product_attention(*inputs(text_len, 1))).abs().max() > 1e-2  # sparse
        torch.testing.assert_close(ref[0], F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)  # dense step
        selections = 0
        for rank, idx in enumerate(xfuser_local(family, text_len, world)[0]):
            got = torch.load(out / f"{family}{text_len}_b{int(balance)}_rank{rank}.pt")
            assert (got["perm"] != list(range(HEADS))) == balance, (family, text_len, got["perm"])
            want = ref.index_select(2, torch.tensor(got["perm"])).index_select(3, idx)
            assert torch.equal(got["out"], want), (family, text_len, rank, (got["out"] - want).abs().max())
            selections += got["counts"][0]
        assert selections > 0  # (at 4 ranks in head order rank 0 holds only the dense heads: no selection)


def test_xdit_cfg_parallel_equals_one_process(spawned, references):
    """CFG parallel beside Ulysses (2 rank groups x world/2 Ulysses ranks, xfuser's rank order and batch split):
    each group's tokens equal its branch's calls in the one-process run with CFG as two calls, and each rank
    selects fresh masks at the same steps, under the same call slot, as that run does for its branch."""
    world, out = spawned
    for family in BUILD:
        ref, (_, reused), log = references[family]
        assert reused > 0
        fresh = {b: [e for e in log if e[1] == BRANCHES.index(b)] for b in BRANCHES}
        assert fresh["cond"] and fresh["uncond"]
        assert [e[0] for e in fresh["cond"]] != [e[0] for e in fresh["uncond"]]  # the branches reuse differently
        for rank in range(world):
            got = torch.load(out / f"cfg_{family}_rank{rank}.pt")
            idx = xfuser_local(family, 8, world // 2)[0][rank % (world // 2)]
            b = got["branch"]
            assert torch.equal(got["out"], ref[b].index_select(3, idx)), (family, rank, b)
            assert got["log"] == fresh[b], (family, rank, got["log"], fresh[b])


def test_route_serves_a_wrapped_site_and_leaves_other_calls():
    """One process: a site module wrapped by an xDiT-style module (`.module`, as CogVideoX's
    xFuserAttentionWrapper) runs sparse through the routed function; other calls run the engine function."""
    m = sparsify(tiny_cogvideox(HEADS), recipe("cogvideox"))
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


def _forward_kwargs(family: str) -> dict:
    """One forward's arguments of the tiny model of `family` on a (4, 8, 8) token grid with 8 text tokens."""
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=g),
              encoder_hidden_states=torch.randn(1, 8, 16, generator=g), return_dict=False)
    if family == "hunyuan_video":
        return dict(kw, timestep=torch.tensor([900.0]), encoder_attention_mask=torch.ones(1, 8),
                    pooled_projections=torch.randn(1, 8, generator=g))
    return dict(kw, timestep=torch.tensor([900]))


@pytest.mark.parametrize("family", list(BUILD))
def test_balance_xdit_families(family):
    """Head balancing on HunyuanVideo (joint blocks, and single-stream blocks whose output projection is the
    block's `proj_out` over [attention | MLP]) and CogVideoX: the balance ratio improves at 2 and 4 ranks, the
    balanced model computes the same function, and unsparsify restores every weight exactly."""
    m = BUILD[family](HEADS)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kw = _forward_kwargs(family)
    start = video_start(family, 8)
    with torch.no_grad():
        sparsify(m, recipe(family))
        ref = m(**kw)[0]
        for degree in (2, 4):
            plan = balance_heads(m, degree, GRID, video_start=start, text_len=8 - start)
            assert set(plan.perms) == set(SITES[family]), plan
            assert plan.ratio_before > 1.25 and plan.ratio_after < plan.ratio_before - 0.2, plan
            moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
            assert {f"{p}.{n}.weight" for p in SITES[family] for n in ("to_q", "to_k", "to_v")} <= moved
            if family == "hunyuan_video":
                assert "single_transformer_blocks.0.proj_out.weight" in moved
            torch.testing.assert_close(m(**kw)[0], ref, rtol=0, atol=1e-6)
            if degree == 2:
                unbalance_heads(m)
    unsparsify(m)  # undoes the balance of degree 4 too
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_balance_refuses_a_pre_only_site_of_unknown_output():
    """A pre-only attention (no output projection of its own) whose block has no proj_out over [attention | MLP]
    is refused before any weight moves."""
    m = sparsify(tiny_hunyuan(HEADS), recipe("hunyuan_video"))
    block = m.single_transformer_blocks[0]
    block.proj_out = torch.nn.Linear(HEADS * 16, HEADS * 16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.attn' has no output projection"):
            balance_heads(m, 2, GRID, text_len=8)
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    finally:
        unsparsify(m)


class _SpGroup:
    """The fields of xfuser's sequence-parallel group that `enable` reads (one process: Ulysses degree 1)."""

    ulysses_rank, ulysses_world_size, ulysses_group = 0, 1, None

    def __init__(self, ring: int = 1):
        self.ring_world_size = ring


def _stand_in_xfuser(monkeypatch, cfg_rank: int, cfg_degree: int, ring: int = 1) -> dict:
    """Put a stand-in of the `xfuser.core.distributed` names `enable` imports into `sys.modules`; return its
    attention function registry. Only our side of the integration runs: xfuser itself needs CUDA."""
    import types

    dist = types.ModuleType("xfuser.core.distributed")
    registry = {"sdpa": sdpa, "other": lambda q, k, v, **kw: (q, None)}
    dist.attention_backend = types.SimpleNamespace(ATTENTION_FUNCTION_REGISTRY=registry)
    dist.get_sp_group = lambda: _SpGroup(ring)
    dist.get_classifier_free_guidance_rank = lambda: cfg_rank
    dist.get_classifier_free_guidance_world_size = lambda: cfg_degree
    for name, mod in (("xfuser", types.ModuleType("xfuser")), ("xfuser.core", types.ModuleType("xfuser.core")),
                      ("xfuser.core.distributed", dist)):
        monkeypatch.setitem(sys.modules, name, mod)
    return registry


class _Wrapper(torch.nn.Module):
    """xDiT's takeover of a transformer: a wrapper whose `.module` is the diffusers model and runs its forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_enable_routes_xfusers_attention_sets_the_cfg_branch_and_unsparsify_restores(monkeypatch):
    """`enable` against a stand-in of xfuser's parallel-state API: every registered attention function is routed
    (a sparsified site's call runs sparsify's op, other calls the function itself), each forward of the wrapper
    runs as the guidance branch of its CFG rank (rank 0: the unconditional half, call 1), a ring degree > 1 is
    refused when a site runs, and `unsparsify` puts the registry and the model back."""
    from sparsify.parallel import RingAttentionError
    from sparsify.parallel.xdit import enable
    from sparsify.runtime import call_slot, site_state

    registry = _stand_in_xfuser(monkeypatch, cfg_rank=0, cfg_degree=2)
    saved = dict(registry)
    m = sparsify(tiny_cogvideox(HEADS), recipe("cogvideox"))
    wrapped = _Wrapper(m)
    enable(wrapped)
    try:
        assert all(registry[n]._sparsify_routed is saved[n] for n in saved)
        seen = []
        hook = m.register_forward_pre_hook(lambda mod, args: seen.append((STATE.guidance, call_slot(0))))
        with torch.no_grad():
            wrapped(**_forward_kwargs("cogvideox"))
        hook.remove()
        assert seen == [((1, 2), 1)] and STATE.guidance is None
        site = m.get_submodule(SITES["cogvideox"][0])._sparsify_site
        q, k, v = inputs(8, 1)
        new_generation()
        outs = []
        for t in TIMESTEPS[:2]:  # the recipe's first step is dense
            STATE.geometry = (*GRID, 0)
            set_timestep(torch.tensor([float(t)]))
            STATE.stack.append(site)
            try:
                outs.append(registry["sdpa"](q, k, v)[0])
            finally:
                STATE.stack.pop()
        torch.testing.assert_close(outs[0], sdpa(q, k, v)[0], rtol=0, atol=1e-6)
        assert site_state(site).selections > 0 and (outs[1] - sdpa(q, k, v)[0]).abs().max() > 1e-2  # sparse
        assert registry["other"](q, k, v)[0] is q  # outside a site: the function itself
        monkeypatch.setattr(sys.modules["xfuser.core.distributed"], "get_sp_group", lambda: _SpGroup(ring=2))
        STATE.stack.append(site)
        try:
            with pytest.raises(RingAttentionError):
                registry["sdpa"](q, k, v)
        finally:
            STATE.stack.pop()
    finally:
        unsparsify(m)
    assert registry == saved
