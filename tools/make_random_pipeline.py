"""Build a diffusers video pipeline with random weights and small local text encoders, and save it (no network).

    python -m tools.make_random_pipeline OUT [--config wan2.1-t2v-1.3b] [--dtype bfloat16] [--prompts prompts.txt]

Wan configurations: the transformer(s) have a real Wan configuration (or a tiny one), the VAE is `AutoencoderKLWan`
with its default (real) configuration or a tiny one, and the text encoder is a one-layer `UMT5EncoderModel` of the
transformer's text width with a word-level tokenizer built from the prompts' words. The `tiny-cogvideox`,
`tiny-cogvideox-i2v` and `tiny-hunyuan` configurations build `CogVideoXPipeline`, `CogVideoXImageToVideoPipeline` and
`HunyuanVideoPipeline` the same way (tiny transformer and VAE; a one-layer T5, or a two-layer Llama and a one-layer
CLIP text model, over the same word-level tokenizer); with a 4x spatial and 4x temporal VAE and patch 2, 64x64 pixels
and 5 frames make a 2x8x8 token grid, as for the tiny Wan configurations. The result loads with
`DiffusionPipeline.from_pretrained(OUT)` and runs `python -m sparsify.calibrate --pipeline OUT ...` on a machine
without network access: attention timings are those of the real configuration, attention patterns are not.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

WORDS = ("a cat walks on the beach at sunset while waves roll in slowly camera pans left over a city street at night "
         "with neon lights and rain red car drives through forest snow falls on mountains bird flies above river")

# name -> (pipeline class, transformer config(s), tiny VAE?, pipeline config)
_WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_14B = dict(_WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
CONFIGS = {
    "wan2.1-t2v-1.3b": ("WanPipeline", [_WAN_13B], False, {}),
    "wan2.1-t2v-14b": ("WanPipeline", [_WAN_14B], False, {}),
    "wan2.2-t2v-a14b": ("WanPipeline", [_WAN_14B, _WAN_14B], False, {"boundary_ratio": 0.875}),
    "tiny-t2v": ("WanPipeline", [_TINY], True, {}),
    "tiny-t2v-a14b": ("WanPipeline", [_TINY, _TINY], True, {"boundary_ratio": 0.8}),
    # Wan 2.2 TI2V style: the image enters as the first latent frame, at timestep 0 (`expand_timesteps`)
    "tiny-ti2v": ("WanImageToVideoPipeline", [_TINY], True, {"expand_timesteps": True}),
    # Wan 2.1 / 2.2 A14B I2V style: the image latents and a frame mask concatenated to the channels (4 + 4 + 4)
    "tiny-i2v-a14b": ("WanImageToVideoPipeline", [dict(_TINY, in_channels=12)] * 2, True, {"boundary_ratio": 0.8}),
}


def word_tokenizer(words=WORDS):
    """A `PreTrainedTokenizerFast` over a word-level vocabulary (lower-cased words; unknown words map to `<unk>`).

    Example:
        >>> tok = word_tokenizer("a cat")
        >>> tok(["a cat", "a dog"]).input_ids
        [[3, 4, 2], [3, 1, 2]]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for w in re.findall(r"\w+", words.lower()):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def small_text_encoder(d_model: int, vocab_size: int, seed: int = 0, cls: str = "UMT5EncoderModel"):
    """A one-layer `UMT5EncoderModel` (or `cls`, e.g. `T5EncoderModel`) whose output width `d_model` is the
    transformer's text width."""
    import transformers
    from transformers import T5Config

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=min(64, d_model // 2), num_heads=2, num_layers=1,
                   d_ff=min(256, 4 * d_model), relative_attention_num_buckets=8, dropout_rate=0.0)
    return getattr(transformers, cls)(cfg).eval()


def tiny_vae(seed: int = 0):
    """A random `AutoencoderKLWan` with 4 latent channels and 4x spatial and temporal compression."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=4,
                            scale_factor_temporal=4).eval()


def _cast(module, dtype):
    return module if dtype == torch.float32 else module.to(dtype)


def _tiny_cogvideox(dtype, words, seed, image_to_video=False):
    """CogVideoX-5B style (rotary positions, text first): `CogVideoXPipeline` or `CogVideoXImageToVideoPipeline`
    (the image latents concatenated to the channels: 4 + 4)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if image_to_video else 4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                                 block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    tok = word_tokenizer(words)
    text_encoder = small_text_encoder(16, len(tok), seed, cls="T5EncoderModel")
    cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    return cls(tokenizer=tok, text_encoder=_cast(text_encoder, dtype), vae=_cast(vae, dtype),
               transformer=_cast(transformer, dtype), scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))


