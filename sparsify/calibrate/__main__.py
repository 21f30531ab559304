"""`python -m sparsify.calibrate`: calibrate a model and write its recipe, summary and plots."""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "testbed"
MIN_GRID_TOKENS = 1024  # adapter-made inputs are enlarged to at least this many tokens unless --grid is given
INPUT_SOURCES = ("trajectory", "random")
# Euler steps of a test-bed's calibration trajectory: few enough for a quick CPU run; with the default 2 sampled
# steps (2 and 6) its noise levels are 0.75 and 0.25, those of the random inputs
TESTBED_TRAJECTORY_STEPS = 8


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
                   help="bundled model (testbed, testbed-16k, tiny-wan) or "
                        "import.path:factory returning a video transformer (any whose geometry sparsify finds)")
    p.add_argument("--pipeline", default=None, metavar="PATH_OR_ID",
                   help="a diffusers pipeline (folder or hub id, loaded with DiffusionPipeline.from_pretrained): calibrate "
                        "each of its transformers on the pipeline's own sampling trajectory over --prompts")
    p.add_argument("--prompts", default=None, metavar="FILE", help="with --pipeline: calibration prompts, one per line")
    p.add_argument("--negative-prompt", default=None, help="with --pipeline: the negative prompt (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="with --pipeline: video height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="with --pipeline: video width (default: the pipeline's)")
    p.add_argument("--num-frames", type=int, default=None, help="with --pipeline: frames (default: the pipeline's)")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps of the sampling trajectory: with --pipeline (default 50), or a test-bed with "
                        f"--inputs-from trajectory (default {TESTBED_TRAJECTORY_STEPS})")
    p.add_argument("--guidance-scale", type=float, default=5.0,
                   help="classifier-free guidance scale of the sampling trajectory (--pipeline, or a test-bed)")
    p.add_argument("--image", default=None, help="with an image-to-video --pipeline: the conditioning image file")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="with --pipeline: text tokens per prompt (default: the pipeline's encode_prompt default)")
    p.add_argument("--check-transfer", default=None, metavar="RECIPE",
                   help="measure the resolution-transfer penalty instead of writing a recipe: the model-output error, "
                        "at this run's resolution (--grid, or --height/--width/--num-frames with --pipeline), of RECIPE "
                        "(calibrated at another resolution) against a recipe calibrated here with the same settings")
    p.add_argument("--budget", type=float, default=None,
                   help="target attention density over all sparsifiable heads (default 0.1; with --check-transfer: "
                        "the budget RECIPE was calibrated at)")
    p.add_argument("--out", default="recipe.yaml", help="recipe path; the plots are written beside it")
    p.add_argument("--tiles", type=_parse_tiles, default=None,
                   help="candidate tile shapes, e.g. 4x4x4,1x8x8 (default: those of 4x4x4,1x8x8,2x4x8,8x2x4,16x2x2,"
                        "1x4x16 that cut the calibration grid into at least 4 tiles with at most 25%% padding)")
    p.add_argument("--methods", default="vsa",
                   help="comma-separated selection methods considered per head (vsa, veda, xattention)")
    p.add_argument("--levels", type=_parse_floats, default=None,
                   help="candidate densities, e.g. 0.03,0.05,0.1,0.2 (default: 0.02,...,0.5, one per distinct number "
                        "of key tiles on the calibration grid)")
    p.add_argument("--inputs-from", choices=INPUT_SOURCES, default=None,
                   help="where a --model's calibration inputs come from: 'trajectory' (the test-beds' default): the "
                        "model's own calls (both guidance branches) at the sampled steps of dense Euler sampling from "
                        "seeded noise; 'random' (the default of other models): inputs made up at evenly spaced noise "
                        "levels (a test-bed's procedural videos noised to that level; Gaussian latents otherwise)")
    p.add_argument("--inputs", type=int, default=None,
                   help="number of calibration inputs, seeds SEED..SEED+N-1 (default: 1 sampling run with "
                        "--inputs-from trajectory, whose two guidance branches make 2 calls per step; else 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration input")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps sampled per input (evenly spaced; default 2); with --pipeline: steps "
                        "calibrated per transformer, spread over the steps it runs (default 4)")
    p.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.split("x")), default=None,
                   help="latent token grid TxHxW of the calibration inputs (default: the test-bed's own, or the "
                        f"adapter's example grid doubled along its smallest side until it holds {MIN_GRID_TOKENS} tokens)")
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
                        "--reuse-max-growth) and write its threshold into the recipe; with --pipeline the trajectory "
                        "is the pipeline's own (first prompt, --num-inference-steps), per transformer")
    p.add_argument("--reuse-steps", type=int, default=10,
                   help="sampling steps of the mask-reuse trajectory (with --model; --pipeline uses its own steps)")
    p.add_argument("--reuse-max-age", type=int, default=4, help="most steps a selection may be reused")
    p.add_argument("--reuse-max-growth", type=float, default=0.05,
                   help="tolerated growth of the trajectory's final-output error with reuse (0.05 = 5%%)")
    p.add_argument("--schedule-search", action="store_true",
                   help="also calibrate the per-step budget schedule (defaults.schedule): sample the first "
                        "calibration seed's trajectory dense, with the solved recipe flat, and with two-piece "
                        "schedules (the first 10/20/30%% of the steps at 1.5/2/3x density, the rest lower so the "
                        "mean is unchanged); the eligible one (achieved density at most 1%% over flat) of least "
                        "final-sample error, flat included, goes into the recipe. Test-bed --model with "
                        "--inputs-from trajectory only")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    from .plan_cli import add_arguments

    add_arguments(p)
    p.add_argument("--quiet", action="store_true",
                   help="print only the files written (and warnings): no progress, no solver output, no summary")
    return p


