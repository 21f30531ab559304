"""Installing sites on modules so that eager code and every torch.compile style reach the sparse op."""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .. import runtime
from ..runtime import STATE
from .patterns import find_attention, materialize_mask, materialize_scale, trace_module

_ORIG_SDPA = torch._C._nn.scaled_dot_product_attention


def sparsify_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Drop-in `scaled_dot_product_attention`: inside an installed site it runs the sparse op.

    Outside any site (text cross-attention, other modules, other models) it is exactly the original.
    """
    stack = STATE.stack
    if stack and not is_causal and dropout_p == 0.0 and not enable_gqa and query.dim() in (3, 4):
        gate = _gate_for(query, GATES[-1]) if GATES and GATES[-1] is not None else None
        return torch.ops.sparsify.sparse_attention(query, key, value, stack[-1], runtime.current_geometry(), scale,
                                                   attn_mask, STATE.timestep, gate)
    if enable_gqa:
        return _ORIG_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return _ORIG_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


#: Name of the gate submodule `sparsify.training.add_vsa_gates` adds to a site module (VSA's `Linear(dim, dim)`).
GATE_ATTR = "to_gate_compress"

#: Gates `[B, S, H*D]` of the site modules being executed, parallel to `STATE.stack` (None: no gate).
GATES: list = []


def _gate_for(query: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The site's gate `[B, S, H*D]` (computed from the module's input) as `[B, H, S, D]`, like `query`."""
    B, H, S, D = query.shape
    if gate.dim() != 3 or gate.shape[0] != B or gate.shape[1] != S or gate.shape[2] != H * D:
        raise RuntimeError(
            f"sparsify: the VSA gate of this site has shape {tuple(gate.shape)} but the attention call has q of "
            f"shape {tuple(query.shape)} ([B, H, S, D]); gates need a self-attention site whose input "
            "sequence is the attention sequence, with [B, S, H*D] = [B, S, dim]")
    return gate.view(B, S, H, D).transpose(1, 2)


def manual_site_attention(q, k, v, site, scale, attn_mask=None):
    """Replacement for a hand-written `softmax(q @ kᵀ * scale [+ attn_mask]) @ v` at an installed site."""
    return torch.ops.sparsify.sparse_attention(q, k, v, site, runtime.current_geometry(), float(scale), attn_mask,
                                               STATE.timestep)


# ----------------------------------------------------------------------------------------------
# process-wide SDPA patching (reference counted across installed models)

_PATCHED: dict[tuple[int, str], tuple[object, object]] = {}  # (id(module), name) -> (module, original)
_USERS = 0


def _patch_sdpa(modules: list) -> None:
    global _USERS
    _USERS += 1
    targets = [(F, "scaled_dot_product_attention")]
    for mod in modules:
        name = getattr(mod, "__name__", "")
        if name.split(".")[0] == __name__.split(".")[0] and not name.startswith("sparsify.testing"):
            # never sparsify's own modules (the fixture models of `sparsify.testing` are user code): with a model
            # already sparsified, discovery of the next one traces through sparsify_sdpa, whose `_ORIG_SDPA`
            # would otherwise be patched into itself (recursion)
            continue
        for name, val in list(vars(mod).items()):
            if val is _ORIG_SDPA:
                targets.append((mod, name))
    for mod, name in targets:
        key = (id(mod), name)
        if key not in _PATCHED and getattr(mod, name, None) is _ORIG_SDPA:
            _PATCHED[key] = (mod, _ORIG_SDPA)
            setattr(mod, name, sparsify_sdpa)


def _unpatch_sdpa() -> None:
    global _USERS
    _USERS = max(0, _USERS - 1)
    if _USERS:
        return
    for (_, name), (mod, orig) in list(_PATCHED.items()):
        if getattr(mod, name, None) is sparsify_sdpa:
            setattr(mod, name, orig)
    _PATCHED.clear()


# ----------------------------------------------------------------------------------------------
# per-site installation


_SITE_FORWARDS: dict[type, object] = {}


def _site_forward(cls: type):
    """The forward of an SDPA site module of class `cls`: the class forward, with the module's site
    tensor on the runtime stack while it runs (and, when the module has a VSA gate submodule
    `GATE_ATTR`, the gate computed from its input hidden states on `GATES`).

    One function per class, bound per instance, so compiled graphs do not specialize on which block
    they run in; the site tensor itself becomes a graph input.
    """
    if cls not in _SITE_FORWARDS:
        inner = cls.forward

        def forward(self, *args, **kwargs):
            gate_mod = getattr(self, GATE_ATTR, None)
            gate = None
            if gate_mod is not None:  # VSA's learned gate, from the module's input hidden states
                gate = gate_mod(args[0] if args else kwargs["hidden_states"])
            STATE.stack.append(self._sparsify_site)
            GATES.append(gate)
            try:
                return inner(self, *args, **kwargs)
            finally:
                STATE.stack.pop()
                GATES.pop()

        _SITE_FORWARDS[cls] = forward
    return _SITE_FORWARDS[cls]


_MANUAL_FORWARDS: dict[type, object] = {}


