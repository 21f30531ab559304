"""Coverage of diffusers' video transformers: each is served from a tiny config, or listed with the reason."""

import pytest
import torch

from sparsify.inspect import coverage_row
from sparsify.testing import dits

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EXPECTED_KINDS = {
    "WanTransformer3DModel": {"self": 2, "cross": 2},
    "WanVACETransformer3DModel": {"self": 3, "cross": 3},
    "SkyReelsV2Transformer3DModel": {"self": 2, "cross": 2},
    "HunyuanVideoTransformer3DModel": {"joint": 2, "text": 1},
    "CogVideoXTransformer3DModel": {"joint": 2},
    "AllegroTransformer3DModel": {"self": 2, "cross": 2},
    "EasyAnimateTransformer3DModel": {"joint": 2},
    "Kandinsky5Transformer3DModel": {"text": 1, "self": 2, "cross": 2},
    "ChronoEditTransformer3DModel": {"self": 2, "cross": 2},
    "HeliosTransformer3DModel": {"self": 2, "cross": 2},
    "ConsisIDTransformer3DModel": {"joint": 2},
    "MotifVideoTransformer3DModel": {"joint": 2},
    "AnyFlowTransformer3DModel": {"self": 2, "cross": 2},
    "WanAnimateTransformer3DModel": {"self": 2, "cross": 3},  # text x2, face adapter
    "JoyImageEditTransformer3DModel": {"joint": 2},
    "Kandinsky6Transformer3DModel": {"text": 4, "self": 2, "cross": 8},  # text encoders, audio self-attention
    "SanaWMTransformer3DModel": {"self": 1, "cross": 2},  # block 0: gated-delta-net linear attention
    "LatteTransformer3DModel": {"self/spatial": 2, "self/temporal": 2, "cross": 2},
    "LTXVideoTransformer3DModel": {"self": 2, "cross": 2},
    "LTX2VideoTransformer3DModel": {"self": 2, "text": 2, "cross": 8},  # audio self-attention: "text" (not video)
}


def test_every_video_transformer_is_covered_or_listed_with_a_reason():
    installed = set(dits.diffusers_video_classes())
    covered, listed = set(dits.DIFFUSERS_VIDEO), set(dits.DIFFUSERS_VIDEO_UNSUPPORTED)
    assert not covered & listed
    assert installed == covered | listed, (installed - covered - listed, (covered | listed) - installed)
    assert all(reason for reason in dits.DIFFUSERS_VIDEO_UNSUPPORTED.values())


@pytest.mark.parametrize("name", sorted(dits.DIFFUSERS_VIDEO))
def test_video_transformer_is_served_without_grid(name):
    row = coverage_row(name)
    assert row["sites"] == EXPECTED_KINDS[name]
    grid = dits.COVERAGE_GRIDS.get(name, dits.COVERAGE_GRID)
    assert row["geometry"].startswith("inferred from") and f"grid {grid}" in row["geometry"]
    assert row["error"] <= 1e-5 and row["changed"] > 1e-4, row
    full = row["sites"].get("self", 0) + row["sites"].get("joint", 0)
    assert len(row["video_spans"]) == full
    assert all(span == row["expected_span"] for span in row["video_spans"].values()), row
    assert row["status"] == "ok"
    torch._dynamo.reset()


def test_a_wrongly_inferred_video_offset_fails_the_row(monkeypatch):
    from sparsify.adapters import infer

    real = infer.find_sites_inferred

    def video_first(model, inputs, unplaced=None):  # CogVideoX puts its 8 text tokens first: offset 0 is wrong
        sites, adapter = real(model, inputs, unplaced)
        adapter.video_start = 0
        return sites, adapter

    monkeypatch.setattr(infer, "find_sites_inferred", video_first)
    row = coverage_row("CogVideoXTransformer3DModel")
    assert row["expected_span"] == (8, 256) and set(row["video_spans"].values()) == {(0, 256)}
    assert row["status"].startswith("FAILED (video span"), row["status"]
    torch._dynamo.reset()
