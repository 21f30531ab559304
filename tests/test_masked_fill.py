"""Score edits before a hand-written softmax: only those that are masks match (serving: tests/test_any_dit.py)."""

import pytest
import torch

from sparsify.passes.discover import capture_graphs
from sparsify.passes.patterns import find_attention


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
