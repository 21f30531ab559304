"""Tiny DiTs for the tests: diffusers families from small configs, and hand-written DiTs in many attention spellings."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention  # bound at import time on purpose


def tiny_wan(layers=2, heads=2, head_dim=32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64,
                                 num_layers=layers, rope_max_seq_len=32).eval()


def tiny_hunyuan(heads: int = 2):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=16,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()


def tiny_cogvideox(heads: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=16,
                                       sample_height=16, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=8).eval()


class _Block(nn.Module):
    def __init__(self, dim, heads, attn_cls):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn_cls(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _QKV(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def split(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o):
        B, H, S, D = o.shape
        return self.out(o.transpose(1, 2).reshape(B, S, H * D))


class ManualAttention(_QKV):
    """softmax(q @ kᵀ * scale) @ v written by hand, with a float32 upcast."""

    def forward(self, x):
        q, k, v = self.split(x)
        scores = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        return self.merge(probs @ v)


class NamedSDPAAttention(_QKV):
    """Calls `scaled_dot_product_attention` bound by name at import time."""

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(scaled_dot_product_attention(q, k, v))


class EinsumAttention(_QKV):
    """softmax(q·kᵀ·scale)·v with `torch.einsum`, in the subscript style given (e.g. `bhid,bhjd->bhij`)."""

    def __init__(self, dim, heads, qk="bhid,bhjd->bhij", pv="bhij,bhjd->bhid"):
        super().__init__(dim, heads)
        self.qk, self.pv = qk, pv

    def forward(self, x):
        q, k, v = self.split(x)
        scores = torch.einsum(self.qk, q, k) * self.head_dim ** -0.5
        return self.merge(torch.einsum(self.pv, scores.softmax(dim=-1), v))


def einsum_attention(qk, pv):
    """An `EinsumAttention` class for one subscript style."""
    return lambda dim, heads: EinsumAttention(dim, heads, qk, pv)


class BaddbmmAttention(_QKV):
    """diffusers' classic `AttnProcessor`: heads folded into the batch, `baddbmm` scores with an unused
    `torch.empty` input (beta=0), a float32 softmax, `bmm` with v."""

    def forward(self, x):
        q, k, v = self.split(x)
        B, H, S, D = q.shape
        q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=D ** -0.5)
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        return self.merge(torch.bmm(probs, v).reshape(B, H, S, D))


class ScaledQueryAttention(_QKV):
    """`(q * scale) @ k.mT`, softmax, `@ v`."""

    def forward(self, x):
        q, k, v = self.split(x)
        q = q * self.head_dim ** -0.5
        return self.merge((q @ k.mT).softmax(-1) @ v)


class PerSampleAttention(_QKV):
    """Attention run once per batch element (`[H, S, D]` slices through SDPA), then stacked."""

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(torch.stack([F.scaled_dot_product_attention(q[i], k[i], v[i]) for i in range(q.shape[0])]))


class MaskedJointAttention(_QKV):
    """Joint attention over [text, video] with a dense `(S, S)` SDPA mask (bool, or additive)."""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class MaskedFillJointAttention(_QKV):
    """Joint attention written by hand, the bool mask `blocked` (True: the key is masked out) applied by
    `masked_fill` before the softmax, in `style`: `masked_fill` (-inf), `masked_fill_` (in place, -inf) or
    `finite` (-1e9)."""

    def __init__(self, dim, heads, style="masked_fill"):
        super().__init__(dim, heads)
        self.style = style

    def forward(self, x, blocked):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if self.style == "masked_fill_":
            scores.masked_fill_(blocked, float("-inf"))
        else:
            scores = scores.masked_fill(blocked, -1e9 if self.style == "finite" else float("-inf"))
        return self.merge(scores.softmax(dim=-1) @ v)


class JointDiT(nn.Module):
    """A hand-written DiT whose attention runs over [text, video] (text first) with a dense mask from
    `mask_fn(n_text, n_video)`."""

    def __init__(self, mask_fn, dim=32, heads=2, layers=2, in_ch=4, n_text=6, attn_cls=MaskedJointAttention):
        super().__init__()
        self.n_text, self.mask_fn = n_text, mask_fn
        self.embed, self.ctx = nn.Linear(in_ch, dim), nn.Linear(8, dim)
        self.text = nn.Parameter(torch.randn(n_text, dim))
        self.attns = nn.ModuleList(attn_cls(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, in_ch)

    def forward(self, x, ctx):
        B, C, T, H, W = x.shape
        text = self.text + self.ctx(ctx).mean(1, keepdim=True)
        h = torch.cat([text, self.embed(x.flatten(2).transpose(1, 2))], 1)
        mask = self.mask_fn(self.n_text, T * H * W).to(x.device)
        for attn in self.attns:
            h = h + attn(h, mask)
        return self.head(h[:, self.n_text:]).transpose(1, 2).reshape(B, C, T, H, W)


def padding_mask(valid_text):
    """Bool `(S, S)` key-padding mask in disguise: every query sees the video and the first `valid_text` texts."""
    def fn(n_text, n_video):
        keys = torch.ones(n_text + n_video, dtype=torch.bool)
        keys[valid_text:n_text] = False
        return keys.expand(n_text + n_video, -1)
    return fn


def block_mask(valid_text):
    """Additive `(S, S)` block mask: video sees video and the valid text; text sees only the valid text."""
    def fn(n_text, n_video):
        S = n_text + n_video
        m = torch.zeros(S, S)
        m[:, valid_text:n_text] = float("-inf")
        m[:n_text, n_text:] = float("-inf")
        return m
    return fn


def random_mask(size, seed=0):
    """Bool `(size, size)` mask with no structure (each query keeps its own random half of the keys)."""
    m = torch.rand(size, size, generator=torch.Generator().manual_seed(seed)) > 0.5
    m[:, 0] = True

    def fn(n_text, n_video):
        assert n_text + n_video == size, (n_text, n_video, size)
        return m
    return fn


class ConvDiT(nn.Module):
    """A hand-written DiT with a Conv3d patch embedding (patch `(1, 2, 2)`) and joint [text, video] SDPA
    attention, known to no adapter: its geometry must be inferred."""

    def __init__(self, dim=32, heads=2, layers=2, in_ch=4, patch=(1, 2, 2)):
        super().__init__()
        self.patch_embed = nn.Conv3d(in_ch, dim, patch, stride=patch)
        self.ctx = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, NamedSDPAAttention) for _ in range(layers))
        self.head = nn.Linear(dim, in_ch * math.prod(patch))

    def forward(self, hidden_states, encoder_hidden_states):
        tokens = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        n_text = encoder_hidden_states.shape[1]
        h = torch.cat([self.ctx(encoder_hidden_states), tokens], 1)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h[:, n_text:])


class TokensDiT(nn.Module):
    """A hand-written DiT fed patchified tokens `[B, F*H*W, C]`, its grid given as int arguments (as LTX-Video)."""

    def __init__(self, dim=32, heads=2, layers=2, in_ch=4):
        super().__init__()
        self.proj_in = nn.Linear(in_ch, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, NamedSDPAAttention) for _ in range(layers))
        self.proj_out = nn.Linear(dim, in_ch)

    def forward(self, hidden_states, num_frames, height, width):
        h = self.proj_in(hidden_states)
        for blk in self.blocks:
            h = blk(h)
        return self.proj_out(h)


def tokens_dit():
    torch.manual_seed(0)
    return TokensDiT().eval()


def conv_dit():
    torch.manual_seed(0)
    return ConvDiT().eval()


SPELLINGS = {
    "einsum_bhid": einsum_attention("bhid,bhjd->bhij", "bhij,bhjd->bhid"),
    "einsum_bhqk": einsum_attention("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
    "einsum_ellipsis": einsum_attention("...id,...jd->...ij", "...ij,...jd->...id"),
    "baddbmm_folded": BaddbmmAttention,
    "scaled_query_mT": ScaledQueryAttention,
    "per_sample_loop": PerSampleAttention,
}


def spelling_dit(name):
    """A `TinyDiT` whose self-attention is written in spelling `name` of `SPELLINGS`."""
    torch.manual_seed(0)
    return TinyDiT(SPELLINGS[name]).eval()


def joint_dit(mask_fn):
    torch.manual_seed(0)
    return JointDiT(mask_fn).eval()


def masked_fill_dit(mask_fn, style="masked_fill"):
    """A `JointDiT` whose attention applies its mask with `masked_fill` (see `MaskedFillJointAttention`)."""
    def blocked(n_text, n_video):
        m = mask_fn(n_text, n_video)
        return m != 0 if m.is_floating_point() else ~m

    torch.manual_seed(0)
    return JointDiT(blocked, attn_cls=lambda dim, heads: MaskedFillJointAttention(dim, heads, style)).eval()


class FactorizedDiT(nn.Module):
    """A hand-written Latte-style DiT with factorized attention: each layer attends within every frame
    (batch B·T, sequence H·W), then along every pixel's frames (batch B·H·W, sequence T)."""

    def __init__(self, dim=32, heads=2, layers=2, in_ch=4):
        super().__init__()
        self.embed = nn.Linear(in_ch, dim)
        self.spatial = nn.ModuleList(_Block(dim, heads, NamedSDPAAttention) for _ in range(layers))
        self.temporal = nn.ModuleList(_Block(dim, heads, ManualAttention) for _ in range(layers))
        self.head = nn.Linear(dim, in_ch)

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.embed(x.flatten(2).transpose(1, 2))  # [B, T*H*W, dim], frame-major
        for spatial, temporal in zip(self.spatial, self.temporal):
            h = spatial(h.reshape(B * T, H * W, -1))
            h = h.reshape(B, T, H * W, -1).transpose(1, 2).reshape(B * H * W, T, -1)
            h = temporal(h)
            h = h.reshape(B, H * W, T, -1).transpose(1, 2).reshape(B, T * H * W, -1)
        return self.head(h).transpose(1, 2).reshape(B, C, T, H, W)


