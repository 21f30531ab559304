"""Block-sparse attention forward as a Triton kernel: one program per query block, a loop over its key blocks."""

from __future__ import annotations

import math
import warnings

import torch

# The kernel calls only triton builtins (tl.full, tl.reduce with the `_triton` combiners, ...), never the @jit helpers
# of triton.language.standard (tl.zeros, tl.max, tl.sum): those are decorated once, when triton is first imported,
# and cannot run under the interpreter if TRITON_INTERPRET was unset then.
from ._triton import _MAX, _SUM, interpreter, interpreting, jit

try:  # triton is optional at import time: `supports` then says why nothing runs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton on this platform
    triton = None
    tl = None

try:  # host-side TMA tensor descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except Exception:  # pragma: no cover
    _TensorDescriptor = None

__all__ = ["block_sparse_attn", "block_sparse_attn_scattered", "supports", "SUPPORTED_BLOCK_SIZES",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634


def _fwd_kernel(  # a plain function, wrapped by `_triton.jit` lazily: once for CUDA, once under the interpreter
    Q, K, V, O,  # pointers (pointer path) or tensor descriptors (TMA path)
    IDX, CNT, LENS, LSE,  # LSE: float32 [B, H, S] row log-sum-exp (natural log), written when STORE_LSE
    DST,  # int32 [S] (HAS_DST): output row of each query row (< 0: not written); O is then a plain pointer
    sqb, sqh, sqs,  # q strides (elements; last dim contiguous)
    skb, skh, sks,
    svb, svh, svs,
    sob, soh, sos,
    H, S, N_QB, MAX_KV, TAIL_BLK, qk_scale,
    BLOCK_M: tl.constexpr,  # query block (semantic and program tile)
    BLOCK_N: tl.constexpr,  # key block (semantic)
    TILE_N: tl.constexpr,  # keys per loop step: BLOCK_N or a divisor of it
    HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr,  # Q/K/V/O are TensorDescriptors
    DESC_RANK: tl.constexpr,  # 3: [B*H, S, D] descriptors; 4: [B, H, S, D]
    HAS_LENS: tl.constexpr,
    TAIL_LAST: tl.constexpr,  # the partial tail key block in a masked second phase (no LENS); else mask where needed
    DOT_FP32: tl.constexpr,  # upcast operands to fp32 before tl.dot (interpreter)
    INPUT_PRECISION: tl.constexpr,
    LAZY_RESCALE: tl.constexpr = False,
    STORE_LSE: tl.constexpr = False,  # also write the row log-sum-exp (for the backward); -inf for keyless rows
    HAS_DST: tl.constexpr = False,  # scatter the output rows through DST (the op's inverse layout, fused)
):
    """One program = one query block of one (b, h). TAIL_LAST (no kv_block_lens) runs the selected blocks
    unmasked and defers the partial tail key block `TAIL_BLK` (-1: none) to a masked second phase; otherwise every
    step tests whether its keys run past S (or the block's length) and masks only then."""
    SUB: tl.constexpr = BLOCK_N // TILE_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)

    row = pid_bh.to(tl.int64) * N_QB + pid_m
    cnt = tl.minimum(tl.load(CNT + row), MAX_KV)
    idx_row = IDX + row * MAX_KV

    # where does the partial tail block sit in this row's selection (-1: not selected / no tail)?
    pos = tl.full([], -1, tl.int32)
    if TAIL_LAST:
        offs_c = tl.arange(0, 64)
        for c0 in range(0, cnt, 64):
            # -2 past the count: never equal to TAIL_BLK (a block id, or -1 when S is a multiple of BLOCK_N)
            ids = tl.load(idx_row + c0 + offs_c, mask=c0 + offs_c < cnt, other=-2)
            hit = tl.reduce(tl.where(ids == TAIL_BLK, c0 + offs_c, -1), 0, _MAX)
            pos = tl.maximum(pos, hit)
    has_tail = (pos >= 0).to(tl.int32)
    last_j = tl.load(idx_row + cnt - 1, mask=cnt > 0, other=0)

    # ---- Q tile
    if USE_TMA:
        if DESC_RANK == 3:
            q = Q.load([pid_bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
    out_dtype = q.dtype
    if DOT_FP32:
        q = q.to(tl.float32)

    # finite start: a row whose every key is masked keeps m = -1e30, p = 0, l = 0 (no inf - inf)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)

    n_main = (cnt - has_tail) * SUB
    for phase in tl.static_range(TAIL_LAST + 1):
        if phase == 0:
            lo = 0
            if TAIL_LAST:
                hi = n_main
            else:
                hi = cnt * SUB
        else:  # the tail block, masked
            lo = n_main
            hi = n_main + has_tail * SUB
        for t in range(lo, hi):
            if phase == 0:
                e = t // SUB
                j = tl.load(idx_row + e)
                if TAIL_LAST:
                    j = tl.where(e == pos, last_j, j)  # the tail's slot runs the row's last entry instead
            else:
                j = TAIL_BLK
            start_n = j * BLOCK_N + (t % SUB) * TILE_N
            # ---- K tile
            if USE_TMA:
                if DESC_RANK == 3:
                    k = K.load([pid_bh, start_n, 0]).reshape(TILE_N, HEAD_DIM)
                else:
                    k = K.load([b, h, start_n, 0]).reshape(TILE_N, HEAD_DIM)
            else:
                kn = start_n + offs_n
                k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
                k = tl.load(k_base + kn[:, None].to(tl.int64) * sks + offs_d[None, :], mask=kn[:, None] < S, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)

            if phase == 1 or not TAIL_LAST:
                n_valid = S - start_n  # keys of this tile that exist / are valid
                if HAS_LENS:
                    n_valid = tl.minimum(n_valid, j * BLOCK_N + tl.load(LENS + j) - start_n)
                if TAIL_LAST:  # the tail block: always partial
                    qk = tl.where(offs_n[None, :] < n_valid, qk, float("-inf"))
                elif n_valid < TILE_N:
                    qk = tl.where(offs_n[None, :] < n_valid, qk, float("-inf"))

            m_ij = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)
            if LAZY_RESCALE:
                # keep a stale running max unless some row's max grew by more than 2**8 (then p <= 256):
                # the rescale of acc is skipped in most steps (one CTA-wide reduction instead)
                if tl.reduce(m_ij - m_i, 0, _MAX) > 8.0:
                    alpha = tl.math.exp2(m_i - m_ij)
                    l_i = l_i * alpha
                    acc = acc * alpha[:, None]
                    m_i = m_ij
                p = tl.math.exp2(qk * qk_scale - m_i[:, None])
                l_i = l_i + tl.reduce(p, 1, _SUM)
            else:
                p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
                alpha = tl.math.exp2(m_i - m_ij)
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
                acc = acc * alpha[:, None]
                m_i = m_ij
            # ---- V tile
            if USE_TMA:
                if DESC_RANK == 3:
                    v = V.load([pid_bh, start_n, 0]).reshape(TILE_N, HEAD_DIM)
                else:
                    v = V.load([b, h, start_n, 0]).reshape(TILE_N, HEAD_DIM)
            else:
                kn = start_n + offs_n
                v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
                v = tl.load(v_base + kn[:, None].to(tl.int64) * svs + offs_d[None, :], mask=kn[:, None] < S, other=0.0)
            if DOT_FP32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(out_dtype)  # rows with no key: acc == 0 -> 0
    if HAS_DST:
        dst = tl.load(DST + offs_m, mask=offs_m < S, other=-1)
        o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + dst[:, None].to(tl.int64) * sos + offs_d[None, :]
        tl.store(o_ptrs, out, mask=dst[:, None] >= 0)
    elif USE_TMA:
        if DESC_RANK == 3:
            O.store([pid_bh, start_m, 0], out.reshape(1, BLOCK_M, HEAD_DIM))
        else:
            O.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * sos + offs_d[None, :]
        tl.store(o_ptrs, out, mask=offs_m[:, None] < S)
    if STORE_LSE:  # natural log: (m + log2 l) * ln 2, with m and l in the exp2 domain of qk_scale
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


_TMA_BROKEN: set = set()  # (device index, config) keys whose TMA compile failed once


def _norm_block_size(block_size) -> tuple[int, int]:
    try:
        bm, bn = (int(x) for x in block_size)
    except Exception:
        raise ValueError(f"block_size must be a pair (BLOCK_M, BLOCK_N); got {block_size!r}") from None
    if bm not in SUPPORTED_BLOCK_SIZES or bn not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {(bm, bn)} not supported: BLOCK_M and BLOCK_N must each be one of {SUPPORTED_BLOCK_SIZES}")
    return bm, bn


def supports(q: torch.Tensor, block_size=(128, 128)) -> tuple[bool, str]:
    """`(True, "")` if `block_sparse_attn` can run on a query like `q [B, H, S, D]` with this block size, else
    `(False, reason)` (the caller then falls back to dense attention). Cheap: no launch.

    Example:
        >>> ok, why = supports(torch.empty(1, 2, 100, 96), (128, 128))
        >>> ok, why
        (False, 'head_dim 96 not supported (one of (32, 64, 128))')
    """
    if triton is None:
        return False, "triton is not installed"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return False, f"q must be a 4-D tensor [B, H, S, D]; got {getattr(q, 'shape', type(q))}"
    if q.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} not supported (one of {SUPPORTED_DTYPES})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {q.shape[-1]} not supported (one of {SUPPORTED_HEAD_DIMS})"
    if q.numel() == 0:
        return False, "empty input"
    try:
        _norm_block_size(block_size)
    except ValueError as e:
        return False, str(e)
    if q.device.type == "cuda":
        return True, ""
    if q.device.type == "cpu":
        if interpreting():
            return True, ""
        return False, "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"device {q.device} not supported (CUDA, or CPU under the Triton interpreter)"


def _check(q, k, v, kv_indices, kv_counts, block_size, kv_block_lens, scale):
    """Raise on a malformed call; return `(block_size, scale)` with their defaults resolved."""
    block_size = _norm_block_size(block_size) if triton is not None else block_size
    ok, why = supports(q, block_size)
    if not ok:
        raise ValueError(f"block_sparse_attn: {why}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"block_sparse_attn: q, k, v must have equal shapes [B, H, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"block_sparse_attn: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"block_sparse_attn: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, H, S, _ = q.shape
    bm, bn = block_size
    n_qb, n_kb = -(-S // bm), -(-S // bn)
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts), ("kv_block_lens", kv_block_lens)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64, torch.int16):
            raise ValueError(f"block_sparse_attn: {name} must be an int32 tensor; got {getattr(t, 'dtype', type(t))}")
        if t.device != q.device:
            raise ValueError(f"block_sparse_attn: {name} is on {t.device}, q on {q.device}")
    if tuple(kv_counts.shape) != (B, H, n_qb):
        raise ValueError(f"block_sparse_attn: kv_counts must be [B, H, ceil(S/BLOCK_M)] = {(B, H, n_qb)}; got "
                         f"{tuple(kv_counts.shape)}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (B, H, n_qb) or kv_indices.shape[3] < 1:
        raise ValueError(f"block_sparse_attn: kv_indices must be [B, H, ceil(S/BLOCK_M), max_kv >= 1] with leading "
                         f"dims {(B, H, n_qb)}; got {tuple(kv_indices.shape)}")
    if kv_block_lens is not None and tuple(kv_block_lens.shape) != (n_kb,):
        raise ValueError(f"block_sparse_attn: kv_block_lens must be [ceil(S/BLOCK_N)] = [{n_kb}]; got "
                         f"{tuple(kv_block_lens.shape)}")
    return block_size, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _tma_ok(t: torch.Tensor) -> bool:
    """Can `t` ([B, H, S, D], last dim contiguous) back a TMA descriptor without a copy."""
    es = t.element_size()
    return t.stride(-1) == 1 and all((s * es) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _desc(t: torch.Tensor, rank: int, rows: int):
    B, H, S, D = t.shape
    if rank == 3:
        return _TensorDescriptor(t, [B * H, S, D], [t.stride(1), t.stride(2), 1], [1, rows, D])
    return _TensorDescriptor(t, [B, H, S, D], [t.stride(0), t.stride(1), t.stride(2), 1], [1, 1, rows, D])


_OPTION_KEYS = ("num_warps", "num_stages", "use_tma", "tail_last", "tile_n", "maxnreg", "lazy_rescale")


def _default_launch(q: torch.Tensor, bm: int, bn: int) -> dict:
    """Launch options on CUDA, as measured on H100/H200 (docs/kernel-notes.md)."""
    D = q.shape[-1]
    cap = torch.cuda.get_device_capability(q.device)
    hopper = cap[0] >= 9 and _TensorDescriptor is not None
    opts = dict(num_warps=8 if bm == 128 else 4, num_stages=4 if D <= 64 else 3,
                use_tma=hopper, tail_last=False, lazy_rescale=False, tile_n=bn, maxnreg=None)
    if hopper and D == 128 and q.dtype != torch.float32:
        if bm == 128:  # two 8-warp programs per SM (128 registers); tail deferred; rescale when a max grows > 2**8
            opts.update(tile_n=64, num_stages=2, maxnreg=128, tail_last=True, lazy_rescale=True)
        elif bn == 128:  # (64, 128): the (64, 64) kernel's steps, two programs per SM by shared memory
            opts.update(tile_n=64, tail_last=True)
        # (64, 64): the tail tested in the loop, 5-6% faster than tail_last on an H200
    if cap[0] < 9:  # Ampere and older: less shared memory
        opts["num_stages"] = 2
    if q.dtype == torch.float32:  # exact (ieee) fp32 products: correct, not fast; small tiles to fit
        opts.update(num_stages=1, use_tma=False, tile_n=min(bn, 32))
    return opts


def _launch(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, *, out=None, fallback=True,
            lse=None, out_rows=None, out_len=None, **options):
    """Launch the kernel on checked inputs; `options` override `_default_launch` (the benchmark sweeps them).

    `out` is written in place when given; `lse` (float32 `[B, H, S]`) receives the row log-sum-exp;
    `out_rows`/`out_len` scatter the rows as `block_sparse_attn_scattered` does (not with `lse`). With
    `fallback`, a TMA variant that fails to compile is remembered and pointer loads are used instead.
    """
    B, H, S, D = q.shape
    bm, bn = block_size
    n_qb = -(-S // bm)
    interpret = q.device.type == "cpu" or interpreting()
    bad = set(options) - set(_OPTION_KEYS)
    if bad:
        raise TypeError(f"unknown launch options {sorted(bad)}; valid: {_OPTION_KEYS}")

    def fix(t):  # last dim must be contiguous; otherwise any strides
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = fix(q), fix(k), fix(v)
    idx = kv_indices.to(torch.int32).contiguous()
    cnt = kv_counts.to(torch.int32).contiguous()
    lens = kv_block_lens.to(torch.int32).contiguous() if kv_block_lens is not None else cnt  # dummy pointer
    S_out = S
    if out_rows is not None:
        if lse is not None:
            raise ValueError("out_rows and lse cannot be combined")
        if tuple(out_rows.shape) != (S,) or out_rows.device != q.device or out_len is None:
            raise ValueError(f"out_rows must be an int tensor [S] = [{S}] on {q.device}, with out_len; got "
                             f"{tuple(out_rows.shape)} on {out_rows.device}, out_len {out_len}")
        out_rows, S_out = out_rows.to(torch.int32).contiguous(), int(out_len)
    if out is None:
        out = torch.empty((B, H, S_out, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, H, S_out, D) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(B, H, S_out, D)} tensor of q's dtype")
    if lse is not None and (tuple(lse.shape) != (B, H, S) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError("lse must be a contiguous float32 [B, H, S] tensor")
    qk_scale = float(scale) * _LOG2E

    if interpret:
        opts = dict(num_warps=4, num_stages=1, use_tma=False, tail_last=True, tile_n=bn, maxnreg=None,
                    lazy_rescale=False)
    else:
        opts = _default_launch(q, bm, bn)
    opts.update({key: val for key, val in options.items() if val is not None})
    extra = {} if (interpret or not opts["maxnreg"]) else {"maxnreg": int(opts["maxnreg"])}
    if opts["use_tma"] and _TensorDescriptor is None:
        opts["use_tma"] = False
    tail_last = bool(opts["tail_last"]) and kv_block_lens is None  # with lens any block may be short
    tail_blk = (S - 1) // bn if S % bn else -1
    tn = int(opts["tile_n"])
    if tn not in (16, 32, 64, 128) or bn % tn:
        raise ValueError(f"tile_n {tn} must divide BLOCK_N {bn}")
    cfg_key = (q.device, q.dtype, D, bm, bn, *(opts[key] for key in _OPTION_KEYS))
    if opts["use_tma"] and not interpret and fallback and cfg_key in _TMA_BROKEN:
        opts["use_tma"] = False

    def run(use_tma: bool):
        if use_tma:
            qq, kk, vv = (t if _tma_ok(t) else t.contiguous() for t in (q, k, v))
            # 3-D [B*H, S, D] when every tensor folds (b, h) into one stride, else 4-D; out is contiguous
            rank = 3 if all(t.stride(0) == t.shape[1] * t.stride(1) or t.shape[0] == 1 for t in (qq, kk, vv)) else 4
            args = (_desc(qq, rank, bm), _desc(kk, rank, tn), _desc(vv, rank, tn),
                    out if out_rows is not None else _desc(out, rank, bm))
        else:
            rank, qq, kk, vv = 3, q, k, v
            args = (qq, kk, vv, out)
        jit(_fwd_kernel, interpret)[(n_qb, B * H)](
            *args, idx, cnt, lens, lse if lse is not None else cnt, out_rows if out_rows is not None else cnt,
            *qq.stride()[:3], *kk.stride()[:3], *vv.stride()[:3], *out.stride()[:3],
            H, S, n_qb, idx.shape[-1], tail_blk, qk_scale,
            BLOCK_M=bm, BLOCK_N=bn, TILE_N=tn, HEAD_DIM=D,
            USE_TMA=bool(use_tma), DESC_RANK=rank, HAS_LENS=kv_block_lens is not None,
            TAIL_LAST=tail_last, DOT_FP32=interpret, LAZY_RESCALE=bool(opts["lazy_rescale"]), STORE_LSE=lse is not None,
            HAS_DST=out_rows is not None, INPUT_PRECISION="ieee" if (q.dtype == torch.float32 or interpret) else "tf32",
            num_warps=opts["num_warps"], num_stages=opts["num_stages"], **extra,
        )

    if interpret:
        with interpreter(True):
            run(opts["use_tma"])
    elif opts["use_tma"] and fallback:
        try:
            run(True)
        except Exception as e:  # compile or launch failure of the TMA variant: remember, use pointer loads
            _TMA_BROKEN.add(cfg_key)
            warnings.warn(f"block_sparse_attn: TMA path failed ({type(e).__name__}: {e}); using pointer loads", RuntimeWarning)
            run(False)
    else:
        run(opts["use_tma"])
    return out


def block_sparse_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                      kv_counts: torch.Tensor, *, block_size: tuple[int, int] = (128, 128), scale: float | None = None,
                      kv_block_lens: torch.Tensor | None = None, return_lse: bool = False):
    """Block-sparse attention with a Triton kernel, differentiable (Triton backward) in q, k and v.

    Query block `i` (rows `i*BLOCK_M .. (i+1)*BLOCK_M`, clipped to `S`) attends to the key blocks
    `kv_indices[b, h, i, :kv_counts[b, h, i]]`, key block `j` covering key rows
    `j*BLOCK_N .. (j+1)*BLOCK_N` clipped to `S`. These are the semantics of FlexAttention's
    `BlockMask.from_kv_blocks(kv_counts, kv_indices, BLOCK_SIZE=(BLOCK_M, BLOCK_N))` with no
    mask_mod, and of `block_sparse_attn_reference`. A query row that sees no key at all (count 0, or
    every selected key masked by `kv_block_lens`) returns zeros, not NaN.

    Forward calls that `hopper.supports` accepts (sm_90, 128x128 or 64x64 blocks, 16-bit, head_dim 128) run the
    Gluon kernels of `hopper`/`hopper64` unless the `hopper` kernel path is off (`SPARSIFY_KERNELS=-hopper`);
    the rest run the plain Triton kernel, on CUDA or on CPU under `TRITON_INTERPRET=1` (slow, for tests). With
    grad, the call goes through `block_sparse_bwd.BlockSparseAttnFunction` (Triton backward).

    Args:
        q, k, v: `[B, H, S, D]`, one dtype: float16 or bfloat16 (float32 is accepted: exact fp32
            products, for tests, slow on CUDA); any strides (a copy is made only if the last dim is not
            contiguous or, for TMA, a stride is not 16-byte aligned). D must be 32, 64 or 128.
        kv_indices: int32 `[B, H, ceil(S/BLOCK_M), max_kv]`, key-block ids in `[0, ceil(S/BLOCK_N))`;
            entries past `kv_counts` are ignored. Ids within a row must be distinct and in range (not
            checked: that would cost a device sync; repeated or out-of-range ids give undefined results).
        kv_counts: int32 `[B, H, ceil(S/BLOCK_M)]`, live entries per query block (clamped to max_kv).
        block_size: `(BLOCK_M, BLOCK_N)`, each 64 or 128.
        scale: softmax scale; default `1/sqrt(D)`.
        kv_block_lens: optional int32 `[ceil(S/BLOCK_N)]`, shared by every batch and head: only the first
            `kv_block_lens[j]` keys of key block `j` are valid (padded partial tiles). Equivalent to the
            reference's `key_mask` with those positions False.
        return_lse: also return the row log-sum-exp of the scaled scores (float32 `[B, H, S]`, natural
            log, -inf for rows that see no key; not differentiable).

    Returns:
        `[B, H, S, D]`, contiguous, in q's dtype; with `return_lse`, the pair `(out, lse)`.

    Raises:
        ValueError: unsupported dtype, head_dim, block size or device, or inconsistent shapes.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> n_qb = n_kb = 3  # ceil(300 / 128)
        >>> idx = torch.tensor([0, 2, 0], dtype=torch.int32, device="cuda").expand(1, 2, n_qb, 3)
        >>> cnt = torch.full((1, 2, n_qb), 2, dtype=torch.int32, device="cuda")  # blocks 0 and 2
        >>> out = block_sparse_attn(q, k, v, idx, cnt, block_size=(128, 128))
        >>> out.shape
        torch.Size([1, 2, 300, 64])
    """
    block_size, scale = _check(q, k, v, kv_indices, kv_counts, block_size, kv_block_lens, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        from .block_sparse_bwd import BlockSparseAttnFunction

        out, lse = BlockSparseAttnFunction.apply(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens)
        return (out, lse) if return_lse else out
    if return_lse:
        B, H, S, _ = q.shape
        lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
        return _launch(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, lse=lse), lse
    out = _hopper(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens)
    if out is not None:
        return out
    return _launch(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens)


_HOPPER_OFF: set = set()  # (device, dtype, block size) keys whose Gluon kernel failed once; "import": no Gluon


def _hopper(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, out_rows=None, out_len=None):
    """The Gluon kernel's output when one serves the call, else None (after one warning if it fails to import or
    to run for a (device, dtype, block size): the plain kernel is used from then on)."""
    from ._triton import enabled

    if not (enabled("hopper") and q.is_cuda and "import" not in _HOPPER_OFF
            and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return None
    try:
        from . import hopper, hopper64
    except Exception as e:  # no (or another) Gluon in this triton
        _HOPPER_OFF.add("import")
        warnings.warn(f"block_sparse_attn: the Gluon Hopper kernels are unavailable ({type(e).__name__}: {e}); "
                      "using the plain Triton kernel", RuntimeWarning)
        return None
    key = (q.device, q.dtype, tuple(block_size))
    if key in _HOPPER_OFF or not hopper.supports(q, k, v, block_size, kv_block_lens)[0]:
        return None
    fn = hopper.block_sparse_attn_hopper if tuple(block_size) == (128, 128) else hopper64.block_sparse_attn_hopper64
    try:
        return fn(q, k, v, kv_indices, kv_counts, scale, out_rows=out_rows, out_len=out_len)
    except Exception as e:  # compile or launch failure: remember, use the plain kernel
        _HOPPER_OFF.add(key)
        warnings.warn(f"block_sparse_attn: the Gluon Hopper kernel for {tuple(block_size)} blocks failed "
                      f"({type(e).__name__}: {e}); using the plain Triton kernel", RuntimeWarning)
        return None


def block_sparse_attn_scattered(q, k, v, kv_indices, kv_counts, out_rows, out_len, *, block_size=(128, 128),
                                scale=None, kv_block_lens=None):
    """`block_sparse_attn` whose output rows go straight to `out_rows` (no gradient): the op's inverse layout.

    Query row `r` is written to row `out_rows[r]` of a `[B, H, out_len, D]` tensor by the kernel's own store (no
    separate pass over the output); rows with `out_rows[r] < 0` are dropped, output rows nobody names are left
    uninitialized. Forward only.

    Args:
        q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens: as for `block_sparse_attn`.
        out_rows: int `[S]`, the output row of each query row (< 0: none), on q's device.
        out_len: rows of the result.

    Returns:
        `[B, H, out_len, D]` in q's dtype.

    Example:
        >>> q = torch.randn(1, 1, 200, 64, device="cuda", dtype=torch.bfloat16)
        >>> idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device="cuda")  # both query blocks see key block 0
        >>> cnt = torch.ones(1, 1, 2, dtype=torch.int32, device="cuda")
        >>> rows = torch.arange(199, -1, -1, dtype=torch.int32, device="cuda")  # reverse the rows
        >>> block_sparse_attn_scattered(q, q, q, idx, cnt, rows, 200).shape
        torch.Size([1, 1, 200, 64])
    """
    block_size, scale = _check(q, k, v, kv_indices, kv_counts, block_size, kv_block_lens, scale)
    with torch.no_grad():
        out = _hopper(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, out_rows, out_len)
        if out is not None:
            return out
        return _launch(q, k, v, kv_indices, kv_counts, block_size, scale, kv_block_lens, out_rows=out_rows,
                       out_len=out_len)
