"""Sequence parallelism: diffusers Ulysses on CPU/gloo against the one-process sparse run, and head balancing."""

from __future__ import annotations

import os
import types

import pytest
import torch

from sparsify import sparsify, unsparsify
from sparsify.parallel import (RingAttentionError, assign_heads, balance_heads, balance_ratio, head_costs,
                               unbalance_heads)
from sparsify.recipe import Budget, HeadConfig
from sparsify.testing.dits import tiny_wan

HEADS, HEAD_DIM, LATENT = 8, 16, (8, 16, 16)  # tokens (8, 8, 8): 8 tiles of 64 per head
GRID = (8, 8, 8)
DENSITIES = [1.0, 0.5, 0.25, 1.0, 0.125, 0.125, 0.25, 0.125]  # 8x apart; in head order rank 0 gets the costly ones
TIMESTEPS = (999, 800, 600, 400)


def recipe(reuse: bool) -> dict:
    """Per-head densities, two tile shapes and a dense head (so head groups straddle ranks), one dense step."""
    heads = [{"head": h, "density": d} for h, d in enumerate(DENSITIES)]
    heads[2]["tile"] = heads[6]["tile"] = [1, 8, 8]
    heads[3]["method"] = "dense"
    defaults = {"tile": [4, 4, 4], "budget": {"density": 0.25}, "dense_steps": 1}
    if reuse:
        defaults["mask_reuse"] = {"threshold": 0.01, "max_age": 2}  # some groups reuse, some do not
    return {"version": 1, "defaults": defaults, "sites": {f"blocks.{i}.attn1": {"heads": heads} for i in range(2)}}


def model():
    return tiny_wan(layers=2, heads=HEADS, head_dim=HEAD_DIM)


def generate(m, steps: int = len(TIMESTEPS)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, *LATENT, generator=g), torch.randn(1, 8, 16, generator=g)
    with torch.no_grad():
        return torch.stack([m(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=ctx,
                              return_dict=False)[0] for t in TIMESTEPS[:steps]])


# (sparsify before enable_parallelism?, balance heads?, mask reuse?)
CASES = [(True, False, True), (False, True, True)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    torch.accelerator.device_count = lambda: 1  # diffusers picks `rank % device_count()` as the device index
    torch.set_num_threads(1)  # ranks share the CPU cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (first, balance, reuse) in enumerate(CASES):
            m = model()
            if not first:
                m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            sparsify(m, recipe(reuse))
            if balance:
                balance_heads(m, world, GRID)
            if first:
                m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            out = generate(m)
            sites = [(st.selections, st.reused) for st in m._sparsify.sites]
            torch.save({"out": out, "sites": sites}, os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    refs = {}
    m = sparsify(model(), recipe(True))
    refs[True] = generate(m)
    refs[True, "reused"] = sum(st.reused for st in m._sparsify.sites)
    unsparsify(m)  # nothing installed leaks into later test modules
    refs["dense"] = generate(model())
    return refs


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ulysses_equals_one_process(world, references, tmp_path, free_port):
    """Every rank's output equals the one-process sparse run: exactly without head balancing; with it within
    1e-6 (the permuted output projection sums its inputs in another order, as does the reference kernel over
    differently composed head groups)."""
    torch.multiprocessing.spawn(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, join=True)
    assert (references[True] - references["dense"]).abs().max() > 1e-2  # sparsity changes the output
    assert references[True, "reused"] > 0  # mask reuse acts in the one-process run
    ref = references[True]
    for i, (_, balance, _) in enumerate(CASES):
        for rank in range(world):
            got = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            if balance:
                torch.testing.assert_close(got["out"], ref, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got["out"], ref), (i, rank, (got["out"] - ref).abs().max())


def test_ring_attention_refused():
    """Ring attention is refused when sparsify() meets it, and by the op when it is enabled afterwards."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    m = model()
    ring = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    m.blocks[1].attn1.processor._parallel_config = ring
    with pytest.raises(RingAttentionError, match=r"blocks\.1\.attn1.*ring_degree=2.*ulysses_degree=P"):
        sparsify(m, recipe(False))
    assert getattr(m, "_sparsify", None) is None and "forward" not in vars(m.blocks[0].attn1)
    m.blocks[1].attn1.processor._parallel_config = None
    sparsify(m, recipe(False))
    m.blocks[1].attn1.processor._parallel_config = ring
    with pytest.raises(RingAttentionError, match="ring_degree=2"):
        m._sparsify.sites[1].head_offset(HEADS)
    unsparsify(m)


def test_balance_permutes_and_unsparsify_restores_exactly():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dense_out = generate(m, 2)
    sparsify(m, recipe(False))
    ref = generate(m, 2)
    plan = balance_heads(m, 2, GRID)
    assert plan.ratio_before > 1.5 and plan.ratio_after < 1.05, plan
    assert set(plan.perms) == {"blocks.0.attn1", "blocks.1.attn1"}
    st = m._sparsify.sites[0]
    perm = plan.perms[st.path]
    assert [c.budget.density for c in st.configs[:1]] == [DENSITIES[perm[0]]]
    assert not torch.equal(m.blocks[0].attn1.to_q.weight, before["blocks.0.attn1.to_q.weight"])
    torch.testing.assert_close(generate(m, 2), ref, rtol=0, atol=1e-6)  # same model function, heads reordered
    unbalance_heads(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    balance_heads(m, 4, GRID)
    unsparsify(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(generate(m, 2), dense_out)


def test_balance_ratio_wan14b_heads():
    """40 heads whose densities vary 8x (top-k, 4x4x4 tiles at 720p): balancing reaches <= 1.05 at 2 and 4 ranks."""
    g = torch.Generator().manual_seed(0)
    dens = (0.025 * 2 ** (3 * torch.rand(40, generator=g))).tolist()  # 2.5% .. 20%
    dens[0], dens[1] = 0.025, 0.2
    costs = head_costs([HeadConfig(budget=Budget(density=d)) for d in dens], (21, 45, 80))
    assert max(costs) / min(costs) >= 4
    for degree in (2, 4):
        perm = [h for b in assign_heads(costs, degree) for h in b]
        assert sorted(perm) == list(range(40))
        assert balance_ratio(costs, degree, perm) <= 1.05
    assert balance_ratio(sorted(costs), 4) > 1.5  # sorted heads: the contrast balancing removes


def test_head_offset_errors():
    m = sparsify(model(), recipe(False))
    st = m._sparsify.sites[0]
    with pytest.raises(RuntimeError, match="installed for 8 heads but is called with 4"):
        st.head_offset(4)
    st.shard = lambda: (1, 2, None)
    assert st.head_offset(4) == 4
    with pytest.raises(RuntimeError, match="Ulysses degree 2"):
        st.head_offset(2)
    unsparsify(m)
