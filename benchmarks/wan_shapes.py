"""Wan2.1 transformer configs at real shapes with random bf16 weights, built directly on the GPU."""

from __future__ import annotations

import torch

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
GRID_480P = (21, 30, 52)  # 81 frames at 480x832: 32,760 tokens
GRID_720P = (21, 45, 80)  # 81 frames at 720x1280: 75,600 tokens


def _build(config, num_layers=None, device=None):
    from diffusers import WanTransformer3DModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(config, num_layers=num_layers or config["num_layers"])
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never materialize fp32 weights (14B would need 56 GB)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def wan_1_3b():
    """Wan2.1-T2V-1.3B transformer config, random bf16 weights."""
    return _build(WAN_1_3B)


def wan_14b():
    """Wan2.1-T2V-14B transformer config, random bf16 weights."""
    return _build(WAN_14B)
