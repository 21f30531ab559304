"""`python -m sparsify.calibrate`: calibrate a model and write its recipe, summary and plots."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "testbed"


def _parse_tiles(text: str):
    try:
        return [tuple(int(x) for x in t.split("x")) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles must look like 4x4x4,1x8x8; got {text!r}") from None


def _parse_floats(text: str):
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsify.calibrate",
        description="Measure every attention head's error for each candidate (tile shape x density) on the dense "
                    "model, solve the per-head budget allocation (a multiple-choice knapsack ILP) and write a "
                    "sparsify recipe. With no arguments it calibrates the bundled test-bed model on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model (testbed, tiny-wan) or import.path:factory returning a diffusers Wan, "
                        "HunyuanVideo or CogVideoX transformer")
    p.add_argument("--budget", type=float, default=0.1, help="target attention density over all sparsifiable heads")
    p.add_argument("--out", default="recipe.yaml", help="recipe path; the plots are written beside it")
    p.add_argument("--tiles", type=_parse_tiles, default=None,
                   help="candidate tile shapes, e.g. 4x4x4,1x8x8 (default: 4x4x4,1x8x8,2x4x8,8x2x4,16x2x2,1x4x16)")
    p.add_argument("--methods", default="vsa",
                   help="comma-separated selection methods considered per head (vsa, veda, xattention)")
    p.add_argument("--levels", type=_parse_floats, default=None, help="candidate densities, e.g. 0.03,0.05,0.1,0.2")
    p.add_argument("--inputs", type=int, default=2, help="number of calibration inputs (seeds SEED..SEED+N-1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration input")
    p.add_argument("--steps", type=int, default=2, help="denoising steps sampled per input (timesteps evenly spaced)")
    p.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.split("x")), default=None,
                   help="latent token grid TxHxW for adapter-made inputs (not the test-bed)")
    p.add_argument("--dense-layers", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="site indices kept dense, e.g. 0,1")
    p.add_argument("--dense-steps", type=int, default=0, help="first denoising steps kept dense (runtime policy)")
    p.add_argument("--min-layer-density", type=float, default=None, help="minimum density of every site")
    p.add_argument("--error-cap", type=float, default=None, help="per-head error cap")
    p.add_argument("--solver", default="auto", choices=["auto", "highs", "cbc", "lagrangian"])
    p.add_argument("--no-output-error", action="store_true",
                   help="skip the per-site model-output error pass (errors then are attention-output errors)")
    p.add_argument("--query-fraction", type=float, default=0.125, help="share of video query tokens measured per call (the same tokens for every candidate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-site checkpoints for resuming (default: <out>.calib/; 'none' disables)")
    p.add_argument("--dry-run", action="store_true", help="estimate time and memory from one forward, then stop")
    p.add_argument("--note", default=None, help="free text recorded in the recipe's provenance (what it was calibrated on)")
    p.add_argument("--mask-reuse", action="store_true",
                   help="also calibrate temporal mask reuse on a sampling trajectory (dense, fresh selection, then "
                        "reuse at candidate thresholds, largest first, until the output error grows at most "
                        "--reuse-max-growth) and write its threshold into the recipe")
    p.add_argument("--reuse-steps", type=int, default=10, help="sampling steps of the mask-reuse trajectory")
    p.add_argument("--reuse-max-age", type=int, default=4, help="most steps a selection may be reused")
    p.add_argument("--reuse-max-growth", type=float, default=0.05,
                   help="tolerated growth of the trajectory's final-output error with reuse (0.05 = 5%%)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def resolve_model(spec: str, device, dtype):
    """Return (model, make_inputs(seed, t) -> forward kwargs, grid or None, description)."""
    if spec == "testbed":
        from ..testbed import build_testbed, example_inputs

        model = build_testbed(pretrained=True, device=device, dtype=dtype)
        return model, (lambda seed, t: example_inputs(seed=seed, t=t, device=device, dtype=dtype)), None, \
            "bundled test-bed (trained small Wan, 4,096 tokens)"
    from ..inspect import load_model
    from ..adapters import adapter_for

    model = load_model(spec)
    p = next(model.parameters(), None)
    if p is not None and (p.device != torch.device(device) or p.dtype != dtype):
        model = model.to(device=device, dtype=dtype)
    adapter = adapter_for(model)
    if adapter is None:
        raise SystemExit(
            f"sparsify.calibrate: no adapter knows {type(model).__name__}; use the Python API "
            "sparsify.calibrate.calibrate(model, forward_loop, grid=..., example_inputs=...)")

    def make_inputs(seed, t, _grid=None):
        torch.manual_seed(seed)
        kw = adapter.example_inputs(model, **({"grid": _grid} if _grid else {}))
        kw = {k: (torch.randn_like(v) if k == "hidden_states" else v) for k, v in kw.items()}
        if "timestep" in kw:
            kw["timestep"] = torch.full_like(kw["timestep"], int(t * 1000))
        return kw

    return model, make_inputs, adapter, f"{type(model).__name__} from {spec}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import DEFAULT_LEVELS, DEFAULT_TILES, run_calibration
    from .report import plots, summary

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    t0 = time.perf_counter()
    model, make_inputs, adapter, desc = resolve_model(args.model, device, dtype)
    if args.grid and adapter is not None:
        base = make_inputs
        make_inputs = lambda seed, t: base(seed, t, args.grid)  # noqa: E731
    times = [1.0 - (i + 0.5) / args.steps for i in range(args.steps)]  # noise levels, high to low
    schedule = [(seed, t) for seed in range(args.seed, args.seed + args.inputs) for t in times]
    inputs_hash = hashlib.sha256(repr((args.model, schedule, str(dtype), args.grid)).encode()).hexdigest()[:16]
    print(f"sparsify.calibrate: {desc}; {args.inputs} inputs x {args.steps} steps; budget {args.budget}; device {device}",
          file=sys.stderr)

    def forward_loop(m, schedule=schedule):
        for seed, t in schedule:
            m(**make_inputs(seed, t))

    def output_loop(m):  # one mid-schedule forward for the per-site model-output error
        m(**make_inputs(args.seed, times[len(times) // 2]))

    if args.dry_run:
        return _dry_run(model, make_inputs, schedule, args, DEFAULT_TILES, DEFAULT_LEVELS)
    out = Path(args.out)
    ckpt = None if (args.checkpoint_dir or "").lower() == "none" else Path(args.checkpoint_dir or f"{out}.calib")
    # discovery needs only small inputs of the same family (a full-size forward under Dynamo is slow)
    first = adapter.example_inputs(model) if adapter is not None else make_inputs(0, times[0])
    result = run_calibration(
        model, forward_loop, budget=args.budget, tiles=args.tiles or DEFAULT_TILES, levels=args.levels or DEFAULT_LEVELS,
        methods=[m for m in args.methods.split(",") if m],
        example_inputs=first, dense_layers=args.dense_layers, dense_steps=args.dense_steps,
        min_layer_density=args.min_layer_density, error_cap=args.error_cap, solver=args.solver,
        query_fraction=args.query_fraction, checkpoint_dir=ckpt, progress=not args.quiet,
        n_forwards=len(schedule), inputs_hash=inputs_hash, output_loop=output_loop,
        output_error=not args.no_output_error)
    if args.mask_reuse:
        result.recipe = _calibrate_reuse(model, result.recipe, make_inputs, args)
    cal = result.recipe.calibration
    cal["command"] = "python -m sparsify.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.note:
        cal["calibrated_on"] = args.note
    result.recipe.save(out)
    print(summary(result, args.budget))
    print(f"\nrecipe: {out}")
    if not args.no_plots:
        for p in plots(result, args.budget, out):
            print(f"plot:   {p}")
    print(f"time: {time.perf_counter() - t0:.1f}s (measurement {result.capture_seconds:.1f}s)")
    return 0


def _calibrate_reuse(model, recipe, make_inputs, args):
    """Run `calibrate_mask_reuse` on an Euler flow-matching trajectory from seed `args.seed + 1000`."""
    from .reuse import calibrate_mask_reuse, with_mask_reuse

    steps = args.reuse_steps
    if args.model == "testbed":
        from ..testbed import LATENT_SHAPE, sample
        from ..testbed.data import class_embeddings

        g = torch.Generator().manual_seed(args.seed + 1000)
        p = next(model.parameters())
        noise = torch.randn(1, *LATENT_SHAPE, generator=g).to(p.device, p.dtype)
        cond = class_embeddings(torch.tensor([args.seed % 8])).to(p.device, p.dtype)

        def trajectory(m):
            return sample(m, noise, cond, steps=steps)
    else:  # generic rectified-flow Euler sampler on adapter-made inputs (the families' own samplers differ)
        kw = make_inputs(args.seed + 1000, 1.0)

        def trajectory(m):
            x = kw["hidden_states"]
            for i in range(steps):
                t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
                v = m(**{**kw, "hidden_states": x, "timestep": torch.full_like(kw["timestep"], t * 1000),
                         "return_dict": False})[0]
                x = x + (t_next - t) * v
            return x
    print(f"sparsify.calibrate: mask reuse on a {steps}-step trajectory (dense, fresh, reuse candidates)", file=sys.stderr)
    rc = calibrate_mask_reuse(model, recipe, trajectory, max_age=args.reuse_max_age,
                              max_error_growth=args.reuse_max_growth)
    growth = "n/a" if rc.error_growth is None else f"{rc.error_growth:+.1%}"
    print(f"mask reuse: threshold {rc.threshold:.4g}, max_age {rc.max_age}: skips {rc.reuse_share:.0%} of selections "
          f"on the trajectory (least overlap kept {rc.min_overlap:.2f}); final-output error vs dense "
          f"{rc.output_error_fresh:.4f} fresh -> {rc.output_error_reuse:.4f} with reuse ({growth}); tried "
          + ", ".join(f"{t:.3g} ({s:.0%} reused, {g:+.1%})" for t, s, g in rc.tried))
    return with_mask_reuse(recipe, rc)


def _dry_run(model, make_inputs, schedule, args, default_tiles, default_levels) -> int:
    """Time one dense forward and one site measurement; extrapolate to the whole run."""
    from ..api import find_sites
    from ..calibrate.measure import measure_site
    from ..geometry import Geometry

    kw = make_inputs(*schedule[0])
    sites, adapter = find_sites(model, kw)
    video = [s for s in sites if s.kind in ("self", "joint")]
    with torch.no_grad():
        t0 = time.perf_counter()
        model(**kw)
        fwd = time.perf_counter() - t0
    s = video[0]
    geo = adapter.geometry(model, (), kw)
    q = torch.randn(1, s.heads, s.q_len, s.head_dim, device=next(model.parameters()).device)
    tiles, levels = args.tiles or default_tiles, args.levels or default_levels
    t0 = time.perf_counter()
    measure_site(q, q, q, Geometry(geo.grid, geo.video_start), tiles, levels, query_fraction=args.query_fraction,
                 methods=[m for m in args.methods.split(",") if m])
    per_site = time.perf_counter() - t0
    total = len(schedule) * (fwd + per_site * len(video))
    n_tiles = max(-(-s.q_len // 64), 1)
    mem = s.q_len * args.query_fraction * n_tiles * (s.head_dim + 1) * 4 * 3
    print(f"dry run: {len(video)} sites, {len(schedule)} forwards; one forward {fwd:.2f}s, one site measurement "
          f"{per_site:.2f}s\nestimated time {total:.0f}s; peak extra memory per head ~{mem / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
