"""CFG parallel: a process that runs one guidance branch numbers its calls as one process running every branch."""

from __future__ import annotations

import contextlib

from ..runtime.state import STATE


@contextlib.contextmanager
def guidance_shard(branch: int, branches: int):
    """Declare that the calls inside the block run only guidance branch `branch` of `branches` (classifier-free
    guidance split over rank groups, as xDiT's `cfg_degree`), so that each call gets the slot the one-process run
    gives it: there the branches are consecutive calls of a step (cond 0, uncond 1), and per-call caches (mask
    reuse, the step plan's residuals) and the calibrator's selection log key on that slot.

    Example:
        >>> from sparsify.runtime import call_slot
        >>> with guidance_shard(1, 2):  # this rank group runs the unconditional branch
        ...     call_slot(0)
        1
    """
    if not (isinstance(branches, int) and branches >= 1 and isinstance(branch, int) and 0 <= branch < branches):
        raise ValueError(f"guidance_shard: need 0 <= branch < branches; got branch={branch}, branches={branches}")
    saved = STATE.guidance
    STATE.guidance = (branch, branches)
    try:
        yield
    finally:
        STATE.guidance = saved
