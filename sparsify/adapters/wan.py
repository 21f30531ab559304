"""diffusers Wan: self-attention sites `blocks.i.attn1`, the grid from hidden_states, a fused q/k processor."""

from __future__ import annotations

import functools

import torch

from ..kernels._triton import enabled, needs_grad, use_triton
from ..geometry import Geometry
from .base import Adapter, _arg, device_dtype, register_adapter


@register_adapter
class WanAdapter(Adapter):
    timestep_pos = 1
    name = "wan"

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel")

    def timestep(self, model, args, kwargs):
        """The call's timestep; a per-token timestep `[B, S]` (Wan 2.2 TI2V, `expand_timesteps`) is reduced to
        its maximum over tokens, the noise level of the generated frames (conditioning frames sit at 0).

        Example:
            >>> WanAdapter().timestep(None, (), {"timestep": torch.tensor([[0.0, 900.0, 900.0]])})
            tensor([900.])
        """
        t = super().timestep(model, args, kwargs)
        if isinstance(t, torch.Tensor) and t.dim() > 1:
            t = t.flatten(1).amax(dim=1)
        return t

    def geometry(self, model, args, kwargs) -> Geometry:
        x = _arg(args, kwargs, "hidden_states", 0)
        pt, ph, pw = model.config.patch_size
        _, _, f, h, w = x.shape
        return Geometry((f // pt, h // ph, w // pw), 0)

    def example_inputs(self, model, *, device=None, dtype=None, grid=(2, 4, 4), batch=1) -> dict:
        dev, dt = device_dtype(model)
        dev, dt = device or dev, dtype or dt
        c = model.config
        pt, ph, pw = c.patch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=g)
        text = torch.randn(batch, 8, c.text_dim, generator=g)
        return {"hidden_states": x.to(dev, dt), "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long),
                "encoder_hidden_states": text.to(dev, dt), "return_dict": False}

    def prepare_site(self, module):
        """Give a self-attention site the fused q/k processor (see `fuse_processor`); returns its undo."""
        return fuse_processor(module)


@functools.cache
def _fused_processor_cls():
    """`FusedWanAttnProcessor`, built on first use (diffusers is imported only for Wan models)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

    class FusedWanAttnProcessor(WanAttnProcessor):
        """diffusers' `WanAttnProcessor` with q/k RMSNorm and RoPE as one Triton pass per tensor.

        Eager CUDA inference of a self-attention call with RoPE takes the fused path; every other call
        (CPU, autograd, `torch.compile` tracing, which fuses these ops itself, cross-attention, image
        context, a non-default attention backend or context parallelism) runs the parent's code unchanged.
        The fused path computes in float32 and rounds once; diffusers rounds the products of its RoPE to
        the model dtype, so bf16 results differ by about one ulp.
        """

        def fusable(self, attn, hidden_states, encoder_hidden_states, rotary_emb) -> bool:
            return (rotary_emb is not None and encoder_hidden_states is None and attn.add_k_proj is None
                    and self._attention_backend is None and self._parallel_config is None
                    and isinstance(attn.norm_q, torch.nn.RMSNorm) and isinstance(attn.norm_k, torch.nn.RMSNorm)
                    and not torch.compiler.is_compiling() and _fast(hidden_states)
                    and not needs_grad(hidden_states, *attn.parameters()))

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if not self.fusable(attn, hidden_states, encoder_hidden_states, rotary_emb):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            from ..kernels.rope import rmsnorm_rope

            query, key, value = _get_qkv_projections(attn, hidden_states, None)
            cos, sin = rotary_emb
            eps_q = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(query.dtype).eps
            eps_k = attn.norm_k.eps if attn.norm_k.eps is not None else torch.finfo(key.dtype).eps
            query = rmsnorm_rope(query, attn.norm_q.weight, eps_q, cos, sin, attn.heads).unflatten(2, (attn.heads, -1))
            key = rmsnorm_rope(key, attn.norm_k.weight, eps_k, cos, sin, attn.heads).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=None)
            out = out.flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](out))

    return FusedWanAttnProcessor


def _fast(x: torch.Tensor) -> bool:
    """Whether the fused Triton path serves `x` (CUDA, Triton, the `rope` kernel path); tests patch it for the interpreter."""
    return use_triton("rope", x)


def fuse_processor(module):
    """Swap a diffusers `WanAttention`'s stock processor for `FusedWanAttnProcessor`, in place.

    Only a module whose processor is exactly diffusers' `WanAttnProcessor` is changed; `sparsify()` does
    this at every Wan self-attention site it installs (mode `install`), and `unsparsify()` undoes it.
    With the `rope` kernel path off (`SPARSIFY_KERNELS=-rope`) the stock processor stays.

    Returns:
        A function that restores the original processor, or None when nothing was changed.

    Example:
        >>> # undo = fuse_processor(model.blocks[0].attn1); ...; undo()
    """
    proc = getattr(module, "processor", None)
    if proc is None or type(proc).__name__ != "WanAttnProcessor" or not enabled("rope"):
        return None
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    if type(proc) is not WanAttnProcessor:
        return None
    fused = _fused_processor_cls()()
    fused._attention_backend, fused._parallel_config = proc._attention_backend, proc._parallel_config
    module.processor = fused

    def undo():
        if module.processor is fused:
            proc._parallel_config = fused._parallel_config  # enable_parallelism may have run since
            module.processor = proc

    return undo

