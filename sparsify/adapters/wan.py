"""diffusers Wan: video-only self-attention at `blocks.i.attn1`; grid from hidden_states [B, C, F, H, W]."""

from __future__ import annotations

import torch

from ..layout import Geometry
from .base import Adapter, _arg, _param, register_adapter


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
        dev, dt = _param(model)
        dev, dt = device or dev, dtype or dt
        c = model.config
        pt, ph, pw = c.patch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=g)
        text = torch.randn(batch, 8, c.text_dim, generator=g)
        return {"hidden_states": x.to(dev, dt), "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long),
                "encoder_hidden_states": text.to(dev, dt), "return_dict": False}
