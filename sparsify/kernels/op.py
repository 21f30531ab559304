"""`torch.ops.sparsify.sparse_attention`: the custom op every rewritten attention site calls."""

from __future__ import annotations

import torch

from .. import runtime


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

    Returns:
        `[B, H, S, D]`, contiguous, q's dtype.

    Example:
        >>> # installed by sparsify(); called as
        >>> # torch.ops.sparsify.sparse_attention(q, k, v, module._sparsify_site, [T, H, W, 0])
    """
    return runtime.run_site(q, k, v, site, geometry, scale, attn_mask, timestep)


@sparse_attention.register_fake
def _(q, k, v, site, geometry, scale=None, attn_mask=None, timestep=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _autograd_dispatch():
    """Re-enable autograd dispatch inside a custom op implementation (which runs below autograd)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradCPU", "AutogradCUDA", "AutogradOther", "AutogradNestedTensor"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sparse_attention` by recomputing its reference path under autograd.

    The selection is recomputed from the same q and k (it is deterministic) and treated as constant.
    The step policy (dense first steps, mask reuse) is inference-only: the recomputation does not use it.
    """
    with torch.enable_grad(), _autograd_dispatch():
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = runtime.run_site(qg, kg, vg, site, geometry, scale, attn_mask)
        dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), grad, allow_unused=True)
    zero = torch.zeros_like
    return tuple((zero(x) if d is None else d).contiguous() for d, x in zip((dq, dk, dv), (q, k, v)))


@sparse_attention_backward.register_fake
def _(grad, q, k, v, site, geometry, scale=None, attn_mask=None):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, site, geometry, scale, attn_mask, timestep = inputs
    ctx.save_for_backward(q, k, v, site, attn_mask)
    ctx.geometry, ctx.scale = geometry, scale


def _backward(ctx, grad):
    q, k, v, site, attn_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparsify.sparse_attention_backward(grad, q, k, v, site, ctx.geometry, ctx.scale, attn_mask)
    return dq, dk, dv, None, None, None, None, None


sparse_attention.register_autograd(_backward, setup_context=_setup_context)
