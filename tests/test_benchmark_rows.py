"""The attention benchmark's per-method rows (whole op and selection alone), run on the CPU at a tiny size."""

import pytest
import torch

from benchmarks import attention, whole_op


@pytest.mark.parametrize("method", ["vsa", "veda", "xattention", "svg2"])
def test_op_and_select_rows_run_each_method(monkeypatch, method):
    from sparsify import runtime

    monkeypatch.setattr(runtime.STATE, "sites", dict(runtime.STATE.sites))  # the op rows' sites go with the test
    monkeypatch.setattr(attention, "_ROWS", {})
    monkeypatch.setattr(attention, "_NO_ERR", set())
    grid = (4, 8, 8)
    monkeypatch.setattr(whole_op, "GRIDS", {256: grid})
    whole_op.register_op_rows(method)
    assert set(attention._ROWS) == {f"op {method} 4x4x4", f"select {method} 4x4x4"} == attention._NO_ERR
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g) for _ in range(3))
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int32)
    case = attention.Case("tiny", 1, 2, 256, 64, (128, 128), 0.25, 1, 2, q, k, v, idx, idx[..., 0] + 1)
    out = attention._ROWS[f"op {method} 4x4x4"](case)()
    assert out.shape == q.shape and torch.isfinite(out).all()
    sel = attention._ROWS[f"select {method} 4x4x4"](case)()
    cnt = sel.kv_counts if hasattr(sel, "kv_counts") else sel[1]
    assert (cnt > 0).all()
    other = attention.Case("other", 1, 2, 300, 64, (128, 128), 0.25, 1, 3, q, k, v, idx, idx[..., 0] + 1)
    assert attention._ROWS[f"op {method} 4x4x4"](other) is None  # no Wan grid of that length: the row is skipped
