"""Attention-site discovery: capture the model with Dynamo and list every attention call with its module path."""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import fx

from ..factorized import site_axis
from .patterns import AttentionMatch, find_attention


@dataclass(frozen=True)
class SiteInfo:
    """One attention site found in the model.

    Attributes:
        path: module path of the innermost module that makes the call (e.g. `blocks.3.attn1`).
        kind: `self` (video only), `joint` (video and text in one sequence), `cross`, or `text`
            (text-only self-attention). Only `self` and `joint` sites can be made sparse.
        heads, head_dim: from q's shape `[B, H, S, D]`.
        q_len, kv_len: sequence lengths at the example inputs.
        has_mask: whether an attention mask is passed.
        impl: `sdpa` or `manual`.
        source: `file:line` of the call.
        axis: how a `self` site covers the video grid (`sparsify.factorized.AXES`): `full`, or factorized
            `spatial` (one frame per sequence) or `temporal` (one pixel's frames per sequence).
    """

    path: str
    kind: str
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    has_mask: bool
    impl: str
    source: str = ""
    axis: str = "full"

    def spec(self):
        from ..recipe import SiteSpec

        return SiteSpec(self.path, self.kind, self.heads, self.head_dim)


def _val(x):
    if isinstance(x, fx.Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return None


def module_path(node: fx.Node, id_to_name: dict[str, str]) -> str | None:
    """Module path of the innermost module in `node.meta['nn_module_stack']`, mapped through ids."""
    stack = node.meta.get("nn_module_stack") or {}
    for key in reversed(list(stack)):
        name = id_to_name.get(str(key).split("@")[0])
        if name is not None:
            return name
        src = stack[key][0] if isinstance(stack[key], tuple) else None
        rel = _path_from_source(src) if isinstance(src, str) else None
        if rel is not None:
            return rel
    return None


def _path_from_source(src: str) -> str | None:
    # e.g. "L['self'].blocks[0].attn1" or "L['self']._modules['blocks']._modules['0'].attn1"
    s = re.sub(r"^L\['self'\]\.?|^L\['fn'\]\.?", "", src)
    s = re.sub(r"\._modules\['([^']+)'\]|_modules\['([^']+)'\]", lambda m: "." + (m.group(1) or m.group(2)), s)
    s = re.sub(r"\[(\d+)\]", r".\1", s).strip(".")
    return s if re.fullmatch(r"[\w.]*", s) else None


def source_location(node: fx.Node) -> str:
    """`file:line` of the innermost frame of the node's stack trace."""
    st = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', st)
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""


def classify(q_len: int, kv_len: int, video_len: int | None) -> str:
    """`cross` if q and kv lengths differ; else `joint` if the sequence holds more than the video,
    `text` if it holds less (e.g. a text refiner's self-attention), else `self`."""
    if q_len != kv_len:
        return "cross"
    if video_len is not None and q_len > video_len:
        return "joint"
    if video_len is not None and q_len < video_len:
        return "text"
    return "self"


_CAPTURE_CODES: list = []  # code objects whose Dynamo cache entries discovery created (weak references)


def _drop_capture_cache_entries(seen_before: set) -> None:
    """Remove the cache entries a capture left on code objects, so that repeated captures neither hit
    Dynamo's recompile limit (after which nothing is captured) nor linger beside the user's graphs.

    Codes first compiled by a capture are remembered and cleared after every later capture too. This
    also drops other compiled entries on those codes (they recompile on their next call).
    """
    import weakref

    from torch._dynamo import convert_frame, reset_code

    for ref in list(convert_frame.input_codes.seen):
        code = ref()
        if code is not None and id(code) not in seen_before and not any(r() is code for r in _CAPTURE_CODES):
            _CAPTURE_CODES.append(weakref.ref(code))
    for ref in _CAPTURE_CODES:
        code = ref()
        if code is not None:
            reset_code(code)


def capture_graphs(model: torch.nn.Module, example_inputs) -> list[fx.GraphModule]:
    """Run `model` once under Dynamo with a recording backend and return every captured graph.

    The capture's own compiled entries are dropped afterwards (see `_drop_capture_cache_entries`).
    """
    graphs: list[fx.GraphModule] = []

    def record(gm, inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    from torch._dynamo import convert_frame

    seen_before = {id(r()) for r in convert_frame.input_codes.seen if r() is not None}
    args, kwargs = _split_inputs(example_inputs)
    compiled = torch.compile(model, backend=record, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        _drop_capture_cache_entries(seen_before)
    return graphs


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def sites_in_graph(gm: fx.GraphModule, id_to_name: dict[str, str], video_len: int | None = None,
                   unplaced: list | None = None, modules: dict | None = None,
                   grid: tuple[int, int, int] | None = None) -> list[tuple[SiteInfo, AttentionMatch]]:
    """Attention sites of one captured graph, each with its FX match.

    q may be `[B, H, S, D]`, or `[N, S, D]` with the heads folded into the batch (N = batch·heads, the
    heads read from the site module's `heads`/`num_heads` attribute when it divides N, else N).
    Calls made outside every submodule (in the model's own forward) have no site path; their
    `file:line` is appended to `unplaced` when given. With the token `grid`, factorized self-attention
    (per frame or per pixel, see `sparsify.factorized.site_axis`) is a `self` site with its axis.
    """
    out = []
    for m in find_attention(gm.graph):
        qv, kv = _val(m.q), _val(m.k)
        if not isinstance(qv, torch.Tensor) or qv.dim() not in (3, 4) or not isinstance(kv, torch.Tensor):
            continue  # neither [B, H, S, D] nor [B*H, S, D]: not a site we can serve
        path = module_path(m.node, id_to_name)
        if path is None:
            if unplaced is not None:
                unplaced.append(source_location(m.node) or "(unknown location)")
            continue
        if qv.dim() == 3:
            N, S, D = qv.shape
            H = folded_heads((modules or {}).get(path), int(N))
            B = int(N) // int(H)
        else:
            B, H, S, D = qv.shape
        kind, axis = classify(int(S), int(kv.shape[-2]), video_len), "full"
        factor = site_axis(int(S), int(kv.shape[-2]), int(B), grid) if grid is not None else None
        if factor is not None:
            kind, axis = "self", factor
            if grid[0] == grid[1] * grid[2]:
                warnings.warn(f"sparsify: site '{path}' attends over {int(S)} tokens, which is both one frame "
                              f"(H·W) and one pixel's frames (T) of the grid {tuple(grid)}: it is read as temporal "
                              "(dense unless long); discover at example inputs where T != H·W to tell", stacklevel=3)
        out.append((SiteInfo(path=path, kind=kind, heads=int(H), head_dim=int(D), q_len=int(S),
                             kv_len=int(kv.shape[-2]), has_mask=m.attn_mask is not None, impl=m.impl,
                             source=source_location(m.node), axis=axis), m))
    return out


HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads", "nheads")


def folded_heads(module, n: int) -> int:
    """Heads of an attention call whose q is `[n, S, D]`: the module's head count when it divides n, else n.

    Example:
        >>> folded_heads(type("A", (), {"heads": 4})(), 8), folded_heads(None, 8)
        (4, 8)
    """
    for attr in HEAD_ATTRS:
        h = getattr(module, attr, None)
        if isinstance(h, int) and h > 0 and n % h == 0:
            return h
    return n


def discover(model: torch.nn.Module, example_inputs, *, video_len: int | None = None,
             unplaced: list | None = None, grid: tuple[int, int, int] | None = None) -> list[SiteInfo]:
    """List every attention site of `model`, found on its Dynamo graph(s) at `example_inputs`.

    Finds `F.scaled_dot_product_attention` however it is called (positionally, by keyword, through
    diffusers' dispatcher, or bound by name at import time) and hand-written
    `softmax(q @ kᵀ * scale) @ v` in its usual spellings.

    Args:
        model: the DiT.
        example_inputs: a kwargs dict, an args tuple, or a single tensor for `model(...)`.
        video_len: video tokens per sample at these inputs, to tell `joint` from `self` sites.
        grid: the token grid `(T, H, W)` at these inputs (sets `video_len`), to find factorized sites too.
        unplaced: if given, receives the `file:line` of every attention call made outside any submodule
            (such calls cannot be sites: sparsify installs per submodule).

    Returns:
        One SiteInfo per module path, in call order.

    Example:
        >>> from sparsify.passes import discover
        >>> # for s in discover(model, inputs): print(s.path, s.kind, s.heads)
    """
    return discover_with_spans(model, example_inputs, video_len=video_len, unplaced=unplaced, grid=grid)[0]


_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}


def video_span(q: fx.Node, q_len: int, video_len: int, max_nodes: int = 2000) -> int | None:
    """Where the video tokens sit in the sequence of an attention call whose query is `q`: the nearest
    `torch.cat` above `q` (breadth first through its inputs) that builds a sequence of `q_len` tokens from
    pieces of which exactly one holds `video_len` tokens gives the offset of that piece. Returns 0 (video
    first), `VIDEO_LAST` (-1: video last, whatever the text length), another offset, or None if no such
    concatenation is found.
    """
    from ..adapters.infer import VIDEO_LAST

    if q_len == video_len:
        return 0
    seen, frontier = {q}, [q]
    while frontier and len(seen) < max_nodes:
        nxt = []
        for n in frontier:
            if n.op == "call_function" and n.target in _CAT_FNS and n.args and isinstance(n.args[0], (list, tuple)):
                parts = [_val(a) for a in n.args[0]]
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                if all(isinstance(p, torch.Tensor) for p in parts) and isinstance(dim, int):
                    lens = [int(p.shape[dim]) for p in parts]
                    if sum(lens) == q_len and lens.count(video_len) == 1:
                        off = sum(lens[:lens.index(video_len)])
                        return VIDEO_LAST if off + video_len == q_len and off else off
            for a in list(n.args) + list(n.kwargs.values()):
                for x in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(x, fx.Node) and x not in seen:
                        seen.add(x)
                        nxt.append(x)
        frontier = nxt
    return None


def discover_with_spans(model: torch.nn.Module, example_inputs, *, video_len: int | None = None,
                        unplaced: list | None = None, grid: tuple[int, int, int] | None = None):
    """`discover`, and for each site the video offset found by `video_span` (None: none found).

    Returns:
        `(sites, spans)`: the SiteInfo list and `{path: offset or None}`.

    Example:
        >>> # sites, spans = discover_with_spans(model, inputs, video_len=4 * 8 * 8)
    """
    if grid is not None:
        video_len = math.prod(grid)
    named = dict(model.named_modules())
    id_to_name = {str(id(m)): name for name, m in named.items()}
    seen: dict[str, SiteInfo] = {}
    spans: dict[str, int | None] = {}
    for gm in capture_graphs(model, example_inputs):
        for info, m in sites_in_graph(gm, id_to_name, video_len, unplaced, named, grid):
            if info.path in seen:
                continue
            seen[info.path] = info
            if video_len is not None and info.kind in ("self", "joint") and info.axis == "full":
                spans[info.path] = video_span(m.q, info.q_len, video_len)
    return list(seen.values()), spans


def import_bound_modules(sites: list[SiteInfo]) -> list:
    """Python modules whose source makes a discovered SDPA call (to patch names bound at import time)."""
    files = {s.source.rsplit(":", 1)[0] for s in sites if s.impl == "sdpa" and s.source}
    mods = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f in files:
            mods.append(mod)
    return mods
