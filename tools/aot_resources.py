"""Registers, shared memory and programs per SM of the forward kernel's launch configs, compiled for sm_90 without a GPU.

    python -m tools.aot_resources --block 64 64 --tile-n 64,32 --stages 2,3,4 --maxnreg 0,128
    python -m tools.aot_resources --varlen --block 128 128 --stages 2 --warps 8   # SVG2's kernel

Compiles `sparsify.kernels.block_sparse._fwd_kernel` ahead of time (`triton.compile` for `GPUTarget("cuda", 90, 32)`:
TMA descriptors, D 128, bf16, `kv_block_lens` on unless `--no-lens`) and reads the register count with the
`cuobjdump` bundled with triton, and from `ptxas -v` whether ptxas serialized the wgmma instructions. Programs per
SM = the least of the shared-memory (228 KiB, 1 KiB reserved per program), register-file (64 Ki) and warp (64)
limits. Needs the triton wheel's NVIDIA tools, not a GPU. For the GPU's compiler, put the triton 3.6 wheel first on
PYTHONPATH (docs/kernel-notes.md, "Checking compile results on the CPU").
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import subprocess
import tempfile
from pathlib import Path

SMEM_PER_SM = 228 * 1024
REGS_PER_SM = 64 * 1024


def _usage(kernel) -> tuple[int, int]:
    """(registers, stack bytes) of a compiled kernel, read with the `cuobjdump` bundled with triton."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(usage.split("REG:")[1].split()[0]), int(usage.split("STACK:")[1].split()[0]) if "STACK:" in usage else 0


