"""diffusers CogVideoX: joint [text, video] attention, text FIRST; hidden_states [B, F, C, H, W]."""

from __future__ import annotations

import torch

from ..geometry import Geometry
from .base import Adapter, _arg, device_dtype, register_adapter


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
        dev, dt = device_dtype(model)
        dev, dt = device or dev, dtype or dt
        c = model.config
        pt = c.patch_size_t or 1
        if grid is None:  # the sample size the positional embedding was built for
            grid = (max(1, (c.sample_frames - 1) // c.temporal_compression_ratio + 1) // pt,
                    c.sample_height // c.patch_size, c.sample_width // c.patch_size)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, grid[0] * pt, c.in_channels, grid[1] * c.patch_size, grid[2] * c.patch_size, generator=g)
        text = torch.randn(batch, c.max_text_seq_length, c.text_embed_dim, generator=g)
        out = {"hidden_states": x.to(dev, dt), "encoder_hidden_states": text.to(dev, dt),
               "timestep": torch.full((batch,), 500, device=dev, dtype=torch.long), "return_dict": False}
        if c.use_rotary_positional_embeddings:
            out["image_rotary_emb"] = _rotary(c, grid, dev)
        return out


def _rotary(c, grid, device):
    """The 3-D rotary embeddings CogVideoXPipeline passes for a token grid (CogVideoX 1.0 crops to the sample size
    the model was trained at; 1.5, with a temporal patch, slices)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    base = (c.sample_height // c.patch_size, c.sample_width // c.patch_size)
    if c.patch_size_t is None:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        crops = get_resize_crop_region_for_grid(tuple(grid[1:]), base[1], base[0])
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=tuple(grid[1:]),
                                       temporal_size=grid[0], device=device)
    return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None, grid_size=tuple(grid[1:]),
                                   temporal_size=grid[0], grid_type="slice", max_size=base, device=device)
