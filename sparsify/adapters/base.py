"""The adapter interface, the adapter registry, and the generic fixed-grid adapter."""

from __future__ import annotations

import operator
from typing import Callable

import torch

from ..errors import SparsifyArgumentError
from ..geometry import Geometry

_ADAPTERS: list[type] = []


def register_adapter(cls):
    """Register an Adapter subclass; `adapter_for` tries them in registration order."""
    _ADAPTERS.append(cls)
    return cls


class Adapter:
    """How one model family lays out tokens.

    Subclasses implement `matches(model)`, `geometry(model, args, kwargs)` (called with the top-level
    forward's arguments on every call) and `example_inputs(model)` (small inputs for discovery).
    """

    name = "base"
    timestep_pos: int | None = None  # position of `timestep` in the top-level forward, if positional

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return False

    def timestep(self, model, args, kwargs):
        """The denoising timestep of this forward call (a tensor or number), or None if unknown."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if self.timestep_pos is not None and len(args) > self.timestep_pos:
            return args[self.timestep_pos]
        return None

    def geometry(self, model, args, kwargs) -> Geometry:
        raise NotImplementedError

    def prepare_site(self, module: torch.nn.Module) -> Callable[[], None] | None:
        """Family-specific changes to an installed site's module (e.g. a fused processor); returns their
        undo, or None when nothing changed. Called by `sparsify()` in mode `install` only."""
        return None

    def example_inputs(self, model, *, device=None, dtype=None) -> dict:
        raise NotImplementedError(
            f"adapter '{self.name}' cannot make example inputs; pass example_inputs= to sparsify()")


class GridAdapter(Adapter):
    """For any other model: a fixed `(T, H, W)` grid, or a callable `grid(args, kwargs) -> (T, H, W)`.

    Args:
        grid: the token grid, or a callable returning it from the top-level forward's arguments.
        video_start: index of the first video token in each attention sequence (text before it).
        timestep: optional callable `timestep(args, kwargs)` returning the denoising timestep; by default
            the `timestep` keyword argument, if any.

    Example:
        >>> GridAdapter((4, 8, 8)).geometry(None, (), {}).video_len
        256
    """

    name = "grid"

    def __init__(self, grid: tuple[int, int, int] | Callable, video_start: int = 0, timestep: Callable | None = None):
        self.grid = grid if callable(grid) else check_grid(grid)
        self.video_start = check_count(video_start, "video_start")
        self._timestep = timestep

    def timestep(self, model, args, kwargs):
        return self._timestep(args, kwargs) if self._timestep is not None else kwargs.get("timestep")

    def geometry(self, model, args, kwargs) -> Geometry:
        if not callable(self.grid):
            return Geometry(self.grid, self.video_start)
        try:
            g = self.grid(args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the user's callable is reported the same way
            raise SparsifyArgumentError(
                "grid", self.grid, f"calling grid(args, kwargs) with the forward call's arguments raised "
                f"{type(e).__name__}: {e}; a callable grid takes (args, kwargs) and returns (T, H, W)") from e
        return Geometry(check_grid(g, returned=True), self.video_start)


def check_count(value, argument: str) -> int:
    """`value` as an int >= 0 (Python, numpy or 0-d integer tensor; not a bool), or SparsifyArgumentError.

    Example:
        >>> check_count(3, "video_start")
        3
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise SparsifyArgumentError(argument, value, "must be an integer >= 0 (an index into the attention "
                                                     "sequence)") from None
    if n < 0:
        raise SparsifyArgumentError(argument, value, "must be an integer >= 0 (an index into the attention sequence)")
    return int(n)


def check_grid(grid, argument: str = "grid", *, returned: bool = False) -> tuple[int, int, int]:
    """`grid` as a `(T, H, W)` tuple of positive ints, or SparsifyArgumentError naming `argument`.

    Accepts a tuple, list or torch.Size of three Python/numpy integers (not booleans, not floats).
    With `returned`, `grid` is what a callable `grid(args, kwargs)` returned, and the message says so.

    Example:
        >>> check_grid([4, 30, 52])
        (4, 30, 52)
    """
    valid = ("must be the latent token grid (T, H, W): three positive integers (frames, rows and columns "
             "of tokens after patchifying), or a callable grid(args, kwargs) returning them")
    if returned:
        valid = "is what the callable grid(args, kwargs) returned; it " + valid
    if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 3:
        n = f" (it has {len(grid)} values)" if isinstance(grid, (tuple, list, torch.Size)) else ""
        raise SparsifyArgumentError(argument, grid, valid + n)
    out = []
    for x in grid:
        try:
            if isinstance(x, bool):
                raise TypeError
            out.append(int(operator.index(x)))
        except TypeError:
            raise SparsifyArgumentError(argument, grid, valid + f" ({x!r} is not an integer)") from None
    if min(out) < 1:
        raise SparsifyArgumentError(argument, grid, valid + " (every size must be >= 1)")
    return tuple(out)


def adapter_for(model: torch.nn.Module) -> Adapter | None:
    """The registered adapter for `model`'s family, or None."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls()
    return None


def device_dtype(model):
    """`(device, dtype)` of `model`'s parameters: the first one's device and the floating dtype holding the most
    elements (diffusers keeps small modules such as Wan's `scale_shift_table` in fp32 in a bf16 model).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(8, 8).to(torch.bfloat16))
        >>> device_dtype(m)
        (device(type='cpu'), torch.bfloat16)
    """
    params = list(model.parameters())
    if not params:
        return torch.device("cpu"), torch.float32
    count: dict = {}
    for p in params:
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return params[0].device, max(count, key=count.get) if count else params[0].dtype


def _arg(args, kwargs, name, pos):
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    raise TypeError(f"sparsify adapter: the forward call has no '{name}' argument")
