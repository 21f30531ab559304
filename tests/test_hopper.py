"""The Gluon Hopper kernel on the CPU box: compiled ahead of time for sm_90, its `supports` gate and the dispatch."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
hopper = pytest.importorskip("sparsify.kernels.hopper", reason="this triton has no (compatible) Gluon")


def _compile(dtype: str, kernel: str, has_dst: bool = False):
    """`triton.compile` of the 128x128 ping-pong kernel (`hopper`) or the 64x64 one (`hopper64`) for sm_90, with the
    TMA store or (`has_dst`) the fused inverse layout's row stores."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from sparsify.kernels import hopper64

    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(block):
        return f"tensordesc<{dtype}[{','.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, gdt)!r}>"

    launch = hopper.LAUNCH
    if kernel == "hopper":
        fn = hopper.block_sparse_fwd_ws
        q_blk, k_blk = desc([1, hopper.ROWS, 128]), desc([1, hopper.BLOCK, 128])
        sig = {"q_desc": q_blk, "k_desc": k_blk, "v_desc": k_blk, "o_desc": q_blk}
    else:
        fn = hopper64.block_sparse_fwd64_ws
        sig = {name: desc([1, 64, 128]) for name in ("q_desc", "k_desc", "v_desc", "o_desc")}
    sig.update({"IDX": "*i32", "CNT": "*i32", "S": "i32", "N_QB": "i32", "N_PAIRS": "i32", "MAX_KV": "i32",
                "qk_scale": "fp32", "O": f"*{dtype}", "DST": "*i32", "OUT_LEN": "i32"})
    const = {"NUM_STAGES": 2, "CONSUMER_REGS": launch["consumer_regs"], "PRODUCER_REGS": launch["producer_regs"],
             "num_warps": launch["num_warps"], "HAS_DST": has_dst}
    sig = {name: "constexpr" if name in const else sig[name] for name in fn.arg_names}
    pointers = [i for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")]
    src = GluonASTSource(fn, signature=sig, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": launch["num_warps"], "maxnreg": launch["maxnreg"]})


@pytest.mark.parametrize("kernel,dtype,has_dst", [
    ("hopper", "bf16", False), ("hopper", "fp16", False), ("hopper64", "bf16", False), ("hopper64", "fp16", False),
    ("hopper", "bf16", True), ("hopper64", "bf16", True), ("hopper64", "fp16", True)])
def test_compiles_for_sm90_without_spills_or_serialized_wgmma(kernel, dtype, has_dst):
    """The kernel builds for sm_90a: shared memory within the 227 KiB limit, no spills, wgmma not serialized (Gluon
    has no interpreter: correctness is tests/gpu/test_hopper_gpu.py)."""
    kernel = _compile(dtype, kernel, has_dst)
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
    """block_sparse_attn takes the Gluon kernel of the block size (128: hopper, 64: hopper64) when it serves the
    call, the scattered entry passes its row map on, and a once-failing (device, dtype, block) falls back with one
    warning without turning off the other block size."""
    from sparsify.kernels import block_sparse, hopper64
    from sparsify.kernels import kernel_backend

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(hopper, "supports", lambda *a, **kw: (True, ""))
    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", lambda q, *a, **kw: calls.append((128, kw)) or "g128")
    monkeypatch.setattr(hopper64, "block_sparse_attn_hopper64", lambda q, *a, **kw: calls.append((64, kw)) or "g64")
    monkeypatch.setattr(block_sparse, "_HOPPER_OFF", set())
    q = torch.empty(1, 1, 300, 128)
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None  # not CUDA
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) == "g128"
    assert block_sparse._hopper(q, q, q, None, None, (64, 64), 0.1, None, "rows", 7) == "g64"
    assert calls == [(128, {"out_rows": None, "out_len": None}), (64, {"out_rows": "rows", "out_len": 7})]
    with kernel_backend("-hopper"):
        assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None and len(calls) == 2

    def boom(*a, **kw):
        raise RuntimeError("no")

    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", boom)
    with pytest.warns(RuntimeWarning, match=r"Gluon Hopper kernel for \(128, 128\) blocks failed"):
        assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None
    monkeypatch.setattr(hopper, "block_sparse_attn_hopper", lambda q, *a, **kw: "g128")
    assert block_sparse._hopper(q, q, q, None, None, (128, 128), 0.1, None) is None  # remembered as failing
    assert block_sparse._hopper(q, q, q, None, None, (64, 64), 0.1, None) == "g64"  # the other block size still runs


def test_gluon_inputs_take_slot_prefixes_without_a_copy():
    """`_bh3` views a contiguous tensor or its slot prefix `t[:, :, :L]` as `[B*H, L, D]` without a copy (the op's
    kernel call), and refuses strides that have no such view."""
    t = torch.randn(2, 3, 10, 128)
    for x in (t, t[:, :, :7]):
        v = hopper._bh3(x)
        assert v.data_ptr() == x.data_ptr() and torch.equal(v, x.reshape(6, x.shape[2], 128))
    assert hopper._bh3(t.transpose(1, 2)) is None  # [B, S, H, D] memory: heads are not a [B*H] axis
    assert hopper._bh3(t.transpose(1, 2)[:1]) is not None  # ... unless B = 1
