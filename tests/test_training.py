"""Trainable VSA: gated coarse branch, its gradients against an independent dense-masked formula, compile, ramp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.testing import dits
from sparsify import installed_sites, sparsify, unsparsify
from sparsify.adapters import adapter_for
from sparsify.geometry import tile_layout
from sparsify.training import SparsityRamp, add_vsa_gates, attention_work, set_density, vsa_gates

GRID, TILE = (4, 4, 16), (1, 4, 16)  # 256 tokens, 4 tiles of 64
S = GRID[0] * GRID[1] * GRID[2]


def _recipe(density, tile=TILE):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}}}


def _sparse_dit(density=0.5, dtype=torch.float64):
    m = dits.named_sdpa_dit().to(dtype)
    inputs = tuple(t.to(dtype) for t in dits.dit_inputs(GRID))
    sparsify(m, _recipe(density), example_inputs=inputs, grid=GRID)
    return m, inputs


def vsa_dense_masked(q, k, v, gate, grid, tile, density):
    """VSA written independently: tile means by one-hot pooling, top-k tiles, dense attention under the
    token mask, plus gate * (softmax of tile-mean scores) @ tile-mean v broadcast to each token."""
    T, H, W = grid
    tt, th, tw = tile
    nh, nw = math.ceil(H / th), math.ceil(W / tw)
    t, h, w = (torch.arange(n) for n in grid)
    tile_of = ((t.view(-1, 1, 1) // tt * nh + h.view(1, -1, 1) // th) * nw + w.view(1, 1, -1) // tw).reshape(-1)
    n = int(tile_of.max()) + 1
    pool = F.one_hot(tile_of, n).to(q.dtype).T  # [n, S]
    pool = pool / pool.sum(-1, keepdim=True)
    qm, km, vm = (pool @ x for x in (q, k, v))  # [B, H, n, D]
    d = q.shape[-1]
    scores = qm @ km.transpose(-1, -2) / math.sqrt(d)
    keep = math.ceil(density * n)
    top = scores.topk(keep, dim=-1).indices
    blocks = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    mask = blocks[:, :, tile_of][:, :, :, tile_of]  # [B, H, S, S]
    s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    fine = torch.softmax(s, -1) @ v
    coarse = (torch.softmax(scores, -1) @ vm)[:, :, tile_of]
    return fine if gate is None else fine + gate * coarse


def _op(site, gate=None):
    return lambda q, k, v, *g: torch.ops.sparsify.sparse_attention(q, k, v, site, [*GRID, 0], None, None, None,
                                                                   g[0] if g else gate)


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_gated_op_matches_dense_masked_formula_values_and_grads(density):
    m, _ = _sparse_dit(density)
    site = m.blocks[0].attn._sparsify_site
    g = torch.Generator().manual_seed(1)
    q, k, v, gate = (torch.randn(2, 2, S, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    up = torch.randn(2, 2, S, 16, generator=g, dtype=torch.float64)
    out = _op(site)(q, k, v, gate)
    ref = vsa_dense_masked(q, k, v, gate, GRID, TILE, density)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # tile means accumulate in float32 (pool_tiles)
    got = torch.autograd.grad(out, (q, k, v, gate), up)
    want = torch.autograd.grad(ref, (q, k, v, gate), up)
    for a, b, name in zip(got, want, "qkvg"):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    unsparsify(m)


def test_gated_op_gradcheck_float64():
    m, _ = _sparse_dit(0.5)
    site = m.blocks[1].attn._sparsify_site
    g = torch.Generator().manual_seed(2)
    args = tuple(torch.randn(1, 2, S, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(_op(site), args, fast_mode=True)
    assert torch.autograd.gradcheck(_op(site), args[:3], fast_mode=True)  # no gate: pure sparse
    unsparsify(m)


def test_op_opcheck_with_gate():
    m, _ = _sparse_dit(0.5, torch.float32)
    site = m.blocks[0].attn._sparsify_site
    q, k, v, gate = (torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(4))
    torch.library.opcheck(torch.ops.sparsify.sparse_attention.default, (q, k, v, site, [*GRID, 0], None, None, None, gate))
    unsparsify(m)


def test_without_gates_nothing_changes_and_zero_gate_is_exact():
    m, inputs = _sparse_dit(0.5)
    with torch.no_grad():
        plain = m(*inputs)
    before = set(m.state_dict())
    add_vsa_gates(m)
    assert set(m.state_dict()) - before == {f"blocks.{i}.attn.to_gate_compress.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert all(float(p.detach().abs().sum()) == 0 for gmod in vsa_gates(m).values() for p in gmod.parameters())  # zero init
    with torch.no_grad():
        torch.testing.assert_close(m(*inputs), plain, atol=0, rtol=0)  # zero gate: pure sparse attention
        torch.nn.init.normal_(m.blocks[0].attn.to_gate_compress.weight)
        gated = m(*inputs)
    assert (gated - plain).abs().max() > 1e-3
    # the op without a gate argument is the pre-existing op
    site = m.blocks[0].attn._sparsify_site
    q, k, v = (torch.randn(1, 2, S, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(_op(site)(q, k, v), vsa_dense_masked(q, k, v, None, GRID, TILE, 0.5), atol=1e-10, rtol=0)
    # gates are saved with the model and survive unsparsify, and a re-sparsified model reuses them
    state = {k_: t.clone() for k_, t in m.state_dict().items()}
    unsparsify(m)
    assert set(m.state_dict()) == set(state)
    sparsify(m, _recipe(0.5), example_inputs=inputs, grid=GRID)
    add_vsa_gates(m)
    with torch.no_grad():
        torch.testing.assert_close(m(*inputs), gated, atol=0, rtol=0)
    unsparsify(m)


def test_gate_gets_gradients_through_the_model_and_density_control():
    m, inputs = _sparse_dit(1.0)
    add_vsa_gates(m)
    x = inputs[0].clone().requires_grad_(True)
    m(x, inputs[1]).square().mean().backward()
    for path, gmod in vsa_gates(m).items():
        assert gmod.weight.grad is not None and gmod.weight.grad.abs().sum() > 0, path
    assert x.grad.abs().sum() > 0
    set_density(m, 0.25)
    w0, d0 = attention_work(m)
    with torch.no_grad():
        m(*inputs)
    w1, d1 = attention_work(m)
    # 1 of 4 tiles per query tile, plus the tile-level coarse branch
    assert (w1 - w0) / (d1 - d0) == pytest.approx(0.25 + (4 / S) ** 2)
    assert all(c.budget.density == 0.25 for st in installed_sites(m) for c in st.configs)
    with pytest.raises(ValueError, match="density"):
        set_density(m, 0.0)
    unsparsify(m)


def test_backward_leaves_work_counters_as_the_forward_left_them():
    m, inputs = _sparse_dit(0.5)
    add_vsa_gates(m)
    x = inputs[0].clone().requires_grad_(True)
    out = m(x, inputs[1])
    counts = [(s.calls, s.work, s.dense_work) for s in installed_sites(m)]
    out.sum().backward()
    assert [(s.calls, s.work, s.dense_work) for s in installed_sites(m)] == counts
    unsparsify(m)


def test_gates_refused_where_they_cannot_work():
    with pytest.raises(RuntimeError, match="not sparsified"):
        add_vsa_gates(dits.named_sdpa_dit())
    m = dits.manual_dit()
    inputs = dits.dit_inputs(GRID)
    sparsify(m, _recipe(0.5), example_inputs=inputs, grid=GRID)
    with pytest.raises(RuntimeError, match="cannot host a VSA gate"):
        add_vsa_gates(m)
    unsparsify(m)
    m = dits.named_sdpa_dit()
    sparsify(m, {**_recipe(0.5), "defaults": {**_recipe(0.5)["defaults"], "dense_steps": 2}}, example_inputs=inputs,
             grid=GRID)
    with pytest.raises(RuntimeError, match="inference-only"):
        add_vsa_gates(m)
    unsparsify(m)


def test_sparsity_ramp():
    ramp = SparsityRamp(final_density=0.1, ramp_steps=100, interval=10)
    ds = [ramp.density(s) for s in range(150)]
    assert ds[0] == 1.0 and ds[9] == 1.0 and ds[10] == pytest.approx(0.91)
    assert all(a >= b for a, b in zip(ds, ds[1:])) and ds[100] == pytest.approx(0.1) and ds[149] == pytest.approx(0.1)
    # FastVideo's VSA_sparsity 0.9, decay_rate 0.03, interval 30: 0.03 more sparsity every 30 steps
    vsa = SparsityRamp(final_density=0.1, ramp_steps=900, interval=30)
    assert vsa.density(59) == pytest.approx(0.97) and vsa.density(60) == pytest.approx(0.94)
    assert SparsityRamp(0.2).density(0) == 0.2
    with pytest.raises(ValueError):
        SparsityRamp(final_density=0.0)


def _wan_train_steps(backend: str | None, steps=2):
    grid = (4, 8, 8)  # 256 tokens, 4 tiles of (4, 4, 4)
    m = dits.tiny_wan(layers=2).train()
    sparsify(m, _recipe(1.0, tile=(4, 4, 4)))
    add_vsa_gates(m)
    torch.manual_seed(0)
    for gmod in vsa_gates(m).values():  # non-zero gates so that the coarse branch matters from step 0
        torch.nn.init.normal_(gmod.weight, std=0.05)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    if backend is not None:
        m.compile_repeated_blocks(fullgraph=True, backend=backend)
    ramp = SparsityRamp(final_density=0.25, ramp_steps=1, interval=1)
    kw = adapter_for(m).example_inputs(m, grid=grid, batch=2)
    target = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    losses, grads = [], None
    for step in range(steps):
        ramp.apply(m, step)
        loss = F.mse_loss(m(**kw)[0], target)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    unsparsify(m)
    return losses, grads


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_training_step_compiled_matches_eager(backend):
    """compile_repeated_blocks(fullgraph=True): forward + backward + AdamW, with gates and a density change."""
    eager_losses, eager_grads = _wan_train_steps(None)
    torch._dynamo.reset()
    comp_losses, comp_grads = _wan_train_steps(backend)
    assert eager_losses[0] != eager_losses[1]
    torch.testing.assert_close(comp_losses, eager_losses, atol=1e-5, rtol=1e-5)
    assert set(comp_grads) == set(eager_grads) and any("to_gate_compress" in n for n in eager_grads)
    for n, g in eager_grads.items():
        torch.testing.assert_close(comp_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_testbed_train_vsa_mode_logs_density_and_work(tmp_path):
    pytest.importorskip("safetensors")
    import csv

    from tools.train_testbed import TrainConfig, train

    cfg = TrainConfig(steps=3, batch=1, out=str(tmp_path), device="cpu", latent_shape=(4, 8, 8, 16), log_every=1,
                      eval_every=0, warmup=1, eval_batch=1, attention="vsa", final_density=0.25, ramp_steps=1)
    summary = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert [float(r["density"]) for r in rows] == [1.0, 0.25, 0.25]  # grid 8x4x8: 4 tiles of 4x4x4
    works = [float(r["attn_work"]) for r in rows]
    assert works[0] > 1.0 and works[2] == pytest.approx(1 / 4 + (4 / 256) ** 2, abs=1e-4)  # + coarse; 1 of 4 tiles
    comp = summary["compute"]
    assert comp["attention"] == "vsa" and comp["train_flops_per_step_last"] < comp["train_flops_per_step_dense"]
    from safetensors.torch import load_file

    assert any("to_gate_compress" in k for k in load_file(str(tmp_path / "testbed_wan.safetensors")))
    assert not installed_sites_of_any()  # the run released its sites


def installed_sites_of_any():
    from sparsify import runtime

    return list(runtime.STATE.sites)


def test_docstring_examples_of_training():
    import doctest

    import sparsify.training

    result = doctest.testmod(sparsify.training, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 4