def resources(block_m: int, block_n: int, tile_n: int, stages: int, warps: int, maxnreg: int | None = None,
              tail_last: bool = False, lazy: bool = False, head_dim: int = 128, ttgir: str | None = None,
              lens: bool = True) -> dict:
    """Compile one config for sm_90; `{"regs", "stack", "smem", "programs_per_sm", "wgmma_serialized"}`.

    `stack` > 0 means spills; `wgmma_serialized` is ptxas's reason code (e.g. C7512, too few registers) when it
    serializes the kernel's wgmma instructions, else None.

    `ttgir` names a file to write the TTGIR to (to see how the loop was pipelined); `lens`: with `kv_block_lens`
    (which excludes `tail_last`: the partial tail key block in a second phase).

    Example:
        >>> # resources(64, 64, 64, 3, 4)  -> {'regs': 145, 'smem': 114760, 'programs_per_sm': 2}
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsify.kernels import block_sparse

    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=tile_n, HEAD_DIM=head_dim, USE_TMA=True, DESC_RANK=3,
                 HAS_LENS=lens, TAIL_LAST=tail_last and not lens, DOT_FP32=False, INPUT_PRECISION="tf32", LAZY_RESCALE=lazy,
                 STORE_LSE=False, HAS_DST=False)
    sig = {}
    for p in inspect.signature(block_sparse._fwd_kernel).parameters:
        if p in const:
            sig[p] = "constexpr"
        elif p in ("Q", "O"):
            sig[p] = f"tensordesc<bf16[1,{block_m},{head_dim}]>"
        elif p in ("K", "V"):
            sig[p] = f"tensordesc<bf16[1,{tile_n},{head_dim}]>"
        elif p in ("IDX", "CNT", "LENS", "LSE", "DST"):
            sig[p] = "*i32"
        elif p == "qk_scale":
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(ASTSource(triton.jit(block_sparse._fwd_kernel), signature=sig, constexprs=const),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    if ttgir:
        Path(ttgir).write_text(kernel.asm["ttgir"])
    regs, stack = _usage(kernel)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(kernel.asm["ptx"])
        cmd = [str(ptxas), "-v", "-arch=sm_90a", str(Path(d) / "k.ptx"), "-o", str(Path(d) / "k.cubin")]
        if maxnreg:
            cmd += ["-maxrregcount", str(maxnreg)]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    serial = next((ln.split("(")[1].split(")")[0] for ln in log.splitlines() if "serialized" in ln), None)
    smem = int(kernel.metadata.shared)
    per_sm = min(SMEM_PER_SM // (smem + 1024), REGS_PER_SM // (regs * 32 * warps), 64 // warps)
    return {"regs": regs, "stack": stack, "smem": smem, "programs_per_sm": per_sm, "wgmma_serialized": serial}


def varlen_resources(block_m: int, block_n: int, warps: int, stages: int, head_dim: int = 128) -> dict:
    """Compile SVG2's variable-size kernel (`sparsify.kernels.varlen._varlen_kernel`) for sm_90, bf16, no key mask.

    Pointers and strides get the JIT's divisibility by 16 (without it the pipeliner leaves the K/V loads
    synchronous). Returns `{"regs", "stack", "smem", "async_copies"}`: `async_copies` counts the `cp.async` copies in
    the TTGIR (0: the K/V loads were not pipelined).

    Example:
        >>> # varlen_resources(128, 128, 8, 2)  -> {'regs': 254, 'stack': 0, 'smem': 163840, 'async_copies': 4}
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsify.kernels import varlen

    fn = varlen._varlen_kernel
    const = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, HAS_MASK=False, DOT_FP32=False,
                 INPUT_PRECISION="tf32")
    names = list(inspect.signature(fn).parameters)
    sig = {}
    for p in names:
        if p in const:
            sig[p] = "constexpr"
        elif p in ("Q", "K", "V", "O"):
            sig[p] = "*bf16"
        elif p == "KM":
            sig[p] = "*i8"
        elif p == "KEY_FIRST":
            sig[p] = "*i64"
        elif p in ("T_BLK", "T_ROW", "T_LEN", "KEYS", "N_KEYS"):
            sig[p] = "*i32"
        elif p == "qk_scale":
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
    aligned = [n for n in names if sig[n].startswith("*") or (n[0] == "s" and n not in ("skmb", "skmh"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(triton.jit(fn), signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    regs, stack = _usage(kernel)
    return {"regs": regs, "stack": stack, "smem": int(kernel.metadata.shared),
            "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local")}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(prog="python -m tools.aot_resources", description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, nargs=2, default=(64, 64), metavar=("BLOCK_M", "BLOCK_N"))
    ap.add_argument("--tile-n", default="64,32")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--maxnreg", default="0", help="register caps, 0 for none")
    ap.add_argument("--no-lens", action="store_true", help="without kv_block_lens (the op's usual prefix call)")
    ap.add_argument("--lazy", action="store_true", help="lazy rescaling (the 128-row default)")
    ap.add_argument("--tail-last", action="store_true",
                    help="the partial tail key block in a second phase (the 128-row default; implies --no-lens)")
    ap.add_argument("--ttgir", default=None, help="write the last config's TTGIR here")
    ap.add_argument("--varlen", action="store_true",
                    help="compile SVG2's variable-size kernel instead; --block, --stages and --warps apply")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows = []
    if a.varlen:
        for ns, nw in itertools.product(ints(a.stages), ints(a.warps)):
            r = varlen_resources(*a.block, nw, ns)
            rows.append({"varlen": True, "block": list(a.block), "stages": ns, "warps": nw, **r})
            print(f"varlen {a.block[0]}x{a.block[1]} stages {ns} warps {nw}: regs {r['regs']:3d} stack "
                  f"{r['stack']:4d}  smem {r['smem']:7d} B  cp.async copies {r['async_copies']}", flush=True)
        return rows
    for tn, ns, nw, mr in itertools.product(ints(a.tile_n), ints(a.stages), ints(a.warps), ints(a.maxnreg)):
        r = resources(*a.block, tn, ns, nw, mr or None, tail_last=a.tail_last, lazy=a.lazy, ttgir=a.ttgir,
                      lens=not (a.no_lens or a.tail_last))
        rows.append({"tile_n": tn, "stages": ns, "warps": nw, "maxnreg": mr or None, **r})
        print(f"block {a.block[0]}x{a.block[1]} tile_n {tn:3d} stages {ns} warps {nw} maxnreg {mr or '-':>3}: "
              f"regs {r['regs']:3d} stack {r['stack']:4d}  smem {r['smem']:7d} B  -> {r['programs_per_sm']} programs/SM"
              f"{'  wgmma serialized (' + r['wgmma_serialized'] + ')' if r['wgmma_serialized'] else ''}", flush=True)
    return rows


if __name__ == "__main__":
    main()
