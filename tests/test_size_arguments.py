"""Geometry of models fed patchified tokens, read from their num_frames/height/width forward arguments."""

import pytest
import torch

from sparsify import find_sites, installed_sites, sparsify, unsparsify
from sparsify.testing import dits

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(density):
    return {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": density}}}


def tokens(grid, seed=0):
    return torch.randn(1, grid[0] * grid[1] * grid[2], 4, generator=torch.Generator().manual_seed(seed))


def test_grid_is_read_from_the_size_arguments_at_every_call():
    m = dits.tokens_dit()
    kw = {"hidden_states": tokens((4, 8, 8)), "num_frames": 4, "height": 8, "width": 8}
    sites, adapter = find_sites(m, kw)
    assert adapter.source == "forward arguments num_frames, height, width" and adapter.patch == (1, 1, 1)
    assert {s.path: s.kind for s in sites} == {"blocks.0.attn": "self", "blocks.1.attn": "self"}
    other = (tokens((2, 8, 16), seed=1), 2, 8, 16)  # another grid, passed positionally
    with torch.no_grad():
        ref = m(*other)
        sparsify(m, recipe(1.0), example_inputs=kw)
        torch.testing.assert_close(m(*other), ref, atol=1e-5, rtol=0)
        unsparsify(m)
        sparsify(m, recipe(0.25), example_inputs=kw)
        out = m(*other)
    assert adapter.geometry(m, other, {}).grid == (2, 8, 16)
    assert all(s.density < 0.5 for s in installed_sites(m))
    unsparsify(m)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3


def test_sizes_that_do_not_match_the_tokens_infer_nothing():
    from sparsify.adapters.infer import infer_adapter

    m = dits.tokens_dit()
    assert infer_adapter(m, {"hidden_states": tokens((4, 8, 8)), "num_frames": 4, "height": 8, "width": 4}) is None
