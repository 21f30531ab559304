"""FX pattern matching for attention: SDPA calls (positional or keyword) and hand-written softmax(q·kᵀ·s)·v."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_MATMUL_FNS = {operator.matmul, torch.matmul, torch.bmm}
_SOFTMAX_FNS = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type_as", "type", "contiguous"}


@dataclass
class AttentionMatch:
    """One attention call found in an FX graph.

    Attributes:
        node: the node whose output is the attention output (the SDPA call or the final matmul).
        impl: `sdpa` or `manual`.
        q, k, v: the nodes feeding query, key and value (`[B, H, S, D]`).
        scale: the softmax scale: a float, a Node, or None for the default `1/sqrt(D)`.
        attn_mask: the mask node (SDPA only), or None.
        kwargs: the normalized SDPA arguments (SDPA only).
        nodes: the nodes of a manual pattern that become dead after a rewrite.
    """

    node: fx.Node
    impl: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: object = None
    attn_mask: object = None
    kwargs: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)


def sdpa_arguments(node: fx.Node) -> dict:
    """The arguments of an SDPA call node by name, whether passed positionally or by keyword."""
    out = dict(_SDPA_DEFAULTS)
    for name, a in zip(SDPA_ARGS, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


def _is_call(node, fns=(), methods=()):
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in fns:
        return True
    return node.op == "call_method" and node.target in methods


def _is_matmul(node):
    return _is_call(node, _MATMUL_FNS, ("matmul", "__matmul__", "bmm"))


def _skip_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CAST_METHODS:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.Tensor.to:
        node = node.args[0]
    return node


def _softmax_input(node):
    if not _is_call(node, _SOFTMAX_FNS, ("softmax",)):
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    ndim = _ndim(node.args[0])
    if dim == -1 or (ndim is not None and dim == ndim - 1):
        return node.args[0]
    return None


def _ndim(node):
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _peel_scale(node):
    """Strip multiplications/divisions by a scalar; return (inner node, factor, peeled nodes)."""
    factor, peeled = 1.0, []
    while isinstance(node, fx.Node):
        if _is_call(node, (operator.mul, torch.mul), ("mul", "__mul__", "__rmul__")):
            a, b = node.args[:2]
            if _is_scalar(b):
                node, factor, peeled = a, _mul(factor, b), peeled + [node]
                continue
            if _is_scalar(a):
                node, factor, peeled = b, _mul(factor, a), peeled + [node]
                continue
        if _is_call(node, (operator.truediv, torch.div), ("div", "__truediv__")):
            a, b = node.args[:2]
            if _is_scalar(b) and "rounding_mode" not in node.kwargs:
                node, factor, peeled = a, _div(factor, b), peeled + [node]
                continue
        break
    return node, factor, peeled


def _is_scalar(x):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        val = x.meta.get("example_value", x.meta.get("val"))
        return isinstance(val, (int, float, torch.SymInt, torch.SymFloat))
    return False


def _mul(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) * float(b)
    return ("mul", a, b)


def _div(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) / float(b)
    return ("div", a, b)


def _untranspose(node):
    """The node k if `node` is kᵀ over the last two dims (transpose/mT/permute/swapaxes), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims"):
        dims = tuple(node.args[1:3])
    elif node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes):
        dims = tuple(node.args[1:3])
    elif node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    elif node.op == "call_method" and node.target == "permute":
        perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return node.args[0] if tuple(perm) == (0, 1, 3, 2) else None
    else:
        return None
    ndim = _ndim(node.args[0])
    norm = {d % ndim if (ndim and isinstance(d, int)) else d for d in dims}
    if norm in ({-1, -2}, ) or (ndim and norm == {ndim - 1, ndim - 2}):
        return node.args[0]
    return None


def match_manual(node: fx.Node) -> AttentionMatch | None:
    """Match `softmax(q @ kᵀ * s) @ v` ending at `node` (casts, scale placement and spellings vary)."""
    if not _is_matmul(node):
        return None
    p, v = node.args[:2]
    pc = _skip_casts(p)
    s = _softmax_input(pc)
    if s is None:
        return None
    s_inner, f1, peeled1 = s, 1.0, []
    while True:  # casts and scalings may interleave: (q @ kᵀ).float() / c, (q @ kᵀ / c).float(), ...
        nxt, f, peeled = _peel_scale(_skip_casts(s_inner))
        if nxt is s_inner:
            break
        s_inner, f1, peeled1 = nxt, _mul(f1, f), peeled1 + peeled
    if not _is_matmul(s_inner):
        return None
    q, kt = s_inner.args[:2]
    q, f2, peeled2 = _peel_scale(q)
    k = _untranspose(kt)
    if k is None:
        return None
    k, f3, peeled3 = _peel_scale(k)
    scale = _mul(_mul(f1, f2), f3)
    if not isinstance(scale, (int, float)) and sum(1 for f in (f1, f2, f3) if not isinstance(f, float)) > 1:
        return None  # several symbolic factors: leave it alone
    nodes = [node, p, pc, s, s_inner, kt] + peeled1 + peeled2 + peeled3
    return AttentionMatch(node=node, impl="manual", q=q, k=k, v=v, scale=scale, nodes=nodes)


def find_attention(graph: fx.Graph) -> list[AttentionMatch]:
    """Every attention call in `graph`, in graph order."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            a = sdpa_arguments(node)
            found.append(AttentionMatch(node=node, impl="sdpa", q=a["query"], k=a["key"], v=a["value"],
                                        scale=a["scale"], attn_mask=a["attn_mask"], kwargs=a))
            continue
        m = match_manual(node)
        if m is not None:
            found.append(m)
    return found


def materialize_scale(graph: fx.Graph, scale):
    """The scale of a match as an op argument: a float, a Node, or new mul/div nodes inserted in `graph`."""
    if scale is None or isinstance(scale, fx.Node):
        return scale
    if isinstance(scale, (int, float)):
        return float(scale)
    op, a, b = scale
    a, b = materialize_scale(graph, a), materialize_scale(graph, b)
    return graph.call_function(operator.mul if op == "mul" else operator.truediv, (a, b))