def resolve_model(spec: str, device, dtype):
    """Return (model, make_inputs(seed, t) -> forward kwargs, grid or None, description)."""
    from ..testbed import VARIANTS

    if spec in VARIANTS:
        from ..testbed import build_testbed, example_inputs

        model = build_testbed(pretrained=True, device=device, dtype=dtype, name=spec)

        def testbed_inputs(seed, t, _grid=None):
            shape = {"latent_shape": testbed_latent_shape(spec, _grid)} if _grid else {}
            return example_inputs(seed=seed, t=t, device=device, dtype=dtype, name=spec, **shape)

        tokens = math.prod(VARIANTS[spec].latent_shape[1:]) // math.prod(VARIANTS[spec].config["patch_size"])
        return model, testbed_inputs, None, f"bundled test-bed {spec} (trained small Wan, {tokens:,} tokens)"
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


def testbed_latent_shape(name: str, grid) -> tuple[int, int, int, int]:
    """The latent shape [C, F, H, W] of a test-bed's inputs on a token grid `(T, H, W)`.

    Example:
        >>> testbed_latent_shape("testbed", (4, 8, 8))
        (4, 4, 16, 16)
    """
    from ..testbed import VARIANTS

    v = VARIANTS[name]
    return (v.latent_shape[0], *(g * p for g, p in zip(grid, v.config["patch_size"])))


def default_grid(adapter, model) -> tuple[int, int, int]:
    """The adapter's example grid, doubled along its smallest side until it holds `MIN_GRID_TOKENS` tokens.

    Example:
        >>> class A:
        ...     def geometry(self, model, args, kwargs):
        ...         from sparsify.geometry import Geometry
        ...         return Geometry((2, 4, 4))
        ...     def example_inputs(self, model):
        ...         return {}
        >>> default_grid(A(), None)
        (16, 8, 8)
    """
    grid = list(adapter.geometry(model, (), adapter.example_inputs(model)).grid)
    while grid[0] * grid[1] * grid[2] < MIN_GRID_TOKENS:
        grid[grid.index(min(grid))] *= 2
    return tuple(grid)


