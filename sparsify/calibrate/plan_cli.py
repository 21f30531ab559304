"""`python -m sparsify.calibrate --time-budget F`: calibrate a generation plan; `--measure-latency OUT`: a latency table."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from ..errors import SparsifyWarning


def add_arguments(p) -> None:
    """The generation-plan options of the calibrate CLI."""
    g = p.add_argument_group("generation plan (step reuse, token merging and attention under one time budget)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="calibrate a generation plan whose predicted time is at most this fraction of dense "
                        "(0.2: five times faster) and write a version-2 recipe")
    g.add_argument("--latency-table", default=None, metavar="FILE",
                   help="the latency table of this model and shape (default: measured now on --device)")
    g.add_argument("--carry-costs", action="store_true",
                   help="with --latency-table of another model: cost this model's plan with that model's times by "
                        "share of a forward (plan a small proxy, e.g. the test-bed, for the model the plan is for)")
    g.add_argument("--measure-latency", default=None, metavar="OUT",
                   help="measure the latency table of --model at its grid on --device and write it to OUT (JSON)")
    g.add_argument("--policy", default="unified", choices=["unified", "usv-entropy"],
                   help="unified: one ILP over every option; usv-entropy: USV's entropy-aware allocation (baseline)")
    g.add_argument("--sampling-steps", type=int, default=None,
                   help="steps of the calibration trajectory and of the plan (default 50 on CUDA, 10 on the CPU)")
    g.add_argument("--measure-steps", type=int, default=None,
                   help="trajectory steps at which reuse and merging errors are measured (default 6 on CUDA, 3 on CPU)")
    g.add_argument("--max-reuse-age", type=int, default=3, help="the most consecutive reused steps")
    g.add_argument("--merge-ratios", default="0.25,0.5", help="candidate token-merging ratios (0 is always one)")
    g.add_argument("--merge-groups", type=int, default=None,
                   help="consecutive block groups that share a merge ratio (default 4 on CUDA, 2 on the CPU)")
    g.add_argument("--step-ranges", type=int, default=4, help="step ranges with one merge ratio each per group")


def _ratios(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main_plan(args, argv, config, device, dtype, say, out: Path) -> int:
    """Run `--time-budget` / `--measure-latency` for `--model` (exit code)."""
    from ..errors import LatencyTableError
    from .__main__ import _fail, _fitted, resolve_model, default_grid
    from .config import CalibrationConfigError
    from .generation import calibrate_plan
    from .latency import load_latency_table, measure_latency_table, model_shape
    from .solve import InfeasibleBudgetError

    t0 = time.perf_counter()
    if args.pipeline is not None:
        return _fail("--time-budget and --measure-latency work with --model (a transformer), not --pipeline")
    if args.time_budget is not None and not args.time_budget > 0:
        return _fail(f"--time-budget must be > 0 (a fraction of dense time, e.g. 0.2); got {args.time_budget:g}")
    try:
        ratios = _ratios(args.merge_ratios)
    except ValueError:
        return _fail(f"--merge-ratios must be comma-separated numbers in [0, 0.5]; got {args.merge_ratios!r}")
    if not all(0 <= r <= 0.5 for r in ratios):
        return _fail(f"--merge-ratios must be numbers in [0, 0.5]; got {args.merge_ratios!r}")
    cpu = device.type != "cuda"
    steps = args.sampling_steps or (10 if cpu else 50)
    model, make_inputs, adapter, desc = resolve_model(args.model, device, dtype)
    if adapter is not None:
        grid = tuple(args.grid) if args.grid else default_grid(adapter, model)
        kw = make_inputs(args.seed, 1.0, grid)
        noise, cond, null = kw["hidden_states"], kw["encoder_hidden_states"], None
        small = adapter.example_inputs(model)
    else:  # the test-bed: procedural class condition, its null embedding
        from ..testbed import LATENT_SHAPE
        from ..testbed.data import class_embeddings, null_embedding

        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(1, *LATENT_SHAPE, generator=g).to(device, dtype)
        cond = class_embeddings(torch.tensor([args.seed % 8])).to(device, dtype)
        null = null_embedding(1).to(device, dtype)
        kw = make_inputs(args.seed, 1.0)
        small = None
    from ..adapters import adapter_for

    grid = tuple(adapter_for(model).geometry(model, (), kw).grid)
    config, _ = _fitted(config, grid, "--grid")  # candidates resolved for the grid (the density budget is unused)
    if args.carry_costs and not args.latency_table:
        return _fail("--carry-costs needs --latency-table FILE (the table of the model whose costs to carry)")
    if args.latency_table:
        try:
            table = load_latency_table(args.latency_table)
        except LatencyTableError as e:
            return _fail(str(e))
        if args.carry_costs:
            say(f"sparsify.calibrate: costs carried from {args.latency_table} "
                f"({table.shape.model}, {table.shape.blocks} blocks, {table.shape.seq_len} tokens, {table.device})")
            table = table.carried_to(model_shape(model, kw))
    else:
        if cpu:
            warnings.warn("sparsify.calibrate: measuring the latency table on the CPU: CPU timings are not "
                          "representative of a GPU (sparse attention can be slower than dense there), so the plan "
                          "trades differently; measure the table on the GPU (--measure-latency OUT) and pass it "
                          "with --latency-table", SparsifyWarning, stacklevel=2)
        say(f"sparsify.calibrate: measuring the latency table of {desc} at grid {'x'.join(map(str, grid))} on {device}")
        try:
            table = measure_latency_table(model, kw, tiles=config.tiles,
                                          densities=(0.1,) if cpu else tuple(config.levels), ratios=ratios or (0.25,))
        except ValueError as e:
            return _fail(str(e).removeprefix("sparsify.calibrate: "))
        if args.measure_latency:
            table.save(args.measure_latency)
            print(f"latency table written: {args.measure_latency}")
        if args.time_budget is None:
            return 0
    say(f"sparsify.calibrate: generation plan for {desc}; grid {'x'.join(map(str, grid))}; {steps} steps, guidance "
        f"{args.guidance_scale:g}; policy {args.policy}; time budget {args.time_budget:g}; latency table from "
        f"{table.device}")
    try:
        pc = calibrate_plan(model, noise, cond, table=table, time_budget=args.time_budget, config=config,
                            policy=args.policy, steps=steps, measure=args.measure_steps or (3 if cpu else 6),
                            attention_steps=args.steps or 2, guidance_scale=args.guidance_scale, null_cond=null,
                            max_age=args.max_reuse_age, merge_groups=args.merge_groups or (2 if cpu else 4),
                            step_ranges=args.step_ranges, merge_ratios=ratios, example_inputs=small,
                            say=lambda m: say(f"sparsify.calibrate: {m}"))
    except (InfeasibleBudgetError, CalibrationConfigError, LatencyTableError) as e:
        return _fail(str(e).removeprefix("sparsify.calibrate: "))
    cal = pc.recipe.calibration
    cal["command"] = "python -m sparsify.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.note:
        cal["calibrated_on"] = args.note
    out.parent.mkdir(parents=True, exist_ok=True)
    written = pc.recipe.save(out)
    if not args.quiet:
        print(pc.summary())
        print(f"\ntime: {time.perf_counter() - t0:.1f}s\nfiles written:")
    print(f"  {written}" if not args.quiet else written)
    return 0
