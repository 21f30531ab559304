"""Where one Wan-14B block's time goes: the top GPU kernels of a dense, a fused-q/k and a sparsified block.

    python -m benchmarks.block_profile [--frames 81] [--density 0.05] [--top 15] [--out FILE]

Runs `torch.profiler` over 3 calls of `blocks[0]` (after 2 warm-up calls) of the diffusers
`WanTransformer3DModel` with the Wan2.1-14B config (random bf16 weights, one block) at 720p, on inputs
captured from a forward, under `torch.no_grad()` and cuDNN SDPA. Prints, per variant, the GPU time per
block and the kernels that take it (ms per block, share); writes the table as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from benchmarks.e2e import _block_inputs, _cudnn, _recipe
from benchmarks import write_result
from benchmarks.wan_shapes import WAN_14B, _build


def profile_block(model, inputs, reps: int = 3) -> tuple[float, list[tuple[str, float]]]:
    """GPU ms per call of `model.blocks[0]` and `(kernel, ms per call)` sorted by time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), _cudnn(torch.device("cuda")):
        args, kw = _block_inputs(model, inputs)
        for _ in range(2):
            model.blocks[0](*args, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                model.blocks[0](*args, **kw)
            torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        if t > 0:
            rows[e.key] = rows.get(e.key, 0.0) + t / 1e3 / reps
    ranked = sorted(rows.items(), key=lambda kv: -kv[1])
    return sum(rows.values()), ranked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--tile", default="4x4x4")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("block_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    from sparsify import sparsify, unsparsify
    from sparsify.adapters.wan import fuse_processor

    lat = (args.frames - 1) // 4 + 1
    cfg = WAN_14B
    model = _build(cfg, num_layers=1).to(torch.bfloat16)
    p = cfg["patch_size"]
    inputs = dict(hidden_states=torch.randn(1, cfg["in_channels"], lat * p[0], 45 * p[1], 80 * p[2], device="cuda",
                                            dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 512, cfg["text_dim"], device="cuda", dtype=torch.bfloat16),
                  return_dict=False)
    tile = tuple(int(x) for x in args.tile.split("x"))
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks.block_profile " + " ".join(argv if argv is not None else sys.argv[1:]),
                  torch=torch.__version__, device=torch.cuda.get_device_name(0), frames=args.frames, variants={})

    def report(label):
        total, ranked = profile_block(model, inputs)
        result["variants"][label] = dict(gpu_ms=total, kernels=ranked[:40])
        print(f"\n{label}: {total:.1f} GPU ms per block")
        for name, ms in ranked[:args.top]:
            print(f"  {ms:8.2f} ms {ms / total:6.1%}  {name[:110]}")

    report("dense (cuDNN)")
    undo = fuse_processor(model.blocks[0].attn1)
    if undo is not None:  # None with SPARSIFY_FUSED_ROPE=0
        report("dense, fused q/k")
        undo()
    sparsify(model, _recipe(args.density, tile))
    report(f"vsa {args.density:g}")
    unsparsify(model)
    write_result(result, args.out, "block_profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
