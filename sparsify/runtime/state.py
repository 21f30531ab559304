"""Process-wide runtime state: installed sites, the current geometry and timestep, and denoising-step tracking."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch

from ..geometry import Geometry
from ..methods import get_method
from ..recipe import HeadConfig, MaskReuse, ScheduleStep, scheduled_budget


@dataclass
class SiteState:
    """Everything the op needs to know about one installed attention site."""

    site_id: int
    path: str
    kind: str
    heads: int
    head_dim: int
    configs: list[HeadConfig]
    axis: str = "full"  # how each call's sequences cover the video grid (sparsify.factorized.AXES)
    index: int = 0
    calls: int = 0
    dense_steps: int = 0  # first denoising steps of each generation run dense
    mask_reuse: MaskReuse | None = None
    schedule: tuple[ScheduleStep, ...] = ()  # per-step budget schedule (factors on each head's density)
    selections: int = 0  # selections computed
    reused: int = 0  # selections reused from an earlier step (temporal mask reuse)
    cache: dict = field(default_factory=dict)
    step_seen: int = -1
    gen_seen: int = -1
    calls_in_step: int = 0  # calls of this site at the current step (CFG as two calls: 0 and 1)
    shard: object = None  # callable() -> (rank, degree, group) or None: the head shard of sequence-parallel calls
    dense_work: float = 0.0  # attention FLOPs the same calls would take dense
    warned: set = field(default_factory=set)
    check: object = None  # check(state, geometry, seq_len) before each call runs: sparsify()'s argument checks
    _work: float = 0.0  # host part of `work`
    _work_pending: torch.Tensor | None = None  # device part: summed without a host sync until `work` is read

    @property
    def work(self) -> float:
        """Attention FLOPs actually computed (padding included), in units of one dense call (syncs once to read)."""
        if self._work_pending is not None:
            self._work += float(self._work_pending)
            self._work_pending = None
        return self._work

    @work.setter
    def work(self, value: float) -> None:
        self._work, self._work_pending = float(value), None

    def add_work(self, amount) -> None:
        """Add computed work: a number, or a device tensor kept on the device (no host sync per call)."""
        if isinstance(amount, torch.Tensor):
            amount = amount.detach().reshape(())
            self._work_pending = amount if self._work_pending is None else self._work_pending + amount
        else:
            self._work += amount

    @property
    def density(self) -> float:
        """Achieved density over all calls so far: computed / dense attention work (padding counted)."""
        return self.work / self.dense_work if self.dense_work else float("nan")

    @property
    def is_dense(self) -> bool:
        return all(c.is_dense for c in self.configs)

    def current_shard(self):
        """`(rank, degree, group)` of the call being run (the site's resolver, else `sparsify.parallel.head_shard`),
        or None outside sequence parallelism."""
        if self.shard is not None:
            return self.shard()
        from ..parallel.shard import manual_shard

        return manual_shard()

    def head_offset(self, H: int) -> int:
        """The first global head of a call with `H` heads: 0 for a whole call, `rank * H` under a head shard
        (Ulysses sequence parallelism: `sparsify.parallel`)."""
        shard = self.current_shard()
        if shard is not None and shard[1] > 1:
            rank, degree = shard[0], shard[1]
            if H * degree != self.heads:
                raise RuntimeError(
                    f"sparsify: site '{self.path}' has {self.heads} heads and runs with Ulysses degree {degree}, "
                    f"so each rank should see {self.heads // degree} heads, but the call has {H}")
            return rank * H
        if H != self.heads:
            raise RuntimeError(
                f"sparsify: site '{self.path}' was installed for {self.heads} heads but is called with {H}; "
                "a sequence-parallel engine that shards heads must be known to sparsify (sparsify.parallel)")
        return 0

    def budgets(self, heads, step: int | None) -> list:
        """The budgets of `heads` at denoising step `step` (None: no step known) under the schedule."""
        return [scheduled_budget(self.configs[h].budget, self.schedule, step) for h in heads]

    def method(self, key: tuple, heads) -> object:
        """The selection method of a head group `(method, tile)`, built once from its heads' recipe params."""
        ckey = ("method", key, tuple(heads))
        impl = self.cache.get(ckey)
        if impl is None:
            impl = self.cache[ckey] = get_method(key[0], [self.configs[h].params for h in heads])
        return impl

    @property
    def slot(self):
        """Which call of the current step this is, for per-call caches (mask reuse): `call_slot(calls_in_step)`."""
        return call_slot(self.calls_in_step)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"sparsify: site '{self.path}': {message}", stacklevel=3)


class StepTracker:
    """Turns the timesteps seen by attention calls into a denoising-step index per generation.

    A new generation starts when the timestep rises (samplers count down) or the grid changes; calls
    at an unchanged timestep (several sites, or classifier-free guidance as two calls) share a step.
    A pipeline that knows its step index (a diffusers `cache_context(step_index=i)`) states it with
    `tell`: steps whose blocks a step cache skipped then still count.

    Example:
        >>> t = StepTracker()
        >>> [t.observe(x, (1, 2, 2)) for x in (999, 999, 800, 600, 999)]
        [0, 0, 1, 2, 0]
        >>> t.generation
        2
    """

    def __init__(self):
        self.last: float | None = None
        self.grid = None
        self.step = 0
        self.generation = 0

    def observe(self, timestep: float, grid) -> int:
        if self.last is None or grid != self.grid or timestep > self.last + 1e-6:
            self.generation += 1
            self.step = 0
        elif timestep < self.last - 1e-6:
            self.step += 1
        self.last, self.grid = timestep, grid
        return self.step

    def tell(self, step: int, timestep: float | None, grid) -> int:
        """Set the step to the pipeline's own index `step`; a lower index, or the same index at a higher
        timestep, or a new grid starts a new generation.

        Example:
            >>> t = StepTracker()
            >>> [t.tell(i, x, (1, 2, 2)) for i, x in ((0, 999), (3, 600), (0, 999))], t.observe(600, (1, 2, 2))
            ([0, 3, 0], 1)
        """
        last = self.last
        if (last is None or grid != self.grid or step < self.step
                or (step == self.step and timestep is not None and timestep > last + 1e-6)):
            self.generation += 1
        self.step, self.grid = int(step), grid
        self.last = timestep if timestep is not None else last
        return self.step

    def reset(self) -> None:
        self.last = None


