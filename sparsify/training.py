"""Training with sparse attention: VSA's learned coarse-branch gates, density control and the sparsity ramp."""

from __future__ import annotations

import dataclasses
import math

import torch

from .passes.install import GATE_ATTR
from .recipe import Budget

_VSA_GATE_MARK = "_sparsify_vsa_gate"


def _installation(model: torch.nn.Module):
    inst = getattr(model, "_sparsify", None)
    if inst is None:
        raise RuntimeError("sparsify: the model is not sparsified; call sparsify(model, recipe) first")
    return inst


def _input_dim(module: torch.nn.Module, path: str) -> int:
    for name in ("to_q", "q_proj", "qkv", "to_qkv"):
        lin = getattr(module, name, None)
        if isinstance(lin, torch.nn.Linear):
            return lin.in_features
    raise ValueError(f"sparsify: cannot tell the input width of site '{path}' ({type(module).__name__}): it has no "
                     "to_q / q_proj / qkv Linear; pass in_dim= to add_vsa_gates")


def add_vsa_gates(model: torch.nn.Module, *, in_dim: int | None = None) -> torch.nn.Module:
    """Add VSA's learned gate to every sparse site of a sparsified model, for training (in place).

    Each site module with a sparse head gets `to_gate_compress = Linear(dim, H*D)`, zero-initialised as FastVideo
    does (a new gate starts as pure sparse attention); sparse heads then return `sparse_out + gate * coarse_out`
    with `gate = to_gate_compress(hidden_states)` and `coarse_out` the attention among tile means broadcast to
    each tile (FastVideo `video_sparse_attn`). The gates are ordinary parameters, kept by `unsparsify()`;
    existing gates are reused.

    Args:
        model: a model sparsified with `mode="install"` (the default) whose sites call SDPA.
        in_dim: the width of the site modules' input hidden states (default: from their `to_q` Linear).

    Raises:
        RuntimeError: the model is not sparsified, or a site cannot host a gate (graph mode, hand-written
            attention, joint attention, inference-only step policies in the recipe).

    Example:
        >>> from sparsify import sparsify
        >>> from sparsify.training import add_vsa_gates, set_density
        >>> # model = sparsify(transformer, {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4],
        >>> #                                                           "budget": {"density": 1.0}}})
        >>> # add_vsa_gates(model); set_density(model, 0.1)   # then train as usual
    """
    inst = _installation(model)
    if inst.mode != "install":
        raise RuntimeError("sparsify: VSA gates need sparsify(..., mode='install'); this model uses graph mode")
    by_path = {i.path: i for i in inst.infos}
    for st in inst.sites:
        if st.is_dense:
            continue
        info = by_path[st.path]
        if info.impl != "sdpa" or info.kind != "self":
            raise RuntimeError(f"sparsify: site '{st.path}' ({info.kind} attention, {info.impl}) cannot host a VSA "
                               "gate: gates need self-attention sites that call scaled_dot_product_attention")
        if st.dense_steps or st.mask_reuse is not None or getattr(st, "schedule", ()):
            raise RuntimeError(f"sparsify: site '{st.path}' uses inference-only step policies (dense_steps, mask_reuse "
                               "or a schedule); a training recipe must not: the backward would not match the forward")
        module = model.get_submodule(st.path)
        existing = getattr(module, GATE_ATTR, None)
        if existing is not None:
            if not getattr(existing, _VSA_GATE_MARK, False) and not isinstance(existing, torch.nn.Linear):
                raise RuntimeError(f"sparsify: '{st.path}.{GATE_ATTR}' exists and is not a Linear gate")
            continue
        dim = in_dim if in_dim is not None else _input_dim(module, st.path)
        ref = next(module.parameters(), None)
        gate = torch.nn.Linear(dim, st.heads * st.head_dim, device=getattr(ref, "device", None),
                               dtype=getattr(ref, "dtype", None))
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.zeros_(gate.bias)
        setattr(gate, _VSA_GATE_MARK, True)
        module.add_module(GATE_ATTR, gate)
    return model


def vsa_gates(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The VSA gates of a model by site path (empty if none).

    Example:
        >>> vsa_gates(torch.nn.Linear(2, 2))
        {}
    """
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules()
            if name.endswith("." + GATE_ATTR) and isinstance(m, torch.nn.Linear)}


def set_density(model: torch.nn.Module, density: float) -> None:
    """Set the top-k density (fraction of key tiles kept per query tile) of every sparse head, in place.

    Takes effect at the next call, eager or compiled (no recompilation). Density 1.0 keeps every tile on the
    tiled path (the coarse branch of VSA gates still contributes): how VSA starts its sparsity ramp.

    Example:
        >>> # set_density(model, 0.1)    # 90% sparsity
    """
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"sparsify: density must be in (0, 1]; got {density!r}")
    for st in _installation(model).sites:
        st.configs = [c if c.is_dense else dataclasses.replace(c, budget=Budget(density=float(density)))
                      for c in st.configs]


def attention_work(model: torch.nn.Module) -> tuple[float, float]:
    """`(work, dense_work)` summed over the sites: attention computed vs dense, in dense-call units.

    Forward calls count, padding included (the backward does not count again): difference two readings.

    Example:
        >>> # w0, d0 = attention_work(model); loss.backward(); w1, d1 = attention_work(model)
        >>> # density_of_step = (w1 - w0) / (d1 - d0)
    """
    sites = _installation(model).sites
    return sum(s.work for s in sites), sum(s.dense_work for s in sites)


@dataclasses.dataclass(frozen=True)
class SparsityRamp:
    """VSA's sparsity schedule: dense at first, then sparsity grows in equal stairs to the target.

    `density(step) = 1 - (1 - final_density) * min(1, (step // interval) * interval / ramp_steps)`.
    FastVideo's VSA training (`VSA_sparsity` s, `VSA_decay_rate` r, `VSA_decay_interval_steps` i) is
    `SparsityRamp(1 - s, ramp_steps=s / r * i, interval=i)`.

    `interval` defaults to `ramp_steps / 30` (at least 1); `ramp_steps=0` gives the final density at once.

    Example:
        >>> ramp = SparsityRamp(final_density=0.1, ramp_steps=300, interval=30)
        >>> [round(ramp.density(s), 3) for s in (0, 29, 30, 150, 300, 1000)]
        [1.0, 1.0, 0.91, 0.55, 0.1, 0.1]
    """

    final_density: float = 0.1
    ramp_steps: int = 0
    interval: int | None = None

    def __post_init__(self):
        if not 0.0 < self.final_density <= 1.0:
            raise ValueError(f"final_density must be in (0, 1]; got {self.final_density}")
        if self.ramp_steps < 0 or (self.interval is not None and self.interval < 1):
            raise ValueError(f"ramp_steps must be >= 0 and interval >= 1; got {self.ramp_steps}, {self.interval}")

    @property
    def stair(self) -> int:
        return self.interval if self.interval is not None else max(1, math.ceil(self.ramp_steps / 30))

    def density(self, step: int) -> float:
        """The density at training step `step` (0-based)."""
        if self.ramp_steps == 0:
            return self.final_density
        done = min(1.0, (step // self.stair) * self.stair / self.ramp_steps)
        return 1.0 - (1.0 - self.final_density) * done

    def apply(self, model: torch.nn.Module, step: int) -> float:
        """`set_density(model, self.density(step))`; returns the density set."""
        set_density(model, d := self.density(step))
        return d
