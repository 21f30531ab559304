"""SVG2's k-means kernels: the nearest centroid of every row, and cluster means of rows grouped by cluster."""

from __future__ import annotations

import torch

from ._triton import _MIN, _SUM, enabled, interpreting, jit, tl, triton, use_triton

__all__ = ["ASSIGN_LAUNCH", "kmeans_assign", "kmeans_update", "segment_means"]


def _assign_kernel(X, C, CN, L, S, NC, sxb, sxh, sxs, H, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Nearest centroid of BLOCK_S rows: argmin_j |c_j|^2 - 2 x.c_j, never materializing the distances."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_s[:, None].to(tl.int64) * sxs + offs_d[None, :],
                mask=offs_s[:, None] < S, other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    best = tl.full([BLOCK_S], float("inf"), dtype=tl.float32)
    arg = tl.full([BLOCK_S], 0, dtype=tl.int32)
    c_base = C + pid_bh.to(tl.int64) * NC * HEAD_DIM
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < NC
        c = tl.load(c_base + cc[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
        cn = tl.load(CN + pid_bh.to(tl.int64) * NC + cc, mask=ok, other=float("inf"))
        d = cn[None, :] - 2.0 * tl.dot(x, tl.trans(c), input_precision=INPUT_PRECISION)
        dmin = tl.reduce(d, 1, _MIN)
        darg = tl.reduce(tl.where(d == dmin[:, None], cc[None, :], 2147483647), 1, _MIN)
        better = dmin < best
        best = tl.where(better, dmin, best)
        arg = tl.where(better, darg, arg)
    tl.store(L + pid_bh.to(tl.int64) * S + offs_s, arg, mask=offs_s < S)


def _segment_mean_kernel(X, OUT, ST, LN, NC, sxb, sxh, sxs, H, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Mean of the rows `ST[c] .. ST[c] + LN[c]` of one (b, h): a cluster's centroid after the permutation."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row = pid_bh.to(tl.int64) * NC + pid_c
    s = tl.load(ST + row)
    n = tl.load(LN + row)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    acc = tl.full([BLOCK_R, HEAD_DIM], 0.0, dtype=tl.float32)  # summed across rows once, after the loop
    for r in range(0, n, BLOCK_R):
        ok = r + offs_r < n
        x = tl.load(base + (s + r + offs_r)[:, None].to(tl.int64) * sxs + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += x.to(tl.float32)
    tl.store(OUT + row * HEAD_DIM + offs_d, tl.reduce(acc, 0, _SUM) / tl.maximum(n, 1).to(tl.float32))


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the k-means kernels serve rows `x`: the `kmeans` kernel path on CUDA (`use_triton`), or CPU tensors
    under the Triton interpreter; float16/bfloat16/float32 with a head dim of 16, 32, 64 or 128.

    Example:
        >>> uses_triton(torch.zeros(1, 1, 4, 16))  # CPU without the interpreter: the PyTorch path
        False
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.shape[-1] not in (16, 32, 64, 128):
        return False
    return use_triton("kmeans", x) or (triton is not None and enabled("kmeans") and interpreting()
                                       and x.device.type == "cpu")


#: The assignment kernel's launch on CUDA (`python -m benchmarks.op --methods svg2 --assign-configs ...` times others).
ASSIGN_LAUNCH = {"block_s": 128, "block_c": 64, "num_warps": 8, "num_stages": 3}


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, max_elems: int = 1 << 25) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row.

    Args:
        x: `[B, H, S, D]`.
        centroids: `[B, H, n, D]` (any float dtype; products run in x's dtype with fp32 accumulation).
        max_elems: distance entries held at once on the torch path.

    Returns:
        int32 `[B, H, S]`. A fused Triton kernel where `uses_triton(x)`, else chunked torch.

    Example:
        >>> x = torch.tensor([[[[0.0, 0.0], [5.0, 5.0], [0.2, 0.1]]]])
        >>> kmeans_assign(x, torch.tensor([[[[5.0, 4.0], [0.0, 0.5]]]])).tolist()
        [[[1, 0, 1]]]
    """
    B, H, S, D = x.shape
    n = centroids.shape[2]
    c = centroids.to(x.dtype)
    cn = c.float().square().sum(-1)  # [B, H, n]
    if uses_triton(x):
        labels = torch.empty(B, H, S, dtype=torch.int32, device=x.device)
        x_ = x if x.stride(-1) == 1 else x.contiguous()
        interp = not x.is_cuda
        cfg = {"block_s": 32, "block_c": 16, "num_warps": 4, "num_stages": 1} if interp else ASSIGN_LAUNCH
        bs = cfg["block_s"]
        jit(_assign_kernel, interp)[(triton.cdiv(S, bs), B * H)](
            x_, c.contiguous(), cn.contiguous(), labels, S, n, x_.stride(0), x_.stride(1), x_.stride(2), H,
            BLOCK_S=bs, BLOCK_C=cfg["block_c"], HEAD_DIM=D, DOT_FP32=interp,
            INPUT_PRECISION="ieee" if (interp or x.dtype == torch.float32) else "tf32",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return labels
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    labels = torch.empty(B, H, S, dtype=torch.int32, device=x.device)
    step = max(1, max_elems // max(1, B * H * n))
    for s0 in range(0, S, step):
        d = cn.to(acc)[:, :, None, :] - 2.0 * torch.matmul(x[:, :, s0:s0 + step].to(acc), c.to(acc).transpose(-1, -2))
        labels[:, :, s0:s0 + step] = d.argmin(-1).to(torch.int32)
    return labels


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Cluster means by a scatter over the rows in any order (float32 `[B, H, n, D]`); an empty cluster keeps its
    old centroid. The PyTorch path of `segment_means`.

    Example:
        >>> x = torch.tensor([[[[1.0], [3.0], [7.0]]]]); old = torch.zeros(1, 1, 3, 1)
        >>> kmeans_update(x, torch.tensor([[[0, 0, 2]]]), old).flatten().tolist()
        [2.0, 0.0, 7.0]
    """
    B, H, S, D = x.shape
    n = old.shape[2]
    flat = (labels.long() + n * torch.arange(B * H, device=x.device).view(B, H, 1)).reshape(-1)
    sums = torch.zeros(B * H * n, D, device=x.device).index_add_(0, flat, x.reshape(-1, D).float())
    cnt = torch.zeros(B * H * n, device=x.device).index_add_(0, flat, torch.ones(flat.numel(), device=x.device))
    means = (sums / cnt.clamp_min(1)[:, None]).view(B, H, n, D)
    return torch.where(cnt.view(B, H, n, 1) > 0, means, old.float())


def segment_means(x_sorted: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Cluster means from rows already grouped by cluster (`starts`, `lens` int32 `[B, H, n]`); float32.

    Equal to `kmeans_update` on the unpermuted rows; a Triton kernel (one pass over x) where
    `uses_triton(x_sorted)`, torch else.

    Example:
        >>> x = torch.tensor([[[[1.0], [3.0], [7.0]]]]); i32 = lambda *v: torch.tensor(v, dtype=torch.int32).view(1, 1, -1)
        >>> segment_means(x, i32(0, 2, 3), i32(2, 1, 0), torch.full((1, 1, 3, 1), 9.0)).flatten().tolist()
        [2.0, 7.0, 9.0]
    """
    B, H, S, D = x_sorted.shape
    n = starts.shape[-1]
    if uses_triton(x_sorted):
        out = torch.empty(B, H, n, D, dtype=torch.float32, device=x_sorted.device)
        xs = x_sorted if x_sorted.stride(-1) == 1 else x_sorted.contiguous()
        interp = not x_sorted.is_cuda
        jit(_segment_mean_kernel, interp)[(n, B * H)](
            xs, out, starts.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous(), n, xs.stride(0),
            xs.stride(1), xs.stride(2), H, BLOCK_R=16 if interp else 64, HEAD_DIM=D, num_warps=4)
    else:
        seg = torch.searchsorted((starts.long() + lens.long()).contiguous(), torch.arange(S, device=x_sorted.device)
                                 .expand(B, H, S).contiguous(), right=True).clamp_max(n - 1)
        out = kmeans_update(x_sorted, seg, old)
    return torch.where(lens[..., None] > 0, out, old.float())
