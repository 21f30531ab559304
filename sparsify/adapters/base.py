"""The adapter interface, the adapter registry, and the generic fixed-grid adapter."""

from __future__ import annotations

from typing import Callable

import torch

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
        self.grid, self.video_start, self._timestep = grid, video_start, timestep

    def timestep(self, model, args, kwargs):
        return self._timestep(args, kwargs) if self._timestep is not None else kwargs.get("timestep")

    def geometry(self, model, args, kwargs) -> Geometry:
        g = self.grid(args, kwargs) if callable(self.grid) else self.grid
        return Geometry(tuple(int(x) for x in g), self.video_start)


def adapter_for(model: torch.nn.Module) -> Adapter | None:
    """The registered adapter for `model`'s family, or None."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls()
    return None


def _param(model):
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _arg(args, kwargs, name, pos):
    if name in kwargs:
        return kwargs[name]
    if len(args) > pos:
        return args[pos]
    raise TypeError(f"sparsify adapter: the forward call has no '{name}' argument")