def factorized_dit():
    torch.manual_seed(0)
    return FactorizedDiT().eval()


class CrossAttention(_QKV):
    def forward(self, x, ctx):
        B, S, _ = x.shape
        q = self.qkv(x)[..., : self.heads * self.head_dim].reshape(B, S, self.heads, -1).transpose(1, 2)
        kv = self.qkv(ctx)[..., self.heads * self.head_dim:].reshape(B, ctx.shape[1], 2, self.heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4)
        return self.merge(F.scaled_dot_product_attention(q, k, v))


class TinyDiT(nn.Module):
    """A hand-written video DiT over a (T, H, W) token grid: self-attention blocks plus one cross-attention."""

    def __init__(self, attn_cls, dim=32, heads=2, layers=2, in_ch=4):
        super().__init__()
        self.embed = nn.Linear(in_ch, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, attn_cls) for _ in range(layers))
        self.cross = CrossAttention(dim, heads)
        self.ctx = nn.Linear(8, dim)
        self.head = nn.Linear(dim, in_ch)

    def forward(self, x, ctx):
        B, C, T, H, W = x.shape
        h = self.embed(x.flatten(2).transpose(1, 2))
        for blk in self.blocks:
            h = blk(h)
        h = h + self.cross(h, self.ctx(ctx))
        return self.head(h).transpose(1, 2).reshape(B, C, T, H, W)


