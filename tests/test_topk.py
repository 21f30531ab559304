"""CPU tests (Triton interpreter) of the row top-k kernel `topk_indices`, exact to a stable descending sort."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparsify.kernels import gather as G  # noqa: E402
from sparsify.kernels.tile_select import topk_indices  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _interpret():
    with G.interpreter():
        yield


def reference(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Top-k indices sorted by score, ties by lower index (a stable descending sort), 0 past ks[h]."""
    H, max_kv = scores.shape[1], max(ks)
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :max_kv].to(torch.int32)
    live = torch.arange(max_kv) < torch.tensor(ks).view(1, H, 1, 1)
    return torch.where(live, idx, torch.zeros_like(idx))


def _kernel_cases():
    g = torch.Generator().manual_seed(0)
    ninf = torch.randn(1, 2, 3, 77, generator=g)
    ninf[..., ::2] = float("-inf")
    few = torch.full((1, 1, 2, 40), float("-inf"))
    few[..., 5] = 1.0
    few[..., 30] = 2.0
    big = torch.randn(1, 1, 2, 90, generator=g) * 1e30
    return {
        "random": (torch.randn(1, 2, 3, 100, generator=g), [5, 17]),
        "ties": (torch.randint(0, 4, (1, 2, 3, 70), generator=g).float(), [10, 33]),
        "ties_window": (torch.randint(0, 50, (1, 1, 4, 64), generator=g).float(), [3]),  # ties fill the 16 slots
        "neg_inf": (ninf, [40, 9]),
        "neg_inf_k": (few, [6]),  # k above the number of finite scores
        "all_equal": (torch.full((1, 1, 2, 40), 0.25), [7]),
        "zeros_signed": (torch.tensor([0.0, -0.0] * 20).view(1, 1, 1, 40), [11]),
        "odd_nk_k1": (torch.randn(1, 1, 4, 45, generator=g), [1]),
        "k_eq_nk": (torch.randn(2, 1, 2, 64, generator=g), [64]),
        "heads_B2": (torch.randn(2, 3, 2, 200, generator=g), [1, 100, 128]),
        "huge": (big, [12]),
        "k_over_128": (torch.randn(1, 1, 1, 300, generator=g), [200]),
    }


def _fallback_cases():  # no ties: torch.topk's order is the stable sort's
    g = torch.Generator().manual_seed(1)
    return {
        "nk_below_32": (torch.randn(2, 2, 3, 20, generator=g), [3, 20]),
        "k_over_256": (torch.randn(1, 2, 2, 400, generator=g), [300, 5]),
    }


KERNEL_CASES = _kernel_cases()
FALLBACK_CASES = _fallback_cases()


def _no_topk(*args, **kwargs):
    raise AssertionError("torch.topk called: the kernel should serve this case")


@pytest.mark.parametrize("case", list(KERNEL_CASES) + list(FALLBACK_CASES))
def test_topk_matches_stable_sort(case, monkeypatch):
    kernel = case in KERNEL_CASES
    scores, ks = KERNEL_CASES[case] if kernel else FALLBACK_CASES[case]
    want = reference(scores, ks)
    if kernel:
        monkeypatch.setattr(torch, "topk", _no_topk)
    out = topk_indices(scores, ks)
    assert out.dtype == torch.int32 and out.shape == (*scores.shape[:3], max(ks)) and out.is_contiguous()
    assert torch.equal(out, want), case


def test_topk_rejects_bad_k():
    for ks in ([41], [0], [3, 3]):
        with pytest.raises(ValueError, match="one k"):
            topk_indices(torch.randn(1, 1, 1, 40), ks)