def _manual_forward(module: torch.nn.Module, path: str):
    """A forward function for `type(module)` with its hand-written attention replaced by the sparse op."""
    cls = type(module)
    if cls in _MANUAL_FORWARDS:
        return _MANUAL_FORWARDS[cls]
    try:
        gm = trace_module(module)
    except Exception as e:  # noqa: BLE001 - report any tracing failure the same way
        raise RuntimeError(
            f"sparsify: module '{path}' ({cls.__name__}) computes attention by hand, and torch.fx could not "
            f"trace it to rewrite that attention: {type(e).__name__}: {e}. Call F.scaled_dot_product_attention "
            "in it instead, or disable this site in the recipe") from e
    matches = [m for m in find_attention(gm.graph) if m.impl == "manual"]
    if not matches:
        raise RuntimeError(
            f"sparsify: found no hand-written attention in '{path}' ({cls.__name__}) when traced with "
            "torch.fx; disable this site in the recipe")
    g = gm.graph
    gm.register_buffer("_sparsify_site", torch.zeros(1, dtype=torch.int64), persistent=False)  # the code reads self's
    for m in matches:  # several: the same attention written once per batch element or chunk
        with g.inserting_before(m.node):
            site = g.get_attr("_sparsify_site")
            scale = materialize_scale(g, m.scale)
            new = g.call_function(manual_site_attention, (m.q, m.k, m.v, site, scale, materialize_mask(g, m.attn_mask)))
        m.node.replace_all_uses_with(new)
    g.eliminate_dead_code()
    gm.recompile()
    fn = type(gm).forward  # generated code reads submodules and attributes from `self`
    _MANUAL_FORWARDS[cls] = fn
    return fn


@dataclass
class Installation:
    """What sparsify() changed on a model, so that unsparsify() can undo it exactly."""

    sites: list  # SiteState, in site order
    infos: list  # SiteInfo of every discovered site
    recipe: object
    adapter: object
    hooks: list = field(default_factory=list)
    undo: list = field(default_factory=list)  # the adapter's undos of `prepare_site`
    modules: list = field(default_factory=list)  # site modules whose forward was replaced
    patched: bool = False
    mode: str = "install"
    compiled: list = field(default_factory=list)  # (module, its `_compiled_call_impl` when sparsify() ran)


def install_site(model, info, state: runtime.SiteState, inst: Installation) -> None:
    """Attach site `info` of `model` to the runtime: a site tensor and a routed (or rewritten) forward."""
    module = model.get_submodule(info.path)
    if hasattr(module, "_sparsify_site"):
        raise RuntimeError(f"sparsify: module '{info.path}' is already sparsified; call unsparsify() first")
    if "forward" in vars(module):
        raise RuntimeError(
            f"sparsify: module '{info.path}' already has an instance-level forward (another tool's wrapper?); "
            "sparsify it before applying that tool")
    module._sparsify_site = torch.tensor([state.site_id], dtype=torch.int64)
    inst.modules.append(module)
    if inst.mode == "graph":
        from .rewrite import GRAPH_SITES

        GRAPH_SITES[id(module)] = state.site_id
        return
    if info.impl == "manual":
        fn = _manual_forward(module, info.path)
        module.forward = types.MethodType(fn, module)
    else:
        module.forward = types.MethodType(_site_forward(type(module)), module)
    prepare = getattr(inst.adapter, "prepare_site", None)
    undo = prepare(module) if prepare is not None else None
    if undo is not None:
        inst.undo.append(undo)


def install(model, infos, states, recipe, adapter, import_modules, mode: str = "install") -> Installation:
    """Install every site in `states` on `model` and the geometry hook on its top-level forward.

    Args:
        mode: `install` routes the sites to the op in Python (eager and every compile style);
            `graph` only registers them for the `sparsify` backend / inductor pre-grad pass.
    """
    if mode not in ("install", "graph"):
        raise ValueError(f"sparsify: mode must be 'install' or 'graph'; got {mode!r}")
    inst = Installation(sites=list(states), infos=list(infos), recipe=recipe, adapter=adapter, mode=mode,
                        compiled=[(m, m.__dict__.get("_compiled_call_impl")) for m in model.modules()])
    by_path = {i.path: i for i in infos}
    try:
        for st in states:
            install_site(model, by_path[st.path], st, inst)
            STATE.sites[st.site_id] = st
        if mode == "install" and any(by_path[st.path].impl == "sdpa" for st in states):
            _patch_sdpa(import_modules)
            inst.patched = True
        if mode == "graph":
            from .rewrite import install_inductor_pass

            install_inductor_pass()
        if adapter is not None:
            def geometry_hook(mod, args, kwargs, _adapter=adapter):
                g = _adapter.geometry(mod, args, kwargs)
                runtime.set_geometry(g, inst)
                runtime.set_timestep(_adapter.timestep(mod, args, kwargs))

            if mode == "graph":  # run eagerly, before the compiled graph that reads it
                geometry_hook = torch._dynamo.disable(geometry_hook)
            inst.hooks.append(model.register_forward_pre_hook(geometry_hook, with_kwargs=True))
    except Exception:
        uninstall(model, inst)
        raise
    return inst


def uninstall(model, inst: Installation) -> None:
    """Undo `install` exactly: hooks, forwards, site tensors, registry entries and patches.

    In-place compilation applied after `install` (`module.compile()`, diffusers' `compile_repeated_blocks()`)
    holds graphs traced through the sparse op; it is removed too, so that every module calls the code it
    called before `install`.
    """
    from .rewrite import GRAPH_SITES, uninstall_inductor_pass

    for h in inst.hooks:
        h.remove()
    inst.hooks.clear()
    for undo in reversed(inst.undo):
        undo()
    inst.undo.clear()
    for module in inst.modules:
        if inst.mode == "install":
            module.__dict__.pop("forward", None)
        GRAPH_SITES.pop(id(module), None)
        module.__dict__.pop("_sparsify_site", None)
    inst.modules.clear()
    for st in inst.sites:
        STATE.sites.pop(st.site_id, None)
    if inst.mode == "graph" and not GRAPH_SITES:
        uninstall_inductor_pass()
    if inst.patched:
        _unpatch_sdpa()
        inst.patched = False
    for module, before in inst.compiled:
        if module.__dict__.get("_compiled_call_impl") is not before:
            module._compiled_call_impl = before
    inst.compiled.clear()
    runtime.forget_geometry(inst)
