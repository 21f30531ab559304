"""What every kernel shares: the JIT cache, the interpreter switch, combiners, device constants and the backend switch."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: every call takes the PyTorch path
    triton = tl = None

_SUM = tl.standard._sum_combine if tl is not None else None
_MAX = tl.standard._elementwise_max if tl is not None else None
_MIN = tl.standard._elementwise_min if tl is not None else None

#: The Triton paths of the op, each of which has a PyTorch equivalent: `attention` (the block-sparse kernels),
#: `hopper` (their warp-specialized Gluon forms on H100/H200), `gather` (tile-order copies), `pool` (tile
#: statistics), `fuse_pool` (tile means computed by the gather), `scatter` (the inverse layout fused into the
#: kernel's store), `topk`, `peak` (Veda's key-tile peaks), `kmeans` (SVG2's assignment and selection), `rope`
#: (Wan's fused q/k RMSNorm + RoPE), `backward` (the Triton backward kernel).
PATHS = ("attention", "hopper", "gather", "pool", "fuse_pool", "scatter", "topk", "peak", "kmeans", "rope", "backward")


def _parse(spec: str, source: str) -> frozenset:
    """The paths switched off by a spec: "" or "triton" (none), "torch" (all), or "-name,-name" (those)."""
    spec = spec.strip().lower()
    if spec in ("", "triton", "all"):
        return frozenset()
    if spec in ("torch", "none", "0"):
        return frozenset(PATHS)
    off = set()
    for part in spec.split(","):
        name = part.strip().lstrip("-")
        if not part.strip().startswith("-") or name not in PATHS:
            raise ValueError(f"{source}: '{spec}' is not a kernel backend; use 'triton' (default), 'torch' (the "
                             f"PyTorch reference everywhere) or a list such as '-rope,-scatter' of paths among "
                             f"{', '.join(PATHS)}")
        off.add(name)
    return frozenset(off)


_OFF: frozenset = _parse(os.environ.get("SPARSIFY_KERNELS", ""), "SPARSIFY_KERNELS")


def enabled(path: str) -> bool:
    """Whether Triton path `path` (one of `PATHS`) is switched on (`SPARSIFY_KERNELS` / `kernel_backend`).

    Example:
        >>> with kernel_backend("-rope"):
        ...     enabled("rope"), enabled("gather")
        (False, True)
    """
    if path not in PATHS:
        raise KeyError(f"unknown kernel path '{path}'; known: {', '.join(PATHS)}")
    return path not in _OFF


@contextlib.contextmanager
def kernel_backend(spec: str):
    """The one backend switch, for a block: "triton" (every path on, the default), "torch" (the PyTorch
    reference everywhere) or "-name,-name" (those paths off). The process-wide default comes from the
    environment variable `SPARSIFY_KERNELS`, with the same syntax.

    Example:
        >>> with kernel_backend("torch"):
        ...     enabled("attention")
        False
    """
    global _OFF
    old, _OFF = _OFF, _parse(spec, "kernel_backend")
    try:
        yield
    finally:
        _OFF = old


def needs_grad(*xs: torch.Tensor) -> bool:
    """True if autograd would record an op on any of `xs` (then the differentiable PyTorch path must run).

    Example:
        >>> needs_grad(torch.zeros(1, requires_grad=True)), needs_grad(torch.zeros(1))
        (True, False)
    """
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def use_triton(path: str, *xs: torch.Tensor) -> bool:
    """Whether Triton path `path` serves tensors `xs`: switched on, Triton present, CUDA, no gradient needed.

    Example:
        >>> use_triton("gather", torch.zeros(1))  # CPU tensors take the PyTorch path
        False
    """
    return enabled(path) and triton is not None and all(x.is_cuda for x in xs) and not needs_grad(*xs)


def interpreting() -> bool:
    """True when `TRITON_INTERPRET` is set in the environment now (CPU tensors then run the Triton kernels).

    Example:
        >>> with interpreter(False):
        ...     interpreting()
        False
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def interpreter(on: bool = True):
    """Set `TRITON_INTERPRET` to `on` inside the block, restoring the previous value after.

    Example:
        >>> with interpreter():
        ...     os.environ["TRITON_INTERPRET"]
        '1'
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def available(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on `x` (CUDA, or CPU under TRITON_INTERPRET=1).

    Example:
        >>> with interpreter():
        ...     available(torch.zeros(1)) == (triton is not None)
        True
    """
    return triton is not None and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


_KERNELS: dict = {}
_LOCK = threading.Lock()


def jit(fn, interpret: bool | None = None, **options):
    """`triton.jit(fn, **options)` built once per interpreter mode (read at call time, as the tests set it).

    Example:
        >>> def k(X): pass
        >>> jit(k) is jit(k)
        True
    """
    mode = interpreting() if interpret is None else interpret
    key = (fn.__module__, fn.__qualname__, mode, tuple(sorted(options.items())))
    with _LOCK:
        if key not in _KERNELS:
            with interpreter(mode):
                _KERNELS[key] = triton.jit(fn, **options)
        return _KERNELS[key]


_CONSTS: dict = {}


def device_ints(values, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A cached integer tensor of `values` on `device`: small per-head constants (k per head, counts, head
    indices) are copied to the GPU once, not on every call (a host-to-device copy from pageable memory
    synchronizes the stream). The tensor is shared: callers must not modify it.

    Example:
        >>> device_ints([3, 5], "cpu").tolist()
        [3, 5]
    """
    return device_consts([int(v) for v in values], device, dtype)


def device_consts(values, device, dtype: torch.dtype) -> torch.Tensor:
    """`device_ints` for any dtype: a cached, shared tensor of the Python scalars `values` on `device`.

    Example:
        >>> device_consts([0.5, 0.0], "cpu", torch.float32).tolist(), device_consts([True], "cpu", torch.bool).tolist()
        ([0.5, 0.0], [True])
    """
    key = (tuple(values), str(device), dtype)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 1024:
            _CONSTS.clear()
        t = _CONSTS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return t
