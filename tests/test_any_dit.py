"""Any DiT: hand-written attention spellings, dense masks, and geometry inferred without an adapter."""

import pytest
import torch
import torch.nn.functional as F

from sparsify import find_sites, installed_sites, sparsify, unsparsify
from sparsify.testing import dits

GRID = (4, 8, 8)


def recipe(density, tile=(1, 8, 8)):
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}}}


def run(m, inputs):
    with torch.no_grad():
        out = m(*inputs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(dits.SPELLINGS))
def test_spelling_is_found_rewritten_exact_and_sparse(name):
    m = dits.spelling_dit(name)
    inputs = dits.dit_inputs(GRID, batch=2)
    sites, _ = find_sites(m, inputs, grid=GRID)
    video = {s.path: (s.kind, s.heads, s.head_dim) for s in sites if s.kind == "self"}
    assert video == {"blocks.0.attn": ("self", 2, 16), "blocks.1.attn": ("self", 2, 16)}
    ref = run(m, inputs)
    sparsify(m, recipe(1.0), example_inputs=inputs, grid=GRID)
    out = run(m, inputs)
    assert all(s.calls >= 1 for s in installed_sites(m))  # the op ran at every site
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), ref, atol=1e-5, rtol=0)
    unsparsify(m)
    torch._dynamo.reset()

    sparsify(m, recipe(0.25), example_inputs=inputs, grid=GRID)
    sparse = run(m, inputs)
    sites = installed_sites(m)
    assert torch.isfinite(sparse).all() and (sparse - ref).abs().max() > 1e-3
    assert all(0 < s.density < 0.5 for s in sites), [s.density for s in sites]
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), sparse, atol=1e-5, rtol=0)
    unsparsify(m)
    torch._dynamo.reset()
    torch.testing.assert_close(run(m, inputs), ref, atol=0, rtol=0)