def _tiny_hunyuan(dtype, words, seed):
    """HunyuanVideo style: joint [video, text] attention, guidance as an embedding (one transformer call per step),
    a Llama text encoder (hidden states) and a CLIP one (pooled projection)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4).eval()
    tok = word_tokenizer(words)
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=512, pad_token_id=0,
                                          eos_token_id=2)).eval()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    return HunyuanVideoPipeline(tokenizer=tok, text_encoder=_cast(text_encoder, dtype), tokenizer_2=tok,
                                text_encoder_2=_cast(text_encoder_2, dtype), vae=_cast(vae, dtype),
                                transformer=_cast(transformer, dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _tiny_ltx(dtype, words, seed):
    """LTX-Video style: patchified tokens `[B, F*H*W, C]` with the grid given as forward arguments, both guidance
    branches in one batch of 2, a one-layer T5 text encoder with its attention mask; the VAE compresses 8x
    spatially (patch 2 and two 2x stages) and 4x temporally, the transformer's patch is 1."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                             cross_attention_dim=32, num_layers=2, caption_channels=16).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=4, block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                down_block_types=("LTXVideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, False),
                                decoder_spatio_temporal_scaling=(True, True, False),
                                decoder_inject_noise=(False,) * 4, upsample_residual=(False,) * 3,
                                upsample_factor=(1,) * 3, downsample_type=("conv",) * 3, patch_size=2,
                                patch_size_t=1).eval()
    tok = word_tokenizer(words)
    text_encoder = small_text_encoder(16, len(tok), seed, cls="T5EncoderModel")
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    return LTXPipeline(tokenizer=tok, text_encoder=_cast(text_encoder, dtype), vae=_cast(vae, dtype),
                       transformer=_cast(transformer, dtype), scheduler=scheduler)


#: name -> builder `(dtype, words, seed) -> pipeline` of the other families' tiny pipelines.
FAMILIES = {
    "tiny-cogvideox": _tiny_cogvideox,
    "tiny-cogvideox-i2v": lambda dtype, words, seed: _tiny_cogvideox(dtype, words, seed, image_to_video=True),
    "tiny-hunyuan": _tiny_hunyuan,
    "tiny-ltx": _tiny_ltx,
}


def build_pipeline(config: str = "tiny-t2v", *, dtype=torch.float32, words: str = WORDS, flow_shift: float = 3.0,
                   seed: int = 0):
    """A pipeline of configuration `config` (see `CONFIGS` and `FAMILIES`) with random weights.

    Example:
        >>> pipe = build_pipeline("tiny-t2v-a14b")
        >>> type(pipe).__name__, pipe.transformer_2 is not None, pipe.config.boundary_ratio
        ('WanPipeline', True, 0.8)
        >>> type(build_pipeline("tiny-hunyuan")).__name__
        'HunyuanVideoPipeline'
    """
    import diffusers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    if config in FAMILIES:
        return FAMILIES[config](dtype, words, seed)
    if config not in CONFIGS:
        raise ValueError(f"unknown pipeline config {config!r}; valid: {', '.join([*CONFIGS, *FAMILIES])}")
    cls_name, transformer_cfgs, tiny, extra = CONFIGS[config]
    transformers = []
    for i, cfg in enumerate(transformer_cfgs):
        torch.manual_seed(seed + i)
        model = WanTransformer3DModel(**cfg).eval()
        transformers.append(model if dtype == torch.float32 else model.to(dtype))
    torch.manual_seed(seed)
    vae = tiny_vae(seed) if tiny else AutoencoderKLWan().eval()
    tok = word_tokenizer(words)
    text_encoder = small_text_encoder(transformer_cfgs[0]["text_dim"], len(tok), seed)
    text_encoder = text_encoder if dtype == torch.float32 else text_encoder.to(dtype)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                        num_train_timesteps=1000)
    kw = dict(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformers[0])
    if len(transformers) > 1:
        kw["transformer_2"] = transformers[1]
    if cls_name == "WanImageToVideoPipeline":
        kw.update(image_encoder=None, image_processor=None)
    return getattr(diffusers, cls_name)(**kw, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_random_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to save the pipeline in (save_pretrained)")
    p.add_argument("--config", default="wan2.1-t2v-1.3b", choices=sorted([*CONFIGS, *FAMILIES]))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", default=None, help="file of prompts (one per line) whose words join the vocabulary")
    p.add_argument("--flow-shift", type=float, default=3.0,
                   help="Wan's UniPC flow shift (3.0 at 480p, 5.0 at 720p); the other families keep their schedulers'")
    args = p.parse_args(argv)
    words = WORDS + (" " + Path(args.prompts).read_text() if args.prompts else "")
    pipe = build_pipeline(args.config, dtype=getattr(torch, args.dtype), words=words, flow_shift=args.flow_shift)
    pipe.save_pretrained(args.out)
    n = sum(p.numel() for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None
            for p in getattr(pipe, name).parameters())
    print(f"saved {type(pipe).__name__} ({args.config}, {n / 1e9:.2f}B transformer parameters, {args.dtype}) to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
