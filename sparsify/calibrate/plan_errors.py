"""Plan options measured on the model's own dense sampling trajectory: step-reuse and token-merging errors, attention entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Trajectory:
    """The dense Euler trajectory of one sample with classifier-free guidance (`sparsify.testbed.sample`).

    Attributes:
        calls: per step, the forward kwargs of each denoiser call (conditional first, then unconditional).
        outputs: per step and call, the dense model output (fp32).
        residuals: `{(step, call): last block's output - first block's input}` for the steps kept.
        guidance_scale: the CFG scale (1.0: one call per step).
    """

    calls: list[list[dict]]
    outputs: list[list[torch.Tensor]]
    residuals: dict = field(default_factory=dict)
    guidance_scale: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.calls)

    @property
    def calls_per_step(self) -> int:
        return len(self.calls[0])

    def timestep(self, step: int) -> float:
        """The timestep value the model saw at step `step` (its first call's `timestep`, first element)."""
        t = self.calls[step][0]["timestep"]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def run(self, model, step: int) -> list[torch.Tensor]:
        """The model's outputs on step `step`'s inputs (fp32), one per call."""
        return [_first(model(**kw)).float() for kw in self.calls[step]]

    def error(self, outs: list[torch.Tensor], step: int) -> float:
        """Relative squared error of `outs` against the dense outputs of step `step` (summed over the calls)."""
        ref = self.outputs[step]
        num = sum(float(((o - r) ** 2).sum()) for o, r in zip(outs, ref))
        return num / max(sum(float((r ** 2).sum()) for r in ref), 1e-30)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def measured_steps(steps: int, k: int) -> list[int]:
    """`k` steps spread evenly over a `steps`-step schedule, first and last included (step 0 first).

    Example:
        >>> measured_steps(50, 6), measured_steps(4, 9)
        ([0, 10, 20, 29, 39, 49], [0, 1, 2, 3])
    """
    if k >= steps:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / max(k - 1, 1)) for i in range(k)})


@torch.no_grad()
def record_trajectory(model, noise, cond, *, steps: int, guidance_scale: float = 5.0, shift: float = 1.0,
                      null_cond=None, keep_residuals=()) -> Trajectory:
    """Sample `noise` densely with `model` and record every call's inputs and outputs.

    Args:
        model: a diffusers Wan-style transformer (`model.blocks`), called as `sparsify.testbed.sample` calls it.
        noise, cond, steps, guidance_scale, shift, null_cond: as for `sparsify.testbed.sample`.
        keep_residuals: steps whose block-stack residuals are kept (what a reused later step adds).

    Example:
        >>> # traj = record_trajectory(model, noise, cond, steps=50, keep_residuals=range(50))
    """
    from ..testbed import sample

    keep = set(keep_residuals)
    calls: list[list[dict]] = []
    outputs: list[list[torch.Tensor]] = []
    residuals: dict = {}
    head_in: list = []

    def pre(mod, args, kwargs):
        head_in.append(args[0] if args else kwargs["hidden_states"])

    def post(mod, args, kwargs, out):
        x_in = head_in.pop()
        step = len(calls) - 1
        if step in keep:
            residuals[(step, len(calls[step]) - 1)] = (out - x_in).detach()

    def step_cb(i, t, x):
        calls.append([])
        outputs.append([])

    def recorder(**kw):
        calls[-1].append(dict(kw))
        out = model(**kw)
        outputs[-1].append(_first(out).float())
        return out

    hooks = [model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True),
             model.blocks[-1].register_forward_hook(post, with_kwargs=True)]
    try:
        sample(recorder, noise, cond, steps=steps, shift=shift, guidance_scale=guidance_scale, null_cond=null_cond,
               callback=step_cb)
    finally:
        for h in hooks:
            h.remove()
    return Trajectory(calls, outputs, residuals, guidance_scale)


class _AddResidual(torch.nn.Module):
    """Stands for the whole block stack on a reused step: input + the residual of the step reused."""

    def __init__(self):
        super().__init__()
        self.residual = None

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.residual


