"""`python -m benchmarks.quality plan`: the unified generation plan against USV's entropy policy and diffusers' cache hooks at the same DiT time.

On a learned test-bed (`--model`, default `testbed-16k`; `--weights FILE` for other weights), in one run:

1. Plans. The unified plan (`sparsify.calibrate.generation.calibrate_plan`, policy `unified`) and USV's
   entropy-aware plan (policy `usv-entropy`) at `--time-budget` x dense time, both calibrated on the dense
   trajectory of the calibration seed (`--calibration-seed`, disjoint from the evaluation seeds) with one
   latency table (`--latency-table FILE`, else measured in the run on `--device`; with `--carry-costs` the table of
   another model, e.g. Wan-14B, costs the plans by share of a forward); the two calibrations share
   their per-head measurements (one checkpoint folder). `--plans unified=a.yaml,usv=b.yaml,attention=c.yaml`
   loads any of them instead. Calibrated plans are written to `--workdir` (`plan_unified.yaml`,
   `plan_usv.yaml`) so that a rerun can load them.
2. The attention recipe the cache hooks are stacked on: the unified plan's own per-head attention part
   (its `sites` and `defaults`, version 1, no plan), unless `--plans attention=FILE` names another. The hook rows
   then run exactly the plan's attention, so the plan-minus-hook margin is the margin of the step policy
   (the ILP's reuse and merging against the hook's skip decisions), not of another density budget.
3. Rows. `--videos` evaluation videos (seed 1234, classes 0, 1, ...), each sampled alone (batch 1) with
   `--steps` Euler steps and classifier-free guidance `--guidance`, every transformer call inside diffusers'
   `cache_context("cond" | "uncond", step_index=i)` as a pipeline calls it: dense; the unified plan; the
   USV plan; the attention recipe alone; the attention recipe with each diffusers cache hook (`--hooks`:
   First Block Cache, MagCache, TaylorSeer; `sparsify()` first, then `enable_cache`, as
   `benchmarks.e2e_generation` stacks them). MagCache's magnitude ratios are diffusers' own calibration
   (`MagCacheConfig(calibrate=True)`) on the calibration seed with the attention recipe installed; its
   `max_skip_steps` and `retention_ratio` are diffusers' defaults (3, 0.2). TaylorSeer caches every block's
   `attn1`, `attn2` and `ffn` (diffusers' default patterns hook nothing of Wan), from step 3 (its default).
4. Matching time. Each hook's knob (First Block Cache and MagCache: `threshold`, bisected geometrically;
   TaylorSeer: `cache_interval`, bisected over integers) is tuned on the calibration seed until the
   generation's PREDICTED DiT time is within `--time-tolerance` (relative) of the unified plan's, counting what
   each generation actually computed. Predicted time uses the latency table and the time model of
   `sparsify.calibrate.allocate`: every transformer call costs the time outside the blocks, plus, for each block
   whose self-attention ran in that call, the table's block time at its merge ratio less its heads' attention
   saving (scaled by the ratio's `kappa`; none in the recipe's `dense_steps`). A block skipped by reuse, by a
   cache hook or predicted by TaylorSeer costs nothing (the elementwise work a skipped block still does is not
   in the table), unless `--hook-costs` gives an `e2e --generation` JSON of the table's shape: a call in which
   a hook skipped blocks then costs that hook's measured skipped call there, as a share of a dense call
   (`hook_skip_shares`). Measured time (the transformer calls' wall time, CUDA events; `CallTimer`) is reported
   beside it for every row, after one untimed 2-step warm-up generation per recipe.

Per row: PSNR and SSIM of the samples against dense sampling (`torchmetrics`, all videos at once), the relative
L2 error of x_t against the dense trajectory at every step (the last is the sample), the predicted DiT time per
generation and as a fraction of dense, the measured DiT time and its fraction, and the calls that ran every
block. The best cache-hook row is the one of highest PSNR among those whose predicted time matched; the
margins `plan - best hook` and `plan - usv` (dB) are stated. Writes `benchmarks/results/quality_plan_<date>.json`.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.e2e_generation import HOOKS, CallTimer

PLAN_NAMES = ("unified", "usv", "attention")
HOOK_LABELS = {"fbc": "FirstBlockCache", "mag": "MagCache", "taylorseer": "TaylorSeer"}


class GuidedCalls:
    """The test-bed denoiser called as a diffusers pipeline calls it, with a ledger of what each call computed.

    Call `n` of a generation is step `n // calls_per_step`, branch `cond` (first) or `uncond`, run inside
    `model.cache_context(branch, step_index=step, num_inference_steps=steps)`. `calls` holds per call
    `(step, blocks)`: the blocks whose self-attention projected anything (a block skipped by step reuse or a cache
    hook, or whose attention TaylorSeer predicted, is absent).

    Example:
        >>> # guided = GuidedCalls(model, steps=50, calls_per_step=2); sample(guided, noise, cond, ...); guided.calls
    """

    def __init__(self, model, steps: int, calls_per_step: int):
        self.model, self.steps, self.per_step = model, steps, calls_per_step
        self.calls: list[tuple[int, set]] = []
        self._hooks = []
        for b, block in enumerate(model.blocks):
            for lin in (m for m in block.attn1.modules() if isinstance(m, torch.nn.Linear)):
                self._hooks.append(lin.register_forward_pre_hook(lambda *_, b=b: self.calls[-1][1].add(b)))

    def __call__(self, **kwargs):
        n = len(self.calls)
        step = n // self.per_step
        self.calls.append((step, set()))
        name = "cond" if n % self.per_step == 0 else "uncond"
        with self.model.cache_context(name, step_index=step, num_inference_steps=self.steps):
            return self.model(**kwargs)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def block_savings(model, table) -> list[float]:
    """Per block, the attention ms one call saves against dense with the recipe installed on `model` (the sum of
    its self-attention heads' savings, each `(dense - attention_call_ms(tile, density)) / heads` as
    `sparsify.calibrate.generation.build_problem` counts them; 0 for a model not sparsified).

    Example:
        >>> # sparsify(model, recipe); block_savings(model, load_latency_table("t.json"))
    """
    from sparsify import installed_sites

    out = [0.0] * len(model.blocks)
    if getattr(model, "_sparsify", None) is None:
        return out
    dense = table.dense_attention_ms[0.0]
    for s in installed_sites(model):
        parts = s.path.split(".")
        if s.kind not in ("self", "joint") or parts[0] != "blocks":
            continue
        for c in s.configs:
            if c.is_dense or not c.enable:
                continue
            if c.budget.density is None:
                raise SystemExit(f"{s.path}: a top-p head has no fixed density; the predicted time needs "
                                 "budget.density for every sparse head")
            out[int(parts[1])] += (dense - table.attention_call_ms(c.tile, c.budget.density)) / s.heads
    return out


def predicted_ms(calls, table, savings, *, plan=None, dense_steps: int = 0, steps: int | None = None,
                 skipped_call_ms: float | None = None) -> float:
    """Predicted DiT ms of the calls of one generation (the module docstring's time model).

    `skipped_call_ms`, where given, is the cost of a call that did not run every block (a cache hook's measured
    skipped call) in place of the time model's.

    Example:
        >>> from sparsify.calibrate.latency import LatencyTable, ModelShape
        >>> t = LatencyTable(ModelShape("M", 2, 1, 8, (1, 4, 4), 16, 1, "float32"), "cpu", forward_ms=10.0,
        ...                  block_ms={0.0: 4.0}, attention_ms={}, dense_attention_ms={0.0: 2.0})
        >>> predicted_ms([(0, {0, 1}), (1, {0, 1}), (1, set())], t, [1.0, 0.5], dense_steps=1)  # 10 + 8.5 + 2
        20.5
        >>> predicted_ms([(0, {0, 1}), (1, {0, 1}), (1, set())], t, [1.0, 0.5], dense_steps=1, skipped_call_ms=3.0)
        21.5
    """
    total = 0.0
    for step, blocks in calls:
        if skipped_call_ms is not None and len(blocks) < len(savings):
            total += skipped_call_ms
            continue
        total += table.outside_ms
        for b in blocks:
            r = plan.ratio(b, step, steps) if plan is not None else 0.0
            kappa = table.dense_attention_ms[r] / table.dense_attention_ms[0.0]
            total += table.block_ms[r] - (0.0 if step < dense_steps else kappa * savings[b])
    return total


def hook_skip_shares(path, table) -> dict[str, float]:
    """Per cache hook, its measured skipped call as a share of a dense call, from an `e2e --generation` JSON
    (`python -m benchmarks.e2e --generation ... --out FILE`) measured at the shape `table` was measured at (the
    shape it was carried from, if carried). A skipped call is one in which the hook skipped blocks: First Block
    Cache still runs the first block, TaylorSeer extrapolates every block's outputs.

    Example:
        >>> # hook_skip_shares("e2e_generation.json", load_latency_table("T.json"))  ->  {"taylorseer": 0.117, ...}
    """
    import json

    try:
        part = json.loads(Path(path).read_text())["generation_plan"]
        dense = next(r for r in part["rows"] if r["label"].startswith("dense"))
        dense_call = dense["composed_ms"] / (part["steps"] * part["cfg_calls_per_step"])
        shares = {h["label"].removeprefix("attention + "): h["skipped_call_ms"] / dense_call for h in part["hooks"]}
        grid = tuple(part["grid"])
    except (OSError, ValueError, KeyError, StopIteration, TypeError, ZeroDivisionError) as e:
        raise SystemExit(f"--hook-costs {path}: not the JSON of `python -m benchmarks.e2e --generation --out FILE` "
                         f"with hook rows ({type(e).__name__}: {e})") from None
    measured = tuple((table.meta.get("carried_from") or {}).get("grid") or table.shape.grid)
    if grid != measured:
        raise SystemExit(f"--hook-costs {path}: measured at grid {'x'.join(map(str, grid))}, the latency table at "
                         f"{'x'.join(map(str, measured))}; measure both at the same shape")
    return shares


def hook_config(name: str, knob, steps: int, mag_ratios=None):
    """The diffusers cache config of hook `name` with its knob (threshold or cache interval) set to `knob`.

    Example:
        >>> hook_config("taylorseer", 3, 50).cache_interval
        3
    """
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "fbc":
        return FirstBlockCacheConfig(threshold=float(knob))
    if name == "mag":
        return MagCacheConfig(threshold=float(knob), num_inference_steps=steps, mag_ratios=list(mag_ratios))
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(knob), cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"])
    raise SystemExit(f"--hooks: unknown cache hook '{name}'; valid: {', '.join(HOOKS)}")


def tune_knob(time_of, target: float, *, lo: float, hi: float, integer: bool, tol: float, iters: int):
    """`(knob, time, tried, matched)`: the knob whose `time_of(knob)` is within `tol` (relative) of `target`.

    Time falls as the knob grows. Bisection on `[lo, hi]`: geometric for a threshold, over the integers for an
    interval. Where no knob tried matches, the closest is returned with `matched` False (beyond `hi`: the
    hook cannot get that fast).

    Example:
        >>> tune_knob(lambda k: 100.0 / k, 20.0, lo=1, hi=50, integer=True, tol=0.02, iters=8)[:2]
        (5, 20.0)
    """
    tried = {}

    def at(k):
        if k not in tried:
            tried[k] = time_of(k)
        return tried[k]

    def ok(k):
        return abs(at(k) / target - 1.0) <= tol

    if not ok(hi) and at(hi) > target:  # the hook cannot get that fast
        return hi, tried[hi], sorted(tried.items()), False
    for _ in range(iters):
        if ok(hi) or (integer and hi - lo <= 1):
            break
        mid = (lo + hi) // 2 if integer else math.sqrt(lo * hi)
        if ok(mid):
            break
        lo, hi = (mid, hi) if at(mid) > target else (lo, mid)
    if integer and not any(ok(k) for k in tried):
        at(lo)  # the neighbour on the slow side
    best = min(tried, key=lambda k: (not ok(k), abs(at(k) - target)))
    return best, tried[best], sorted(tried.items()), ok(best)


def magcache_ratios(model, run) -> list[float]:
    """diffusers' MagCache calibration of `model` (the conditional branch's ratios), from one generation `run()`.

    diffusers prints the ratios of each branch at the end of a calibration run (`MagCacheConfig(calibrate=True)`);
    the first list printed is the conditional branch's.
    """
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run()
    text = buf.getvalue()
    for i, line in enumerate(text.splitlines()):
        if "MagCacheConfig(mag_ratios=" in line:
            return [float(x) for x in ast.literal_eval(text.splitlines()[i + 1].strip())]
    raise RuntimeError(f"diffusers' MagCache calibration printed no ratios; its output: {text[-500:]!r}")


def _attention_part(recipe):
    """The version-1 attention recipe of a plan recipe: its sites and defaults, no plan."""
    from sparsify import load_recipe

    d = recipe.to_dict()
    d.pop("plan", None)
    d["version"] = 1
    return load_recipe(d)


def _load_plans(spec: str | None) -> dict:
    from sparsify import load_recipe

    out = {}
    for item in (x for x in (spec or "").split(",") if x):
        name, _, path = item.partition("=")
        if name not in PLAN_NAMES or not path:
            raise SystemExit(f"--plans: '{item}' is not NAME=PATH with NAME one of {', '.join(PLAN_NAMES)}")
        r = load_recipe(path)
        if name != "attention" and r.plan is None:
            raise SystemExit(f"--plans: {name}={path} has no generation plan (a version-2 recipe from "
                             "python -m sparsify.calibrate --time-budget ...)")
        if name == "attention" and r.plan is not None and not r.plan.is_trivial:
            raise SystemExit(f"--plans: attention={path} has a generation plan; give an attention-only recipe")
        out[name] = r
    return out


def plan_quality(a, argv) -> dict:
    """The `plan` subcommand (see the module docstring)."""
    from benchmarks._common import run_header, write_result
    from diffusers.hooks import MagCacheConfig

    from benchmarks.quality import sample_trajectory, step_errors, video_metrics
    from sparsify import sparsify, unsparsify
    from sparsify.calibrate import CalibrationConfig
    from sparsify.calibrate.allocate import InfeasibleTimeBudgetError
    from sparsify.calibrate.generation import calibrate_plan
    from sparsify.calibrate.latency import load_latency_table, measure_latency_table, model_shape
    from sparsify.testbed import build_testbed, get_variant

    psnr, ssim = video_metrics()
    cal_kw = dict(measure=6, attention_steps=2, merge_groups=4, step_ranges=4, max_age=3)
    cfg = dict(query_fraction=a.query_fraction)
    latent = None
    if a.tiny:
        a.model, a.steps, a.videos, a.time_budget, a.device = "testbed", 6, 1, 0.5, "cpu"
        a.time_tolerance, a.tune_iters = 0.1, 4
        latent = (4, 8, 16, 16)  # 512 tokens, 8 tiles of 4x4x4
        cal_kw = dict(measure=2, attention_steps=1, merge_groups=2, step_ranges=2, max_age=2)
        torch.set_num_threads(1)
        cfg = dict(tiles=[(4, 4, 4)], levels=(0.25, 0.5), output_error=False, query_fraction=0.25)
    if a.measure_steps:
        cal_kw["measure"] = a.measure_steps
    try:
        ratios = tuple(float(r) for r in a.merge_ratios.split(",") if r)
    except ValueError:
        raise SystemExit(f"--merge-ratios: comma-separated numbers in [0, 0.5]; got {a.merge_ratios!r}") from None
    if not all(0 <= r <= 0.5 for r in ratios):
        raise SystemExit(f"--merge-ratios: each must be in [0, 0.5]; got {a.merge_ratios!r}")
    cal_kw["merge_ratios"] = ratios
    hooks = [h for h in a.hooks.split(",") if h]
    unknown = sorted(set(hooks) - set(HOOKS))
    if unknown:
        raise SystemExit(f"--hooks: unknown {unknown}; valid: {', '.join(HOOKS)}")
    if a.carry_costs and not a.latency_table:
        raise SystemExit("--carry-costs needs --latency-table FILE (the table of the model whose costs to carry)")
    given = _load_plans(a.plans)
    variant = get_variant(a.model)
    data = variant.data_module()
    latent = latent or variant.latent_shape
    dev = torch.device(a.device)
    t_start = time.perf_counter()
    seconds: dict = {}
    dtype = getattr(torch, a.dtype)
    model = build_testbed(device=dev, name=variant.name, weights=a.weights, dtype=dtype)
    calls_per_step = 2 if a.guidance != 1.0 else 1

    def draw(seed, n):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *latent, generator=g).to(dev, dtype)

    cal_noise = draw(a.calibration_seed, 1)
    cal_cond = data.class_embeddings(torch.tensor([a.calibration_seed % data.NUM_CLASSES])).to(dev, dtype)
    null = data.null_embedding(1).to(dev, dtype)
    eval_noise = draw(1234, a.videos)
    eval_cond = data.class_embeddings(torch.arange(a.videos) % data.NUM_CLASSES).to(dev, dtype)
    first = {"hidden_states": cal_noise, "timestep": torch.full((1,), 1000.0, device=dev),
             "encoder_hidden_states": cal_cond, "return_dict": False}
    config = CalibrationConfig(progress=False, verbose=False, **cfg)
    grid = model_shape(model, first).grid
    tiles, levels = config.candidates(grid)

    t0 = time.perf_counter()
    if a.latency_table:
        table = load_latency_table(a.latency_table)
        if a.carry_costs:
            table = table.carried_to(model_shape(model, first))
        table.check_shape(model_shape(model, first))
    else:
        table = measure_latency_table(model, first, tiles=tiles, densities=tuple(d for d in levels if d < 1.0),
                                      ratios=cal_kw["merge_ratios"])
        table.save(Path(a.workdir) / "latency_table.json")
        seconds["latency_table"] = round(time.perf_counter() - t0, 1)
    print(f"latency table ({table.device}): forward {table.forward_ms:.3f} ms, dense generation "
          f"{calls_per_step * a.steps * table.forward_ms:.1f} ms", flush=True)
    skip_share = {h: v for h, v in hook_skip_shares(a.hook_costs, table).items() if h in hooks} if a.hook_costs else {}
    if a.hook_costs:
        priced = ", ".join(f"{h} {v:.3f}" for h, v in skip_share.items()) or "none of --hooks"
        rest = sorted(set(hooks) - set(skip_share))
        print(f"skipped calls priced from {a.hook_costs} (share of a dense call): {priced}"
              + (f"; by the time model: {', '.join(rest)}" if rest else ""), flush=True)

    recipes, calibration = {}, {}
    with tempfile.TemporaryDirectory() as ckpt:
        for name, policy in (("unified", "unified"), ("usv", "usv-entropy")):
            if name in given:
                recipes[name] = given[name]
                continue
            t0 = time.perf_counter()

            def calibrate(budget, policy=policy):
                return calibrate_plan(model, cal_noise, cal_cond, table=table, time_budget=budget,
                                      config=config.replace(checkpoint_dir=ckpt), policy=policy, steps=a.steps,
                                      guidance_scale=a.guidance, shift=a.shift, null_cond=null, **cal_kw,
                                      say=lambda m: print(f"calibrate {policy}: {m}", flush=True))

            budget, pc = a.time_budget, None
            for _ in range(3):  # the up-front refusal names a bound; USV's own sparsest plan may be slower still
                try:
                    pc = calibrate(budget)
                    break
                except InfeasibleTimeBudgetError as e:
                    if policy == "unified":
                        raise
                    print(f"USV's entropy policy cannot meet budget {budget:g}: {e}; its row is its fastest plan",
                          flush=True)
                    budget = math.ceil(e.fastest * 1000) / 1000
            if pc is None:
                raise SystemExit(f"USV's entropy policy: no plan at budget {budget:g} either")
            seconds[f"calibrate_{name}"] = round(time.perf_counter() - t0, 1)
            recipes[name] = pc.recipe
            calibration[name] = {"time_budget": pc.time_budget, "predicted_ms": pc.predicted_ms,
                                 "dense_ms": pc.dense_ms,
                                 "predicted_error": pc.predicted_error,
                                 "file": str(pc.recipe.save(Path(a.workdir) / f"plan_{name}.yaml"))}
            print(pc.summary(), flush=True)
    recipes["attention"] = given.get("attention") or _attention_part(recipes["unified"])

    def generation(recipe=None, hook=None, noise=eval_noise, cond=eval_cond, steps=a.steps, timed=True, skip=None):
        """Each video of `noise` alone: (samples, trajectory, per-video predicted ms, per-video measured ms, calls);
        `skip`: the ms of a call in which the hook skipped blocks (`--hook-costs`), else the time model's."""
        if recipe is not None:
            sparsify(model, recipe)
        if hook is not None:
            model.enable_cache(hook)
        try:
            savings = block_savings(model, table)
            xs, trajs, pred, meas, full = [], [], [], [], 0
            for i in range(noise.shape[0]):
                if hook is not None:
                    model._reset_stateful_cache()
                guided = GuidedCalls(model, steps, calls_per_step)
                timer = CallTimer(model, dev) if timed else None
                try:
                    x, traj = sample_trajectory(guided, noise[i:i + 1], cond[i:i + 1], steps=steps,
                                                guidance=a.guidance, shift=a.shift)
                    if timer is not None:
                        meas.append(sum(c["total_ms"] for c in timer.results(len(model.blocks))))
                finally:
                    guided.remove()
                    if timer is not None:
                        timer.remove()
                xs.append(x)
                trajs.append(traj)
                plan = recipe.plan if recipe is not None else None
                pred.append(predicted_ms(guided.calls, table, savings, plan=plan, steps=steps, skipped_call_ms=skip,
                                         dense_steps=recipe.defaults.dense_steps if recipe is not None else 0))
                full += sum(len(b) == len(model.blocks) for _, b in guided.calls)
        finally:
            if hook is not None:
                model.disable_cache()
            if recipe is not None:
                unsparsify(model)
        return torch.cat(xs), [torch.cat(s) for s in zip(*trajs)], pred, meas, full

    for name in ("unified", "usv", "attention"):  # JIT and first-call work outside the timed rows
        generation(recipes[name], noise=cal_noise, cond=cal_cond, steps=2, timed=False)

    rows, ref = [], None

    def add(label, kind, recipe=None, hook=None, skip=None, **extra):
        nonlocal ref
        t0 = time.perf_counter()
        x, traj, pred, meas, full = generation(recipe, hook, skip=skip)
        if ref is None:
            ref = (x, traj)
        err = step_errors(traj, ref[1])
        row = {"label": label, "kind": kind, "psnr_db": psnr(x, ref[0]), "ssim": ssim(x, ref[0]),
               "final_error": err[-1], "step_error": err, "predicted_ms": sum(pred) / len(pred),
               "predicted_ms_per_video": pred, "measured_ms": sum(meas) / len(meas), "measured_ms_per_video": meas,
               "full_calls": full / len(pred), "calls": calls_per_step * a.steps, **extra,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "step_error"}, flush=True)
        return row

    add("dense", "dense")
    plan_row = add("unified plan", "plan", recipes["unified"], predicted_calibration=calibration.get("unified"))
    add("USV entropy plan", "plan", recipes["usv"], predicted_calibration=calibration.get("usv"))
    add("attention recipe", "attention", recipes["attention"])
    target = plan_row["predicted_ms"]
    mag = None
    for h in hooks:
        t0 = time.perf_counter()
        if h == "mag":
            sparsify(model, recipes["attention"])
            model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=a.steps))
            guided = GuidedCalls(model, a.steps, calls_per_step)
            try:
                mag = magcache_ratios(model, lambda: sample_trajectory(guided, cal_noise, cal_cond, steps=a.steps,
                                                                       guidance=a.guidance, shift=a.shift))
            finally:
                guided.remove()
                model.disable_cache()
                unsparsify(model)

        skip = skip_share[h] * table.forward_ms if h in skip_share else None

        def time_of(knob, h=h, skip=skip):
            return generation(recipes["attention"], hook_config(h, knob, a.steps, mag), noise=cal_noise,
                              cond=cal_cond, timed=False, skip=skip)[2][0]

        integer = h == "taylorseer"
        knob, t_cal, tried, matched = tune_knob(time_of, target, lo=1 if integer else 1e-3,
                                                hi=a.steps if integer else 10.0, integer=integer,
                                                tol=a.time_tolerance, iters=a.tune_iters)
        tuning = {"knob": "cache_interval" if integer else "threshold", "value": knob, "matched": matched,
                  "calibration_predicted_ms": t_cal, "tried": tried, "seconds": round(time.perf_counter() - t0, 1)}
        if h == "mag":
            tuning["mag_ratios"] = mag
        add(f"attention + {HOOK_LABELS[h]}", "hook", recipes["attention"], hook_config(h, knob, a.steps, mag),
            skip=skip, hook_name=h, tuning=tuning, skipped_call_ms=skip)

    dense = rows[0]
    for r in rows:
        r["predicted_fraction"] = r["predicted_ms"] / dense["predicted_ms"]
        r["measured_fraction"] = r["measured_ms"] / dense["measured_ms"] if dense["measured_ms"] else None
    matched = [r for r in rows if r["kind"] == "hook" and r["tuning"]["matched"]]
    best = max(matched, key=lambda r: r["psnr_db"]) if matched else None
    usv = rows[2]
    margins = {"plan_minus_best_hook_db": plan_row["psnr_db"] - best["psnr_db"] if best else None,
               "best_hook": best["label"] if best else None,
               "plan_minus_usv_db": plan_row["psnr_db"] - usv["psnr_db"]}
    table_md = _markdown(rows, best, a.steps)
    print(table_md)
    print(f"plan - best time-matched hook: {_db(margins['plan_minus_best_hook_db'])} ({margins['best_hook']}); "
          f"plan - USV: {_db(margins['plan_minus_usv_db'])}")
    meta = {"benchmark": "quality plan", **run_header("quality", argv), "model": variant.name,
            "weights": a.weights, "dtype": a.dtype, "latent_shape": list(latent), "steps": a.steps, "videos": a.videos,
            "guidance_scale": a.guidance, "shift": a.shift, "time_budget": a.time_budget, "merge_ratios": list(ratios),
            "time_tolerance": a.time_tolerance, "calibration_seed": a.calibration_seed, "eval_seed": 1234,
            "hook_costs": {"file": a.hook_costs, "skipped_call_share": skip_share} if a.hook_costs else None,
            "latency_table": {"device": table.device, "file": a.latency_table,
                              "carried_from": table.meta.get("carried_from"), **table.to_dict()["ms"]},
            "plans": {k: ("given" if k in given else "calibrated" if k in calibration else "attention part of unified")
                      for k in PLAN_NAMES},
            "attention_recipe": "the unified plan's attention part" if "attention" not in given else a.plans,
            "calibration": calibration, "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 1)},
            "margins": margins, "table": table_md, "rows": rows}
    write_result(meta, a.out, "quality_plan")
    return meta


