"""Measure a test-bed's noise floor: dense bf16 (and forced SDPA kernels) against dense fp32 over one sampling run.

    python -m tools.testbed_noise_floor --model testbed-16k --steps 50 --out noise_floor_16k.json
    python -m tools.testbed_noise_floor --model testbed-16k --backends      # + bf16 with SDPA forced to flash, cuDNN

Samples `--batch` clips (classes spread over all classes) from the same noise with Euler and classifier-free
guidance, in fp32 (TF32 off) and in each of `--runs`, and prints PSNR of the final latents and the relative
error along the trajectory (`sparsify.testbed.noise_floor`). The JSON holds every per-step error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsify.testbed.model import build_testbed
from sparsify.testbed.noise_floor import noise_floor
from sparsify.testbed.variants import get_variant


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.testbed_noise_floor", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="testbed-16k", help="test-bed variant: testbed or testbed-16k")
    p.add_argument("--weights", default=None, help="a safetensors file of the variant (default: the shipped one)")
    p.add_argument("--random-init", action="store_true", help="use a seeded random init instead of trained weights")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule")
    p.add_argument("--runs", default="bf16,bf16mixed,amp", help="comma list of <precision>[-<backend>] runs")
    p.add_argument("--backends", action="store_true", help="add bf16-flash and bf16-cudnn (CUDA) to --runs")
    p.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("C", "F", "H", "W"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default: noise_floor_<model>.json)")
    args = p.parse_args(argv)

    variant = get_variant(args.model)
    data = variant.data_module()
    shape = tuple(args.latent_shape) if args.latent_shape else variant.latent_shape
    runs = [r for r in args.runs.split(",") if r]
    if args.backends:
        runs += ["bf16-flash", "bf16-cudnn"]
    model = build_testbed(pretrained=not args.random_init, device=args.device, weights=args.weights,
                          name=variant.name, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, *shape, generator=g).to(args.device)
    labels = (torch.arange(args.batch) * data.NUM_CLASSES // max(1, args.batch)) % data.NUM_CLASSES
    cond = data.class_embeddings(labels).to(args.device)
    t0 = time.perf_counter()
    nf = noise_floor(model, noise, cond, steps=args.steps, guidance_scale=args.guidance, shift=args.shift,
                     runs=tuple(runs))
    wall = time.perf_counter() - t0
    print(f"[noise floor] {variant.name} ({'random init' if args.random_init else args.weights or 'shipped'}), "
          f"{args.batch} x {list(shape)}, {args.steps} Euler steps, guidance {args.guidance}, shift {args.shift}, "
          f"reference {nf.reference}, PSNR by {nf.psnr_backend}, {wall:.1f}s")
    print(nf.table())
    result = {
        "model": variant.name,
        "weights": "random init" if args.random_init else str(args.weights or variant.weights_path.name),
        "latent_shape": list(shape),
        "batch": args.batch,
        "labels": labels.tolist(),
        "seed": args.seed,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
        **nf.to_dict(),
    }
    out = Path(args.out or f"noise_floor_{variant.name}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"[noise floor] wrote {out}")
    return result


if __name__ == "__main__":
    main()
