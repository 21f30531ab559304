"""diffusers HunyuanVideo: joint [video, text] attention with a text key-padding mask; video first."""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Adapter, _arg, device_dtype, register_adapter


@register_adapter
class HunyuanVideoAdapter(Adapter):
    timestep_pos = 1
    name = "hunyuan_video"

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in ("HunyuanVideoTransformer3DModel",)

    def geometry(self, model, args, kwargs) -> Geometry:
        x = _arg(args, kwargs, "hidden_states", 0)
        p, pt = model.config.patch_size, model.config.patch_size_t
        _, _, f, h, w = x.shape
        return Geometry((f // pt, h // p, w // p), 0)

    def example_inputs(self, model, *, device=None, dtype=None, grid=(2, 4, 4), batch=1, text_len=8) -> dict:
        dev, dt = device_dtype(model)
        dev, dt = device or dev, dtype or dt
        c = model.config
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c.in_channels, grid[0] * c.patch_size_t, grid[1] * c.patch_size, grid[2] * c.patch_size, generator=g)
        text = torch.randn(batch, text_len, c.text_embed_dim, generator=g)
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask[:, text_len - 2:] = False  # some padded text, so the key mask is exercised
        out = {"hidden_states": x.to(dev, dt), "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long),
               "encoder_hidden_states": text.to(dev, dt), "encoder_attention_mask": mask.to(dev),
               "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g).to(dev, dt),
               "return_dict": False}
        if c.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.0, device=dev, dtype=dt)
        return out
