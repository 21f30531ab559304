"""The test-bed models: small diffusers Wan video DiTs (see `variants`), their example inputs and a flow-matching sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

#: Latent video shape [C, F, H, W] the test-bed is trained on; patch (1, 2, 2) gives a 16 x 16 x 16 token grid.
LATENT_SHAPE: tuple[int, int, int, int] = (4, 16, 32, 32)

#: Length and width of the text-like condition sequence (see `sparsify.testbed.data.class_embeddings`).
TEXT_LEN: int = 8
TEXT_DIM: int = 64

#: `WanTransformer3DModel(**TESTBED_CONFIG)`: dim 256 = 4 heads x 64, 8 blocks, ffn 512, about 6.9M parameters.
TESTBED_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": LATENT_SHAPE[0],
    "out_channels": LATENT_SHAPE[0],
    "text_dim": TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

#: Shipped weights (fp16) and their config/metadata, next to this file.
WEIGHTS_PATH = Path(__file__).with_name("testbed_wan.safetensors")
CONFIG_PATH = Path(__file__).with_name("testbed_wan.json")

#: Wan's timestep convention: the model sees t * 1000 for a noise level t in [0, 1].
NUM_TRAIN_TIMESTEPS = 1000


def grid(latent_shape: tuple[int, int, int, int] | None = None, name: str = "testbed") -> tuple[int, int, int]:
    """Token grid (T, H, W) of a test-bed for a latent video shape; tokens are frame-major t*H*W + h*W + w.

    Args:
        latent_shape: [C, F, H, W]; default: the variant's training shape.
        name: the test-bed variant (`testbed`, `testbed-16k`; see `sparsify.testbed.variants`).

    Example:
        >>> grid(), grid(name="testbed-16k")
        ((16, 16, 16), (16, 32, 32))
    """
    from .variants import get_variant

    v = get_variant(name)
    _, f, h, w = v.latent_shape if latent_shape is None else latent_shape
    pt, ph, pw = v.config["patch_size"]
    return f // pt, h // ph, w // pw


def load_testbed_config(path: str | Path | None = None, name: str = "testbed") -> dict[str, Any]:
    """The model config stored beside the weights (falls back to the variant's config when no json is there)."""
    from .variants import get_variant

    v = get_variant(name)
    path = Path(path) if path is not None else v.config_path
    if not path.exists():
        return dict(v.config)
    meta = json.loads(path.read_text())
    return dict(meta.get("config", meta))


def build_testbed(
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | Path | None = None,
    seed: int = 0,
    name: str = "testbed",
    overrides: dict[str, Any] | None = None,
):
    """Build a test-bed `WanTransformer3DModel`, with the shipped trained weights when `pretrained`.

    Args:
        pretrained: load the variant's `<stem>.safetensors` (fp16 on disk, cast to `dtype`); else a seeded random
            init.
        device: where to put the model.
        dtype: parameter dtype (fp32 on CPU; bf16/fp16 on GPU).
        weights: another safetensors file of the same config (e.g. a fresh training run's output); its config is
            read from the `.json` beside it.
        seed: seed of the random init (used when not pretrained).
        name: the variant, `testbed` (4,096 tokens, the default) or `testbed-16k` (16,384 tokens).
        overrides: `WanTransformer3DModel` kwargs replacing the variant's (e.g. `{"num_layers": 2}` for a tiny
            model in tests); the weights must then match.

    Returns:
        The model in eval mode.

    Example:
        >>> model = build_testbed()                       # trained weights, fp32 CPU
        >>> model(**example_inputs(latent_shape=(4, 2, 8, 8)))[0].shape   # default latent: [1, 4, 16, 32, 32]
        torch.Size([1, 4, 2, 8, 8])
        >>> tiny = build_testbed(pretrained=False, name="testbed-16k", overrides={"num_layers": 2})
    """
    from diffusers import WanTransformer3DModel

    from .variants import get_variant

    v = get_variant(name)
    weights = Path(weights) if weights is not None else v.weights_path
    if pretrained and not weights.exists():
        raise FileNotFoundError(_missing_weights_message(v, weights))
    config = load_testbed_config(weights.with_suffix(".json"), name=v.name) if pretrained else dict(v.config)
    config.update(overrides or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    if pretrained:
        from safetensors.torch import load_file

        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{weights}: missing keys {missing[:5]}..., unexpected keys {unexpected[:5]}...")
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def build_testbed16k(pretrained: bool = True, **kwargs):
    """Build `testbed-16k` (16,384 tokens, 12 blocks of 8 heads x 32): `build_testbed(name="testbed-16k", ...)`.

    Example:
        >>> model = build_testbed16k(pretrained=False)    # random init; pretrained=True needs testbed16k.safetensors
        >>> grid(name="testbed-16k")
        (16, 32, 32)
    """
    return build_testbed(pretrained=pretrained, name="testbed-16k", **kwargs)


def _missing_weights_message(variant, weights: Path) -> str:
    flag = "" if variant.name == "testbed" else f" --config {variant.aliases[0]}"
    msg = f"{variant.name} weights not found at {weights}; train them with `python -m tools.train_testbed{flag} --out DIR`"
    if weights == variant.weights_path:
        msg += (f", then copy DIR/{variant.stem}.safetensors and DIR/{variant.stem}.json to {weights.parent}/ "
                f"(or pass weights=DIR/{variant.stem}.safetensors)")
    return msg + ", or pass pretrained=False for a random init"


def example_inputs(
    batch: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    t: float = 0.5,
    latent_shape: tuple[int, int, int, int] | None = None,
    name: str = "testbed",
) -> dict[str, Any]:
    """Forward kwargs of a test-bed: a procedural video noised to level `t`, its class condition, Wan timestep.

    The video comes from the variant's data generator (its training distribution), so the attention these
    inputs produce is the trained model's real attention, not that of noise.

    Args:
        batch: number of videos.
        seed: seed of the videos and the noise (same seed, same inputs on every device).
        device, dtype: of the returned tensors.
        t: noise level in [0, 1] (x_t = (1 - t) x0 + t eps); the timestep is t * 1000.
        latent_shape: [C, F, H, W]; default: the variant's (4,096 tokens for `testbed`, 16,384 for `testbed-16k`).
        name: the test-bed variant.

    Returns:
        `dict(hidden_states=[B, C, F, H, W], timestep=[B], encoder_hidden_states=[B, L, text_dim],
        return_dict=False)`; call `model(**inputs)[0]`.

    Example:
        >>> x = example_inputs(batch=2, name="testbed-16k", latent_shape=(4, 4, 16, 16))
        >>> x["hidden_states"].shape, x["encoder_hidden_states"].shape
        (torch.Size([2, 4, 4, 16, 16]), torch.Size([2, 10, 64]))
    """
    x0, eps, cond = _example_x0_eps_cond(batch, seed, latent_shape, name)
    xt = (1.0 - t) * x0 + t * eps
    return {
        "hidden_states": xt.to(device=device, dtype=dtype),
        "timestep": torch.full((batch,), t * NUM_TRAIN_TIMESTEPS, device=device, dtype=dtype),
        "encoder_hidden_states": cond.to(device=device, dtype=dtype),
        "return_dict": False,
    }


def _example_x0_eps_cond(
    batch: int, seed: int, latent_shape, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .variants import get_variant

    v = get_variant(name)
    latent_shape = v.latent_shape if latent_shape is None else latent_shape
    x0, _labels, cond = v.data_module().make_batch(batch, seed=seed, device="cpu", latent_shape=latent_shape)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 7919))
    return x0, eps, cond


def example_target(
    batch: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    latent_shape: tuple[int, int, int, int] | None = None,
    name: str = "testbed",
) -> torch.Tensor:
    """The flow-matching target v = eps - x0 of `example_inputs(batch, seed, ...)` (any t): the ideal output."""
    x0, eps, _ = _example_x0_eps_cond(batch, seed, latent_shape, name)
    return (eps - x0).to(device=device, dtype=dtype)


def shifted_sigmas(steps: int, shift: float = 1.0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Flow-matching noise levels 1 -> 0 (steps + 1 values), time-shifted like Wan: s' = shift*s / (1 + (shift-1)*s)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift * s / (1.0 + (shift - 1.0) * s)


@torch.no_grad()
def sample(
    model: Callable[..., Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int = 20,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    null_cond: torch.Tensor | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler sampler of the rectified flow x_t = (1 - t) x0 + t eps, the model predicting v = eps - x0.

    Model-agnostic: it only calls `model(hidden_states=x, timestep=t*1000, encoder_hidden_states=c,
    return_dict=False)[0]`, so a sparsified model (or any wrapper with that signature) samples the same way
    and dense-vs-sparse PSNR compares like with like from the same `noise`.

    Args:
        model: the denoiser.
        noise: x at t = 1, [B, C, F, H, W]; its dtype/device is used throughout.
        cond: text-like condition [B, L, text_dim].
        steps: number of Euler steps.
        shift: Wan-style time shift of the schedule (1.0 = uniform).
        guidance_scale: classifier-free guidance; > 1 also runs the model on `null_cond` (zeros by default).
        null_cond: the unconditional embedding.
        callback: called as `callback(step_index, t, x)` before each model call (e.g. to set a step index).

    Returns:
        The sample x at t = 0, same shape and dtype as `noise`.

    Example:
        >>> from sparsify.testbed.data import class_embeddings
        >>> model, cond = build_testbed(), class_embeddings(torch.tensor([0]))
        >>> sample(model, torch.randn(1, 4, 2, 8, 8), cond, steps=2).shape   # real use: [B, 4, 16, 32, 32], 20+ steps
        torch.Size([1, 4, 2, 8, 8])
    """
    sigmas = shifted_sigmas(steps, shift)
    x = noise
    cond = cond.to(device=noise.device, dtype=noise.dtype)
    if guidance_scale != 1.0:
        null_cond = torch.zeros_like(cond) if null_cond is None else null_cond.to(cond)
    for i in range(steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        if callback is not None:
            callback(i, t, x)
        ts = torch.full((x.shape[0],), t * NUM_TRAIN_TIMESTEPS, device=x.device, dtype=x.dtype)
        v = model(hidden_states=x, timestep=ts, encoder_hidden_states=cond, return_dict=False)[0]
        if guidance_scale != 1.0:
            vu = model(hidden_states=x, timestep=ts, encoder_hidden_states=null_cond, return_dict=False)[0]
            v = vu + guidance_scale * (v - vu)
        x = (x.float() + (t_next - t) * v.float()).to(noise.dtype)
    return x


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB between two videos with values in [-1, 1] (data_range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
