"""Attention kernel benchmark: SDPA cuDNN and flash, FlexAttention and our block-sparse kernel, one run, same inputs.

Run on a GPU::

    python -m benchmarks.kernel                       # both Wan shapes, densities 2,5,10,20,50%
    python -m benchmarks.kernel --quick               # fewer repeats, densities 5,10%
    python -m benchmarks.kernel --shapes wan14b --densities 5,10 --sweep   # + kernel launch variants
    python -m benchmarks.kernel --backward --shapes wan1.3b           # backward: ours, cuDNN, flash, Flex
    python -m benchmarks.kernel --backward --bwd-sweep                # + backward launch variants
    python -m benchmarks.kernel --tiny                # CPU smoke run (Triton interpreter, 256 tokens)

Backward (``--backward``): the time of dq, dk, dv given the forward's saved state, measured as
``torch.autograd.grad(out, (q, k, v), dO, retain_graph=True)`` for SDPA cuDNN, SDPA flash and compiled
FlexAttention (same block mask), and as ``block_sparse_attn_backward`` for ours (preprocess, transposed
selection and both kernels); ``+fwd`` rows time the forward and the backward together. The JSON goes to
``benchmarks/results/kernel_bwd_<date>.json``.

Every competitor sees the same fresh random (never zero) q, k, v and, for the sparse ones, the
same random block selection (the same number of key blocks for every query block). Times are
`triton.testing.do_bench` medians (device events, L2 flushed between repeats). The table gives
ratios against cuDNN and against FlexAttention measured in the same process; a JSON record with the
GPU, versions, command and date goes to `benchmarks/results/kernel_<date>.json`.

More sparse rows plug in through `register_row(name, factory)`: `factory(case)` gets a `Case` (inputs,
selection, block mask) and returns a zero-argument callable to time, or None to skip. `--plugin some.module`
imports a module that registers its rows before the run. `--op-methods vsa,veda,xattention,svg2` adds, per
method, the whole op and the selection alone on the same inputs (`benchmarks.op.op_row_factory` and
`select_row_factory`; 4x4x4 tiles, the case's density, the method's own selection), so each method's
selection cost sits beside the kernel and the op in one table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks._common import TINY_SHAPE, WAN_SHAPES, run_header, wall_ms, write_result

SHAPES = {name: s[1:5] for name, s in WAN_SHAPES.items()}  # name: (B, H, S, D)
TINY = {TINY_SHAPE[0]: TINY_SHAPE[1:5]}

# kernel variants timed with --sweep (launch options of sparsify.kernels.block_sparse._launch)
VARIANTS = {
    "default": {},
    "ptr": dict(use_tma=False),  # the fallback path: pointer loads
    "no_lazy": dict(lazy_rescale=False),
    "mask_branch": dict(mask_mode=1),  # tail masking inside the loop instead of a second phase
    "tn128_st3": dict(tile_n=128, num_stages=3, maxnreg=0, mask_mode=1, lazy_rescale=False),  # 1 program/SM
    # 32-key steps: at --block 64 they fit 3 (3 stages) or 4 (2 stages) programs per SM instead of 2
    # (`python -m tools.aot_resources`)
    "tn32_st3": dict(tile_n=32, num_stages=3),
    "tn32_st2": dict(tile_n=32, num_stages=2),
    "st2": dict(num_stages=2),  # 64x64 blocks: the default's 3 stages against 2
    # the plain Triton kernel with its defaults (where `ours` runs a Gluon kernel: sm_90, 64x64 or 128x128 blocks)
    "triton": {},
}


@dataclass
class Case:
    """One benchmark point: inputs, selection and the equivalent FlexAttention block mask."""

    shape: str
    B: int
    H: int
    S: int
    D: int
    block_size: tuple[int, int]
    density: float  # requested
    count: int  # key blocks per query block
    n_kv_blocks: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_indices: torch.Tensor  # int32 [B, H, n_q_blocks, n_kv_blocks]; first `count` live, sorted
    kv_counts: torch.Tensor  # int32 [B, H, n_q_blocks]
    block_mask: object = None  # torch.nn.attention.flex_attention.BlockMask
    extras: dict = field(default_factory=dict)

    @property
    def actual_density(self) -> float:
        return self.count / self.n_kv_blocks


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # "cpu" under --tiny (Triton interpreter, tiny shapes)

_ROWS: dict[str, Callable[[Case], Callable[[], object] | None]] = {}
_NO_ERR: set[str] = set()  # rows whose output is not the case's attention (no error against Flex)


def register_row(name: str, factory: Callable[[Case], Callable[[], object] | None], *, compare: bool = True) -> None:
    """Add a sparse competitor row (e.g. the whole sparsify op); `factory(case)` returns the callable to time.

    `compare=False` for rows that do not reproduce the case's random-mask attention (a method's own selection,
    or the selection alone): they get no error against Flex.
    """
    _ROWS[name] = factory
    if not compare:
        _NO_ERR.add(name)


def random_selection(B, H, n_qb, n_kb, count, *, device, generator=None):
    """`count` distinct random key blocks per query block (sorted), padded with the unused ids."""
    perm = torch.rand(B, H, n_qb, n_kb, device=device, generator=generator).argsort(-1).to(torch.int32)
    idx = torch.cat([perm[..., :count].sort(-1).values, perm[..., count:]], -1).contiguous()
    cnt = torch.full((B, H, n_qb), count, dtype=torch.int32, device=device)
    return idx, cnt


def _flex_stand_in(q, k, v, *, block_mask, scale, kernel_options=None):
    """The CPU smoke run's Flex row: dense SDPA (math) under the block mask's token mask (Flex has no CPU backward)."""
    bm, bn = block_mask.BLOCK_SIZE
    S = q.shape[2]
    tok = block_mask.to_dense().bool().repeat_interleave(bm, -2).repeat_interleave(bn, -1)[..., :S, :S]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale)


def _bench(fn, args) -> float:
    import triton.testing

    fn()  # compile / warm caches outside the timed region
    if DEVICE != "cuda":
        return wall_ms(fn, reps=1)  # --tiny: a smoke run, not a measurement
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _env(argv) -> dict:
    return run_header("kernel", argv)


def run(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from sparsify.kernels.block_sparse import _launch, block_sparse_attn

    dtype = DTYPES[args.dtype]
    bs = (args.block, args.block)
    flex = torch.compile(flex_attention, dynamic=False) if DEVICE == "cuda" else _flex_stand_in
    flex_opts = None if args.block == 128 else {"BLOCK_M": args.block, "BLOCK_N": args.block}
    record = {**_env(args.argv), "dtype": args.dtype, "block_size": list(bs), "ours_opts": args.ours_opts or {}, "warmup_ms": args.warmup_ms,
              "rep_ms": args.rep_ms, "dense": [], "sparse": []}
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)

    for shape in args.shapes:
        B, H, S, D = {**SHAPES, **TINY}[shape]
        # fresh random inputs (never zeros); scale 1 like normalised q/k after RMSNorm
        q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        dense = {}
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            if name == "sdpa_flash" and args.no_flash:
                continue

            def f(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            try:
                dense[name] = _bench(f, args)
            except Exception as e:  # a backend missing on this build
                print(f"[{shape}] {name} failed: {type(e).__name__}: {e}", flush=True)
        record["dense"].append({"shape": shape, "B": B, "H": H, "S": S, "D": D, **{k_: round(v_, 4) for k_, v_ in dense.items()}})
        print(f"[{shape}] dense: " + ", ".join(f"{k_} {v_:.2f} ms" for k_, v_ in dense.items()), flush=True)

        n_qb, n_kb = -(-S // bs[0]), -(-S // bs[1])
        for d in args.densities:
            count = max(1, round(d / 100 * n_kb))
            idx, cnt = random_selection(B, H, n_qb, n_kb, count, device=DEVICE, generator=gen)
            mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=bs, seq_lengths=(S, S))
            case = Case(shape, B, H, S, D, bs, d / 100, count, n_kb, q, k, v, idx, cnt, mask)
            times, errs = {}, {}
            ref = flex(q, k, v, block_mask=mask, scale=scale, kernel_options=flex_opts)
            times["flex"] = _bench(lambda: flex(q, k, v, block_mask=mask, scale=scale, kernel_options=flex_opts), args)
            if args.ours_opts:
                ours = lambda: _launch(q, k, v, idx, cnt, bs, scale, None, fallback=False, **args.ours_opts)
            else:
                ours = lambda: block_sparse_attn(q, k, v, idx, cnt, block_size=bs, scale=scale)
            out = ours()
            errs["ours"] = _rel(out, ref)
            times["ours"] = _bench(ours, args)
            if args.sweep:
                for vname in args.variants:
                    opts = VARIANTS[vname]
                    fn = lambda opts=opts: _launch(q, k, v, idx, cnt, bs, scale, None, fallback=False, **opts)
                    try:
                        errs[vname] = _rel(fn(), ref)
                        times[vname] = _bench(fn, args)
                    except Exception as e:
                        print(f"  variant {vname} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for rname, factory in _ROWS.items():
                fn = factory(case)
                if fn is not None:
                    if rname not in _NO_ERR:
                        errs[rname] = _rel(fn(), ref)
                    times[rname] = _bench(fn, args)
            del ref, out
            for m, t in times.items():
                row = {"shape": shape, "density_pct": d, "count": count, "n_kv_blocks": n_kb, "method": m,
                       "ms": round(t, 4), "err_vs_flex": round(errs[m], 6) if m in errs else None}
                if "sdpa_cudnn" in dense:
                    row["x_vs_cudnn"] = round(dense["sdpa_cudnn"] / t, 3)
                    row["floor_ms"] = round(count / n_kb * dense["sdpa_cudnn"], 4)
                row["x_vs_flex"] = round(times["flex"] / t, 3)
                record["sparse"].append(row)
            print(f"[{shape}] {d:>4}%: " + ", ".join(f"{m} {t:.3f}" for m, t in times.items()), flush=True)
        q = k = v = None  # free them (the timing closures above still name them)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return record


# backward launch variants timed with --bwd-sweep (options of sparsify.kernels.block_sparse_bwd.block_sparse_attn_backward)
BWD_VARIANTS = {
    "b_default": {},  # Hopper: two launches (dq first, computing delta), TMA loads, 64/64 tiles, 4 warps, 2 stages
    "b_ptr": dict(use_tma=False),
    "b_tma_dq128_w8": dict(use_tma=True, q_tile=128, dq_warps=8),
}


def run_backward(args) -> dict:
    """Backward timings (see the module docstring): dense SDPA, FlexAttention and ours, same inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from sparsify.kernels.block_sparse import block_sparse_attn
    from sparsify.kernels.block_sparse_bwd import block_sparse_attn_backward

    dtype = DTYPES[args.dtype]
    bs = (args.block, args.block)
    flex = torch.compile(flex_attention, dynamic=False) if DEVICE == "cuda" else _flex_stand_in
    flex_opts = None if args.block == 128 else {"BLOCK_M": args.block, "BLOCK_N": args.block}
    record = {**_env(args.argv), "kind": "backward", "dtype": args.dtype, "block_size": list(bs), "bwd_opts": args.bwd_opts or {},
              "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "dense": [], "sparse": []}
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)

    def grad_of(out, xs, go):
        return lambda: torch.autograd.grad(out, xs, go, retain_graph=True)

    for shape in args.shapes:
        B, H, S, D = {**SHAPES, **TINY}[shape]
        q, k, v, go = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(4))
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        scale = 1.0 / math.sqrt(D)
        dense = {}
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            if name == "sdpa_flash" and args.no_flash:
                continue
            try:
                with sdpa_kernel(backend):
                    out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                    dense[name + "_bwd"] = _bench(grad_of(out, (qg, kg, vg), go), args)
                del out

                def fwd_bwd(backend=backend):
                    with sdpa_kernel(backend):
                        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                    return torch.autograd.grad(o, (qg, kg, vg), go)

                dense[name + "_fwd_bwd"] = _bench(fwd_bwd, args)
            except Exception as e:
                print(f"[{shape}] {name} failed: {type(e).__name__}: {e}", flush=True)
        record["dense"].append({"shape": shape, "B": B, "H": H, "S": S, "D": D, **{k_: round(v_, 4) for k_, v_ in dense.items()}})
        print(f"[{shape}] dense: " + ", ".join(f"{k_} {v_:.2f} ms" for k_, v_ in dense.items()), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

        n_qb, n_kb = -(-S // bs[0]), -(-S // bs[1])
        for d in args.densities:
            count = max(1, round(d / 100 * n_kb))
            idx, cnt = random_selection(B, H, n_qb, n_kb, count, device=DEVICE, generator=gen)
            mask = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=bs, seq_lengths=(S, S))
            times, errs = {}, {}
            fout = flex(qg, kg, vg, block_mask=mask, scale=scale, kernel_options=flex_opts)
            ref = torch.autograd.grad(fout, (qg, kg, vg), go, retain_graph=True)
            times["flex_bwd"] = _bench(grad_of(fout, (qg, kg, vg), go), args)
            del fout
            times["flex_fwd_bwd"] = _bench(lambda: torch.autograd.grad(
                flex(qg, kg, vg, block_mask=mask, scale=scale, kernel_options=flex_opts), (qg, kg, vg), go), args)

            out, lse = block_sparse_attn(q, k, v, idx, cnt, block_size=bs, scale=scale, return_lse=True)
            variants = {"ours_bwd": dict(args.bwd_opts or {})}
            if args.bwd_sweep:
                variants.update({n: o for n, o in BWD_VARIANTS.items() if n != "b_default"})
            for vname, opts in variants.items():
                fn = lambda opts=opts: block_sparse_attn_backward(go, q, k, v, out, lse, idx, cnt, block_size=bs,
                                                                  scale=scale, **opts)
                try:
                    g = fn()
                    errs[vname] = max(_rel(a, b) for a, b in zip(g, ref))
                    del g
                    times[vname] = _bench(fn, args)
                except Exception as e:
                    print(f"  variant {vname} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

            from sparsify.kernels.block_sparse_bwd import transpose_selection

            times["ours_transpose"] = _bench(lambda: transpose_selection(idx, cnt, n_kb), args)

            def ours_fwd_bwd():
                o, s_ = block_sparse_attn(q, k, v, idx, cnt, block_size=bs, scale=scale, return_lse=True)
                return block_sparse_attn_backward(go, q, k, v, o, s_, idx, cnt, block_size=bs, scale=scale,
                                                  **(args.bwd_opts or {}))

            times["ours_fwd_bwd"] = _bench(ours_fwd_bwd, args)
            errs["ours_fwd_bwd"] = errs.get("ours_bwd")
            # the autograd path (defaults), as training runs it
            oa = block_sparse_attn(qg, kg, vg, idx, cnt, block_size=bs, scale=scale)
            times["ours_autograd_bwd"] = _bench(grad_of(oa, (qg, kg, vg), go), args)
            del oa, ref
            out = lse = None  # free them (the timing closures above still name them)
            for m, t in times.items():
                dense_key = "sdpa_cudnn_fwd_bwd" if m.endswith("fwd_bwd") else "sdpa_cudnn_bwd"
                flex_key = "flex_fwd_bwd" if m.endswith("fwd_bwd") else "flex_bwd"
                row = {"shape": shape, "density_pct": d, "count": count, "n_kv_blocks": n_kb, "method": m,
                       "ms": round(t, 4), "err_vs_flex": round(errs[m], 6) if errs.get(m) is not None else None,
                       "x_vs_flex": round(times[flex_key] / t, 3)}
                if dense_key in dense:
                    row["x_vs_cudnn"] = round(dense[dense_key] / t, 3)
                    row["floor_ms"] = round(count / n_kb * dense[dense_key], 4)
                record["sparse"].append(row)
            print(f"[{shape}] {d:>4}%: " + ", ".join(f"{m} {t:.3f}" for m, t in times.items()), flush=True)
        q = k = v = go = qg = kg = vg = None  # free them (the timing closures above still name them)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return record


def table_bwd(record: dict) -> str:
    lines = [f"{record['device']}  torch {record['torch']}  triton {record['triton']}  {record['dtype']}  "
             f"block {record['block_size']}  {record['date']}  (backward)"]
    dense = {r["shape"]: r for r in record["dense"]}
    for shape in dict.fromkeys(r["shape"] for r in record["sparse"]):
        d = dense.get(shape, {})
        lines.append(f"\n{shape} (B{d.get('B')} H{d.get('H')} S{d.get('S')} D{d.get('D')}): " + ", ".join(
            f"{k_} {d[k_]:.2f} ms" for k_ in ("sdpa_cudnn_bwd", "sdpa_cudnn_fwd_bwd", "sdpa_flash_bwd", "sdpa_flash_fwd_bwd")
            if k_ in d))
        lines += _sparse_rows(record, shape, 18, "max err vs Flex")
    return "\n".join(lines)


def _sparse_rows(record: dict, shape: str, method_width: int, err_header: str) -> list[str]:
    """The header and one line per sparse row of `shape` (shared by the forward and backward tables)."""
    mw, ew = method_width, len(err_header)
    lines = [f"{'density':>8} {'blocks':>9} {'method':>{mw}} {'ms':>9} {'x cuDNN':>8} {'x Flex':>7} "
             f"{'floor ms':>9} {'/floor':>7} {err_header:>{ew}}"]
    for r in (r for r in record["sparse"] if r["shape"] == shape):
        floor = r.get("floor_ms")
        lines.append(
            f"{r['density_pct']:>7}% {r['count']:>4}/{r['n_kv_blocks']:<4} {r['method']:>{mw}} {r['ms']:>9.3f} "
            f"{r.get('x_vs_cudnn', float('nan')):>8.2f} {r['x_vs_flex']:>7.3f} "
            f"{floor if floor is not None else float('nan'):>9.3f} "
            f"{(r['ms'] / floor) if floor else float('nan'):>7.2f} "
            f"{r['err_vs_flex'] if r['err_vs_flex'] is not None else '':>{ew}}")
    return lines


def table(record: dict) -> str:
    lines = [
        f"{record['device']}  torch {record['torch']}  triton {record['triton']}  {record['dtype']}  "
        f"block {record['block_size']}  {record['date']}",
    ]
    dense = {r["shape"]: r for r in record["dense"]}
    for shape in dict.fromkeys(r["shape"] for r in record["sparse"]):
        d = dense.get(shape, {})
        lines.append(
            f"\n{shape} (B{d.get('B')} H{d.get('H')} S{d.get('S')} D{d.get('D')}): "
            f"SDPA cuDNN {d.get('sdpa_cudnn', float('nan')):.2f} ms, SDPA flash {d.get('sdpa_flash', float('nan')):.2f} ms"
        )
        lines += _sparse_rows(record, shape, 16, "err vs Flex")
    return "\n".join(lines)


def main(argv=None) -> dict:
    global DEVICE
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="wan1.3b,wan14b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--densities", default="2,5,10,20,50", help="percent of key blocks per query block")
    p.add_argument("--block", type=int, default=128, choices=(64, 128), help="BLOCK_M = BLOCK_N")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="densities 5,10 and shorter timing")
    p.add_argument("--sweep", action="store_true", help="also time the kernel variants in VARIANTS")
    p.add_argument("--variants", default=None, help="comma list of VARIANTS names to time (implies --sweep)")
    p.add_argument("--no-flash", action="store_true", help="skip SDPA flash (slow on the 14B shape)")
    p.add_argument("--warmup-ms", type=float, default=200.0)
    p.add_argument("--rep-ms", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-opts", default=None, help="JSON launch options (or @file) for the 'ours' row (default: the defaults)")
    p.add_argument("--backward", action="store_true", help="time backward passes instead (see the module docstring)")
    p.add_argument("--bwd-sweep", action="store_true", help="with --backward: also time the variants in BWD_VARIANTS")
    p.add_argument("--bwd-opts", default=None, help="JSON backward launch options (or @file) for the 'ours' rows")
    p.add_argument("--plugin", action="append", default=[], help="module to import that calls register_row")
    p.add_argument("--op-methods", default="",
                   help="comma list of selection methods (vsa,veda,xattention,svg2): add for each a whole-op row "
                        "('op <m>': selection, layout, kernel, inverse on the case's q, k, v at its density) and a "
                        "selection row ('select <m>': the selection alone)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: Triton interpreter, one 256-token shape (B1 H2 D64), fp32, 64x64 blocks, "
                        "densities 25,50 unless given; wall times, not measurements")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel[_bwd]_<date>.json)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
        args.shapes, args.dtype, args.block = TINY_SHAPE[0], "fp32", 64
        if "--densities" not in " ".join(args.argv):
            args.densities = "25,50"
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(args.shapes) - set(SHAPES) - (set(TINY) if args.tiny else set()))
    if unknown:
        p.error(f"unknown --shapes {unknown}; known: {sorted(SHAPES)}")
    if args.ours_opts and args.ours_opts.startswith("@"):
        args.ours_opts = Path(args.ours_opts[1:]).read_text()
    args.ours_opts = json.loads(args.ours_opts) if args.ours_opts else None
    if args.bwd_opts and args.bwd_opts.startswith("@"):
        args.bwd_opts = Path(args.bwd_opts[1:]).read_text()
    args.bwd_opts = json.loads(args.bwd_opts) if args.bwd_opts else None
    if args.quick:
        args.densities, args.warmup_ms, args.rep_ms = "5,10", 50.0, 300.0
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
        if unknown:
            p.error(f"unknown --variants {unknown}; known: {sorted(VARIANTS)}")
        args.sweep = True
    args.variants = [v for v in (args.variants.split(",") if args.variants else VARIANTS) if v != "default"]
    args.densities = [float(x) if "." in x else int(x) for x in str(args.densities).split(",") if x]
    # run as `python -m benchmarks.kernel` this module is `__main__`: plugins importing `benchmarks.kernel`
    # must register their rows here, not in a second copy of the module
    sys.modules.setdefault("benchmarks.kernel", sys.modules[__name__])
    for mod in args.plugin:
        importlib.import_module(mod)
    if args.op_methods:
        from benchmarks.op import op_row_factory, select_row_factory

        for m in args.op_methods.split(","):
            register_row(f"op {m} 4x4x4", op_row_factory((4, 4, 4), m), compare=False)
            register_row(f"select {m} 4x4x4", select_row_factory((4, 4, 4), m), compare=False)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernel needs a CUDA GPU (or --tiny for the CPU smoke run)")
    if args.backward:
        record = run_backward(args)
        print(table_bwd(record), flush=True)
        stem = f"kernel_bwd{'_sweep' if args.bwd_sweep else ''}"
    else:
        record = run(args)
        print(table(record), flush=True)
        stem = f"kernel{'_sweep' if args.sweep else ''}"
    write_result(record, args.out, stem)
    return record


if __name__ == "__main__":
    main()