class _State:
    """Process-wide runtime state (one per process; sites of several models may coexist)."""

    def __init__(self):
        self.sites: dict[int, SiteState] = {}
        self.geometry: tuple[int, int, int, int] | None = None  # (T, H, W, video_start) of the current forward
        self.geometry_owner = None  # the installation whose forward set `geometry` and `timestep` (see forget_geometry)
        self.timestep = None  # the current forward's timestep tensor (set by the geometry hook)
        self.timestep_seen = None  # (tensor, version, value) of the last timestep read by `timestep_value`
        self.steps = StepTracker()
        self.branch = None  # the guidance branch of the current forward (a diffusers cache_context name), if named
        self.guidance = None  # (branch, branches) under CFG parallel: this process runs only that branch's calls
        self.merged = None  # MergedTokens of the block running with merged tokens (sparsify.generation.merge), if any
        self.stack: list = []  # site tensors of the attention modules being executed
        self.observer = None  # callable(site_state, q, k, v, geometry, scale, key_mask), e.g. the calibrator
        self.selection_log = None  # callable(site_state, group_key, step, pooled_q, pooled_k, idx, cnt) per fresh selection
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        return next(self._ids)


STATE = _State()


def call_slot(calls: int):
    """Which call of the current step the `calls`-th call (from 0) of a site or model is, as one process running
    every guidance branch would number it: the branch named by a diffusers `cache_context` ("cond", "uncond") when
    one is set (a step cache may run one branch and skip the other, so only the name keeps them apart); under CFG
    parallel (`STATE.guidance = (b, n)`: this process runs only branch `b` of `n`) `calls * n + b`; else `calls`.

    Example:
        >>> call_slot(0), call_slot(1)
        (0, 1)
        >>> STATE.guidance = (1, 2); call_slot(0); STATE.guidance = None  # the unconditional branch's process
        1
    """
    if STATE.branch is not None:
        return ("branch", STATE.branch)
    if STATE.guidance is not None:
        return calls * STATE.guidance[1] + STATE.guidance[0]
    return calls


def new_generation() -> None:
    """Start a new generation explicitly: the next call is step 0 and cached selections are dropped."""
    STATE.steps.reset()
    for st in STATE.sites.values():
        st.cache.clear()


def set_geometry(geometry: Geometry, owner) -> None:
    """Record the current forward's geometry, set by the installation `owner` (a model's geometry hook).

    Example:
        >>> set_geometry(Geometry((4, 8, 8), 0), owner="demo"); current_geometry()
        [4, 8, 8, 0]
        >>> forget_geometry("demo"); current_geometry()
        []
    """
    STATE.geometry = (geometry.grid[0], geometry.grid[1], geometry.grid[2], geometry.video_start)
    STATE.geometry_owner = owner


def forget_geometry(owner) -> None:
    """Drop the geometry and timestep of the last forward if `owner` set them (its model is being unsparsified), so
    that no later call (token merging, another model, a block called alone) reads a grid left by that model."""
    if STATE.geometry_owner is owner:
        STATE.geometry = STATE.geometry_owner = None
        set_timestep(None)


def current_geometry() -> list[int]:
    """The op's geometry argument for the current forward: `[T, H, W, video_start]`, or `[]` if unknown."""
    return list(STATE.geometry) if STATE.geometry is not None else []


def set_timestep(t) -> None:
    """Record the current forward's timestep tensor (the geometry hook calls this once per forward).

    Example:
        >>> set_timestep(900); STATE.timestep
        tensor([900.])
        >>> set_timestep(None)  # (the example leaves no state behind)
    """
    STATE.timestep = t if (t is None or isinstance(t, torch.Tensor)) else torch.tensor([float(t)])
    STATE.timestep_seen = None


def timestep_value(t: torch.Tensor) -> float:
    """The first element of the op's timestep argument, read from the device once per timestep tensor: the
    sites of one forward receive the same tensor object and share one reading instead of each paying a host
    sync. A reading is reused only for the same object with the same version counter (an in-place update is
    a new reading); tensors without a version counter (inference mode) are read on every call.

    Example:
        >>> timestep_value(torch.tensor([800.0, 800.0]))
        800.0
    """
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        return float(t.reshape(-1)[0])
    seen = STATE.timestep_seen
    if seen is None or seen[0] is not t or seen[1] != version:
        seen = STATE.timestep_seen = (t, version, float(t.reshape(-1)[0]))  # holds t: no address reuse meanwhile
    return seen[2]


def unpack_geometry(geom: list[int]) -> Geometry | None:
    """The `Geometry` of the op's `[T, H, W, video_start]` argument, or None for `[]`."""
    return Geometry(tuple(geom[:3]), geom[3]) if len(geom) == 4 else None


def site_state(site: torch.Tensor) -> SiteState:
    """The installed site whose id `site` (int64 `[1]`) holds."""
    sid = int(site.reshape(-1)[0])
    try:
        return STATE.sites[sid]
    except KeyError:
        raise RuntimeError(f"sparsify: attention site id {sid} is not installed (was the model unsparsified?)") from None
