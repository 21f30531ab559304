"""GPU check of the 64x64 Gluon kernel (`sparsify.kernels.hopper64`): correctness, then timing.

    python -m benchmarks.hopper64_check [--no-bench] [--no-check]

(a) correctness (child process, 60 s timeout: a deadlocked mbarrier protocol is reported, not hung on) of
    `block_sparse_attn_hopper64` against `block_sparse_attn_reference(..., block_size=(64, 64))`, bf16 and fp16,
    2 and 3 stages, on B2 H3 S=1000 (16 query blocks), S=4099 (65: odd, partial tail), S=4160 (65: odd, S a multiple
    of 64), S=130 (3), S=64 (1); random distinct selections with random counts (20% zero, some above max_kv, so the
    kernel must clamp), forced pairs where one of the two query blocks of a CTA has count 0 and the other not, the
    partial tail key block often selected; output poisoned with NaN; rel-L2 <= 1.2e-2 (bf16) / 3e-3 (fp16), no NaN
    left, rows of count-0 query blocks exactly 0.
(b) timing (child process, 120 s timeout) with `triton.testing.do_bench(fn, warmup=200, rep=1000,
    return_mode="median")` of the plain Triton kernel `sparsify.kernels.block_sparse._launch(q, k, v, idx, cnt,
    (64, 64), scale, None)` and of the Gluon kernel (2 and 3 stages) at B1 H40 S75600 D128 bf16 with 59 and 118
    random distinct sorted key blocks of 1182 per query block (`benchmarks.attention.random_selection`), ms and
    ratio, plus the rel-L2 of the Gluon output against the Triton one.
Prints only (no JSON; the kernel-alone table is `benchmarks.attention --block 64 --variants triton`); always exits
0. About 1-2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import traceback

BLOCK = 64
TOL = {"bf16": 1.2e-2, "fp16": 3e-3}
CHECK_TIMEOUT_S = 60
BENCH_TIMEOUT_S = 120
COUNTS = (59, 118)
STAGES = (2, 3)


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def odd_selection(B, H, S, gen, device, max_kv=None):
    """Distinct random key blocks per query block (sorted prefix), max_kv columns; counts random in
    [0, max_kv + 2] (above max_kv -> the kernel clamps), 20% zero, and in every 4th pair exactly one of the two
    query blocks has count 0; 40% of the live rows have the partial tail block (id n_kb - 1) selected."""
    import torch

    n_qb = n_kb = -(-S // BLOCK)
    max_kv = n_kb if max_kv is None else min(max_kv, n_kb)
    perm = torch.rand(B, H, n_qb, n_kb, generator=gen).argsort(-1).to(torch.int32)
    # force the tail block into the first position of some rows (swap it with whatever is there)
    force = torch.rand(B, H, n_qb, generator=gen) < 0.4
    tail_pos = (perm == n_kb - 1).int().argmax(-1)
    first = perm[..., 0].clone()
    bi, hi, qi = torch.nonzero(force, as_tuple=True)
    perm[bi, hi, qi, tail_pos[bi, hi, qi]] = first[bi, hi, qi]
    perm[bi, hi, qi, 0] = n_kb - 1
    idx = perm[..., :max_kv].contiguous()
    cnt = torch.randint(0, max_kv + 3, (B, H, n_qb), generator=gen).to(torch.int32)
    cnt[torch.rand(B, H, n_qb, generator=gen) < 0.2] = 0
    pair = torch.arange(n_qb) // 2
    one_zero = (pair % 4 == 1)
    which = (torch.rand(B, H, n_qb, generator=gen) < 0.5)
    # in pairs with one_zero: zero the even block when `which` of the pair's even block, else the odd one
    even_pick = which[..., 0::2].repeat_interleave(2, -1)[..., :n_qb]
    zero_me = one_zero & (even_pick == (torch.arange(n_qb) % 2 == 0))
    cnt[zero_me.expand_as(cnt)] = 0
    live = (one_zero & ~zero_me).expand_as(cnt) & (cnt == 0)
    cnt[live] = 1 + max_kv // 2
    # sort the live prefix (any order is valid; sorted is what the op produces)
    c_cl = cnt.clamp(max=max_kv)
    for b in range(B):
        for h in range(H):
            for i in range(n_qb):
                c = int(c_cl[b, h, i])
                if c > 1:
                    idx[b, h, i, :c] = idx[b, h, i, :c].sort().values
    return idx.to(device).contiguous(), cnt.to(device).contiguous()


def run_check() -> None:
    import torch

    from sparsify.kernels.reference import block_sparse_attn_reference

    from sparsify.kernels import hopper64

    dev = "cuda"
    print("(a) correctness vs block_sparse_attn_reference, block (64, 64), NaN-poisoned output", flush=True)
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 1000, None), (2, 3, 4099, None), (2, 3, 4160, 20), (1, 2, 130, None), (1, 1, 64, None)]
    n_fail = 0
    for (B, H, S, max_kv) in shapes:
        D = 128
        idx, cnt = odd_selection(B, H, S, gen, dev, max_kv)
        n_qb = idx.shape[2]
        c_cl = cnt.clamp(max=idx.shape[-1])
        pairs = c_cl[..., : n_qb // 2 * 2].reshape(B, H, -1, 2)
        n_diff = int((pairs[..., 0] != pairs[..., 1]).sum())
        n_onez = int(((pairs[..., 0] == 0) ^ (pairs[..., 1] == 0)).sum())
        print(f"-- B{B} H{H} S{S}: n_qb {n_qb} ({'odd' if n_qb % 2 else 'even'}), max_kv {idx.shape[-1]}, "
              f"{int((cnt == 0).sum())}/{cnt.numel()} blocks count 0, {int((cnt > idx.shape[-1]).sum())} counts "
              f"> max_kv, pairs with different counts {n_diff}/{pairs[..., 0].numel()} (one side 0: {n_onez})",
              flush=True)
        empty_rows = (c_cl == 0).repeat_interleave(BLOCK, dim=-1)[..., :S]
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            q, k, v = (torch.randn(B, H, S, D, generator=gen).to(dev, dtype) for _ in range(3))
            scale = 0.9 / math.sqrt(D)
            ref = block_sparse_attn_reference(q, k, v, idx, c_cl, block_size=(BLOCK, BLOCK), scale=scale).float()
            for st in STAGES:
                name = f"{dname} stages{st}"
                try:
                    out = torch.full_like(q, float("nan"))
                    hopper64.block_sparse_attn_hopper64(q, k, v, idx, cnt, scale, out=out, num_stages=st)
                    torch.cuda.synchronize()
                    n_nan = int(torch.isnan(out).any(-1).sum())
                    err = rel_l2(torch.nan_to_num(out.float(), nan=0.0), ref)
                    zeros_ok = bool((out[empty_rows] == 0).all()) if bool(empty_rows.any()) else True
                    ok = n_nan == 0 and err <= TOL[dname] and zeros_ok
                    worst = ""
                    if not ok:
                        n_fail += 1
                        e = (torch.nan_to_num(out.float(), nan=1e4) - ref).norm(dim=-1)  # [B, H, S]
                        r = int(e.flatten().argmax())
                        bb, hh, ss = r // (H * S), (r // S) % H, r % S
                        qb = ss // BLOCK
                        partner = qb ^ 1
                        pc = int(c_cl[bb, hh, partner]) if partner < n_qb else "none"
                        worst = (f"; worst row b{bb} h{hh} s{ss}: query block {qb} count {int(c_cl[bb, hh, qb])}, "
                                 f"partner block {partner} count {pc}")
                    print(f"   {name:14s} rel-L2 {err:.3e} (tol {TOL[dname]:.1e})  rows left NaN {n_nan}  "
                          f"count-0 rows zero {zeros_ok}  -> {'PASS' if ok else 'FAIL'}{worst}", flush=True)
                except Exception as e:
                    n_fail += 1
                    print(f"   {name:14s} ERROR {type(e).__name__}: {str(e)[:1500]}", flush=True)
                    traceback.print_exc(limit=4)
    print(f"(a) {'ALL PASS' if n_fail == 0 else f'{n_fail} FAILED'}", flush=True)


def run_bench() -> None:
    import torch
    import triton.testing

    from sparsify.kernels import block_sparse, hopper64

    try:
        from benchmarks.attention import random_selection
    except Exception as e:  # same construction, in case the import fails
        print(f"   (benchmarks.attention.random_selection unavailable: {e!r}; local copy)")

        def random_selection(B, H, n_qb, n_kb, count, *, device, generator=None):
            perm = torch.rand(B, H, n_qb, n_kb, device=device, generator=generator).argsort(-1).to(torch.int32)
            idx = torch.cat([perm[..., :count].sort(-1).values, perm[..., count:]], -1).contiguous()
            return idx, torch.full((B, H, n_qb), count, dtype=torch.int32, device=device)

    B, H, S, D = 1, 40, 75600, 128
    n = -(-S // BLOCK)
    print(f"(b) timing B{B} H{H} S{S} D{D} bf16, n_qb = n_kb = {n}; do_bench(warmup=200, rep=1000, median)",
          flush=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = D ** -0.5

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=200, rep=1000, return_mode="median"))

    for count in COUNTS:
        torch.manual_seed(1000 + count)
        idx, cnt = random_selection(B, H, n, n, count, device="cuda")
        try:
            ref = block_sparse._launch(q, k, v, idx, cnt, (BLOCK, BLOCK), scale, None)
            base = bench(lambda: block_sparse._launch(q, k, v, idx, cnt, (BLOCK, BLOCK), scale, None))
            print(f"   count {count:4d} ({100 * count / n:4.1f}%)  triton _launch (64, 64)     {base:8.3f} ms",
                  flush=True)
        except Exception as e:
            ref, base = None, float("nan")
            print(f"   count {count}: triton _launch ERROR {type(e).__name__}: {str(e)[:1000]}", flush=True)
        for st in STAGES:
            try:
                out = hopper64.block_sparse_attn_hopper64(q, k, v, idx, cnt, scale, num_stages=st)
                torch.cuda.synchronize()
                agree = rel_l2(out, ref) if ref is not None else float("nan")
                del out
                ms = bench(lambda: hopper64.block_sparse_attn_hopper64(q, k, v, idx, cnt, scale, num_stages=st))
                print(f"   count {count:4d} ({100 * count / n:4.1f}%)  gluon hopper64 stages{st}     {ms:8.3f} ms   "
                      f"gluon/triton {ms / base:6.3f} (speedup {base / ms:5.3f}x)   rel-L2 vs triton {agree:.2e}",
                      flush=True)
            except Exception as e:
                print(f"   count {count}: gluon stages{st} ERROR {type(e).__name__}: {str(e)[:1000]}", flush=True)
                traceback.print_exc(limit=4)
        del ref
        torch.cuda.empty_cache()


def _child(section: str, timeout: int) -> None:
    cmd = [sys.executable, "-m", "benchmarks.hopper64_check", "--child", section]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(r.stdout, end="")
        if r.returncode != 0:
            print(f"   child exit status {r.returncode}; stderr tail:\n{r.stderr[-3000:]}")
        elif r.stderr.strip():
            print("   (stderr tail) " + r.stderr.strip()[-1500:])
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(out, end="")
        print(f"   TIMEOUT after {timeout} s: child killed -- most likely an mbarrier DEADLOCK in the kernel (the "
              f"last line above is the last configuration that finished). stderr tail: {err[-800:]}")
    except Exception as e:
        print(f"   launching the child FAILED: {type(e).__name__}: {e}")
    print(f"   [{section}: {time.time() - t0:.1f} s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hopper64_check", description=__doc__.splitlines()[0])
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "check":
        run_check()
        return
    if a.child == "bench":
        run_bench()
        return
    t0 = time.time()
    try:
        import torch
        import triton
        print(f"torch {torch.__version__}  triton {triton.__version__}  "
              f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", flush=True)
    except Exception as e:
        print(f"environment: {e!r}")
    if not a.no_check:
        print("=" * 100)
        _child("check", CHECK_TIMEOUT_S)
    if not a.no_bench:
        print("=" * 100)
        _child("bench", BENCH_TIMEOUT_S)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - always exit 0, as asked
        print(f"unexpected: {e!r}")
    sys.exit(0)
