"""Calibration inputs from a dense sampling trajectory: the model's own calls at the sampled denoising steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

#: The test-bed sampler's guidance branches, in the order it calls the model within a step.
BRANCHES = ("cond", "uncond")


def sample_steps(steps, k: int) -> list[int]:
    """`k` of `steps`, spread evenly over them (the middle of each of k equal spans); all of them if k >= len.

    Example:
        >>> sample_steps(range(50), 4)
        [6, 18, 31, 43]
        >>> sample_steps([10, 11, 12], 5)
        [10, 11, 12]
    """
    steps = list(steps)
    if k >= len(steps):
        return steps
    return [steps[min(len(steps) - 1, round((i + 0.5) * len(steps) / k - 0.5))] for i in range(k)]


def detached(kwargs: dict) -> dict:
    """A copy of call keyword arguments whose tensors are detached clones (safe to replay later)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


@dataclass
class TrajectoryCall:
    """One model call of a dense sampling run, kept for calibration.

    Attributes:
        seed: the seed of the run's noise (and condition).
        step: the denoising step index (0 = pure noise).
        t: the noise level in [0, 1] at that step (the model saw `t * 1000`).
        branch: `cond` or `uncond` (classifier-free guidance's unconditional call).
        kwargs: the call's keyword arguments (detached clones), `model(**kwargs)` replays it.
    """

    seed: int
    step: int
    t: float
    branch: str
    kwargs: dict


class _Done(Exception):
    """Stops a sampling run once its last sampled step has run."""


def record_calls(model: torch.nn.Module, run: Callable[[Callable[[int], None]], Any], sampled) -> dict[int, list[dict]]:
    """The keyword arguments of every call of `model` during the `sampled` steps of one sampling run.

    `run(at_step)` runs the sampler and calls `at_step(i)` at the start of denoising step i, before that
    step's model calls (all guidance branches). The run is cut short when the step after the last sampled
    one starts: later steps are never computed.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> def run(at_step):
        ...     x = torch.zeros(1, 2)
        ...     for i in range(10):
        ...         at_step(i)
        ...         x = x + lin(input=x)
        >>> got = record_calls(lin, run, [1, 3])
        >>> sorted(got), len(got[3]), sorted(got[3][0])
        ([1, 3], 1, ['input'])
    """
    sampled = set(sampled)
    last = max(sampled)
    state = {"step": -1}
    got: dict[int, list[dict]] = {s: [] for s in sorted(sampled)}

    def at_step(i: int) -> None:
        if i > last:
            raise _Done
        state["step"] = i

    def record(module, args, kwargs):
        if state["step"] in sampled:
            if args:
                raise TypeError(f"record_calls: {type(module).__name__} was called with positional arguments; "
                                "the recorded calls are replayed as model(**kwargs), so call it with keywords only")
            got[state["step"]].append(detached(kwargs))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            run(at_step)
    except _Done:
        pass
    finally:
        hook.remove()
    missing = [s for s, calls in got.items() if not calls]
    if missing:
        raise RuntimeError(f"sparsify.calibrate: the sampling run never called the model at steps {missing} "
                           f"(sampled {sorted(sampled)})")
    return got


def seed_inputs(model: torch.nn.Module, seed: int, *, latent_shape: tuple[int, int, int, int] | None = None,
                name: str = "testbed") -> tuple[torch.Tensor, torch.Tensor]:
    """`(noise, cond)` of a test-bed sampling run from `seed`, as `testbed_trajectory` draws them.

    The noise is `torch.randn(1, *latent_shape)` with generator seed `seed`; the condition is the embedding of
    class `seed % NUM_CLASSES`; both on the device and in the dtype of `model`'s parameters.

    Example:
        >>> from sparsify.testbed import build_testbed
        >>> m = build_testbed(pretrained=False, overrides={"num_layers": 1})
        >>> noise, cond = seed_inputs(m, 100, latent_shape=(4, 2, 8, 8))
        >>> bool(torch.equal(noise, torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(100))))
        True
    """
    from ..adapters.base import device_dtype
    from ..testbed.variants import get_variant

    v = get_variant(name)
    data = v.data_module()
    shape = tuple(latent_shape or v.latent_shape)
    device, dtype = device_dtype(model)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(seed))).to(device, dtype)
    cond = data.class_embeddings(torch.tensor([int(seed) % data.NUM_CLASSES])).to(device, dtype)
    return noise, cond


def testbed_trajectory(model: torch.nn.Module, seeds, *, num_steps: int, sampled, guidance_scale: float = 5.0,
                       shift: float = 1.0, latent_shape: tuple[int, int, int, int] | None = None,
                       name: str = "testbed") -> list[TrajectoryCall]:
    """A test-bed's own calls at the `sampled` steps of dense Euler sampling runs, one run per seed.

    Each run is `sparsify.testbed.sample` from seeded noise (`torch.randn` with generator seed `seed`) and the
    condition of class `seed % NUM_CLASSES`, with `num_steps` steps, the given time `shift` and classifier-free
    guidance (two calls per step, `cond` then `uncond`, when `guidance_scale != 1`): the inputs the model
    gets when it samples, which a calibration forward loop replays.

    Args:
        model: the dense test-bed (`build_testbed(...)`); its parameters' device and dtype are used.
        seeds: one sampling run per seed.
        num_steps: Euler steps of each run.
        sampled: the step indices kept (see `sample_steps`); the run stops after the last.
        guidance_scale, shift: as for `sparsify.testbed.sample`.
        latent_shape: [C, F, H, W] of the noise (default: the variant's training shape).
        name: the test-bed variant (`testbed`, `testbed-16k`), for its latent shape and conditions.

    Returns:
        The calls, run by run, step by step, branch by branch.

    Example:
        >>> from sparsify.testbed import build_testbed
        >>> m = build_testbed(pretrained=False, overrides={"num_layers": 1})
        >>> calls = testbed_trajectory(m, [0], num_steps=8, sampled=[2, 6], latent_shape=(4, 2, 8, 8))
        >>> [(c.step, c.t, c.branch) for c in calls]
        [(2, 0.75, 'cond'), (2, 0.75, 'uncond'), (6, 0.25, 'cond'), (6, 0.25, 'uncond')]
    """
    from ..testbed.model import sample, shifted_sigmas

    sampled = sorted(set(int(s) for s in sampled))
    if not sampled or sampled[0] < 0 or sampled[-1] >= num_steps:
        raise ValueError(f"sampled steps {sampled} must be non-empty and within 0..{num_steps - 1} "
                         f"(num_steps={num_steps})")
    sigmas = shifted_sigmas(num_steps, shift)
    branches = BRANCHES if guidance_scale != 1.0 else BRANCHES[:1]
    out: list[TrajectoryCall] = []
    for seed in seeds:
        noise, cond = seed_inputs(model, seed, latent_shape=latent_shape, name=name)

        def run(at_step, noise=noise, cond=cond):
            sample(model, noise, cond, steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                   callback=lambda i, t, x: at_step(i))

        got = record_calls(model, run, sampled)
        for step, calls in got.items():
            if len(calls) != len(branches):
                raise RuntimeError(f"sparsify.calibrate: expected {len(branches)} model call(s) per step with "
                                   f"guidance_scale={guidance_scale}, got {len(calls)} at step {step}")
            out += [TrajectoryCall(int(seed), step, float(sigmas[step]), b, kw) for b, kw in zip(branches, calls)]
    return out
