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
_EINSUM_FNS = {torch.einsum, torch.functional.einsum}
_BADDBMM_FNS = {torch.baddbmm}
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
        attn_mask: the mask: a node (SDPA's `attn_mask`, or an added mask), `("not", node)` for the mask of a
            `masked_fill` (see `materialize_mask`), or None.
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
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)  # a dtype= upcast is a cast
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


def einsum_role(equation: str) -> str | None:
    """`qk` if `equation` is q·kᵀ over the last axis (`...id,...jd->...ij`), `pv` if it is p·v
    (`...ij,...jd->...id`), else None. Batch letters (or `...`) must be the same prefix on every operand.

    Example:
        >>> einsum_role("bhqd,bhkd->bhqk"), einsum_role("b h i j, b h j d -> b h i d"), einsum_role("ij,jk->ik")
        ('qk', 'pv', None)
    """
    eq = equation.replace(" ", "").replace("...", "*")
    if eq.count("->") != 1 or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if not (len(a) == len(b) == len(out) >= 3) or len(set(out)) != len(out):
        return None
    pre = out[:-2]
    if a[:-2] != pre or b[:-2] != pre:
        return None
    (a1, a2), (b1, b2), (o1, o2) = a[-2:], b[-2:], out[-2:]
    if len({a1, a2, b1, b2, o1, o2} - set(pre)) != 3 or set(pre) & {a1, a2, b1, b2}:
        return None
    if a2 == b2 and (o1, o2) == (a1, b1) and len({a1, b1, a2}) == 3:
        return "qk"
    if a2 == b1 and (o1, o2) == (a1, b2) and len({a1, a2, b2}) == 3:
        return "pv"
    return None


def _einsum(node, role):
    if not (_is_call(node, _EINSUM_FNS) and len(node.args) == 3 and isinstance(node.args[0], str)):
        return None
    return node.args[1:] if einsum_role(node.args[0]) == role else None


def _attention_product(node):
    """`(p, v)` if `node` is p·v (matmul, bmm, `@` or einsum), else None."""
    if _is_matmul(node):
        return node.args[:2]
    return _einsum(node, "pv")


def _score_product(node):
    """`(q, k, factor, mask, transposed_k_node)` if `node` is q·kᵀ (matmul/bmm/`@` with kᵀ, einsum, or
    `baddbmm(mask_or_empty, q, kᵀ, beta=0|1, alpha=scale)`), else None."""
    if _is_matmul(node):
        q, kt = node.args[:2]
        k = _untranspose(kt)
        return None if k is None else (q, k, 1.0, None, kt)
    qk = _einsum(node, "qk")
    if qk is not None:
        return qk[0], qk[1], 1.0, None, None
    if _is_call(node, _BADDBMM_FNS) and len(node.args) == 3:
        base, q, kt = node.args
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        k = _untranspose(kt)
        if k is None or beta not in (0, 1) or not (_is_scalar(alpha) or isinstance(alpha, fx.Node)):  # alpha: a scalar
            return None
        return q, k, (float(alpha) if isinstance(alpha, (int, float)) else alpha), (None if beta == 0 else base), kt
    return None


def _peel_add_mask(node):
    """`scores + mask` (a tensor, not a scalar): return (scores, mask, [add node]); else (node, None, [])."""
    if _is_call(node, (operator.add, torch.add), ("add", "__add__")) and len(node.args) == 2 and "alpha" not in node.kwargs:
        for a, b in (node.args, node.args[::-1]):
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not _is_scalar(b):
                if _score_product(_peel_scale(_skip_casts(a))[0]) is not None:
                    return a, b, [node]
    return node, None, []


_MASKED_FILL_FNS = {torch.masked_fill, torch.Tensor.masked_fill}


def _fill_value(node):
    """The fill value of a masked_fill call as a float, or None when it is not a constant."""
    val = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    return float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None


def _masks_out(value, factor) -> bool:
    """Whether filling scores with `value`, then scaling them by `factor`, removes those keys from the softmax:
    -inf under any positive factor, another value at most `MASKED_BELOW` only unscaled."""
    from ..runtime.masks import MASKED_BELOW

    if value is None:
        return False
    if value == float("-inf"):
        return not isinstance(factor, float) or factor > 0
    return value <= MASKED_BELOW and factor == 1.0


def _peel_masked_fill(node, factor):
    """`scores.masked_fill(mask, value)` (a value that removes keys, see `_masks_out`): return (scores,
    ("not", mask), [node]): SDPA's bool mask keeps the keys masked_fill did not fill. Else (node, None, [])."""
    if _is_call(node, _MASKED_FILL_FNS, ("masked_fill", "masked_fill_")) and len(node.args) >= 2 \
            and isinstance(node.args[1], fx.Node):
        if _masks_out(_fill_value(node), factor):
            return node.args[0], ("not", node.args[1]), [node]
    return node, None, []