def manual_dit():
    torch.manual_seed(0)
    return TinyDiT(ManualAttention).eval()


def named_sdpa_dit():
    torch.manual_seed(0)
    return TinyDiT(NamedSDPAAttention).eval()


def dit_inputs(grid=(4, 4, 8), batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *grid, generator=g), torch.randn(batch, 3, 8, generator=g))


def tile_of_tokens(grid, tile):
    """Independent long [T*H*W]: the tile of every video token under the layout's rule (boxes of `tile`
    in raster order; partial boxes of equal extents chunked, in raster order, into tiles of at most one
    tile volume; tiles ordered by their first box)."""
    T, H, W = grid
    tt, th, tw = tile
    vol = tt * th * tw
    nt, nh, nw = math.ceil(T / tt), math.ceil(H / th), math.ceil(W / tw)
    boxes = [(a, b, c) for a in range(nt) for b in range(nh) for c in range(nw)]
    ext = {x: (min(tt, T - x[0] * tt), min(th, H - x[1] * th), min(tw, W - x[2] * tw)) for x in boxes}
    members = {}  # first box of each tile -> its boxes
    by_kind = {}
    for x in boxes:
        by_kind.setdefault(ext[x], []).append(x)
    for e, xs in by_kind.items():
        per = max(1, vol // math.prod(e))
        for i in range(0, len(xs), per):
            members[xs[i]] = xs[i:i + per]
    order = sorted(members, key=boxes.index)
    box_tile = {x: n for n, first in enumerate(order) for x in members[first]}
    t = torch.arange(T).view(-1, 1, 1).expand(T, H, W).reshape(-1) // tt
    h = torch.arange(H).view(1, -1, 1).expand(T, H, W).reshape(-1) // th
    w = torch.arange(W).view(1, 1, -1).expand(T, H, W).reshape(-1) // tw
    return torch.tensor([box_tile[(int(a), int(b), int(c))] for a, b, c in zip(t, h, w)])


def mask_from_selection(grid, tile, idx, cnt, seq_len, video_start=0, key_mask=None):
    """Independent token-level bool mask [B, H, S, S] of a tile selection (for cross-checking the op)."""
    T, H, W = grid
    tile_of = tile_of_tokens(grid, tile)  # tile index of every video token
    B, Hh, n_q, _ = idx.shape
    sel = torch.zeros(B, Hh, n_q, n_q, dtype=torch.bool)
    for b in range(B):
        for hh in range(Hh):
            for i in range(n_q):
                sel[b, hh, i, idx[b, hh, i, : cnt[b, hh, i]].long()] = True
    vl = T * H * W
    mask = torch.ones(B, Hh, seq_len, seq_len, dtype=torch.bool)
    vid = slice(video_start, video_start + vl)
    mask[:, :, vid, vid] = sel[:, :, tile_of][:, :, :, tile_of]
    if key_mask is not None:
        mask &= key_mask[:, None, None, :]
    return mask


def rel_err(a, b):
    """Relative L2 error `|a - b| / |b|`, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def stale_selection(B, H, S, bm, bn, gen, *, p_empty, max_frac=0.7, full_width=False):
    """Random duplicate-free CPU selection; some rows empty; stale (ignored) ids past each count."""
    n_qb, n_kb = -(-S // bm), -(-S // bn)
    max_kv = n_kb if full_width else max(1, math.ceil(n_kb * max_frac))
    idx = torch.rand(B, H, n_qb, n_kb, generator=gen).argsort(-1)[..., :max_kv].to(torch.int32)
    cnt = torch.randint(1, max_kv + 1, (B, H, n_qb), generator=gen, dtype=torch.int32)
    cnt = torch.where(torch.rand(B, H, n_qb, generator=gen) < p_empty, torch.zeros_like(cnt), cnt)
    return idx.contiguous(), cnt


def density_selection(B, H, S, bm, bn, density, *, p_empty=0.0, device="cuda"):
    """Duplicate-free random selection, `density` of the key blocks per query block, some rows empty."""
    n_qb, n_kb = -(-S // bm), -(-S // bn)
    count = max(1, round(density * n_kb))
    perm = torch.rand(B, H, n_qb, n_kb, device=device).argsort(-1).to(torch.int32)
    idx = torch.cat([perm[..., :count].sort(-1).values, perm[..., count:]], -1).contiguous()
    cnt = torch.randint(1, count + 1, (B, H, n_qb), device=device, dtype=torch.int32)
    if p_empty:
        cnt = torch.where(torch.rand(B, H, n_qb, device=device) < p_empty, torch.zeros_like(cnt), cnt)
    return idx, cnt


# ------------------------------------------------------------------------------------------------
# diffusers video transformers from tiny configs (for the coverage test and `inspect --all-diffusers`)

COVERAGE_GRID = (4, 8, 8)  # latent tokens after patching: four 1x8x8 tiles per frame stack

#: Classes checked at another grid: factorized spatial sites tile one frame, which needs four 1x8x8 tiles itself.
COVERAGE_GRIDS = {"LatteTransformer3DModel": (4, 16, 16)}


def _video_latent(channels, patch=(1, 2, 2), grid=COVERAGE_GRID, frames_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    F_, H_, W_ = (n * p for n, p in zip(grid, patch))
    shape = (1, F_, channels, H_, W_) if frames_first else (1, channels, F_, H_, W_)
    return torch.randn(*shape, generator=g)


def _text(n, dim, seed=1):
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def _t():
    return torch.tensor([500])


_WAN_LIKE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2)


def _default_inputs():
    return {"hidden_states": _video_latent(4), "timestep": _t(), "encoder_hidden_states": _text(8, 16),
            "return_dict": False}


def _tiny_skyreels():
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**_WAN_LIKE, rope_max_seq_len=32), _default_inputs()


def _tiny_wan_vace():
    from diffusers import WanVACETransformer3DModel

    m = WanVACETransformer3DModel(**_WAN_LIKE, rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8)
    return m, {**_default_inputs(), "control_hidden_states": _video_latent(8, seed=3)}


def _tiny_wan_family():
    return tiny_wan(), _default_inputs()


def _tiny_hunyuan_family():
    m = tiny_hunyuan()
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[:, 6:] = False
    return m, {**_default_inputs(), "encoder_attention_mask": mask, "pooled_projections": torch.randn(1, 8)}


def _cogvideox_like(cls):
    """A tiny model of the CogVideoX architecture (CogVideoX, ConsisID) and its inputs."""
    m = cls(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=13, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8)
    return m, {"hidden_states": _video_latent(4, frames_first=True), "encoder_hidden_states": _text(8, 16),
               "timestep": _t(), "return_dict": False}


def _tiny_cogvideox_family():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return _cogvideox_like(CogVideoXTransformer3DModel)


def _tiny_allegro():
    from diffusers import AllegroTransformer3DModel

    m = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
                                  sample_height=16, sample_width=16, sample_frames=4, caption_channels=16)
    return m, _default_inputs()


def _tiny_easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    m = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                      patch_size=2, sample_width=16, sample_height=16, num_layers=2, mmdit_layers=2,
                                      time_embed_dim=16, text_embed_dim=16)
    return m, _default_inputs()


def _unzero(m):
    """Draw the all-zero parameters of `m` from N(0, 0.1): adaLN-zero modulations would make the output of a freshly
    built model independent of its attention."""
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.1)


def _tiny_kandinsky5():
    from diffusers import Kandinsky5Transformer3DModel

    m = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                                     patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                                     num_visual_blocks=2, axes_dims=(4, 6, 6))
    _unzero(m)
    T, H, W = COVERAGE_GRID
    x = torch.randn(1, T, 2 * H, 2 * W, 4, generator=torch.Generator().manual_seed(0))  # channels last
    return m, {"hidden_states": x, "encoder_hidden_states": _text(8, 16), "timestep": _t().float(),
               "pooled_projections": torch.randn(1, 8), "text_rope_pos": torch.arange(8),
               "visual_rope_pos": [torch.arange(T), torch.arange(H), torch.arange(W)], "return_dict": False}


def _tiny_chronoedit():
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**_WAN_LIKE, rope_max_seq_len=32), _default_inputs()


def _tiny_helios():
    from diffusers import HeliosTransformer3DModel

    return HeliosTransformer3DModel(**_WAN_LIKE, rope_dim=(12, 10, 10)), _default_inputs()


def _tiny_anyflow():
    from diffusers import AnyFlowTransformer3DModel

    frames = _video_latent(4).shape[2]  # its timesteps are per frame: [B, F]
    return AnyFlowTransformer3DModel(**_WAN_LIKE, rope_max_seq_len=32), {
        **_default_inputs(), "timestep": torch.full((1, frames), 500), "r_timestep": torch.full((1, frames), 400)}


def _tiny_consisid():
    from diffusers import ConsisIDTransformer3DModel

    return _cogvideox_like(ConsisIDTransformer3DModel)


def _tiny_motif():
    from diffusers import MotifVideoTransformer3DModel

    m = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                     num_layers=1, num_single_layers=1, patch_size=2, patch_size_t=1,
                                     text_embed_dim=16, rope_axes_dim=(4, 6, 6))
    return m, {**_default_inputs(), "encoder_attention_mask": torch.ones(1, 8)}


def _tiny_wan_animate():
    from diffusers import WanAnimateTransformer3DModel

    m = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=None, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=8, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=2)
    x = _video_latent(12)  # [noisy latent, reference latent, mask] channels
    face = torch.randn(1, 3, 9, 8, 8, generator=torch.Generator().manual_seed(4))  # 9 face frames -> 3 motion frames
    return m, {"hidden_states": x, "timestep": _t(), "encoder_hidden_states": _text(8, 16),
               "pose_hidden_states": _video_latent(4, grid=(COVERAGE_GRID[0] - 1, *COVERAGE_GRID[1:]), seed=5),
               "face_pixel_values": face, "return_dict": False}


def _tiny_joyimage_edit():
    from diffusers import JoyImageEditTransformer3DModel

    m = JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2,
                                       text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6])
    return m, _default_inputs()


def _tiny_kandinsky6():
    from diffusers import Kandinsky6Transformer3DModel

    m = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                                     patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                                     num_visual_blocks=2, axes_dims=(4, 6, 6), in_audio_dim=4, out_audio_dim=4)
    _unzero(m)
    T, H, W = COVERAGE_GRID
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, 2 * H, 2 * W, 2 * 4 + 1, generator=g)  # channels last: [latent, condition, mask]
    return m, {"hidden_states": x, "encoder_hidden_states": _text(8, 16), "pooled_projections": torch.randn(1, 8),
               "timestep": _t().float(), "audio_hidden_states": torch.randn(1, 12, 4, generator=g),
               "return_dict": False}


def _tiny_sana_wm():
    from diffusers import SanaWMTransformer3DModel

    m = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
                                 patch_size=(1, 2, 2), softmax_every_n=2, linear_head_dim=16, caption_channels=16,
                                 chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2, image_size=16)
    _unzero(m)
    frames = COVERAGE_GRID[0]  # its timesteps are per frame: [B, 1, F]
    # float64: in float32 its softmax layers cast q, k, v to bfloat16 before SDPA, so a density-1.0 comparison would
    # measure bf16 rounding (the float32 model itself is 1e-4 off its float64 output), not sparsify
    return m.double(), {"hidden_states": _video_latent(4).double(), "timestep": torch.full((1, 1, frames), 500),
                        "encoder_hidden_states": _text(8, 16).unsqueeze(1).double(),
                        "encoder_attention_mask": torch.ones(1, 8), "return_dict": False}


def _tiny_latte():
    from diffusers import LatteTransformer3DModel

    grid = COVERAGE_GRIDS["LatteTransformer3DModel"]  # spatial attention over H*W per frame, temporal over T
    m = LatteTransformer3DModel(sample_size=2 * grid[1], num_layers=2, patch_size=2, attention_head_dim=16,
                                num_attention_heads=2, caption_channels=16, in_channels=4, out_channels=4,
                                cross_attention_dim=32, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                video_length=grid[0])
    return m, {"hidden_states": _video_latent(4, grid=grid), "timestep": _t(), "encoder_hidden_states": _text(8, 16),
               "return_dict": False}


def _tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel

    T, H, W = COVERAGE_GRID  # patchified tokens [B, T*H*W, C]; the grid comes from num_frames, height, width
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   cross_attention_dim=32, num_layers=2, caption_channels=16)
    x = torch.randn(1, T * H * W, 4, generator=torch.Generator().manual_seed(0))
    return m, {"hidden_states": x, "encoder_hidden_states": _text(8, 16), "timestep": _t(),
               "encoder_attention_mask": torch.ones(1, 8), "num_frames": T, "height": H, "width": W,
               "return_dict": False}


def _tiny_ltx2():
    from diffusers import LTX2VideoTransformer3DModel

    T, H, W = COVERAGE_GRID  # video and audio streams; the video grid comes from num_frames, height, width
    m = LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4,
                                    audio_num_attention_heads=2, audio_attention_head_dim=16,
                                    audio_cross_attention_dim=32, num_layers=2, caption_channels=16)
    g = torch.Generator().manual_seed(0)
    audio = 10
    return m, {"hidden_states": torch.randn(1, T * H * W, 4, generator=g),
               "audio_hidden_states": torch.randn(1, audio, 4, generator=g), "encoder_hidden_states": _text(8, 16),
               "audio_encoder_hidden_states": _text(8, 16, seed=2), "timestep": _t(), "num_frames": T, "height": H,
               "width": W, "audio_num_frames": audio, "return_dict": False}


#: Builders `() -> (model, forward kwargs)` of diffusers' video transformers from tiny configs.
DIFFUSERS_VIDEO = {
    "WanTransformer3DModel": _tiny_wan_family,
    "WanVACETransformer3DModel": _tiny_wan_vace,
    "SkyReelsV2Transformer3DModel": _tiny_skyreels,
    "HunyuanVideoTransformer3DModel": _tiny_hunyuan_family,
    "CogVideoXTransformer3DModel": _tiny_cogvideox_family,
    "AllegroTransformer3DModel": _tiny_allegro,
    "EasyAnimateTransformer3DModel": _tiny_easyanimate,
    "Kandinsky5Transformer3DModel": _tiny_kandinsky5,
    "ChronoEditTransformer3DModel": _tiny_chronoedit,
    "HeliosTransformer3DModel": _tiny_helios,
    "ConsisIDTransformer3DModel": _tiny_consisid,
    "MotifVideoTransformer3DModel": _tiny_motif,
    "AnyFlowTransformer3DModel": _tiny_anyflow,
    "WanAnimateTransformer3DModel": _tiny_wan_animate,
    "JoyImageEditTransformer3DModel": _tiny_joyimage_edit,
    "Kandinsky6Transformer3DModel": _tiny_kandinsky6,
    "SanaWMTransformer3DModel": _tiny_sana_wm,
    "LatteTransformer3DModel": _tiny_latte,
    "LTXVideoTransformer3DModel": _tiny_ltx,
    "LTX2VideoTransformer3DModel": _tiny_ltx2,
}

#: Joint-attention classes whose text tokens come before the video in the attention sequence (read from diffusers'
#: source: CogVideoX, ConsisID and EasyAnimate concatenate `[text, video]`; HunyuanVideo, Motif and JoyImage-Edit
#: concatenate `[video, text]`). Every other covered class attends over the video alone at its full self sites.
COVERAGE_TEXT_FIRST = frozenset({"CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel",
                                 "EasyAnimateTransformer3DModel"})


def coverage_video_span(name: str, inputs: dict) -> tuple[int, int]:
    """The `(start, length)` of the video tokens at every full self or joint site of the tiny `name` built by
    `DIFFUSERS_VIDEO`, from the family's token order (`COVERAGE_TEXT_FIRST`), the text tokens its builder passes
    (`encoder_hidden_states`) and its coverage grid: the oracle for the inferred span, independent of discovery.

    Example:
        >>> coverage_video_span("CogVideoXTransformer3DModel", {"encoder_hidden_states": torch.zeros(1, 8, 16)})
        (8, 256)
        >>> coverage_video_span("WanTransformer3DModel", {})
        (0, 256)
    """
    length = math.prod(COVERAGE_GRIDS.get(name, COVERAGE_GRID))
    return (int(inputs["encoder_hidden_states"].shape[1]) if name in COVERAGE_TEXT_FIRST else 0), length


#: diffusers video transformers this coverage does not serve, each with the reason (asserted by the test).
DIFFUSERS_VIDEO_UNSUPPORTED = {
    "MochiTransformer3DModel": "attention runs per batch element over the valid text tokens (torch.nonzero): Dynamo "
                               "breaks the graph there and the resumed frames carry no module path, so no video "
                               "site is discovered",
    "CosmosTransformer3DModel": "its padding-mask resize needs torchvision, which is not installed",
    "HunyuanVideo15Transformer3DModel": "a data-dependent branch (`if torch.all(image_embeds == 0)`) and boolean-mask "
                                        "text reordering break the Dynamo graph before the transformer blocks; in the "
                                        "resumed frames only the first block's attention is captured",
    "SanaVideoTransformer3DModel": "its self-attention is linear (ReLU feature maps, no softmax); only the text "
                                   "cross-attention is a softmax site",
    "AnyFlowFARTransformer3DModel": "its self-attention runs through flex_attention with a frame-causal BlockMask "
                                    "(AnyFlowCausalAttnProcessor accepts only the flex backend): a tiny config yields "
                                    "only the 2 text cross-attention sites, no video site",
    "HunyuanVideoFramepackTransformer3DModel": "the clean, 2x and 4x history latents are patch-embedded by their own "
                                               "Conv3d layers and concatenated before the video tokens, and the batch-1 "
                                               "text trimming (`.item()` on the mask length) breaks the Dynamo graph "
                                               "between that concatenation and the blocks: the video offset at the "
                                               "joint sites (148 in a tiny config) is not found and would default to 0",
    "JoyImageEditPlusTransformer3DModel": "its input is pre-patchified patches [B, N, C, pt, ph, pw] packing the target "
                                          "and reference images, with each one's (t, h, w) in a Python list "
                                          "(shape_list): no 5-D latent to infer the grid from",
    "Kandinsky6SRTransformer3DModel": "its attention is already block sparse (NABLA: flex_attention with a "
                                      "sliding-tile BlockMask over tokens regrouped into 8x8 blocks) and dispatches "
                                      "only on the flex backend: a tiny config yields no attention site",
    "MiniMaxH3Transformer3DModel": "its input is already-patchified video tokens [B, N, C*pt*ph*pw], scattered with "
                                   "index_copy at video_indices into one sequence with text and audio; the grid exists "
                                   "only as per-token (t, h, w) in position_ids: no 5-D latent to infer it from",
    "SanaWMLTX2RefinerTransformer3DModel": "its input is an already-patchified token sequence [B, N, C] with "
                                           "precomputed rotary embeddings (video_rotary_emb) and no frame or size "
                                           "arguments: no 5-D latent to infer the grid from",
    "WanAnimate2Transformer3DModel": "its input is a list of per-sample 4-D latents [C, F, H, W], and the denoising "
                                     "pass (kv_cache_mode='cached') attends through flex_attention with a BlockMask "
                                     "over a 128-aligned [generation | reference] buffer: a tiny config yields one "
                                     "cross-attention site and no video self-attention site in either pass",
}


def diffusers_video_classes() -> list[str]:
    """Names of the installed diffusers' top-level `*Transformer3DModel` classes (video latents `[B, C, F, H, W]`)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Transformer3DModel"))
