"""Masks written as `scores.masked_fill(mask, -inf)` before the softmax: found, served like SDPA masks."""

import warnings

import pytest
import torch

from sparsify import find_sites, installed_sites, sparsify, unsparsify
from sparsify.passes.discover import capture_graphs
from sparsify.passes.patterns import find_attention
from sparsify.testing import dits

GRID = (4, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")
MASKS = {"padding": dits.padding_mask(4), "block": dits.block_mask(4), "random": dits.random_mask(6 + 4 * 8 * 8)}


def recipe(density):
    return {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": density}}}


def run(m, inputs):
    with torch.no_grad():
        return m(*inputs)


@pytest.mark.parametrize("style", ["masked_fill", "masked_fill_", "finite"])
@pytest.mark.parametrize("name", list(MASKS))
def test_masked_fill_mask_is_served_like_an_sdpa_mask(name, style):
    m = dits.masked_fill_dit(MASKS[name], style)
    inputs = dits.dit_inputs(GRID, batch=2)
    kw = {"example_inputs": inputs, "grid": GRID, "video_start": m.n_text}
    sites, _ = find_sites(m, inputs, grid=GRID, video_start=m.n_text)
    assert {s.path: (s.kind, s.has_mask, s.impl) for s in sites} == {
        "attns.0": ("joint", True, "manual"), "attns.1": ("joint", True, "manual")}
    ref = run(m, inputs)
    sparsify(m, recipe(1.0), **kw)
    torch.testing.assert_close(run(m, inputs), ref, atol=1e-5, rtol=0)
    unsparsify(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sparsify(m, recipe(0.25), **kw)
        out = run(m, inputs)
        density = [s.density for s in installed_sites(m)]
        unsparsify(m)
    dense_warnings = [x for x in w if "not a key-padding mask" in str(x.message)]
    if name == "random":  # no structure: dense, exactly the original, one warning per site
        assert len(dense_warnings) == 2 and density == [1.0, 1.0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:  # key padding in disguise, or text/video blocks: sparse
        assert not dense_warnings and all(d < 0.6 for d in density), density
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    torch.testing.assert_close(run(m, inputs), ref, atol=0, rtol=0)


class _Scores(torch.nn.Module):
    def __init__(self, edit):
        super().__init__()
        self.edit = edit

    def forward(self, q, k, v, blocked):
        s = q @ k.transpose(-2, -1) * 0.25
        s = self.edit(s, blocked)
        return s.softmax(-1) @ v


def _in_place_fill_after_scale(s, blocked):
    s.masked_fill_(blocked, float("-inf"))
    return s


def _set_items(s, blocked):
    s[blocked] = float("-inf")
    return s


def _mild_fill(s, blocked):
    return s.masked_fill(blocked, -5.0)  # a bias, not a mask


def _scaled_finite_fill(s, blocked):
    return s.masked_fill(blocked, -1e9) * 1e-6  # the scale shrinks the fill: not a mask any more


@pytest.mark.parametrize("edit, masked", [(_in_place_fill_after_scale, True), (_set_items, None), (_mild_fill, None),
                                           (_scaled_finite_fill, None)])
def test_only_score_edits_that_are_masks_are_matched(edit, masked):
    """Matched with a mask only where the edit removes keys exactly as SDPA's bool mask does; any other edit of
    the scores (in place, a soft bias, a fill undone by a scale) is no attention we can replace."""
    q = torch.randn(1, 2, 8, 4)
    blocked = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    blocked[..., 5:] = True
    graphs = capture_graphs(_Scores(edit), (q, q.clone(), q.clone(), blocked))
    matches = [m for gm in graphs for m in find_attention(gm.graph) if m.impl == "manual"]
    assert (len(matches) == 1 and matches[0].attn_mask is not None) if masked else not matches
