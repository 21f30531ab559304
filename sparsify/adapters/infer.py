"""Geometry inferred from the shapes at the call: the video latent, the patch embedding, and where the video sits."""

from __future__ import annotations

import inspect
import math

import torch

from ..geometry import Geometry
from .base import Adapter

#: `video_start` meaning "the video tokens are the last ones of the sequence" (text first, any text length).
VIDEO_LAST = -1

_EMBED_TYPES = (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear)


class _Stop(Exception):
    """Raised by the probe hook once the patch embedding has been seen (the rest of the forward is not needed)."""


class InferredAdapter(Adapter):
    """The generic adapter: the token grid from the 5-D video input of the top-level forward and the patch
    sizes found at discovery (or from the forward's frame count, height and width arguments, see `sizes`),
    the video span from the attention graph (see `sparsify.passes.discover.video_spans`).

    Attributes:
        where: the video input: a positional index or a keyword name.
        dims: the `(frames, height, width)` dimensions of that input.
        patch: `(pt, ph, pw)`; the grid of a call is `(F // pt, H // ph, W // pw)`.
        video_start: first video token in every sparse site's sequence (`VIDEO_LAST`: the last tokens).
        embed: module path of the patch embedding it was inferred from.
        sizes: for a model fed patchified tokens: the `(name, position)` of the forward's integer arguments
            giving F, H and W (e.g. LTX-Video's `num_frames`, `height`, `width`); None reads the 5-D latent.

    Example:
        >>> a = InferredAdapter(where="hidden_states", dims=(2, 3, 4), patch=(1, 2, 2))
        >>> a.geometry(None, (), {"hidden_states": torch.zeros(1, 16, 5, 8, 8)}).grid
        (5, 4, 4)
        >>> s = InferredAdapter(None, (), (1, 1, 1), sizes=(("num_frames", 4), ("height", 5), ("width", 6)))
        >>> s.geometry(None, (), {"num_frames": 3, "height": 8, "width": 8}).grid, s.source
        ((3, 8, 8), 'forward arguments num_frames, height, width')
    """

    name = "inferred"

    def __init__(self, where, dims, patch, video_start: int = 0, embed: str = "", sizes=None):
        self.where, self.dims, self.patch, self.video_start, self.embed = where, tuple(dims), tuple(patch), video_start, embed
        self.sizes = tuple(sizes) if sizes is not None else None

    def __repr__(self):
        return (f"InferredAdapter(where={self.where!r}, dims={self.dims}, patch={self.patch}, "
                f"video_start={self.video_start}, embed={self.embed!r}, sizes={self.sizes!r})")

    @property
    def source(self) -> str:
        """Where the grid is read: the forward's size arguments, or the patch embedding and its patch."""
        if self.sizes is not None:
            return "forward arguments " + ", ".join(name for name, _ in self.sizes)
        return f"{self.embed} patch {self.patch}"

    def _video(self, args, kwargs):
        if isinstance(self.where, int):
            return args[self.where] if len(args) > self.where else None
        return kwargs.get(self.where)

    def geometry(self, model, args, kwargs) -> Geometry:
        if self.sizes is not None:
            vals = [_size_value(args, kwargs, name, pos) for name, pos in self.sizes]
            if any(v is None for v in vals):
                raise ValueError(
                    f"sparsify: the inferred geometry reads the grid from forward arguments "
                    f"{', '.join(n for n, _ in self.sizes)}, but this call passes {vals} (positive integers expected); "
                    "pass them, or grid=(T, H, W) to sparsify()")
            return Geometry(tuple(v // p for v, p in zip(vals, self.patch)), self.video_start)
        x = self._video(args, kwargs)
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(
                f"sparsify: the inferred geometry reads the video latent from forward argument {self.where!r}, "
                f"but this call passes {type(x).__name__ if x is None else tuple(getattr(x, 'shape', ()))}; pass "
                "grid=(T, H, W) to sparsify() for this model")
        grid = tuple(int(x.shape[d]) // p for d, p in zip(self.dims, self.patch))
        return Geometry(grid, self.video_start)

    def timestep(self, model, args, kwargs):
        if "timestep" in kwargs:
            return kwargs["timestep"]
        pos = _positional_index(model, "timestep")
        return args[pos] if pos is not None and len(args) > pos else None


def _positional_index(model, name):
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


def _video_input(args, kwargs):
    """(where, tensor) of the video latent: `hidden_states` if 5-D, else the first 5-D floating tensor."""
    x = kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor) and x.dim() == 5:
        return "hidden_states", x
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() == 5 and a.is_floating_point():
            return i, a
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor) and a.dim() == 5 and a.is_floating_point():
            return k, a
    return None, None


def probe_patch_embedding(model, args, kwargs, x):
    """Run `model` until its patch embedding: the first Conv3d, Conv2d or Linear whose input holds at least
    the whole latent `x` (a multiple of its voxels). Returns `(path, module, input shape, output shape)` or None.
    """
    voxels = x.numel() // x.shape[1] if x.shape[1] else 0
    found = []
    hooks = []

    def hook(name):
        def fn(mod, inputs, output):
            a = inputs[0] if inputs else None
            if isinstance(a, torch.Tensor) and isinstance(output, torch.Tensor) and a.numel() >= x.numel() \
                    and voxels and a.numel() % voxels == 0:
                found.append((name, mod, tuple(a.shape), tuple(output.shape)))
                raise _Stop
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, _EMBED_TYPES):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Stop:
        pass
    except Exception:  # noqa: BLE001 - a model that fails on these inputs has no inferred geometry
        return None
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def _patch_sizes(x_shape, out_shape, mod, batch):
    """Candidate `(dims, patch)` pairs consistent with the embedding's output, best first."""
    B = batch
    # (F, H, W) dims -> channel dim, for [B, C, F, H, W], [B, F, C, H, W] and channels-last [B, F, H, W, C]
    layouts = {(2, 3, 4): 1, (1, 3, 4): 2, (1, 2, 3): 4}
    cands = []
    if isinstance(mod, torch.nn.Conv3d) and len(out_shape) == 5:
        grids = [tuple(out_shape[2:])]
    elif isinstance(mod, torch.nn.Conv2d) and len(out_shape) == 4 and out_shape[0] % B == 0:
        grids = [(out_shape[0] // B, out_shape[2], out_shape[3])]
    elif isinstance(mod, torch.nn.Linear) and len(out_shape) == 5:
        grids = [tuple(out_shape[1:4])]
    elif isinstance(mod, torch.nn.Linear) and len(out_shape) == 3:
        grids = None  # tokens only: solve below
    else:
        return []
    for dims, channel_dim in layouts.items():
        chans = x_shape[channel_dim]
        F, H, W = (x_shape[d] for d in dims)
        if grids is not None:
            for g in grids:
                if all(n % t == 0 and t > 0 for n, t in zip((F, H, W), g)):
                    cands.append((dims, (F // g[0], H // g[1], W // g[2]), chans))
            continue
        n_tok = out_shape[1]
        for pt in (d for d in range(1, F + 1) if F % d == 0):
            for ph in (d for d in range(1, H + 1) if H % d == 0):
                for pw in (d for d in range(1, W + 1) if W % d == 0):
                    if (F // pt) * (H // ph) * (W // pw) == n_tok and mod.in_features % (pt * ph * pw) == 0 \
                            and mod.in_features // (pt * ph * pw) >= chans:
                        cands.append((dims, (pt, ph, pw), chans))

    def score(c):
        dims, (pt, ph, pw), chans = c
        in_ch = getattr(mod, "in_channels", None)
        if in_ch is None and isinstance(mod, torch.nn.Linear):
            in_ch = mod.in_features // (pt * ph * pw)
        return (in_ch != chans, ph != pw, dims != (2, 3, 4), -pt * ph * pw)

    return sorted(cands, key=score)


#: Names of the forward arguments that give a patchified model's latent frame count, height and width.
SIZE_ARGUMENTS = (("num_frames", "latent_num_frames", "num_latent_frames"), ("height", "latent_height"),
                  ("width", "latent_width"))


def _size_value(args, kwargs, name, pos):
    v = kwargs.get(name, args[pos] if pos is not None and len(args) > pos else None)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def size_arguments_adapter(model, args, kwargs) -> InferredAdapter | None:
    """An `InferredAdapter` that reads the grid from the forward's frame count, height and width arguments
    (`SIZE_ARGUMENTS`), for a model fed patchified tokens `[B, S, C]` (`hidden_states`, else the first 3-D floating
    tensor): the grid is `(F, H, W)` when `F·H·W == S`, else `(F // pt, H // p, W // p)` with the model config's
    `patch_size_t` and `patch_size` when that product is S. None when the arguments or the tokens are missing.

    Example:
        >>> # LTX-Video: forward(hidden_states=[1, 256, C], ..., num_frames=4, height=8, width=8) -> grid (4, 8, 8)
    """
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    sizes = []
    for names in SIZE_ARGUMENTS:
        name = next((n for n in names if n in params), None)
        if name is None:
            return None
        sizes.append((name, params.index(name)))
    vals = [_size_value(args, kwargs, n, p) for n, p in sizes]
    x = kwargs.get("hidden_states")
    if not (isinstance(x, torch.Tensor) and x.dim() == 3):
        x = next((a for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.Tensor) and a.dim() == 3 and a.is_floating_point()), None)
    if x is None or None in vals:
        return None
    config = getattr(model, "config", None)
    p, pt = getattr(config, "patch_size", 1), getattr(config, "patch_size_t", 1)
    for patch in ((1, 1, 1), (pt, p, p)):
        if all(isinstance(n, int) and n > 0 for n in patch) and \
                math.prod(v // n for v, n in zip(vals, patch)) == x.shape[1]:
            return InferredAdapter(None, (), patch, sizes=sizes)
    return None


def infer_adapter(model, example_inputs) -> InferredAdapter | None:
    """An `InferredAdapter` for `model` at `example_inputs`, or None when the shapes do not tell the grid
    (no 5-D video input nor size arguments, or no patch embedding found).

    The patch embedding is the first Conv3d (kernel = stride = patch), Conv2d applied frame by frame, or
    Linear on patchified tokens whose input holds the whole latent. Its output shape gives the token grid;
    the grid per call is then `(F // pt, H // ph, W // pw)` of the latent. A model fed patchified tokens
    instead has its grid read from its frame count, height and width arguments (`size_arguments_adapter`).

    Example:
        >>> # adapter = infer_adapter(model, {"hidden_states": x, "timestep": t, ...})
        >>> # adapter.geometry(model, (), inputs).grid   -> (T, H, W)
    """
    from ..passes.discover import _split_inputs

    args, kwargs = _split_inputs(example_inputs)
    where, x = _video_input(args, kwargs)
    if x is None:
        return size_arguments_adapter(model, args, kwargs)
    probe = probe_patch_embedding(model, args, kwargs, x)
    if probe is None:
        return None
    path, mod, in_shape, out_shape = probe
    cands = _patch_sizes(tuple(x.shape), out_shape, mod, int(x.shape[0]))
    if not cands:
        return None
    dims, patch, _ = cands[0]
    return InferredAdapter(where=where, dims=dims, patch=patch, embed=path)


def find_sites_inferred(model, example_inputs, unplaced: list | None = None):
    """`sparsify.find_sites` for a model without a family adapter: infer the adapter, discover the sites,
    and set the adapter's `video_start` from the spans found at the sparse sites (the most common one).

    Returns:
        `(sites, adapter)`; the adapter is None when the geometry cannot be inferred (sites are still listed,
        classified without a video length).

    Example:
        >>> # sites, adapter = find_sites_inferred(model, {"hidden_states": x, "timestep": t, ...})
    """
    from collections import Counter

    from ..passes.discover import _split_inputs, discover, discover_with_spans

    adapter = infer_adapter(model, example_inputs)
    if adapter is None:
        return discover(model, example_inputs, unplaced=unplaced), None
    args, kwargs = _split_inputs(example_inputs)
    grid = adapter.geometry(model, args, kwargs).grid
    sites, spans = discover_with_spans(model, example_inputs, grid=grid, unplaced=unplaced)
    found = Counter(v for v in spans.values() if v is not None)
    adapter.spans = spans
    adapter.video_start = found.most_common(1)[0][0] if found else 0
    return sites, adapter
