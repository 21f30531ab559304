"""Head shards of sequence-parallel calls: which global heads an attention call holds under Ulysses."""

from __future__ import annotations

import contextlib
import weakref

#: The process-wide head shards `(rank, degree, group)` set by `head_shard` (engines without a per-module config).
_MANUAL: list = []


class RingAttentionError(RuntimeError):
    """Ring attention was enabled on a sparsified model: no block-sparse selection can run on K/V chunks."""


def _ring_error(path: str, degree: int) -> RingAttentionError:
    return RingAttentionError(
        f"sparsify: site '{path}' runs under context parallelism with ring_degree={degree}; ring attention "
        "passes K/V chunks around and no engine tells the attention op which chunk it holds, so block-sparse "
        "attention cannot run there. Use Ulysses only: ContextParallelConfig(ulysses_degree=P) (ring_degree=1)")


def diffusers_shard(module, path: str = "?"):
    """The Ulysses head shard `(rank, degree, group)` of a diffusers attention module's calls (the rank within
    the Ulysses process group `group`), or None without context parallelism.

    Reads the `ContextParallelConfig` that `model.enable_parallelism(...)` gives the module's processor,
    so it is right whether `sparsify()` ran before or after `enable_parallelism`.

    Raises:
        RingAttentionError: the config has `ring_degree > 1`.

    Example:
        >>> import torch
        >>> diffusers_shard(torch.nn.Linear(2, 2)) is None  # no processor, no parallel config
        True
    """
    proc = getattr(module, "processor", None)
    config = getattr(proc, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        raise _ring_error(path, cp.ring_degree)
    if cp._ulysses_local_rank is None:  # configured but not set up on a process group yet
        return None
    return cp._ulysses_local_rank, cp.ulysses_degree, cp._ulysses_mesh.get_group()


@contextlib.contextmanager
def head_shard(rank: int, degree: int, group=None):
    """Declare the Ulysses head shard of every sparse attention call inside the block (for engines such as
    xDiT whose attention modules carry no parallel config of their own). `group` is the Ulysses process group
    (default: the whole world); ranks agree on temporal mask reuse through it.

    Example:
        >>> with head_shard(1, 2):
        ...     pass  # calls here hold heads [H/2, H) of each site
    """
    if not (isinstance(degree, int) and degree >= 1 and 0 <= rank < degree):
        raise ValueError(f"head_shard: need 0 <= rank < degree; got rank={rank}, degree={degree}")
    _MANUAL.append((rank, degree, group))
    try:
        yield
    finally:
        _MANUAL.pop()


def manual_shard():
    """The innermost `head_shard` block's `(rank, degree, group)`, or None outside one."""
    return _MANUAL[-1] if _MANUAL else None


def _resolver(module, path: str):
    ref = weakref.ref(module)

    def shard():
        if _MANUAL:
            return _MANUAL[-1]
        m = ref()
        return diffusers_shard(m, path) if m is not None else None

    return shard


def attach(model, inst) -> None:
    """Give every installed site of `model` a head-shard resolver (called by `sparsify()`; undone with it).

    Raises:
        RingAttentionError: a site's module already runs ring attention.
    """
    for st in inst.sites:
        module = model.get_submodule(st.path)
        st.shard = _resolver(module, st.path)
        st.shard()  # refuse ring attention now if it is already enabled


_CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")


def _identity_pre(module, *args, **kwargs):
    return args, kwargs


def _identity_post(module, output):
    return output


@contextlib.contextmanager
def serial_view(model):
    """Run `model` as one process inside the block although diffusers context parallelism is enabled on it:
    its split/gather hooks pass inputs through and its attention processors see no parallel config.

    `sparsify()` discovers attention sites inside this view, so sites keep their full head count whichever
    of `sparsify()` and `enable_parallelism` ran first. Does nothing to a model without context parallelism.

    Example:
        >>> import torch
        >>> with serial_view(torch.nn.Linear(2, 2)):
        ...     pass
    """
    undo = []
    try:
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                for name, hook in registry.hooks.items():
                    ref = getattr(hook, "fn_ref", None)
                    if ref is not None and name.startswith(_CP_HOOK_PREFIXES):
                        undo.append((ref, "pre_forward", ref.pre_forward))
                        undo.append((ref, "post_forward", ref.post_forward))
                        ref.pre_forward, ref.post_forward = _identity_pre, _identity_post
            proc = getattr(module, "processor", None)
            if getattr(proc, "_parallel_config", None) is not None:
                undo.append((proc, "_parallel_config", proc._parallel_config))
                proc._parallel_config = None
        yield model
    finally:
        for obj, name, val in reversed(undo):
            setattr(obj, name, val)
