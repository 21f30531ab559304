"""End-to-end benchmark: dense (SDPA cuDNN) against sparsified diffusers Wan models, in one run.

    python -m benchmarks.e2e [--frames 81,161] [--blocks 2] [--densities 0.1,0.05] [--tile 4x4x4]
                             [--compile] [--pipeline-steps 4] [--out FILE]
    python -m benchmarks.e2e --tiny        # CPU smoke run of every code path at toy sizes
    python -m benchmarks.e2e --generation --plan PLAN.yaml [--steps 50] [--blocks 2] [--validate-steps 6]
                             [--hooks fbc,mag,taylorseer]      # per generation, composed (benchmarks/e2e_generation.py)
    python -m benchmarks.e2e --generation --tiny                # its CPU smoke run, with a plan built in code

Part 1, per forward: the diffusers `WanTransformer3DModel` with the Wan2.1-14B config (random bf16 weights)
cut to `--blocks` blocks, at 720p (81 frames: 75,600 tokens; 161 frames: 147,600). For each density it
reports the forward time, the time of one block (timed alone on inputs captured from the forward), the
dense self-attention time (cuDNN, timed alone at the same shape), the attention share before and after,
peak memory, and the Amdahl ceiling measured in the same run:
`dense ÷ (non-attention + density × attention)`, with non-attention = dense − blocks × attention.
"x dense" is always over dense eager; the ceiling, "of ceil" and the attention share of a compiled row
use the dense compiled row (`--compile`) as their baseline, since compiling shrinks the non-attention part.
The 40-block figure extends the measured forward as `other + 40 × block`, with `other` = forward −
blocks × block (patch embedding, condition embedders, head).

Part 2, per generation: `WanPipeline` with the Wan2.1-1.3B config (random bf16 weights) at 480p, 81 frames,
`--pipeline-steps` sampling steps with classifier-free guidance (two transformer calls per step). The text
encoder is excluded (random prompt embeddings are passed in) and so is the VAE (`output_type="latent"`).

Forwards run under `torch.no_grad()`, as diffusers pipelines do. On CUDA, sparsify gives every Wan
self-attention site a processor that fuses the q/k RMSNorm and RoPE into one Triton pass (eager only;
`SPARSIFY_KERNELS=-rope` turns it off); the row "dense, fused q/k" times that processor with dense cuDNN
attention, so the share of the speedup that comes from it, and not from sparsity, is measured in the same run.

Prints one table and writes benchmarks/results/e2e_<date>.json (GPU, versions, command, date).
`--tiny` runs every code path at toy sizes on the CPU (fp32; wall times, not measurements).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from benchmarks._common import GRID_720P, WAN_1_3B, WAN_14B, build_wan, run_header, write_result

TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=64, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, in_channels=4, out_channels=4, rope_max_seq_len=64)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, make_args, device, reps: int, warmup: int = 1) -> float:
    """Median wall time (ms) of `fn(*make_args())` over `reps` calls after `warmup`, fresh inputs each call."""
    for _ in range(warmup):
        fn(*make_args())
    times = []
    for _ in range(reps):
        args = make_args()
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _cudnn(device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            yield
    else:
        yield


def _peak(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _recipe(density: float, tile, **defaults) -> dict:
    return {"version": 1, "defaults": {"method": "vsa", "tile": list(tile), "budget": {"density": density}, **defaults}}


def _block_inputs(model, inputs):
    """Positional and keyword arguments of `model.blocks[0]` during one forward."""
    seen = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    h = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        h.remove()
    return seen["args"], seen["kwargs"]


def per_forward(cfg, grid, n_blocks, densities, tile, device, dtype, reps, compile_model=False, tiny=False):
    """Part 1: one transformer at one grid; dense and each density, measured in the same run."""
    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.adapters.wan import fuse_processor

    model = build_wan(cfg, num_layers=n_blocks, device=device).to(dtype)  # bf16 already on the GPU; fp32 for --tiny
    T, H, W = grid
    p = cfg["patch_size"]
    H_heads, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
    S = T * H * W
    text_len = 8 if tiny else 512

    def make_inputs():
        return dict(hidden_states=torch.randn(1, cfg["in_channels"], T * p[0], H * p[1], W * p[2], device=device, dtype=dtype),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype),
                    return_dict=False)

    def fwd(inputs):
        with torch.no_grad(), _cudnn(device):
            return model(**inputs)

    def attn(q, k, v):
        with _cudnn(device):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def qkv():
        return tuple(torch.randn(1, H_heads, S, D, device=device, dtype=dtype) for _ in range(3))

    t_attn = timed(attn, qkv, device, reps=max(reps, 5))
    rows = []

    def measure(label, density, run_model):
        t_fwd = timed(fwd, lambda: (make_inputs(),), device, reps)
        with torch.no_grad(), _cudnn(device):
            bargs, bkw = _block_inputs(run_model, make_inputs())

            def block(*_):
                return run_model.blocks[0](*bargs, **bkw)

            t_block = timed(block, tuple, device, reps)
        peak = _peak(lambda: fwd(make_inputs()), device)
        sites = installed_sites(model)
        achieved = (sum(s.work for s in sites) / sum(s.dense_work for s in sites)) if sites else 1.0
        rows.append(dict(label=label, density=density, achieved_density=achieved, forward_ms=t_fwd,
                         block_ms=t_block, peak_gib=peak))

    def compiled(label, density):
        model.compile_repeated_blocks(fullgraph=True)  # compiles each block in place (nn.Module.compile)
        t0 = time.perf_counter()
        fwd(make_inputs())
        print(f"{label}: compile_repeated_blocks, first forward {time.perf_counter() - t0:.1f} s", flush=True)
        measure(label, density, model)
        rows[-1]["compiled"] = True
        for blk in model.blocks:  # undo nn.Module.compile (before unsparsify restores the forwards)
            blk._compiled_call_impl = None
        torch._dynamo.reset()

    measure("dense (cuDNN)", 1.0, model)
    if compile_model:
        compiled("dense compiled", 1.0)
    undo = [u for u in (fuse_processor(blk.attn1) for blk in model.blocks) if u is not None]
    if undo and device.type == "cuda":  # what the fused q/k processor alone buys (dense attention)
        measure("dense, fused q/k", 1.0, model)
        rows[-1]["fused_qk_only"] = True
    for u in undo:
        u()
    for d in densities:
        sparsify(model, _recipe(d, tile))
        measure(f"vsa {d:g}", d, model)
        if compile_model:
            compiled(f"vsa {d:g} compiled", d)
        unsparsify(model)
    eager = rows[0]
    for r in rows:
        # the ceiling and the attention share use the dense baseline of the same mode (eager or compiled):
        # non-attention = dense forward - blocks x dense attention; the speedup is always over dense eager
        base = next(x for x in rows if x["density"] == 1.0 and x.get("compiled") == r.get("compiled")
                    and not x.get("fused_qk_only"))
        non_attn = base["forward_ms"] - n_blocks * t_attn
        r["attention_dense_ms"] = t_attn
        r["speedup"] = eager["forward_ms"] / r["forward_ms"]
        r["speedup_same_mode"] = base["forward_ms"] / r["forward_ms"]
        r["ceiling"] = base["forward_ms"] / (non_attn + r["density"] * n_blocks * t_attn)
        r["of_ceiling"] = r["speedup_same_mode"] / r["ceiling"]
        r["block_speedup"] = eager["block_ms"] / r["block_ms"]
        # attention time inside a block: the block minus its non-attention part (the mode's dense block minus dense attention)
        r["attention_share"] = 1.0 - (base["block_ms"] - t_attn) / r["block_ms"]
        # 40 blocks: the measured forward's non-block part (embeddings, head) + 40 x the measured block
        other, e_other = r["forward_ms"] - n_blocks * r["block_ms"], eager["forward_ms"] - n_blocks * eager["block_ms"]
        b_other = base["forward_ms"] - n_blocks * base["block_ms"]
        r["speedup_40_blocks"] = (e_other + 40 * eager["block_ms"]) / (other + 40 * r["block_ms"])
        r["ceiling_40_blocks"] = (b_other + 40 * base["block_ms"]) / (
            b_other + 40 * (base["block_ms"] - t_attn + r["density"] * t_attn))
    model = None  # free it (the closures above still name it)
    return dict(tokens=S, grid=list(grid), blocks=n_blocks, rows=rows)


def wan_generation(model, cfg, grid, steps, device, dtype, tiny=False):
    """`generate(callback=None)`: one `WanPipeline` generation around `model` (latents out, random prompt
    embeddings in, CFG 5, cuDNN attention), at the video size of the latent `grid`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    T, H, W = grid
    p = cfg["patch_size"]
    text_len = 8 if tiny else 512
    frames, height, width = (T - 1) * 4 + 1, H * p[1] * 8, W * p[2] * 8

    def generate(callback=None):
        emb = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype)
        with torch.no_grad(), _cudnn(device):
            return pipe(prompt_embeds=emb, negative_prompt_embeds=torch.randn_like(emb), height=height, width=width,
                        num_frames=frames, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator(device).manual_seed(0), callback_on_step_end=callback).frames

    return generate