def _fail(msg: str, code: int = 2) -> int:
    print(f"sparsify.calibrate: error: {msg}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .config import CalibrationConfig, CalibrationConfigError
    from .core import run_calibration
    from .solve import InfeasibleBudgetError

    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    transferred = None
    if args.check_transfer:
        from ..pipeline_recipe import load_pipeline_recipe
        from ..recipe import RecipeError

        try:
            transferred = load_pipeline_recipe(args.check_transfer)
        except RecipeError as e:
            return _fail(str(e))
        if args.budget is None:
            args.budget = float((transferred.calibration or {}).get("budget", 0.1))
    if args.budget is None:
        args.budget = 0.1
    if args.steps is None:
        args.steps = 2 if args.pipeline is None else None
    if args.pipeline is not None and args.num_inference_steps is None:
        args.num_inference_steps = 50
    out = Path(args.out)
    ckpt = None if (args.checkpoint_dir or "").lower() == "none" else Path(args.checkpoint_dir or f"{out}.calib")
    try:
        config = CalibrationConfig(
            budget=args.budget, methods=tuple(m for m in args.methods.split(",") if m), tiles=args.tiles,
            levels=args.levels, dense_layers=tuple(args.dense_layers), dense_steps=args.dense_steps,
            min_layer_density=args.min_layer_density, error_cap=args.error_cap, solver=args.solver,
            query_fraction=args.query_fraction, output_error=not args.no_output_error, checkpoint_dir=ckpt,
            progress=not args.quiet, verbose=not args.quiet)
    except CalibrationConfigError as e:
        return _fail(str(e))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.schedule_search:
        problem = _schedule_search_problem(args)
        if problem:
            return _fail(problem)
    if args.time_budget is not None or args.measure_latency:
        from .plan_cli import main_plan

        return main_plan(args, argv, config, device, dtype, say, out)
    if args.pipeline is not None:
        return _main_pipeline(args, argv, config, device, dtype, t_start, say, out, ckpt, transferred)
    if args.prompts is not None:
        return _fail("--prompts needs --pipeline (with --model the calibration inputs are made up; see --inputs)")
    model, make_inputs, adapter, desc = resolve_model(args.model, device, dtype)
    from ..testbed import grid as testbed_grid

    grid = tuple(args.grid) if args.grid else (testbed_grid(name=args.model) if adapter is None
                                               else default_grid(adapter, model))
    if adapter is not None or args.grid:  # a test-bed's inputs are at its own grid unless --grid is given
        base = make_inputs
        make_inputs = lambda seed, t: base(seed, t, grid)  # noqa: E731
    source = args.inputs_from or ("trajectory" if adapter is None else "random")
    if source == "trajectory" and adapter is not None:
        from ..testbed import VARIANTS

        return _fail(f"--inputs-from trajectory needs a test-bed --model ({', '.join(VARIANTS)}), whose sampler "
                     f"makes the trajectory, or a --pipeline; for {args.model} use --inputs-from random")
    if args.inputs is None:
        args.inputs = 1 if source == "trajectory" else 2
    if args.inputs < 1 or args.steps < 1:
        return _fail(f"--inputs and --steps must be >= 1; got --inputs {args.inputs}, --steps {args.steps}")
    seeds = list(range(args.seed, args.seed + args.inputs))
    random_inputs = make_inputs
    if source == "random":
        times = [1.0 - (i + 0.5) / args.steps for i in range(args.steps)]  # noise levels, high to low
        schedule = [(seed, t) for seed in seeds for t in times]
        output_key = (args.seed, times[len(times) // 2])
        inputs_hash = hashlib.sha256(repr((args.model, schedule, str(dtype), grid)).encode()).hexdigest()[:16]
        inputs_info = {"source": "random", "seeds": seeds, "noise_levels": times,
                       "latents": "procedural videos noised to each level (sparsify.testbed.example_inputs)"
                       if adapter is None else "Gaussian (the adapter's example inputs)"}
    else:
        from .trajectory import BRANCHES, sample_steps

        n_steps = args.num_inference_steps or TESTBED_TRAJECTORY_STEPS
        if n_steps < 1:
            return _fail(f"--num-inference-steps must be >= 1; got {n_steps}")
        if args.schedule_search and n_steps < 2:
            return _fail(f"--schedule-search needs --num-inference-steps >= 2 (a schedule splits the steps); "
                         f"got {n_steps}")
        sampled = sample_steps(range(n_steps), args.steps)
        branches = list(BRANCHES if args.guidance_scale != 1.0 else BRANCHES[:1])
        schedule = [(seed, step, b) for seed in seeds for step in sampled for b in branches]
        output_key = (args.seed, sampled[len(sampled) // 2], branches[0])
        inputs_hash = hashlib.sha256(repr((args.model, "trajectory", seeds, n_steps, sampled, args.guidance_scale,
                                           str(dtype), grid)).encode()).hexdigest()[:16]
        inputs_info = {"source": "trajectory", "sampler": "Euler flow matching (sparsify.testbed.sample), shift 1",
                       "seeds": seeds, "num_inference_steps": n_steps, "guidance_scale": args.guidance_scale,
                       "sampled_steps": sampled, "noise_levels": [round(1.0 - s / n_steps, 6) for s in sampled],
                       "branches": branches}
    config, infeasible = _fitted(config, grid, "--grid")
    if infeasible:
        return _fail(infeasible)
    what = (f"{args.inputs} sampling run(s) of {n_steps} steps (guidance {args.guidance_scale:g}), steps {sampled} "
            f"x {len(branches)} branch(es)" if source == "trajectory" else
            f"{args.inputs} random inputs x {args.steps} noise levels")
    say(f"sparsify.calibrate: {desc}; grid {'x'.join(map(str, grid))}; {what}; "
        f"budget {config.budget:g}; tiles {_names(config.tiles)}; levels {', '.join(f'{x:g}' for x in config.levels)}; "
        f"device {device}")

    def forward_loop(m, schedule=schedule):
        for key in schedule:
            m(**make_inputs(*key))

    def output_loop(m):  # one mid-schedule forward for the per-site model-output error
        m(**make_inputs(*output_key))

    if args.dry_run:
        extra = 0
        if source == "trajectory":
            extra = len(seeds) * (max(sampled) + 1) * len(branches) - len(schedule)
            if args.schedule_search:  # dense, flat and every candidate: one whole generation each
                from .schedule import FRACTIONS, SCALES, two_piece_schedules

                extra += (2 + len(two_piece_schedules(n_steps, FRACTIONS, SCALES))) * n_steps * len(branches)
        return _dry_run(model, random_inputs, [(args.seed, 0.5)] * len(schedule), config, t_start, extra_forwards=extra)
    # discovery needs only small inputs of the same family (a full-size forward under Dynamo is slow)
    first = adapter.example_inputs(model) if adapter is not None else random_inputs(0, 0.5)
    if source == "trajectory":
        from .trajectory import testbed_trajectory

        say(f"sparsify.calibrate: sampling {len(seeds)} dense trajectory(ies) up to step {max(sampled)}")
        recorded = {(c.seed, c.step, c.branch): c.kwargs for c in testbed_trajectory(
            model, seeds, num_steps=n_steps, sampled=sampled, guidance_scale=args.guidance_scale,
            latent_shape=testbed_latent_shape(args.model, grid), name=args.model)}
        make_inputs = lambda *key: recorded[key]  # noqa: E731
    if transferred is not None:
        return _check_transfer_model(model, transferred, forward_loop, output_loop, config, first, schedule,
                                     inputs_hash, grid, make_inputs, args)
    try:
        result = run_calibration(model, forward_loop, config, example_inputs=first, n_forwards=len(schedule),
                                 inputs_hash=inputs_hash, output_loop=output_loop)
    except (InfeasibleBudgetError, CalibrationConfigError) as e:
        return _fail(str(e).removeprefix("sparsify.calibrate: "))
    except KeyboardInterrupt as e:
        return _fail(str(e) or "interrupted", 130)
    result.recipe.calibration["inputs"] = inputs_info
    if args.schedule_search:
        result.recipe = _calibrate_schedule(model, result.recipe, args, n_steps,
                                            testbed_latent_shape(args.model, grid), say)
    if args.mask_reuse:
        result.recipe = _calibrate_reuse(model, result.recipe, random_inputs, args)
    return _write(result.recipe, {None: result}, args, argv, config, out, ckpt, t_start)


def _check_transfer_model(model, transferred, forward_loop, output_loop, config, first, schedule, inputs_hash, grid,
                          make_inputs, args) -> int:
    """Calibrate at this grid, then compare the two recipes' model-output errors on the calibration inputs."""
    from .core import run_calibration
    from .transfer import transfer_report

    native = run_calibration(model, forward_loop, config, example_inputs=first, n_forwards=len(schedule),
                             inputs_hash=inputs_hash, output_loop=output_loop).recipe

    def run():
        return [model(**make_inputs(*key))[0] for key in schedule]

    return _print_transfer(transfer_report(model, transferred, native, run, example_inputs=first, grid=grid), args)


def _main_pipeline(args, argv, config, device, dtype, t_start, say, out, ckpt, transferred) -> int:
    """`--pipeline`: load it, encode the prompts, calibrate each transformer on the trajectory, write the recipe."""
    from ..pipeline_recipe import PipelineRecipe
    from .config import CalibrationConfigError
    from .pipeline import DEFAULT_STEPS, load_pipeline, plan_pipeline_calibration, run_pipeline_calibration
    from .solve import InfeasibleBudgetError

    if not args.prompts:
        return _fail("--pipeline needs --prompts FILE (calibration prompts, one per line)")
    try:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    except OSError as e:
        return _fail(f"--prompts {args.prompts}: {e.strerror or e}")
    if not prompts:
        return _fail(f"--prompts {args.prompts} holds no prompt (one per line)")
    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    pipe = load_pipeline(args.pipeline, dtype=dtype)
    try:
        plan = plan_pipeline_calibration(
            pipe, prompts, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, steps=args.steps or DEFAULT_STEPS, dense_steps=config.dense_steps,
            seed=args.seed, image=image, max_sequence_length=args.max_sequence_length, free_text_encoder=True,
            device=device)
    except ValueError as e:
        return _fail(str(e).removeprefix("sparsify.calibrate: "))
    grid = plan.grid
    config, infeasible = _fitted(config, grid, "--height/--width/--num-frames")
    if infeasible:
        return _fail(infeasible)
    say(f"sparsify.calibrate: {type(pipe).__name__} from {args.pipeline}; grid {'x'.join(map(str, grid))}; "
        f"{len(prompts)} prompt(s) x {args.num_inference_steps} steps; transformers "
        + ", ".join(f"{n} (steps {s[0]}..{s[-1]}, calibrated at {plan.sampled[n]})" for n, s in plan.steps.items())
        + f"; budget {config.budget:g}; tiles {_names(config.tiles)}; levels {', '.join(f'{x:g}' for x in config.levels)}; "
        f"device {device}")
    if args.dry_run:
        _, pargs, pkw = plan.first_call
        for name, model in plan.transformers.items():
            print(f"{name}:")
            _dry_run(model, lambda: pkw, [()] * plan.forwards(name), config, t_start,
                     extra_forwards=plan.trajectory_forwards(name) - plan.forwards(name))
        return 0
    try:
        result = run_pipeline_calibration(plan, config)
    except (InfeasibleBudgetError, CalibrationConfigError) as e:
        return _fail(str(e).removeprefix("sparsify.calibrate: "))
    except KeyboardInterrupt as e:
        return _fail(str(e) or "interrupted", 130)
    if transferred is not None:
        return _check_transfer_pipeline(plan, transferred, result.recipe, args)
    recipe = result.recipe
    if args.mask_reuse:
        from .pipeline import calibrate_pipeline_mask_reuse

        print(f"sparsify.calibrate: mask reuse on the pipeline's {args.num_inference_steps}-step trajectory (dense, "
              "fresh, reuse candidates)", file=sys.stderr)
        recipe, found = calibrate_pipeline_mask_reuse(plan, recipe, max_age=args.reuse_max_age,
                                                      max_error_growth=args.reuse_max_growth)
        for name, rc in found.items():
            _print_reuse(rc, f"{name}: " if len(found) > 1 else "")
    several = isinstance(recipe, PipelineRecipe)
    return _write(recipe, result.results if several else {None: next(iter(result.results.values()))}, args, argv,
                  config, out, ckpt, t_start)


def _write(recipe, results, args, argv, config, out, ckpt, t_start) -> int:
    """Record the command in the recipe, write it and its plots, print the summaries and the files written.

    `results`: the calibration result of each transformer by name (one under None for a single model).
    """
    from .report import plots, summary

    cal = recipe.calibration
    cal["command"] = "python -m sparsify.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.note:
        cal["calibrated_on"] = args.note
    written = [recipe.save(out)]
    for name, res in results.items():
        if not args.quiet:
            print((f"== {name} ==\n" if name is not None else "") + summary(res, config.budget))
        if not args.no_plots:
            written += plots(res, config.budget, out if name is None else out.with_name(f"{out.stem}.{name}{out.suffix}"))
    if not args.quiet:
        print(f"\ntime: {time.perf_counter() - t_start:.1f}s (measurement "
              f"{sum(r.capture_seconds for r in results.values()):.1f}s)")
        print("files written:")
    for f in written:
        print(f"  {f}" if not args.quiet else f)
    if ckpt is not None:
        print(f"  {ckpt}/ (per-site measurements, per transformer with --pipeline: a rerun with other --budget resumes "
              "from them)" if not args.quiet else f"{ckpt}/")
    return 0


def _check_transfer_pipeline(plan, transferred, native, args) -> int:
    """The final latents of every prompt's generation at this size: transferred recipe against native, both vs dense."""
    from .pipeline import _generator
    from .transfer import transfer_report

    pipe = plan.pipe

    def run():
        return [pipe(**call, **plan.common, generator=_generator(plan.seed + n)).frames
                for n, call in enumerate(plan.calls)]

    pipe.set_progress_bar_config(disable=True)
    return _print_transfer(transfer_report(pipe, transferred, native, run, grid=plan.grid), args)


def _print_transfer(rep: dict, args) -> int:
    """Print the resolution-transfer report, and write it as JSON when `--out` ends in `.json`."""
    import json

    from .transfer import format_report

    print(format_report(rep))
    if args.out.endswith(".json"):
        Path(args.out).write_text(json.dumps(rep, indent=1))
        print(f"files written:\n  {args.out}")
    return 0


def _names(tiles) -> str:
    return ", ".join("x".join(map(str, t)) for t in tiles)


def _fitted(config, grid, larger: str):
    """`config` with the candidates fitted to `grid`, and an infeasible-budget message (None when feasible)."""
    tiles, levels = config.candidates(grid)
    config = config.replace(tiles=tiles, levels=levels)
    lowest = _lowest_density(grid, tiles, levels)
    if lowest <= config.budget + 1e-9:
        return config, None
    return config, (f"budget {config.budget:g} is infeasible on the {'x'.join(map(str, grid))} token grid: the lowest "
                    f"density the candidates reach is {lowest:.4g} (tiles {_names(tiles)}, levels "
                    f"{', '.join(f'{x:g}' for x in levels)}). Use --budget {lowest:.3g} or more, or lower --levels, "
                    f"or a larger {larger} (one key tile is then a smaller share)")


def _lowest_density(grid, tiles, levels) -> float:
    """The lowest video self-attention density any candidate reaches on `grid` (padding counted)."""
    from ..geometry import Geometry
    from .measure import candidate_cost

    geo = Geometry(tuple(grid))
    return min(candidate_cost(geo, t, min(levels), geo.video_len) for t in tiles)


def _schedule_search_problem(args) -> str | None:
    """Why `--schedule-search` cannot run with these arguments (None when it can)."""
    from ..testbed import VARIANTS

    valid = (f"--schedule-search needs a test-bed --model ({', '.join(VARIANTS)}) calibrated with --inputs-from "
             "trajectory (their default): the schedule is searched on the test-bed's own sampling run from the first "
             "calibration seed")
    if args.pipeline is not None:
        return f"{valid}; it is not available with --pipeline"
    if args.time_budget is not None or args.measure_latency:
        return f"{valid}; it is not available with --time-budget or --measure-latency"
    if args.check_transfer:
        return f"{valid}; it is not available with --check-transfer"
    if args.model not in VARIANTS:
        return f"{valid}; --model {args.model} is not a test-bed"
    if args.inputs_from == "random":
        return f"{valid}; drop --inputs-from random"
    return None


def _calibrate_schedule(model, recipe, args, n_steps, latent_shape, say):
    """Run `calibrate_schedule` on the test-bed's sampling run from seed `args.seed`, as its trajectory sampled it."""
    from ..testbed import sample
    from .schedule import calibrate_schedule, with_schedule
    from .trajectory import seed_inputs

    noise, cond = seed_inputs(model, args.seed, latent_shape=latent_shape, name=args.model)

    def run(m):
        return sample(m, noise, cond, steps=n_steps, guidance_scale=args.guidance_scale)

    say(f"sparsify.calibrate: budget schedule on the {n_steps}-step sampling run of seed {args.seed} (dense, flat, "
        "candidates)")
    sc = calibrate_schedule(model, recipe, run, steps=n_steps, say=lambda line: say(f"sparsify.calibrate: {line}"))
    return with_schedule(recipe, sc)


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
    _print_reuse(rc)
    return with_mask_reuse(recipe, rc)


def _print_reuse(rc, label: str = "") -> None:
    growth = "n/a" if rc.error_growth is None else f"{rc.error_growth:+.1%}"
    print(f"{label}mask reuse: threshold {rc.threshold:.4g}, max_age {rc.max_age}: skips {rc.reuse_share:.0%} of "
          f"selections on the trajectory (least overlap kept {rc.min_overlap:.2f}); final-output error vs dense "
          f"{rc.output_error_fresh:.4f} fresh -> {rc.output_error_reuse:.4f} with reuse ({growth}); tried "
          + ", ".join(f"{t:.3g} ({s:.0%} reused, {g:+.1%})" for t, s, g in rc.tried))


# CPU costs relative to one dense forward, measured on the test-bed (2 inputs x 2 steps, 8 sites, 4,096 tokens):
OUTPUT_PASS_FORWARDS = 1.5  # one per-site model-output pass (that site sparse at the reference density)
CHECK_FORWARDS_PER_SITE = 1.4  # the final check (every site sparse, heads on mixed tiles), per site
REPORT_SECONDS = 5.0  # emitting the recipe, the summary's solves and the three plots (about 4 s measured on a quiet 2-core CPU)


def _dry_run(model, make_inputs, schedule, config, t_start, extra_forwards: int = 0) -> int:
    """Time discovery, one dense forward and one site measurement; extrapolate to the whole run.

    `extra_forwards`: forwards the run makes besides the measured ones (unsampled trajectory steps, the schedule
    search's generations), timed as dense ones.
    """
    from ..api import find_sites
    from ..geometry import Geometry
    from .measure import measure_site

    setup = time.perf_counter() - t_start  # imports and model load
    kw = make_inputs(*schedule[0])
    t0 = time.perf_counter()
    sites, adapter = find_sites(model, kw)
    discovery = time.perf_counter() - t0
    video = [s for s in sites if s.kind in ("self", "joint")]
    with torch.no_grad():
        model(**kw)  # the first forward pays one-off costs
        t0 = time.perf_counter()
        model(**kw)
        fwd = time.perf_counter() - t0
    s = video[0]
    geo = adapter.geometry(model, (), kw)
    q = torch.randn(1, s.heads, s.q_len, s.head_dim, device=next(model.parameters()).device)
    t0 = time.perf_counter()
    measure_site(q, q, q, Geometry(geo.grid, geo.video_start), config.tiles, config.levels,
                 query_fraction=config.query_fraction, methods=config.methods)
    per_site = time.perf_counter() - t0
    capture = len(schedule) * (fwd + per_site * len(video)) + extra_forwards * fwd
    output = fwd * (1 + len(video) * (OUTPUT_PASS_FORWARDS + CHECK_FORWARDS_PER_SITE)) if config.output_error else 0.0
    total = setup + discovery + capture + output + REPORT_SECONDS
    n_tiles = max(-(-s.q_len // 64), 1)
    mem = s.q_len * config.query_fraction * n_tiles * (s.head_dim + 1) * 4 * 3
    print(f"dry run: {len(video)} sites, {len(schedule)} measured forwards"
          + (f" (+{extra_forwards} unmeasured forwards)" if extra_forwards else "")
          + f"; one forward {fwd:.2f}s, one site measurement {per_site:.2f}s\nestimated time {total:.0f}s: setup {setup:.0f}s, discovery {discovery:.0f}s, "
          f"measurement {capture:.0f}s, model-output error and final check {output:.0f}s, recipe and plots "
          f"~{REPORT_SECONDS:.0f}s; "
          f"peak extra memory per head ~{mem / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
