"""Sample the test-bed once per class and save a PNG strip (first 3 latent channels as RGB), a visual sanity check.

    python -m tools.testbed_preview --out preview.png [--model testbed-16k] [--weights W.safetensors] [--steps 30]
    python -m tools.testbed_preview --out data16k.png --model testbed-16k --data   # the training data instead
"""

from __future__ import annotations

import argparse

import torch

from sparsify.testbed.model import build_testbed, sample
from sparsify.testbed.variants import get_variant


def to_png(videos: torch.Tensor, path: str, frames: int = 8, zoom: int = 3) -> None:
    """Write videos `[B, C, F, H, W]` (values in [-1, 1]) as a grid: one row per video, `frames` frames per row."""
    from PIL import Image

    B, C, F, H, W = videos.shape
    idx = torch.linspace(0, F - 1, frames).round().long()
    rows = [torch.cat([videos[b, :3, int(f)] for f in idx], dim=2) for b in range(B)]
    img = ((torch.cat(rows, dim=1).permute(1, 2, 0).float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255).byte().numpy()
    Image.fromarray(img).resize((img.shape[1] * zoom, img.shape[0] * zoom), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.testbed_preview", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="testbed", help="test-bed variant: testbed or testbed-16k")
    p.add_argument("--data", action="store_true", help="draw one training clip per class instead of sampling")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--weights", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    variant = get_variant(args.model)
    data = variant.data_module()
    labels = torch.arange(data.NUM_CLASSES)
    if args.data:
        x = data.make_batch(len(labels), seed=args.seed, labels=labels, device=args.device)[0]
    else:
        model = build_testbed(pretrained=True, device=args.device, weights=args.weights, name=variant.name)
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(len(labels), *variant.latent_shape, generator=g).to(args.device)
        x = sample(model, noise, data.class_embeddings(labels).to(args.device), steps=args.steps,
                   guidance_scale=args.guidance)
    to_png(x, args.out)
    print(f"[preview] wrote {args.out}; sample mean {x.mean().item():.3f} std {x.std().item():.3f} "
          f"min {x.min().item():.3f} max {x.max().item():.3f}")


if __name__ == "__main__":
    main()