def _db(x) -> str:
    return "-" if x is None else f"{x:+.2f} dB"


def _markdown(rows, best, steps: int) -> str:
    lines = [f"| row | knob | PSNR dB | SSIM | x_t error, step {steps // 2} | final error | predicted DiT ms | "
             "x dense | measured DiT ms | x dense | full calls |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knob = "-" if r["kind"] != "hook" else \
            f"{r['tuning']['knob']} {r['tuning']['value']:.4g}" + ("" if r["tuning"]["matched"] else " (unmatched)")
        label = f"**{r['label']}** (best hook)" if r is best else r["label"]
        meas = "-" if r["measured_fraction"] is None else f"{r['measured_fraction']:.3f}"
        lines.append(f"| {label} | {knob} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['step_error'][steps // 2]:.4f} | "
                     f"{r['final_error']:.4f} | {r['predicted_ms']:.1f} | {r['predicted_fraction']:.3f} | "
                     f"{r['measured_ms']:.1f} | {meas} | {r['full_calls']:.0f}/{r['calls']} |")
    return "\n".join(lines)


def add_arguments(sub) -> None:
    """The `plan` subcommand's parser under `python -m benchmarks.quality`."""
    p = sub.add_parser("plan", help="the unified generation plan against USV's entropy plan and the attention recipe "
                       "with diffusers' cache hooks, at the same predicted DiT time (PSNR / SSIM vs dense)")
    p.add_argument("--model", default="testbed-16k", help="test-bed variant: testbed-16k (default) or testbed")
    p.add_argument("--weights", default=None, help="a safetensors file of the variant (default: the shipped one)")
    p.add_argument("--time-budget", type=float, default=0.2, help="the plans' DiT time as a fraction of dense")
    p.add_argument("--latency-table", default=None, metavar="FILE",
                   help="latency table of this model and shape (default: measured now on --device)")
    p.add_argument("--carry-costs", action="store_true",
                   help="with --latency-table of another model (e.g. Wan-14B): plan and time-match with its costs "
                        "by share of a forward (LatencyTable.carried_to)")
    p.add_argument("--plans", default=None, metavar="NAME=PATH,...",
                   help="load recipes instead of calibrating: unified=a.yaml,usv=b.yaml,attention=c.yaml (any subset)")
    p.add_argument("--videos", type=int, default=2, help="evaluation videos per row (seed 1234, batch 1 each)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of every generation and of the plans")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule")
    p.add_argument("--calibration-seed", type=int, default=100, help="noise and class seed of the calibration "
                   "trajectory and of the hooks' tuning (not the evaluation seed 1234)")
    p.add_argument("--measure-steps", type=int, default=None,
                   help="trajectory steps at which reuse and merging errors are measured (default 6)")
    p.add_argument("--query-fraction", type=float, default=0.125, help="share of query tokens measured per call "
                   "in the per-head calibration")
    p.add_argument("--merge-ratios", default="0.25,0.5",
                   help="candidate token-merging ratios of both plans (0: no merging; a --latency-table must have them)")
    p.add_argument("--hooks", default=",".join(HOOKS), help=f"diffusers cache hooks: subset of {','.join(HOOKS)}")
    p.add_argument("--hook-costs", default=None, metavar="FILE",
                   help="the JSON of `benchmarks.e2e --generation` at the latency table's shape: price a call in "
                        "which a hook skipped blocks at that hook's measured share of a dense call (default: skipped "
                        "blocks cost nothing)")
    p.add_argument("--time-tolerance", type=float, default=0.03,
                   help="relative difference of predicted time at which a hook's knob matches the plan")
    p.add_argument("--tune-iters", type=int, default=8, help="bisection steps per hook")
    p.add_argument("--workdir", default=".", help="folder of the calibrated plans and the measured latency table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights, latents and latency table (bfloat16: as a real pipeline runs)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the 4k test-bed at 512 tokens, 6 steps, one "
                   "video, time budget 0.5, one tile")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_plan_<date>.json)")