def per_generation(cfg, grid, steps, densities, tile, device, dtype, tiny=False):
    """Part 2: a WanPipeline generation (latents out, prompt embeddings in), dense and sparsified."""
    from sparsify import installed_sites, sparsify, unsparsify

    model = build_wan(cfg, device=device).to(dtype)
    generate = wan_generation(model, cfg, grid, steps, device, dtype, tiny)
    T, H, W = grid

    rows = []
    variants = [("dense (cuDNN)", None, {})] + [(f"vsa {d:g}", d, {}) for d in densities]
    if densities:
        d = min(densities)
        variants.append((f"vsa {d:g} + mask reuse", d, {"mask_reuse": {"threshold": 0.05, "max_age": 4}}))
    for label, d, extra in variants:
        if d is not None:
            sparsify(model, _recipe(d, tile, **extra))
        reps = 1 if tiny else 2
        t = timed(lambda: generate(), tuple, device, reps=reps, warmup=1)
        sites = installed_sites(model)  # counters over all 1 + reps generations; reported per generation
        sel = sum(s.selections for s in sites) // (1 + reps)
        reused = sum(s.reused for s in sites) // (1 + reps)
        rows.append(dict(label=label, density=d or 1.0, generation_ms=t, per_step_ms=t / steps,
                         selections=sel, reused=reused))
        if d is not None:
            unsparsify(model)
    for r in rows:
        r["speedup"] = rows[0]["generation_ms"] / r["generation_ms"]
    generate = model = None  # free them
    return dict(tokens=T * H * W, grid=list(grid), steps=steps, cfg_calls_per_step=2, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", default="81,161", help="video frames of the 14B per-forward rows (81 and/or 161)")
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks of the 14B model (of 40)")
    ap.add_argument("--densities", default="0.1,0.05")
    ap.add_argument("--tile", default="4x4x4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the sparsified model under compile_repeated_blocks")
    ap.add_argument("--pipeline-steps", type=int, default=4, help="sampling steps of the 1.3B pipeline (0: skip)")
    ap.add_argument("--generation", action="store_true",
                    help="only the per-generation rows of a plan: the Wan-14B shape, composed from measured parts")
    ap.add_argument("--plan", default=None, help="with --generation: a version-2 recipe with a plan (the test-bed's)")
    ap.add_argument("--steps", type=int, default=50, help="with --generation: sampling steps of the composed rows")
    ap.add_argument("--validate-steps", type=int, default=6, help="with --generation: steps of the real generations")
    ap.add_argument("--hooks", default="fbc,mag,taylorseer", help="with --generation: diffusers cache hooks stacked")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a smoke run of every code path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    densities = [float(x) for x in args.densities.split(",") if x]
    tile = tuple(int(x) for x in args.tile.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    result = run_header("e2e", argv)
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if args.generation:
        from benchmarks import e2e_generation as eg

        if args.plan is None and not args.tiny:
            raise SystemExit("--generation: give --plan PLAN.yaml (a version-2 recipe; --tiny builds one in code)")
        recipe = eg.load_plan_recipe(args.plan) if args.plan else eg.tiny_plan_recipe()
        cfg, grid = (TINY, (4, 4, 8)) if args.tiny else (WAN_14B, GRID_720P)
        part = eg.per_generation_plan(cfg, grid, recipe, steps=args.steps, blocks=args.blocks,
                                      validate_steps=args.validate_steps, hooks=[h for h in args.hooks.split(",") if h],
                                      device=device, dtype=dtype, reps=args.reps, tiny=args.tiny)
        result["generation_plan"] = part
        eg.print_generation_plan(part)
        write_result(result, args.out, "e2e_generation")
        return 0
    forward = []
    for f in [int(x) for x in args.frames.split(",") if x]:
        lat = (f - 1) // 4 + 1
        if args.tiny:
            cfg, grid = TINY, (4 if f <= 81 else 6, 4, 8)
        else:
            cfg, grid = WAN_14B, (lat, 45, 80)
        part = per_forward(cfg, grid, args.blocks, densities, tile, device, dtype, args.reps, args.compile, args.tiny)
        part["frames"] = f
        forward.append(part)
        _print_forward(part)
    result["per_forward"] = forward
    if args.pipeline_steps:
        cfg, grid = (TINY, (3, 4, 8)) if args.tiny else (WAN_1_3B, (21, 30, 52))
        gen = per_generation(cfg, grid, args.pipeline_steps, densities, tile, device, dtype, args.tiny)
        result["per_generation"] = gen
        _print_generation(gen)
    write_result(result, args.out, "e2e")
    return 0


def _print_forward(part):
    print(f"\nWan-14B config, {part['blocks']} blocks, {part['frames']} frames, grid {part['grid']} "
          f"({part['tokens']} tokens); dense self-attention {part['rows'][0]['attention_dense_ms']:.1f} ms per block")
    print(f"{'variant':<22}{'fwd ms':>9}{'block ms':>10}{'x dense':>9}{'ceiling':>9}{'of ceil':>9}"
          f"{'attn %':>8}{'x @40 blk':>10}{'ceil @40':>9}{'peak GiB':>10}{'density':>9}")
    for r in part["rows"]:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        dense = r["density"] == 1.0  # dense rows (baselines, fused q/k only): no ceiling to compare with
        ceil, of_ceil, ceil40 = ("-", "-", "-") if dense else (
            f"{r['ceiling']:.2f}", f"{r['of_ceiling']:.0%}", f"{r['ceiling_40_blocks']:.2f}")
        print(f"{r['label']:<22}{r['forward_ms']:>9.1f}{r['block_ms']:>10.1f}{r['speedup']:>9.2f}{ceil:>9}"
              f"{of_ceil:>9}{r['attention_share']:>8.0%}{r['speedup_40_blocks']:>10.2f}"
              f"{ceil40:>9}{peak:>10}{r['achieved_density']:>9.3f}")


def _print_generation(gen):
    print(f"\nWanPipeline, Wan-1.3B config, grid {gen['grid']} ({gen['tokens']} tokens), {gen['steps']} steps x "
          f"{gen['cfg_calls_per_step']} CFG calls; text encoder and VAE excluded")
    print(f"{'variant':<26}{'gen ms':>10}{'ms/step':>9}{'x dense':>9}{'selections':>12}{'reused':>8}")
    for r in gen["rows"]:
        print(f"{r['label']:<26}{r['generation_ms']:>10.1f}{r['per_step_ms']:>9.1f}{r['speedup']:>9.2f}"
              f"{r['selections']:>12}{r['reused']:>8}")


if __name__ == "__main__":
    sys.exit(main())
