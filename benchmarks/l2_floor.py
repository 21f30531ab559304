"""The K/V load floor of the block-sparse forward: a kernel that only loads the selected K and V blocks.

    python -m benchmarks.l2_floor [--shape wan14b] [--densities 5,10] [--blocks 64,128] [--out PATH]

Each program takes one query block of one (b, h), walks its selected key blocks (`benchmarks.attention`'s random
selection) and loads each block's K and V tile, summing them in fp32 so that no load can be dropped: no matmul, no
softmax, one float stored per program. Its time is what moving the attention kernel's K/V bytes from L2 (each head's
K and V, 38.7 MB at Wan-14B, fit the 50 MB L2) to the SMs costs. Timed in the same run, on the same selection: the
plain Triton kernel (`block_sparse._launch`) and `block_sparse_attn` (the Gluon kernels on sm_90). Prints ms, the
bytes loaded and their rate, and writes a JSON.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

SHAPES = {"wan14b": (1, 40, 75600, 128), "wan1.3b": (1, 12, 32760, 128)}


@triton.jit
def _load_only(K, V, IDX, CNT, OUT, S, N_QB, MAX_KV, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: consecutive programs serve consecutive query blocks of one head
    pid_bh = tl.program_id(1)
    row = pid_bh.to(tl.int64) * N_QB + pid_m
    cnt = tl.minimum(tl.load(CNT + row), MAX_KV)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    base = pid_bh.to(tl.int64) * S * D
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for t in range(cnt):
        j = tl.load(IDX + row * MAX_KV + t)
        rows = j * BLOCK_N + offs_n
        ptr = base + rows[:, None].to(tl.int64) * D + offs_d[None, :]
        m = rows[:, None] < S
        acc += tl.load(K + ptr, mask=m, other=0.0).to(tl.float32) + tl.load(V + ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row, tl.sum(tl.sum(acc, 1), 0))


def load_only(k, v, idx, cnt, block: int, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Sum of every selected K and V element per query block, `[B, H, n_qb]` fp32 (the load-only kernel).

    Example:
        >>> # s = load_only(k, v, idx, cnt, 64)
    """
    B, H, S, D = k.shape
    n_qb = idx.shape[2]
    out = torch.empty(B, H, n_qb, device=k.device, dtype=torch.float32)
    _load_only[(n_qb, B * H)](k, v, idx, cnt, out, S, n_qb, idx.shape[-1], BLOCK_N=block, D=D, num_warps=num_warps,
                              num_stages=num_stages)
    return out


def run(shape: str, densities, blocks) -> list[dict]:
    from benchmarks import time_ms
    from benchmarks.attention import random_selection
    from sparsify.kernels.block_sparse import _launch, block_sparse_attn

    B, H, S, D = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, v, q = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    rows = []
    for block in blocks:
        n = -(-S // block)
        for d in densities:
            count = max(1, round(d / 100 * n))
            idx, cnt = random_selection(B, H, n, n, count, device="cuda", generator=gen)
            sums = load_only(k, v, idx, cnt, block)
            sel = idx[..., :count].long()  # check one head against torch
            kb = (k[0, 0].float() + v[0, 0].float()).view(-1)
            ref = torch.nn.functional.pad(kb, (0, n * block * D - kb.numel())).view(n, -1).sum(1)[sel[0, 0]].sum(-1)
            assert torch.allclose(sums[0, 0], ref, rtol=1e-3, atol=1e-1), "the load-only kernel sums wrongly"
            t = {f"load_only_w{w}_s{s}": time_ms(lambda w=w, s=s: load_only(k, v, idx, cnt, block, w, s))
                 for w, s in ((4, 3), (8, 3), (4, 4))}
            t_load = min(t.values())
            scale = D ** -0.5
            t_plain = time_ms(lambda: _launch(q, k, v, idx, cnt, (block, block), scale, None))
            t_ours = time_ms(lambda: block_sparse_attn(q, k, v, idx, cnt, block_size=(block, block), scale=scale))
            nbytes = B * H * n * count * 2 * block * D * k.element_size()
            row = {"shape": shape, "block": block, "density_pct": d, "count": count, "n_blocks": n, **t,
                   "load_only_ms": t_load, "plain_ms": t_plain, "ours_ms": t_ours, "kv_bytes": nbytes,
                   "load_only_TBps": nbytes / t_load / 1e9, "plain_over_load": t_plain / t_load,
                   "ours_over_load": t_ours / t_load}
            rows.append(row)
            print(f"{shape} block {block:3d} {d:4g}% ({count}/{n}): K/V loaded {nbytes / 1e9:6.1f} GB | load-only "
                  f"{t_load:7.3f} ms ({nbytes / t_load / 1e9:5.2f} TB/s; {', '.join(f'{k_} {v_:.3f}' for k_, v_ in t.items())})"
                  f" | plain kernel {t_plain:7.3f} ms ({t_plain / t_load:4.2f}x load-only) | ours {t_ours:7.3f} ms "
                  f"({t_ours / t_load:4.2f}x)", flush=True)
            del sums
    return rows


def main(argv=None) -> list[dict]:
    from benchmarks import gpu_meta, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.l2_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="wan14b", choices=sorted(SHAPES))
    ap.add_argument("--densities", default="5,10")
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.l2_floor needs a CUDA GPU")
    rows = run(a.shape, [float(x) for x in a.densities.split(",")], [int(x) for x in a.blocks.split(",")])
    write_result({**gpu_meta("l2_floor", argv), "rows": rows}, a.out, "l2_floor")
    return rows


if __name__ == "__main__":
    main()