def interpolate(measured: list[int], values: np.ndarray, steps: int) -> np.ndarray:
    """Values measured at steps `measured` (along the first axis), linearly interpolated to every step.

    Example:
        >>> interpolate([0, 4], np.array([0.0, 4.0]), 5).tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(measured), -1)
    out = np.stack([np.interp(np.arange(steps), measured, flat[:, j]) for j in range(flat.shape[1])], axis=1)
    return out.reshape(steps, *values.shape[1:])


@torch.no_grad()
def reuse_errors(model, traj: Trajectory, steps: list[int], max_age: int) -> np.ndarray:
    """`[len(steps), max_age, 2]`: the output error of reusing, at each step, the residual of the step `a` earlier,
    as it is (`[..., 0]`, order 0) and extrapolated linearly in the timestep (`[..., 1]`, order 1).

    A reused step runs no block: its block stack becomes the input plus a residual (the plan's `compute: false`).
    Order 0 adds the residual `r2` of the last computed step `c2 = s - a`; order 1 adds
    `r2 + w * (r2 - r1)` (`generation.plan.extrapolate`), `r1` the residual of the computed step before, taken
    at the plan's steady cadence (`a` reused steps after each computed one): `c1 = c2 - (a + 1)`. NaN where the
    step is younger than the age, or (order 1) where `c1 < 0`, or where a residual was not kept.

    Example:
        >>> # e = reuse_errors(model, traj, [1, 5, 9], max_age=3)
        >>> # e[1, 0, 0]: step 5 adding step 4's residual; e[1, 0, 1]: extrapolating it from steps 2 and 4
    """
    from ..generation.plan import extrapolate, extrapolation_weight

    out = np.full((len(steps), max_age, 2), np.nan)
    stand_in = _AddResidual()
    blocks = model.blocks
    model.blocks = torch.nn.ModuleList([stand_in])
    try:
        for i, s in enumerate(steps):
            for a in range(1, max_age + 1):
                c2, c1 = s - a, s - 2 * a - 1
                if c2 < 0 or (c2, 0) not in traj.residuals:
                    continue
                first = c1 >= 0 and (c1, 0) in traj.residuals
                w = extrapolation_weight(traj.timestep(s), traj.timestep(c1), traj.timestep(c2)) if first else None
                for o in (0, 1) if first else (0,):
                    outs = []
                    for c, kw in enumerate(traj.calls[s]):
                        r1 = traj.residuals[(c1, c)] if o else None
                        stand_in.residual = extrapolate(r1, traj.residuals[(c2, c)], w)
                        outs.append(_first(model(**kw)).float())
                    out[i, a - 1, o] = traj.error(outs, s)
    finally:
        model.blocks = blocks
    return out


@torch.no_grad()
def merge_errors(model, traj: Trajectory, steps: list[int], groups, ratios, tile) -> np.ndarray:
    """`[len(groups), len(steps), len(ratios)]`: the output error of merging tokens around the blocks of each
    group (all of them at one ratio, every other block unmerged) at each step.

    Example:
        >>> # merge_errors(model, traj, [0, 9], groups=[(0, 1), (2, 3)], ratios=[0.25, 0.5], tile=(4, 4, 4))
    """
    from ..generation.merge import merge_blocks

    out = np.zeros((len(groups), len(steps), len(ratios)))
    for gi, group in enumerate(groups):
        for ri, r in enumerate(ratios):
            merging = merge_blocks(model, {b: float(r) for b in group}, tile=tile)
            try:
                for si, s in enumerate(steps):
                    out[gi, si, ri] = traj.error(traj.run(model, s), s)
            finally:
                merging.remove()
    return out


class _EntropyObserver:
    """`runtime.STATE.observer`: the mean normalized entropy of sampled video queries' attention, per site call."""

    def __init__(self, queries: int = 256):
        self.queries = queries
        self.values: dict[str, list[float]] = {}

    def __call__(self, st, q, k, v, geom, scale, key_mask) -> None:
        vs, vl = geom.video_start, geom.video_len
        g = torch.Generator().manual_seed(len(self.values.get(st.path, ())))
        rows = torch.randperm(vl, generator=g)[:self.queries].to(q.device) + vs
        logits = (q.index_select(2, rows).float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.view(key_mask.shape[0], 1, 1, -1).to(torch.bool), float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) / math.log(k.shape[2])
        self.values.setdefault(st.path, []).append(float(ent.mean()))


@torch.no_grad()
def attention_entropy(model, traj: Trajectory, steps: list[int], queries: int = 256) -> np.ndarray:
    """`[blocks, len(steps)]`: the normalized attention entropy (0 peaked .. 1 uniform) of each block's
    self-attention at each step, over sampled video queries and every head and call: USV's policy signal.

    Example:
        >>> # attention_entropy(model, traj, [0, 9]).shape  -> (len(model.blocks), 2)
    """
    from ..api import installed_sites, sparsify, unsparsify
    from ..runtime.state import STATE

    if STATE.observer is not None:
        raise RuntimeError("sparsify.calibrate: another calibration is already observing this process")
    sparsify(model, {"version": 1, "defaults": {"method": "dense"}})
    obs = _EntropyObserver(queries)
    STATE.observer = obs
    try:
        for s in steps:
            traj.run(model, s)
        paths = [st.path for st in installed_sites(model) if st.kind in ("self", "joint")]
    finally:
        STATE.observer = None
        unsparsify(model)
    out = np.full((len(model.blocks), len(steps)), np.nan)
    per = traj.calls_per_step
    for p in paths:
        parts = p.split(".")
        if parts[0] == "blocks" and parts[1].isdigit() and p in obs.values:
            vals = np.asarray(obs.values[p]).reshape(len(steps), per)
            out[int(parts[1])] = vals.mean(1)
    return out
