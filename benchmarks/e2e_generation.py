"""Per-generation rows of `python -m benchmarks.e2e --generation`: a whole schedule composed from measured parts.

A dense 50-step Wan-14B generation at 720p takes about half an hour on one H100, so the 40-block, `--steps`-step
rows are COMPOSED, not run end to end:

1. Components, measured on the 14B model cut to `--blocks` blocks at the real shape (random bf16 weights, no
   grad, cuDNN attention): the dense forward, and one block (timed alone on the arguments it received in a
   forward) for every (attention density, merge ratio) the rows use; the time outside the blocks
   (`forward - blocks x block`, dense and sparsified); and a reused step as `PlanRunner` runs it (the real
   forward with every block skipped and the last residual added, or, where the plan extrapolates (order 1),
   extrapolated from the last two; checked to run no block).
2. Composition: the plan (calibrated on the test-bed, `--plan`) is mapped onto 40 blocks and `--steps` steps by
   block and step fraction (`StepPlan.mapped`), and so are the attention densities of its recipe (each block's
   mean head density, dense heads counting 1; the recipe's `dense_steps` run dense). Per step and guidance
   call: a computed step costs the time outside the blocks plus each block at its density and merge ratio; a
   reused step costs the measured reused forward. Two calls per step (classifier-free guidance).
3. Validation: real short generations (`WanPipeline`, the cut model, `--validate-steps` steps with CFG, the
   plan mapped onto the cut model and those steps and run by `sparsify()`'s `PlanRunner`) for dense,
   attention only and the plan. Their DiT time (the transformer calls, timed in the run) is compared with the
   composition of the same cut model and steps: `measured / composed` is reported per row. Peak GPU memory
   (`torch.cuda.max_memory_allocated`) of each generation is reported too (None on the CPU), with the plan's
   over dense's, measured, and at full depth (both peaks plus the weights of the blocks the cut leaves out).

diffusers' cache hooks (`enable_cache`: First Block Cache, MagCache, TaylorSeer) are stacked on the same
attention recipe (sparsify first, then the cache) and run for real on the cut model for `--validate-steps`
steps. With random weights their skip decisions mean nothing, so each hook runs a fixed schedule that
computes every other step (First Block Cache: the threshold switched per step; MagCache: unit magnitude ratios
and at most one skipped step in a row; TaylorSeer: `cache_interval=2` on every block's attn1, attn2 and ffn,
which diffusers' default patterns miss on Wan), and the skip schedule of the 50-step
row is a parameter: the hook computes K evenly spaced steps. Each transformer call is timed per block and
classed as computed or skipped (did the last block's self-attention project anything?); a call of the 40-block
model is the measured call's outside time + its first block + 38 x its middle blocks' mean (the last block's
where the cut has two) + its last block. Rows give K = the unified plan's computed steps, and the largest K
whose composed time stays within the unified plan's ("K at plan time": what quality comparisons at matched
time use).

Not in the composed time: the scheduler, text encoder and VAE; mask reuse (components select afresh every
call); the recipe's per-step budget `schedule`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch

CALLS = 2  # classifier-free guidance as two transformer calls per step
HOOKS = ("fbc", "mag", "taylorseer")


def block_densities(recipe, blocks: int) -> list[float]:
    """The mean head density of each block's self-attention sites in `recipe` (a dense head counts 1.0).

    Sites come from the recipe's model signature (`model.sites`), else `blocks.<b>.attn1` with the recipe's
    `defaults`, rules and `sites` entries.

    Example:
        >>> from sparsify import load_recipe
        >>> r = load_recipe({"version": 1, "defaults": {"budget": {"density": 0.1}},
        ...                  "sites": {"blocks.1.attn1": {"density": 0.3}}})
        >>> block_densities(r, 2)
        [0.1, 0.3]
    """
    sig = [s for s in (recipe.model.sites if recipe.model else ()) if s.kind in ("self", "joint")]
    out = []
    for b in range(blocks):
        specs = [(i, s.path, s.heads) for i, s in enumerate(sig) if s.path.startswith(f"blocks.{b}.")]
        if not sig:
            entry = recipe.sites.get(f"blocks.{b}.attn1")
            heads = 1 + max((h.head for h in entry.heads), default=0) if entry else 1
            specs = [(None, f"blocks.{b}.attn1", heads)]
        dens = []
        for index, path, heads in specs:
            for c in recipe.head_configs(path, heads, site_index=index):
                if c.is_dense:
                    dens.append(1.0)
                elif c.budget.density is None:
                    raise SystemExit(f"--plan: {recipe.where}: {path} has top-p heads, whose density is known only "
                                     "at run time; the composed rows need fixed densities (budget.density)")
                else:
                    dens.append(float(c.budget.density))
        out.append(round(statistics.fmean(dens), 4) if dens else 1.0)
    return out


@dataclass
class Components:
    """Measured per-call times (ms) of the cut model: outside the blocks, one block per (density, ratio), a reused
    step (adding the last residual; `extrapolate_ms`: extrapolating it from the last two, the plan's order 1)."""

    outside_dense_ms: float
    outside_sparse_ms: float
    block_ms: dict
    reuse_ms: float
    extrapolate_ms: float | None = None


def step_densities(densities: list[float], dense_steps: int):
    """`density(block, step)`: the block's density, 1.0 in the first `dense_steps` steps.

    Example:
        >>> f = step_densities([0.1, 0.2], dense_steps=1)
        >>> f(1, 0), f(1, 3)
        (1.0, 0.2)
    """
    return lambda b, s: 1.0 if s < dense_steps else densities[b]


def configs_used(plan, density) -> set:
    """Every (density, merge ratio) a block runs with under `plan` (computed steps only).

    Example:
        >>> from sparsify.generation import StepPlan
        >>> sorted(configs_used(StepPlan("M", 2, 2, (True, False)), lambda b, s: 0.1 * (b + 1)))
        [(0.1, 0.0), (0.2, 0.0)]
    """
    return {(density(b, s), plan.ratio(b, s)) for s in range(plan.steps) if plan.compute[s] for b in range(plan.blocks)}


def compose(plan, density, comp: Components, calls: int = CALLS) -> float:
    """Predicted DiT ms of one generation of `plan` (a plan for this many blocks and steps) from measured parts.

    A computed step: `calls x (outside + sum over blocks of block_ms[density, ratio])` (the sparsified model's
    outside time unless every block is dense); a reused step: `calls x reuse_ms` (`calls x extrapolate_ms` where
    the plan's order is 1).

    Example:
        >>> from sparsify.generation import StepPlan
        >>> c = Components(2.0, 3.0, {(1.0, 0.0): 10.0, (0.1, 0.0): 4.0}, reuse_ms=1.0)
        >>> compose(StepPlan("M", 2, 3, (True, False, True)), lambda b, s: 0.1, c)
        46.0
    """
    total = 0.0
    for s in range(plan.steps):
        if not plan.compute[s]:
            if plan.order[s] and comp.extrapolate_ms is None:
                raise ValueError(f"step {s} extrapolates (order 1) but no extrapolating reused step was measured")
            total += calls * (comp.extrapolate_ms if plan.order[s] else comp.reuse_ms)
            continue
        d = [density(b, s) for b in range(plan.blocks)]
        outside = comp.outside_dense_ms if all(x >= 1.0 for x in d) else comp.outside_sparse_ms
        total += calls * (outside + sum(comp.block_ms[(d[b], plan.ratio(b, s))] for b in range(plan.blocks)))
    return total


class CallTimer:
    """Per transformer call: its time, each block's time and whether the last block's self-attention computed.

    CUDA events on a GPU (no synchronisation inside the call), `time.perf_counter` on the CPU.
    """

    def __init__(self, model, device):
        self.cuda = device.type == "cuda"
        self.calls: list = []
        blocks = model.blocks
        self._hooks = [model.register_forward_pre_hook(lambda *_: self._start(), prepend=True),
                       model.register_forward_hook(lambda *_: self._mark("end"))]
        for i, blk in enumerate(blocks):
            self._hooks += [blk.register_forward_pre_hook(lambda *_, i=i: self._mark(("pre", i)), prepend=True),
                            blk.register_forward_hook(lambda *_, i=i: self._mark(("post", i)))]
        for lin in (m for m in blocks[-1].attn1.modules() if isinstance(m, torch.nn.Linear)):
            self._hooks.append(lin.register_forward_pre_hook(lambda *_: self._computed()))

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _start(self):
        self.calls.append({"marks": [("start", self._now())], "computed": False})

    def _mark(self, tag):
        if self.calls:
            self.calls[-1]["marks"].append((tag, self._now()))

    def _computed(self):
        if self.calls:
            self.calls[-1]["computed"] = True

    def remove(self):
        for h in self._hooks:
            h.remove()

    def results(self, n_blocks: int) -> list[dict]:
        """`[{total_ms, blocks_ms, computed}]` per call (synchronises once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for c in self.calls:
            t0 = c["marks"][0][1]
            at = {tag: (t0.elapsed_time(t) if self.cuda else (t - t0) * 1e3) for tag, t in c["marks"]}
            out.append({"total_ms": at.get("end", math.nan), "computed": c["computed"],
                        "blocks_ms": [at[("post", i)] - at[("pre", i)] for i in range(n_blocks)]})
        return out


def call_at_depth(call: dict, blocks: int) -> float:
    """A measured call's time at `blocks` blocks: outside + first block + middle blocks' mean x (blocks - 2) + last.

    Example:
        >>> call_at_depth({"total_ms": 10.0, "blocks_ms": [3.0, 1.0, 2.0]}, 40)
        47.0
    """
    b = call["blocks_ms"]
    outside = call["total_ms"] - sum(b)
    if len(b) == 1:
        return outside + blocks * b[0]
    mid = statistics.fmean(b[1:-1]) if len(b) > 2 else b[-1]
    return outside + b[0] + (blocks - 2) * mid + b[-1]


def _cut_recipe(recipe, densities: list[float], plan=None) -> dict:
    """The attention recipe (and plan) for the cut model: one density per block, the source recipe's method,
    tile and `dense_steps`; no mask reuse (components select afresh)."""
    d = recipe.defaults
    out = {"version": 2 if plan is not None else 1,
           "defaults": {"method": d.method, "tile": list(d.tile), "budget": {"density": 1.0},
                        "dense_steps": d.dense_steps},
           "sites": {f"blocks.{b}.attn1": ({"enable": False} if x >= 1.0 else {"density": x})
                     for b, x in enumerate(densities)}}
    if plan is not None:
        out["plan"] = plan.to_dict()
    return out


def _uniform_recipe(recipe, density: float) -> dict:
    d = recipe.defaults
    return {"version": 1, "defaults": {"method": d.method, "tile": list(d.tile), "budget": {"density": density}}}


def measure_components(model, make_inputs, needed: set, recipe, tile, device, reps: int,
                       extrapolate: bool = False) -> Components:
    """Time the cut model's parts for every (density, ratio) in `needed` (see the module docstring), and with
    `extrapolate` a reused step of order 1 too."""
    from benchmarks.e2e import _block_inputs, _cudnn, timed
    from sparsify import sparsify, unsparsify
    from sparsify.adapters import adapter_for
    from sparsify.generation import StepPlan, merge_blocks

    n = len(model.blocks)
    block_ms, outside = {}, {}

    def fwd(inputs):
        with torch.no_grad(), _cudnn(device):
            return model(**inputs)

    for d in sorted({d for d, _ in needed} | {1.0}, reverse=True):
        if d < 1.0:
            sparsify(model, _uniform_recipe(recipe, d))
        try:
            t_fwd = timed(fwd, lambda: (make_inputs(),), device, reps)
            inputs = make_inputs()
            with torch.no_grad(), _cudnn(device):
                bargs, bkw = _block_inputs(model, inputs)
                for r in sorted({r for x, r in needed if x == d} | {0.0}):
                    merging = merge_blocks(model, {0: r}, tile=tile) if r > 0 else None
                    if merging is not None:  # the block runs alone, outside a forward of the model
                        merging.set_geometry(adapter_for(model).geometry(model, (), inputs))
                    try:
                        block_ms[(d, r)] = timed(lambda: model.blocks[0](*bargs, **bkw), tuple, device, reps)
                    finally:
                        if merging is not None:
                            merging.remove()
            outside[d] = t_fwd - n * block_ms[(d, 0.0)]
        finally:
            if d < 1.0:
                unsparsify(model)
    sparse = [v for d, v in outside.items() if d < 1.0]
    cls = type(model).__name__
    reuse = _reuse_ms(model, make_inputs, recipe, device, reps, StepPlan(cls, n, 2, (True, False)))
    extra = (_reuse_ms(model, make_inputs, recipe, device, reps, StepPlan(cls, n, 3, (True, True, False), order=(0, 0, 1)))
             if extrapolate else None)
    return Components(outside[1.0], statistics.median(sparse) if sparse else outside[1.0], block_ms, reuse, extra)


def _reuse_ms(model, make_inputs, recipe, device, reps, plan) -> float:
    """The last step of `plan` (computed steps, then one reused) as `PlanRunner` runs it, one guidance branch."""
    from benchmarks.e2e import _cudnn, timed
    from sparsify import runtime, sparsify, unsparsify

    sparsify(model, _cut_recipe(recipe, [1.0] * plan.blocks, plan))
    try:
        runtime.new_generation()
        inputs = make_inputs()

        last = plan.steps - 1

        def call(step):
            with torch.no_grad(), _cudnn(device), model.cache_context("cond", step_index=step,
                                                                      num_inference_steps=plan.steps):
                model(**{**inputs, "timestep": torch.tensor([900.0 - 100 * step], device=device)})

        for s in range(last):
            call(s)
        t = timed(lambda: call(last), tuple, device, reps)
        if _attn_ran(model, lambda: call(last)):
            raise RuntimeError("the reused step ran the last block's attention: PlanRunner did not reuse")
    finally:
        unsparsify(model)
    return t


def _attn_ran(model, fn) -> bool:
    hit = []
    hooks = [m.register_forward_pre_hook(lambda *_: hit.append(1)) for m in model.blocks[-1].attn1.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return bool(hit)


def _hook_config(name: str, steps: int):
    """The diffusers cache config of `name`, set to compute every other step (see the module docstring)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "fbc":
        return FirstBlockCacheConfig(threshold=-1.0)  # switched per step by the generation's callback
    if name == "mag":
        return MagCacheConfig(threshold=1.0, max_skip_steps=1, retention_ratio=1.0 / steps,
                              num_inference_steps=steps, mag_ratios=[1.0] * steps)
    if name == "taylorseer":
        # diffusers' default patterns (`^blocks.*attn`, full match) hook no module of Wan: name its attention and FFN
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                     cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"])
    raise SystemExit(f"--hooks: unknown cache hook '{name}'; valid: {', '.join(HOOKS)}")


def _fbc_script(model):
    """A `callback_on_step_end` making First Block Cache compute the even steps and skip the odd ones."""
    def cb(pipe, i, t, kwargs):
        leader = model.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        leader.threshold = -1.0 if (i + 1) % 2 == 0 else float("inf")
        return {}
    return cb


def _timed_generation(model, generate, device, callback=None) -> tuple[list, float | None]:
    """One warm-up generation, then one timed: per-call records (CallTimer) and peak GPU memory (GiB)."""
    generate(callback)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = CallTimer(model, device)
    try:
        generate(callback)
        calls = timer.results(len(model.blocks))
    finally:
        timer.remove()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return calls, peak


def per_generation_plan(cfg, grid, plan_recipe, *, steps: int, blocks: int, validate_steps: int, hooks, device, dtype,
                        reps: int, tiny: bool = False, model_blocks: int = 40) -> dict:
    """Dense, attention-only, the plan and each cache hook: composed `model_blocks`-block rows and the validation."""
    from benchmarks._common import build_wan
    from sparsify import sparsify, unsparsify
    from sparsify.generation import StepPlan

    plan = plan_recipe.plan
    n = blocks
    model = build_wan(cfg, num_layers=n, device=device).to(dtype)
    cls = type(model).__name__
    plan = dataclasses.replace(plan, model=cls)
    tile = plan.tile or plan_recipe.defaults.tile
    dens_src = block_densities(plan_recipe, plan.blocks)
    dense_steps = plan_recipe.defaults.dense_steps

    def densities(depth):
        return [dens_src[(b * plan.blocks) // depth] for b in range(depth)]

    full, cut = plan.mapped(model_blocks, steps), plan.mapped(n, validate_steps)
    rows_full = {"dense (cuDNN)": (StepPlan(cls, model_blocks, steps, (True,) * steps), lambda b, s: 1.0),
                 "attention only": (StepPlan(cls, model_blocks, steps, (True,) * steps),
                                    step_densities(densities(model_blocks), dense_steps)),
                 "unified plan": (full, step_densities(densities(model_blocks), dense_steps))}
    rows_cut = {"dense (cuDNN)": (StepPlan(cls, n, validate_steps, (True,) * validate_steps), lambda b, s: 1.0),
                "attention only": (StepPlan(cls, n, validate_steps, (True,) * validate_steps),
                                   step_densities(densities(n), dense_steps)),
                "unified plan": (cut, step_densities(densities(n), dense_steps))}
    needed = set().union(*(configs_used(p, d) for p, d in (*rows_full.values(), *rows_cut.values())))
    T, H, W = grid
    p = cfg["patch_size"]
    text_len = 8 if tiny else 512

    def make_inputs():
        return dict(hidden_states=torch.randn(1, cfg["in_channels"], T * p[0], H * p[1], W * p[2], device=device,
                                              dtype=dtype),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype),
                    return_dict=False)

    comp = measure_components(model, make_inputs, needed, plan_recipe, tile, device, reps,
                              extrapolate=any(full.order) or any(cut.order))
    rows = [dict(label=k, composed_ms=compose(pl, d, comp), computed_steps=sum(pl.compute))
            for k, (pl, d) in rows_full.items()]
    dense_ms = rows[0]["composed_ms"]
    plan_ms = rows[2]["composed_ms"]

    from benchmarks.e2e import wan_generation

    generate = wan_generation(model, cfg, grid, validate_steps, device, dtype, tiny)
    validation = []
    for label, (pl, d) in rows_cut.items():
        recipe = None if label.startswith("dense") else _cut_recipe(
            plan_recipe, densities(n), pl if label == "unified plan" else None)
        if recipe is not None:
            sparsify(model, recipe)
        try:
            calls, peak = _timed_generation(model, generate, device)
        finally:
            if recipe is not None:
                unsparsify(model)
        measured = sum(c["total_ms"] for c in calls)
        predicted = compose(pl, d, comp)
        validation.append(dict(label=label, measured_ms=measured, composed_ms=predicted,
                               measured_over_composed=measured / predicted, calls=len(calls), peak_gib=peak))
    hook_rows = []
    for name in hooks:
        sparsify(model, _cut_recipe(plan_recipe, densities(n)))
        model.enable_cache(_hook_config(name, validate_steps))
        try:
            calls, peak = _timed_generation(model, generate, device, _fbc_script(model) if name == "fbc" else None)
        finally:
            model.disable_cache()
            unsparsify(model)
        on = [call_at_depth(c, model_blocks) for c in calls if c["computed"]]
        off = [call_at_depth(c, model_blocks) for c in calls if not c["computed"]]
        row = dict(label=f"attention + {name}", computed_calls=len(on), skipped_calls=len(off),
                   computed_call_ms=statistics.median(on) if on else None,
                   skipped_call_ms=statistics.median(off) if off else None, peak_gib=peak,
                   cut_measured_ms=sum(c["total_ms"] for c in calls))
        k_plan = sum(full.compute)
        if on and off:
            cost = lambda k: CALLS * (k * row["computed_call_ms"] + (steps - k) * row["skipped_call_ms"])  # noqa: E731
            row["computed_steps"], row["composed_ms"] = k_plan, cost(k_plan)
            fits = [k for k in range(1, steps + 1) if cost(k) <= plan_ms]
            row["k_at_plan_time"] = max(fits) if fits else None
        else:
            row["computed_steps"], row["composed_ms"], row["k_at_plan_time"] = k_plan, None, None
        hook_rows.append(row)
    for r in rows + hook_rows:
        r["speedup"] = dense_ms / r["composed_ms"] if r.get("composed_ms") else None
    peaks = {v["label"]: v["peak_gib"] for v in validation}
    mem = mem40 = None
    if peaks["dense (cuDNN)"]:
        # the full model holds (model_blocks - n) more blocks' weights in both runs; activations are per block
        extra = (model_blocks - n) * sum(x.numel() * x.element_size() for x in model.blocks[0].parameters()) / 2**30
        mem = peaks["unified plan"] / peaks["dense (cuDNN)"]
        mem40 = (peaks["unified plan"] + extra) / (peaks["dense (cuDNN)"] + extra)
    model = None
    return dict(tokens=T * H * W, grid=list(grid), steps=steps, blocks_composed=model_blocks, blocks_measured=n,
                validate_steps=validate_steps, cfg_calls_per_step=CALLS, source_plan=plan.to_dict(),
                plan_composed=full.to_dict(), block_densities=dens_src,
                components=dict(outside_dense_ms=comp.outside_dense_ms, outside_sparse_ms=comp.outside_sparse_ms,
                                reuse_ms=comp.reuse_ms, extrapolate_ms=comp.extrapolate_ms,
                                block_ms=[dict(density=d, ratio=r, ms=v) for (d, r), v in sorted(comp.block_ms.items())]),
                rows=rows, hooks=hook_rows, validation=validation, peak_plan_over_dense=mem,
                peak_plan_over_dense_full_depth=mem40)


def tiny_plan_recipe():
    """A test-bed-like v2 recipe built in code for `--tiny`: 4 blocks, 8 steps, reuse (once extrapolated), one merge
    range, two densities.

    Example:
        >>> tiny_plan_recipe().plan.steps
        8
    """
    from sparsify import load_recipe

    return load_recipe({"version": 2, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 0.5}},
                        "sites": {"blocks.0.attn1": {"enable": False}},
                        "plan": {"model": {"class": "TestbedDiT", "blocks": 4}, "steps": 8,
                                 "compute": [True, True, False, True, True, False, True, True],
                                 "order": [0, 0, 0, 0, 0, 1, 0, 0],
                                 "merge": [{"blocks": [2, 3], "from_step": 2, "to_step": 6, "ratio": 0.25}]}})


