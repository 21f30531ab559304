"""`torch.ops.sparsify.sparse_attention`: the custom op every rewritten attention site calls."""

from __future__ import annotations

import torch

from .dispatch import run_site
from .state import site_state


@torch.library.custom_op("sparsify::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    site: torch.Tensor,
    geometry: list[int],
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    timestep: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse attention of one installed site.

    Args:
        q, k, v: `[B, H, S, D]`.
        site: int64 `[1]` tensor holding the site id (a per-module tensor, so that one compiled
            graph shared by several blocks still reaches each block's configuration).
        geometry: `[T, H, W, video_start]` of the call, or `[]` when unknown.
        scale: softmax scale (default `1/sqrt(D)`).
        timestep: the forward's denoising timestep (any shape; the first element is used), which drives
            the step policy (dense first steps, mask reuse); None disables it.
        attn_mask: optional SDPA mask; a key-padding mask (bool, or 0/-inf float, shaped `[B, S]` or
            `[B, 1, 1, S]`) is honoured by the sparse path, any other mask makes the call dense.
        gate: optional `[B, H, S, D]` gate of VSA's coarse branch (see `sparsify.training.add_vsa_gates`):
            sparse heads then return `sparse_out + gate * coarse_out`. None: pure sparse attention.

    Returns:
        `[B, H, S, D]`, contiguous, q's dtype.

    Example:
        >>> # installed by sparsify(); called as
        >>> # torch.ops.sparsify.sparse_attention(q, k, v, module._sparsify_site, [T, H, W, 0])
    """
    return run_site(q, k, v, site, geometry, scale, attn_mask, timestep, gate=gate)


@sparse_attention.register_fake
def _(q, k, v, site, geometry, scale=None, attn_mask=None, timestep=None, gate=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _autograd_dispatch():
    """Re-enable autograd dispatch inside a custom op implementation (which runs below autograd)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradCPU", "AutogradCUDA", "AutogradOther", "AutogradNestedTensor"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


_COUNTERS = ("calls", "selections", "reused", "work", "dense_work")


@torch.library.custom_op("sparsify::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    site: torch.Tensor,
    geometry: list[int],
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sparse_attention` (q, k, v and gate) by recomputing its path under autograd.

    The selection is recomputed from the same q and k (it is deterministic) and treated as constant; the
    coarse branch (with a gate) is differentiated through its pooling and softmax. The step policy (dense
    first steps, mask reuse) is inference-only: the recomputation does not use it, and it leaves the
    site's call and work counters as the forward left them. On CUDA the block-sparse part runs the Triton
    backward kernel (the `backward` kernel path; switched off, the PyTorch reference).

    Returns:
        `(dq, dk, dv, dgate)`; `dgate` is an empty tensor when `gate` is None.
    """
    st = site_state(site)
    saved = {name: getattr(st, name) for name in _COUNTERS}
    try:
        with torch.enable_grad(), _autograd_dispatch():
            xs = [x.detach().requires_grad_(True) for x in (q, k, v)]
            gg = gate.detach().requires_grad_(True) if gate is not None else None
            if gg is None:
                out = run_site(*xs, site, geometry, scale, attn_mask)
            else:
                out = run_site(*xs, site, geometry, scale, attn_mask, None, gate=gg)
            wrt = xs + ([gg] if gg is not None else [])
            grads = torch.autograd.grad(out, wrt, grad, allow_unused=True) if out.requires_grad else [None] * len(wrt)
    finally:
        for name, val in saved.items():
            setattr(st, name, val)
    if gate is None:
        grads = list(grads) + [None]
    grads = [(torch.zeros_like(x) if d is None else d).contiguous() for d, x in zip(grads[:3], (q, k, v))] + [
        q.new_zeros(0) if gate is None else (torch.zeros_like(gate) if grads[3] is None else grads[3]).contiguous()]
    return tuple(grads)


@sparse_attention_backward.register_fake
def _(grad, q, k, v, site, geometry, scale=None, attn_mask=None, gate=None):
    dgate = q.new_empty(0) if gate is None else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)) + (dgate,)


def _setup_context(ctx, inputs, output):
    q, k, v, site, geometry, scale, attn_mask, timestep, gate = inputs
    ctx.save_for_backward(q, k, v, site, attn_mask, gate)
    ctx.geometry, ctx.scale = geometry, scale


def _backward(ctx, grad):
    q, k, v, site, attn_mask, gate = ctx.saved_tensors
    dq, dk, dv, dgate = torch.ops.sparsify.sparse_attention_backward(grad, q, k, v, site, ctx.geometry, ctx.scale,
                                                                     attn_mask, gate)
    return dq, dk, dv, None, None, None, None, None, (dgate if gate is not None else None)


sparse_attention.register_autograd(_backward, setup_context=_setup_context)
