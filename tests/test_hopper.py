"""The Gluon Hopper kernel on the CPU box: compiled ahead of time for sm_90, its `supports` gate and the dispatch."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
hopper = pytest.importorskip("sparsify.kernels.hopper", reason="this triton has no (compatible) Gluon")


def _compile(dtype: str, kernel: str):
    """`triton.compile` of the 128x128 ping-pong kernel (`hopper`) or the 64x64 one (`hopper64`) for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(block):
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, gdt)!r}>"

    if kernel == "hopper":
        cfg = hopper.VARIANTS["pingpong"]
        fn, warps, maxnreg = hopper.block_sparse_fwd_ws, cfg["num_warps"], cfg["maxnreg"]
        sig = {"q_desc": desc([1, cfg["rows"], 128]), "k_desc": desc([1, 128, 128]), "v_desc": desc([1, 128, 128]),
               "o_desc": desc([1, cfg["rows"], 128]), "IDX": "*i32", "CNT": "*i32", "S": "i32", "N_QB": "i32",
               "MAX_KV": "i32", "N_TILES": "i32", "qk_scale": "fp32"}
        const = {"NUM_STAGES": 2, "PINGPONG": True, "SEPARATE_O": False, "CONSUMER_REGS": 240, "PRODUCER_REGS": 24,
                 "num_warps": warps}
    else:
        from sparsify.kernels import hopper64

        launch = hopper64.LAUNCH
        fn, warps, maxnreg = hopper64.block_sparse_fwd64_ws, launch["num_warps"], launch["maxnreg"]
        sig = {name: desc([1, 64, 128]) for name in ("q_desc", "k_desc", "v_desc", "o_desc")}
        sig.update({"IDX": "*i32", "CNT": "*i32", "S": "i32", "N_QB": "i32", "N_PAIRS": "i32", "MAX_KV": "i32",
                    "qk_scale": "fp32"})
        const = {"NUM_STAGES": 2, "CONSUMER_REGS": launch["consumer_regs"], "PRODUCER_REGS": launch["producer_regs"],
                 "num_warps": warps}
    sig.update({name: "constexpr" for name in const})
    src = GluonASTSource(fn, signature=sig, constexprs=const,
                         attrs={(4,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "maxnreg": maxnreg})


@pytest.mark.parametrize("kernel", ["hopper", "hopper64"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiles_for_sm90_without_spills_or_serialized_wgmma(dtype, kernel):
    """The kernel builds for sm_90a: shared memory within the 227 KiB limit, no spills, wgmma not serialized
    (hopper64, the 64x64 form, has not run on a GPU yet: this is its only test)."""
    kernel = _compile(dtype, kernel)
    assert 0 < kernel.metadata.shared <= 232448
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    logs = []
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(kernel.asm["ptx"])
        for name in ("ptxas", "ptxas-blackwell"):  # the second: a newer ptxas some wheels bundle
            if (tools / name).exists():
                r = subprocess.run([str(tools / name), "-v", "-arch=sm_90a", str(Path(d) / "k.ptx"), "-o",
                                    str(Path(d) / "k.cubin")], capture_output=True, text=True)
                logs.append((r.returncode, r.stdout + r.stderr))
                if r.returncode == 0:
                    break
    if not logs or (logs[-1][0] != 0 and all("Unsupported .version" in log for _, log in logs)):
        pytest.skip("no bundled ptxas can assemble the PTX this triton emits")
    rc, log = logs[-1]
    assert rc == 0, log
    assert "serialized" not in log, log
    assert "0 bytes spill stores" in log, log
    assert "setmaxnreg" in kernel.asm["ptx"]  # the partitions take their register budgets (240 / 24)


def test_supports_says_why_not():
    x = torch.empty(1, 1, 300, 128)
    assert hopper.supports(x, x, x, (128, 128)) == (False, "not a CUDA tensor")


def test_block_sparse_attn_dispatch(monkeypatch):
    """block_sparse_attn takes the Gluon kernel when it serves the call, once-failing keys fall back with a warning."""
    from sparsify.kernels import block_sparse
    from sparsify.kernels.gather import FAST

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(hopper, "supports", lambda *a, **kw: (True, ""))
    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", lambda q, *a, **kw: calls.append(q) or "gluon")
    monkeypatch.setattr(block_sparse, "_HOPPER_OFF", set())
    q = torch.empty(1, 1, 300, 128)
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None  # not CUDA
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) == "gluon" and len(calls) == 1
    monkeypatch.setitem(FAST, "hopper", False)
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None and len(calls) == 1
    monkeypatch.setitem(FAST, "hopper", True)

    def boom(*a, **kw):
        raise RuntimeError("no")

    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", boom)
    with pytest.warns(RuntimeWarning, match="Gluon Hopper kernel failed"):
        assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None
    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", lambda q, *a, **kw: "gluon")
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None  # remembered as failing