def print_generation_plan(part: dict) -> None:
    print(f"\nPer generation, Wan-14B config composed at {part['blocks_composed']} blocks from {part['blocks_measured']} "
          f"measured, grid {part['grid']} ({part['tokens']} tokens), {part['steps']} steps x "
          f"{part['cfg_calls_per_step']} CFG calls; DiT time only")
    print(f"{'variant':<26}{'DiT ms':>12}{'x dense':>9}{'computed':>10}{'K at plan time':>16}")
    for r in part["rows"] + part["hooks"]:
        ms = f"{r['composed_ms']:.1f}" if r.get("composed_ms") is not None else "-"
        x = f"{r['speedup']:.2f}" if r.get("speedup") else "-"
        k = r.get("k_at_plan_time")
        print(f"{r['label']:<26}{ms:>12}{x:>9}{r['computed_steps']:>10}{'-' if k is None else k:>16}")
    print(f"\nValidation: {part['blocks_measured']} blocks, {part['validate_steps']} steps, real WanPipeline generations")
    print(f"{'variant':<26}{'measured ms':>13}{'composed ms':>13}{'ratio':>8}{'peak GiB':>10}")
    for v in part["validation"]:
        peak = f"{v['peak_gib']:.2f}" if v["peak_gib"] is not None else "-"
        print(f"{v['label']:<26}{v['measured_ms']:>13.1f}{v['composed_ms']:>13.1f}{v['measured_over_composed']:>8.3f}"
              f"{peak:>10}")
    mem = part["peak_plan_over_dense"]
    mem40 = part["peak_plan_over_dense_full_depth"]
    print(f"peak memory, unified plan / dense: {'-' if mem is None else f'{mem:.3f}'} measured, "
          f"{'-' if mem40 is None else f'{mem40:.3f}'} with the full depth's weights")


def load_plan_recipe(path):
    """The v2 recipe of `--plan` (SystemExit naming the file where it has no plan)."""
    from sparsify import load_recipe

    r = load_recipe(path)
    if r.plan is None:
        raise SystemExit(f"--plan: {path} has no generation plan (a version-2 recipe from "
                         "python -m sparsify.calibrate --time-budget ...)")
    return r
