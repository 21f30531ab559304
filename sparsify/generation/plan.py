"""The generation plan of a recipe (schema v2): per step compute or reuse, per block and step range a merge ratio."""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import torch

from ..errors import RecipeError, SparsifyWarning
from ..runtime.state import STATE, call_slot, timestep_value


@dataclass(frozen=True)
class MergeRange:
    """Merge `ratio` of each tile's tokens around blocks `blocks` at plan steps `[from_step, to_step)`.

    Example:
        >>> MergeRange(blocks=(10, 11), from_step=5, to_step=40, ratio=0.25).covers(11, 5)
        True
    """

    blocks: tuple[int, ...]
    from_step: int
    to_step: int
    ratio: float

    def covers(self, block: int, step: int) -> bool:
        return block in self.blocks and self.from_step <= step < self.to_step


@dataclass(frozen=True)
class StepPlan:
    """Which denoising steps run the transformer and how many tokens each block sees, for one model.

    `compute[i]` False reuses step i: the transformer's blocks are skipped and a residual (blocks' output
    minus input, per guidance branch) is added to the input. With `order[i]` 0 that is the last computed
    step's residual; with 1 it is extrapolated linearly in the timestep from the last two computed steps'
    residuals (`extrapolation_weight`). Attention densities stay in the recipe's `defaults`, `rules` and
    `sites`. A schedule of another length is mapped by step fraction (`plan_step`).

    Example:
        >>> p = StepPlan(model="WanTransformer3DModel", blocks=2, steps=4, compute=(True, True, False, True),
        ...              order=(0, 0, 1, 0))
        >>> [p.plan_step(i, 8) for i in range(8)], p.computes(5, 8), p.extrapolates(5, 8)
        ([0, 0, 1, 1, 2, 2, 3, 3], False, True)
    """

    model: str
    blocks: int
    steps: int
    compute: tuple[bool, ...]
    merge: tuple[MergeRange, ...] = ()
    tile: tuple[int, int, int] | None = None  # merging tile; None: the recipe's default tile
    order: tuple[int, ...] = ()  # per step 0 or 1 (1 only on reused steps); empty: all 0

    def __post_init__(self):
        order = tuple(int(o) for o in self.order) if self.order else (0,) * len(self.compute)
        if len(order) != len(self.compute) or any(o not in (0, 1) for o in order):
            raise ValueError(f"StepPlan: order must hold one 0 or 1 per step ({len(self.compute)}); got {self.order!r}")
        if any(o and c for o, c in zip(order, self.compute)):
            raise ValueError(f"StepPlan: order 1 is for reused steps only; got order {order} with compute "
                             f"{self.compute}")
        object.__setattr__(self, "order", order)

    def plan_step(self, step: int, num_steps: int | None) -> int:
        """The plan step of denoising step `step` of a `num_steps` schedule (same fraction of the schedule)."""
        if num_steps is None or num_steps == self.steps:
            return min(step, self.steps - 1)
        return min(self.steps - 1, (step * self.steps) // max(num_steps, 1))

    def computes(self, step: int, num_steps: int | None = None) -> bool:
        return self.compute[self.plan_step(step, num_steps)]

    def extrapolates(self, step: int, num_steps: int | None = None) -> bool:
        """Whether denoising step `step` of a `num_steps` schedule reuses with order 1 (extrapolates)."""
        return self.order[self.plan_step(step, num_steps)] == 1

    def ratio(self, block: int, step: int, num_steps: int | None = None) -> float:
        """The merge ratio of `block` at denoising step `step` (the first range that covers it; 0 if none)."""
        s = self.plan_step(step, num_steps)
        return next((m.ratio for m in self.merge if m.covers(block, s)), 0.0)

    @property
    def is_trivial(self) -> bool:
        """Every step computed, nothing merged: the recipe runs exactly as its attention-only part."""
        return all(self.compute) and all(m.ratio == 0 for m in self.merge)

    def mapped(self, blocks: int, steps: int) -> "StepPlan":
        """This plan for a deeper or shallower model of the same family and another schedule length.

        Step `i` of `steps` takes plan step `floor(i * self.steps / steps)` (as `plan_step` does at run time) and
        block `b` of `blocks` takes plan block `floor(b * self.blocks / blocks)`: same fraction of the schedule and
        of the depth. `order` is mapped as `compute` is (a reused step takes its plan step's order). Merge ranges
        keep their order (the first range covering a block and step still wins); a range no block or step maps
        to is dropped.

        Example:
            >>> p = StepPlan("WanTransformer3DModel", 4, 4, (True, True, False, True),
            ...              (MergeRange((2, 3), 1, 3, 0.25),), order=(0, 0, 1, 0))
            >>> q = p.mapped(blocks=8, steps=8)
            >>> q.compute, q.order, q.merge
            ((True, True, True, True, False, False, True, True), (0, 0, 0, 0, 1, 1, 0, 0), (MergeRange(blocks=(4, 5, 6, 7), from_step=2, to_step=6, ratio=0.25),))
        """
        if blocks < 1 or steps < 1:
            raise ValueError(f"StepPlan.mapped: blocks and steps must be >= 1; got blocks={blocks}, steps={steps}")
        compute = tuple(self.compute[self.plan_step(i, steps)] for i in range(steps))
        order = tuple(0 if c else self.order[self.plan_step(i, steps)] for i, c in enumerate(compute))
        merge = []
        for m in self.merge:
            bl = tuple(b for b in range(blocks) if (b * self.blocks) // blocks in m.blocks)
            lo, hi = -(-m.from_step * steps // self.steps), -(-m.to_step * steps // self.steps)  # ceil
            if bl and lo < hi:
                merge.append(MergeRange(bl, lo, hi, m.ratio))
        return StepPlan(self.model, blocks, steps, compute, tuple(merge), self.tile, order)

    def check_model(self, model_cls: str, blocks: int, where: str) -> None:
        """Raise RecipeError unless the plan was made for a model of class `model_cls` with `blocks` blocks."""
        if self.model != model_cls:
            raise RecipeError(f"the plan is for model class '{self.model}' but the model is '{model_cls}'; a plan "
                              "is calibrated for one model: recalibrate it for this one", source=where,
                              key="plan.model.class")
        if self.blocks != blocks:
            raise RecipeError(f"the plan is for a {self.model} with {self.blocks} blocks but this one has {blocks}",
                              source=where, key="plan.model.blocks")

    def to_dict(self) -> dict:
        out = {"model": {"class": self.model, "blocks": self.blocks}, "steps": self.steps,
               "compute": list(self.compute)}
        if self.merge:
            out["merge"] = [{"blocks": list(m.blocks), "from_step": m.from_step, "to_step": m.to_step,
                             "ratio": m.ratio} for m in self.merge]
        if self.tile is not None:
            out["tile"] = list(self.tile)
        if any(self.order):
            out["order"] = list(self.order)
        return out


def plan_from_dict(raw, key: str = "plan") -> StepPlan:
    """Validate the `plan` mapping of a version-2 recipe (RecipeError naming the key path of a problem).

    Example:
        >>> plan_from_dict({"model": {"class": "WanTransformer3DModel", "blocks": 2}, "steps": 3,
        ...                 "compute": [True, False, True]}).compute
        (True, False, True)
    """
    from ..recipe import _expect_map, _fail, _in_range, _int, check_tile

    raw = _expect_map(raw, key, {"model", "steps", "compute", "order", "merge", "tile"},
                      required=("model", "steps", "compute"))
    m = _expect_map(raw["model"], f"{key}.model", {"class", "blocks"}, required=("class", "blocks"))
    if not isinstance(m["class"], str) or not m["class"]:
        _fail(f"{key}.model.class", f"must be the model's class name; got {m['class']!r}")
    blocks = _int(m["blocks"], f"{key}.model.blocks", 1)
    steps = _int(raw["steps"], f"{key}.steps", 1)
    compute = raw["compute"]
    if not isinstance(compute, list) or len(compute) != steps or not all(isinstance(c, bool) for c in compute):
        _fail(f"{key}.compute", f"must be a list of {steps} booleans (one per step: true computes, false reuses "
                                f"the last computed step); got {compute!r}")
    if not compute[0]:
        _fail(f"{key}.compute[0]", "step 0 must compute: there is no earlier step to reuse")
    order = raw.get("order", [0] * steps)
    if not isinstance(order, list) or len(order) != steps:
        _fail(f"{key}.order", f"must be a list of {steps} entries, 0 or 1 (one per step: on a reused step 0 adds the "
                              f"last computed step's residual, 1 extrapolates it from the last two); got {order!r}")
    for i, o in enumerate(order):
        if not isinstance(o, numbers.Integral) or isinstance(o, bool) or o not in (0, 1):
            _fail(f"{key}.order[{i}]", f"must be 0 (reuse the last computed residual) or 1 (extrapolate from the "
                                       f"last two); got {o!r}")
        if o == 1 and compute[i]:
            _fail(f"{key}.order[{i}]", f"must be 0: step {i} computes ({key}.compute[{i}] is true) and order 1 "
                                       "applies to reused steps only")
    merges = []
    raw_merge = raw.get("merge", [])
    if not isinstance(raw_merge, list):
        _fail(f"{key}.merge", "must be a list of {blocks, from_step, to_step, ratio} ranges")
    for i, e in enumerate(raw_merge):
        k = f"{key}.merge[{i}]"
        e = _expect_map(e, k, {"blocks", "from_step", "to_step", "ratio"}, required=("blocks", "ratio"))
        bl = e["blocks"]
        if not isinstance(bl, list) or not bl:
            _fail(f"{k}.blocks", f"must be a non-empty list of block indices; got {bl!r}")
        bl = tuple(_int(b, f"{k}.blocks[{j}]", 0) for j, b in enumerate(bl))
        for j, b in enumerate(bl):
            if b >= blocks:
                _fail(f"{k}.blocks[{j}]", f"block {b} does not exist: the plan's model has {blocks} blocks "
                                          f"(0..{blocks - 1})")
        lo = _int(e.get("from_step", 0), f"{k}.from_step", 0)
        hi = _int(e.get("to_step", steps), f"{k}.to_step", lo + 1)
        if hi > steps:
            _fail(f"{k}.to_step", f"must be at most the plan's {steps} steps; got {hi}")
        if not _in_range(e["ratio"], 0.0, 0.5, False):
            _fail(f"{k}.ratio", f"must be a number in [0, 0.5] (the fraction of each tile's tokens merged); "
                                f"got {e['ratio']!r}")
        merges.append(MergeRange(bl, lo, hi, float(e["ratio"])))
    tile = check_tile(raw["tile"], f"{key}.tile") if "tile" in raw else None
    return StepPlan(m["class"], blocks, steps, tuple(compute), tuple(merges), tile, tuple(int(o) for o in order))


def extrapolation_weight(t: float | None, t1: float | None, t2: float | None) -> float | None:
    """The weight `w` of first-order reuse at timestep `t` from residuals `r1`, `r2` computed at `t1`, `t2`.

    The residual reused is `r2 + w * (r2 - r1)` with `w = (t - t2) / (t2 - t1)`: the line through both residuals,
    read at `t`. None (reuse `r2` as it is) where a timestep is unknown or `t1 == t2`.

    Example:
        >>> extrapolation_weight(600.0, 900.0, 800.0), extrapolation_weight(600.0, 800.0, 800.0)
        (2.0, None)
    """
    if t is None or t1 is None or t2 is None or t1 == t2:
        return None
    return (t - t2) / (t2 - t1)


def extrapolate(r1: torch.Tensor | None, r2: torch.Tensor, w: float | None) -> torch.Tensor:
    """`r2 + w * (r2 - r1)` (one new tensor), or `r2` itself where `w` or `r1` is None.

    Example:
        >>> extrapolate(torch.tensor([1.0]), torch.tensor([3.0]), 0.5), extrapolate(None, torch.tensor([3.0]), 0.5)
        (tensor([4.]), tensor([3.]))
    """
    if w is None or r1 is None:
        return r2
    return torch.lerp(r2, r1, -w)  # r2 + (-w) * (r1 - r2)


_HOOK_CLS = None


def _hook_classes():
    """The diffusers `ModelHook` subclasses of the plan: `(ReuseHook, ContextHook)` (built on first use)."""
    global _HOOK_CLS
    if _HOOK_CLS is None:
        from diffusers.hooks import ModelHook

        class ReuseHook(ModelHook):
            """Runs the block, or on a reused step passes the input through (the head block adds the residual
            `PlanRunner._before` chose for this call: the last computed one, or its extrapolation)."""

            def __init__(self, runner, head: bool):
                super().__init__()
                self.runner, self.head = runner, head

            def new_forward(self, module, *args, **kwargs):
                run = self.runner
                if run.compute_now:
                    return self.fn_ref.original_forward(*args, **kwargs)
                x = args[0] if args else kwargs["hidden_states"]
                return x + extrapolate(*run.reuse) if self.head else x

        class ContextHook(ModelHook):
            """A stateful no-op hook on the model: through its state manager the pipeline's `cache_context`
            (guidance branch, step index, number of steps) reaches the plan even with no step cache enabled."""

            _is_stateful = True

            def __init__(self):
                from diffusers.hooks.hooks import BaseState, StateManager

                super().__init__()
                self.state_manager = StateManager(BaseState)

            def reset_state(self, module):
                self.state_manager.set_context(None)
                return module

        _HOOK_CLS = (ReuseHook, ContextHook)
    return _HOOK_CLS


HOOK_NAME = "sparsify_plan_reuse"
CONTEXT_HOOK_NAME = "sparsify_plan_context"


class PlanRunner:
    """Runs a StepPlan on a diffusers Wan transformer: step reuse through block hooks, merging through
    `BlockMerger`s whose ratio is set per step. `sparsify()` installs it for a recipe with a plan.

    Per call slot (guidance branch) it keeps the residuals of the last computed steps with their timesteps
    (`residual[slot]`: `[(t, r), ...]`, oldest first): two when the plan has an order-1 step, else one.

    Example:
        >>> # runner = PlanRunner(model, recipe.plan, tile=(4, 4, 4), where="plan.yaml"); ...; runner.remove()
    """

    def __init__(self, model: torch.nn.Module, plan: StepPlan, tile, where: str = "<Recipe>"):
        from diffusers.hooks import HookRegistry

        from .merge import BlockMerger

        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise RecipeError(f"the plan needs a model with a ModuleList `blocks`; {type(model).__name__} has none",
                              source=where, key="plan")
        plan.check_model(type(model).__name__, len(blocks), where)
        self.plan, self.model, self.where = plan, model, where
        self.compute_now, self.slot, self.t = True, None, None
        self.residual: dict = {}
        self.keep = 2 if any(plan.order) else 1
        self.reuse = (None, None, None)  # (r1, r2, w) of this reused call: `extrapolate(r1, r2, w)`
        self.head_in: dict = {}
        self.warned: set = set()
        self._calls = (None, None, 0)  # (generation, step, calls so far) for unnamed CFG calls
        self.registries, self._hooks = [], []
        self._created = [m for m in (model, *blocks) if not hasattr(m, "_diffusers_hook")]  # registries we add
        merged = sorted({b for m in plan.merge if m.ratio > 0 for b in m.blocks})
        self.mergers = {b: BlockMerger(blocks[b], 0.0, plan.tile or tile) for b in merged}
        if not all(plan.compute):
            for i, block in enumerate(blocks):
                reg = HookRegistry.check_if_exists_or_initialize(block)
                reg.register_hook(_hook_classes()[0](self, head=i == 0), HOOK_NAME)
                self.registries.append(reg)
            # the residual is taken around the whole stack, outside any token merging of the first/last block
            self._hooks += [blocks[0].register_forward_pre_hook(self._record_in, prepend=True),
                            blocks[-1].register_forward_hook(self._record_out)]
        self._hooks.append(model.register_forward_pre_hook(self._before, with_kwargs=True))
        self.root = HookRegistry.check_if_exists_or_initialize(model)
        self.root.register_hook(_hook_classes()[1](), CONTEXT_HOOK_NAME)

    def _record_in(self, block, args):
        if self.compute_now:
            self.head_in[self.slot] = args[0]

    def _record_out(self, block, args, output):
        if self.compute_now and self.slot in self.head_in:
            kept = self.residual.setdefault(self.slot, [])
            del kept[:max(0, len(kept) - self.keep + 1)]  # drop the oldest first: its memory can hold the new one
            kept.append((self.t, (output - self.head_in.pop(self.slot)).detach()))

    def _before(self, model, args, kwargs):
        """Per forward (after sparsify's step hook): this step's compute flag, call slot, timestep and merge ratios,
        and on a reused step the residual the head block adds (extrapolated where the plan's order is 1 and two
        computed residuals are kept; else the last one)."""
        from .merge import forward_geometry
        from .steps import cache_context

        ctx = cache_context(model)
        num = getattr(ctx, "num_inference_steps", None)
        step = STATE.steps.step
        if num is not None and num != self.plan.steps and num not in self.warned:
            self.warned.add(num)
            warnings.warn(f"sparsify: {self.where}: key 'plan.steps': the plan was made for {self.plan.steps} steps "
                          f"and this schedule has {num}: its steps are mapped by fraction of the schedule",
                          SparsifyWarning, stacklevel=2)
        gen = STATE.steps.generation
        g, s, c = self._calls
        c = c + 1 if (g, s) == (gen, step) else 0
        self._calls = (gen, step, c)
        self.slot = call_slot(c)
        self.t = timestep_value(STATE.timestep) if STATE.timestep is not None else None
        if step == 0:
            self.residual.pop(self.slot, None)
        kept = self.residual.get(self.slot)
        self.compute_now = self.plan.computes(step, num) or not kept
        self.reuse = (None, None, None)
        if not self.compute_now:
            (t2, r2), w, r1 = kept[-1], None, None
            if self.plan.extrapolates(step, num) and len(kept) == 2:
                t1, r1 = kept[0]
                w = extrapolation_weight(self.t, t1, t2)
            self.reuse = (r1, r2, w)
        geometry = forward_geometry(model, args, kwargs) if self.mergers else None
        for b, mg in self.mergers.items():  # a reused step runs no block: nothing to merge
            ratio = self.plan.ratio(b, step, num) if self.compute_now else 0.0
            mg.r = int(ratio * mg.tile[0] * mg.tile[1] * mg.tile[2])
            mg.geometry = geometry
        return None

    def remove(self) -> None:
        """Undo the plan: hooks and mergers removed; the model computes what it computed before."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.root.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
        for reg in self.registries:
            reg.remove_hook(HOOK_NAME, recurse=False)
        self.registries.clear()
        for mg in self.mergers.values():
            mg.remove()
        self.mergers.clear()
        self.residual.clear()
        self.reuse = (None, None, None)
        for mod in (self.model, *self.model.blocks):  # diffusers leaves the bound class forward behind
            fwd = mod.__dict__.get("forward")
            if getattr(fwd, "__func__", None) is type(mod).forward and getattr(fwd, "__self__", None) is mod:
                del mod.__dict__["forward"]
        for mod in self._created:
            reg = mod.__dict__.get("_diffusers_hook")
            if reg is not None and not reg.hooks:
                del mod.__dict__["_diffusers_hook"]
        self._created.clear()
