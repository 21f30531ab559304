"""diffusers CogVideoX: joint [text, video] attention, text FIRST; hidden_states [B, F, C, H, W]."""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Adapter, _arg, _param, register_adapter


@register_adapter
class CogVideoXAdapter(Adapter):
    timestep_pos = 2
    name = "cogvideox"

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in ("CogVideoXTransformer3DModel",)

    def geometry(self, model, args, kwargs) -> Geometry:
        x = _arg(args, kwargs, "hidden_states", 0)
        text = _arg(args, kwargs, "encoder_hidden_states", 1)
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        _, f, _, h, w = x.shape
        return Geometry((f // pt, h // p, w // p), int(text.shape[1]))

    def example_inputs(self, model, *, device=None, dtype=None, grid=None, batch=1) -> dict:
        dev, dt = _param(model)
        dev, dt = device or dev, dtype or dt
        c = model.config
        pt = c.patch_size_t or 1
        if grid is None:  # the sample size the positional embedding was built for
            grid = (max(1, (c.sample_frames - 1) // c.temporal_compression_ratio + 1) // pt,
                    c.sample_height // c.patch_size, c.sample_width // c.patch_size)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, grid[0] * pt, c.in_channels, grid[1] * c.patch_size, grid[2] * c.patch_size, generator=g)
        text = torch.randn(batch, c.max_text_seq_length, c.text_embed_dim, generator=g)
        return {"hidden_states": x.to(dev, dt), "encoder_hidden_states": text.to(dev, dt),
                "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long), "return_dict": False}