def _mutations(nodes) -> list:
    """The in-place users (`x.masked_fill_(...)`, `x += ...`, `x[i] = ...`, `x.mul_(...)`) of `nodes`."""
    out = []
    for n in nodes:
        for u in n.users:
            t = u.target
            name = t if u.op == "call_method" else getattr(t, "__name__", "")
            if isinstance(name, str) and ((name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPS):
                out.append(u)
    return out


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """Whether node `a` comes before node `b` in their graph."""
    n = a.next
    while n is not b and n.op != "root":
        n = n.next
    return n is b


_INPLACE_OPS = {"iadd", "isub", "imul", "itruediv", "setitem", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                "__setitem__"}


def match_manual(node: fx.Node) -> AttentionMatch | None:
    """Match `softmax(q @ kᵀ * s [+ mask]) @ v` ending at `node`: `@`, matmul, bmm, einsum or baddbmm for the
    products, the scale on q, k or the scores, casts (a float32 softmax) anywhere between. The mask may be
    added (`+ mask`) or written as `scores.masked_fill(mask, -inf)` (or in place, `masked_fill_`, on the
    softmax's input); any other in-place change of the scores is not matched."""
    pv = _attention_product(node)
    if pv is None:
        return None
    p, v = pv
    pc = _skip_casts(p)
    s = _softmax_input(pc)
    if s is None:
        return None
    s_inner, f1, peeled1, mask = s, 1.0, [], None
    fill_ = _mutations([s])
    if len(fill_) == 1 and fill_[0].target == "masked_fill_" and _precedes(fill_[0], pc):  # s.masked_fill_(m, -inf)
        _, mask, _ = _peel_masked_fill(fill_[0], 1.0)
    if fill_ and mask is None:
        return None
    while True:  # casts, scalings and one mask may interleave: (q @ kᵀ).float() / c + m, ....masked_fill(m, -inf)
        nxt, f, peeled = _peel_scale(_skip_casts(s_inner))
        if f != 1.0:
            f1 = _mul(f1, f)
        if mask is None:
            inner, m, added = _peel_add_mask(nxt)
            if m is not None:
                if f1 != 1.0:
                    return None  # (scores + mask) * c scales the mask too: not SDPA's form
                nxt, mask, peeled = inner, m, peeled + added
            else:
                inner, m, added = _peel_masked_fill(nxt, f1)
                if m is not None:
                    nxt, mask, peeled = inner, m, peeled + added
        if nxt is s_inner:
            break
        s_inner, peeled1 = nxt, peeled1 + peeled
    sp = _score_product(s_inner)
    if sp is None or set(_mutations([s_inner] + peeled1)) - set(fill_) - set(peeled1):
        return None
    q, k, f0, bmask, kt = sp
    if bmask is not None:
        if mask is not None:
            return None
        mask = bmask
    q, f2, peeled2 = _peel_scale(q)
    k, f3, peeled3 = _peel_scale(k)
    factors = (f0, f1, f2, f3)
    if sum(1 for f in factors if not isinstance(f, float)) > 1:
        return None  # several symbolic factors: leave it alone
    scale = _mul(_mul(_mul(f0, f1), f2), f3)
    nodes = [node, p, pc, s, s_inner] + ([kt] if kt is not None else []) + peeled1 + peeled2 + peeled3
    return AttentionMatch(node=node, impl="manual", q=q, k=k, v=v, scale=scale, attn_mask=mask, nodes=nodes)


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


def materialize_mask(graph: fx.Graph, mask):
    """The mask of a match as an op argument: None, a Node, or a new `logical_not` node inserted in `graph` for a
    masked_fill mask (`("not", node)`: the keys it fills are the ones SDPA's bool mask removes)."""
    if isinstance(mask, tuple):
        return graph.call_function(torch.logical_not, (mask[1],))
    return mask


def materialize_scale(graph: fx.Graph, scale):
    """The scale of a match as an op argument: a float, a Node, or new mul/div nodes inserted in `graph`."""
    if scale is None or isinstance(scale, fx.Node):
        return scale
    if isinstance(scale, (int, float)):
        return float(scale)
    op, a, b = scale
    a, b = materialize_scale(graph, a), materialize_scale(graph, b)
    return graph.call_function(operator.mul if op == "mul" else operator.truediv, (a, b))


_CONSTRUCTORS = ("empty", "zeros", "ones", "full", "arange", "tensor", "empty_like", "zeros_like", "ones_like")


def trace_module(module: torch.nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace(module)`, where tensor constructors may take traced sizes.

    Code such as diffusers' `torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype)` (the unused
    input of a `baddbmm` with `beta=0`) fails under plain symbolic tracing because `torch.empty` does not
    accept proxies; here the constructors in `_CONSTRUCTORS` are wrapped while tracing so that they become
    graph nodes.

    Example:
        >>> class A(torch.nn.Module):
        ...     def forward(self, q):
        ...         return torch.baddbmm(torch.empty(q.shape[0], q.shape[1], q.shape[1]), q, q.mT, beta=0)
        >>> any(n.target is torch.empty for n in trace_module(A()).graph.nodes)
        True
    """
    originals = {name: getattr(torch, name) for name in _CONSTRUCTORS}

    def wrap(target):
        def wrapper(*args, **kwargs):
            proxies = []
            fx.node.map_aggregate((args, kwargs), lambda x: proxies.append(x) if isinstance(x, fx.Proxy) else None)
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", target, args, kwargs)
            return target(*args, **kwargs)

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        return fx.symbolic_trace(module)
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
