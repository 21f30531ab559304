"""Graph rewriting: the `sparsify` Dynamo backend and the inductor pre-grad pass.

`sparsify(model, recipe)` (install mode, the default) already routes every enabled site to the op at
the Python level, so compiled graphs contain `torch.ops.sparsify.sparse_attention` whatever the
backend. `sparsify(model, recipe, mode="graph")` instead leaves the model's code alone: the
rewrite then happens here, on the Dynamo graph, through `torch.compile(model, backend="sparsify")`
or the inductor pre-grad pass (`install_inductor_pass()`). Graph mode maps nodes to sites by module
identity, so it serves whole-model compiles; regional compiles (one graph shared by many blocks)
need install mode.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .patterns import find_attention, materialize_mask, materialize_scale

# id(module) -> site id, for modules installed in graph mode
GRAPH_SITES: dict[int, int] = {}


def _site_of(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for key in reversed(list(stack)):
        try:
            mid = int(str(key).split("@")[0])
        except ValueError:
            continue
        if mid in GRAPH_SITES:
            return GRAPH_SITES[mid]
    return None


def rewrite_graph(graph: fx.Graph) -> int:
    """Replace attention nodes of graph-mode sites by `torch.ops.sparsify.sparse_attention`.

    The site id is materialized in the graph (`torch.full`, no `get_attr`), and the geometry is
    read by the op at run time (the graph-mode geometry hook runs outside the compiled region).

    Returns:
        The number of nodes rewritten.
    """
    n = 0
    for m in find_attention(graph):
        sid = _site_of(m.node)
        if sid is None:
            continue
        if m.impl == "sdpa" and (m.kwargs.get("is_causal") or m.kwargs.get("dropout_p") not in (0, 0.0, None)):
            continue
        with graph.inserting_before(m.node):
            site = graph.call_function(torch.full, ((1,), sid), {"dtype": torch.int64})
            new = graph.call_function(torch.ops.sparsify.sparse_attention.default,
                                      (m.q, m.k, m.v, site, [], materialize_scale(graph, m.scale),
                                       materialize_mask(graph, m.attn_mask)))
        new.meta.update({k: v for k, v in m.node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        m.node.replace_all_uses_with(new)
        n += 1
    if n:
        graph.eliminate_dead_code()
    return n


def sparsify_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """`torch.compile(model, backend="sparsify")`: rewrite graph-mode sites, then compile with inductor.

    `options=` given to torch.compile reach inductor as config patches.
    """
    from torch._inductor.compile_fx import compile_fx

    if rewrite_graph(gm.graph):
        gm.recompile()
    options = kwargs.get("options") or {}
    return compile_fx(gm, example_inputs, config_patches=options) if options else compile_fx(gm, example_inputs)


torch._dynamo.register_backend(sparsify_backend, name="sparsify")


def _pass_code_hash() -> str:
    from . import patterns

    src = inspect.getsource(rewrite_graph) + inspect.getsource(patterns)
    return hashlib.sha256(src.encode()).hexdigest()


class SparsifyPass(CustomGraphPass):
    """The inductor pre-grad pass. Its `uuid()` hashes the pass code and the installed sites' configs,
    so inductor's FX cache is neither bypassed nor stale."""

    def __call__(self, graph: fx.Graph) -> None:
        rewrite_graph(graph)

    def uuid(self):
        from ..runtime import STATE

        cfg = repr(sorted((sid, st.path, st.configs) for sid, st in STATE.sites.items() if sid in GRAPH_SITES.values()))
        return hashlib.sha256((_pass_code_hash() + cfg).encode()).hexdigest()


def install_inductor_pass() -> SparsifyPass:
    """Register the pre-grad pass on inductor's config (torch 2.11: one pass; 2.13: a list is accepted).

    An existing pass of someone else is kept: on torch versions that take one pass, both are chained.

    Example:
        >>> from sparsify.passes.rewrite import install_inductor_pass
        >>> p = install_inductor_pass()  # then: torch.compile(model) rewrites graph-mode sites
    """
    import torch._inductor.config as cfg

    current = cfg.pre_grad_custom_pass
    if isinstance(current, SparsifyPass):
        return current
    p = SparsifyPass()
    if current is None:
        cfg.pre_grad_custom_pass = p
    elif isinstance(current, list):
        if not any(isinstance(x, SparsifyPass) for x in current):
            current.append(p)
    else:
        cfg.pre_grad_custom_pass = _Chained(current, p)
    return p


class _Chained(CustomGraphPass):
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, graph):
        self.first(graph)
        self.second(graph)

    def uuid(self):
        u1 = self.first.uuid() if hasattr(self.first, "uuid") else None
        return None if u1 is None else hashlib.sha256(f"{u1}{self.second.uuid()}".encode()).hexdigest()


def uninstall_inductor_pass() -> None:
    """Remove the pre-grad pass from inductor's config."""
    import torch._inductor.config as cfg

    current = cfg.pre_grad_custom_pass
    if isinstance(current, SparsifyPass):
        cfg.pre_grad_custom_pass = None
    elif isinstance(current, _Chained) and isinstance(current.second, SparsifyPass):
        cfg.pre_grad_custom_pass = current.first
    elif isinstance(current, list):
        current[:] = [x for x in current if not isinstance(x, SparsifyPass)]
