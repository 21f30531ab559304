"""Head load balancing for Ulysses: a static head permutation so that every rank gets about the same work."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..geometry import Geometry, tile_layout
from ..methods.select import budget_counts
from ..recipe import Budget, HeadConfig
from ..runtime.dispatch import sparse_work


def head_costs(configs: list[HeadConfig], grid, *, video_start: int = 0, text_len: int = 0) -> list[float]:
    """Attention work of each head per call, relative to one dense head, padding counted (as the calibrator
    and `sparsify.runtime.sparse_work` count it).

    A dense head costs 1. A top-k head keeps `ceil(density · n_tiles)` key tiles of its tile layout per query
    tile; a top-p head's work depends on the data, and its `min_density` floor stands for it (pass measured
    costs to `balance_heads(costs=...)` instead where they are known).

    Args:
        configs: one HeadConfig per head (a site's `SiteState.configs`).
        grid: `(T, H, W)` token grid the costs are for.
        video_start, text_len: position of the video tokens and the number of other (dense) tokens.

    Example:
        >>> from sparsify.recipe import Budget, HeadConfig
        >>> cs = [HeadConfig(tile=(1, 8, 8), budget=Budget(density=d)) for d in (0.25, 1.0)]
        >>> head_costs(cs, (4, 8, 8))
        [0.25, 1.0]
        >>> head_costs([HeadConfig(method="dense")], (4, 8, 8))
        [1.0]
    """
    geom = Geometry(tuple(grid), video_start)
    S = video_start + geom.video_len + text_len
    costs = []
    for c in configs:
        if c.is_dense:
            costs.append(1.0)
            continue
        lay = tile_layout(geom.grid, c.tile)
        density = c.budget.density if c.budget.density is not None else c.budget.min_density
        k = budget_counts(Budget(density=max(density, 1e-9)), lay.n_tiles)
        costs.append(float(sparse_work(geom, lay, torch.full((1, 1, lay.n_tiles), k), S)))
    return costs


def assign_heads(costs: list[float], degree: int) -> list[list[int]]:
    """Split heads into `degree` ranks of `len(costs) / degree` heads each with about equal total cost.

    Longest-processing-time first under the equal-count constraint (each head, costliest first, goes to the
    least loaded rank that still has room), then pairwise swaps between the busiest rank and the others while
    a swap lowers the busiest load.

    Returns:
        The heads of each rank, ascending within a rank.

    Example:
        >>> assign_heads([4.0, 1.0, 1.0, 4.0], 2)
        [[0, 1], [2, 3]]
    """
    H = len(costs)
    if degree < 1 or H % degree:
        raise ValueError(f"assign_heads: {H} heads cannot be split evenly over degree={degree} ranks")
    per = H // degree
    bins: list[list[int]] = [[] for _ in range(degree)]
    load = [0.0] * degree
    for h in sorted(range(H), key=lambda h: (-costs[h], h)):
        r = min((r for r in range(degree) if len(bins[r]) < per), key=lambda r: (load[r], r))
        bins[r].append(h)
        load[r] += costs[h]
    for _ in range(H * H):  # local search: swap a head of the busiest rank with a cheaper one elsewhere
        top = max(range(degree), key=lambda r: load[r])
        best = None
        for r in range(degree):
            if r == top:
                continue
            for a in bins[top]:
                for b in bins[r]:
                    d = costs[a] - costs[b]
                    if d > 0:
                        new_max = max(load[top] - d, load[r] + d)
                        if new_max < load[top] - 1e-12 and (best is None or new_max < best[0]):
                            best = (new_max, r, a, b)
        if best is None:
            break
        _, r, a, b = best
        bins[top][bins[top].index(a)] = b
        bins[r][bins[r].index(b)] = a
        d = costs[a] - costs[b]
        load[top] -= d
        load[r] += d
    return [sorted(b) for b in bins]


def balance_ratio(costs: list[float], degree: int, perm: list[int] | None = None) -> float:
    """Slowest rank / mean rank work when rank `r` holds heads `perm[r·H/P : (r+1)·H/P]` (default: in order).

    Example:
        >>> balance_ratio([4.0, 1.0, 1.0, 4.0], 2), balance_ratio([4.0, 1.0, 1.0, 4.0], 2, [0, 1, 2, 3])
        (1.0, 1.0)
        >>> balance_ratio([4.0, 4.0, 1.0, 1.0], 2)
        1.6
    """
    loads = _loads(costs, degree, perm)
    mean = sum(loads) / degree
    return max(loads) / mean if mean > 0 else 1.0


def _loads(costs, degree, perm=None) -> list[float]:
    order = list(range(len(costs))) if perm is None else list(perm)
    per = len(order) // degree
    return [sum(costs[h] for h in order[r * per:(r + 1) * per]) for r in range(degree)]


@dataclass
class BalancePlan:
    """The head permutation of every site and the balance it reaches.

    `perms[path][j]` is the original head now at position `j`; rank `r` holds positions `[r·H/P, (r+1)·H/P)`.
    `ratio_before` / `ratio_after`: the slowest rank's work over the mean, summed over sites (ranks wait for
    one another at every site's all-to-all), without and with the permutation.
    """

    degree: int
    perms: dict = field(default_factory=dict)
    site_ratios: dict = field(default_factory=dict)  # path -> (before, after)
    ratio_before: float = 1.0
    ratio_after: float = 1.0


#: Per-head projections of a diffusers attention module: rows are `[H, D]` (q/k/v and the joint text q/k/v).
_ROW_PROJ = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_gate_compress")
#: Output projections: columns are `[H, D]`.
_COL_PROJ = ("to_out.0", "to_add_out")
#: Norms over all heads at once (`rms_norm_across_heads`): weights are `[H, D]`; per-head norms (`[D]`) stay.
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _check_module(module, path: str) -> None:
    if getattr(module, "fused_projections", False) or hasattr(module, "to_qkv") and module.to_qkv is not None:
        raise ValueError(
            f"balance_heads: site '{path}' has fused q/k/v projections (fuse_projections()); balance heads "
            "before fusing, or call unfuse_projections() first")
    if not all(hasattr(module, n) for n in ("to_q", "to_k", "to_v")):
        raise ValueError(
            f"balance_heads: site '{path}' ({type(module).__name__}) is not a diffusers attention module with "
            "to_q/to_k/to_v projections; head balancing permutes those projections' heads")


def _out_columns(model, path: str, module, HD: int) -> list:
    """The linear layers whose input columns `[0, HD)` are the site's heads: `to_out.0` and `to_add_out`; for a
    pre-only module (no output projection of its own) its block's `proj_out`, whose input is the attention output
    followed by the block's MLP hidden state (HunyuanVideo's and Flux's single-stream blocks).

    Raises:
        ValueError: the site has no output projection of its own and its block is not of that form.
    """
    own = [sub for sub in (_get(module, n) for n in _COL_PROJ) if sub is not None and sub.weight.shape[1] == HD]
    if own or not getattr(module, "pre_only", False):
        return own
    block = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None
    proj, mlp = getattr(block, "proj_out", None), getattr(block, "proj_mlp", None)
    if not (isinstance(proj, torch.nn.Linear) and isinstance(mlp, torch.nn.Linear)
            and proj.in_features == HD + mlp.out_features):
        raise ValueError(
            f"balance_heads: site '{path}' has no output projection of its own (pre_only) and its block has no "
            f"proj_out over [attention output ({HD}) | proj_mlp output]; its heads' output columns are unknown")
    return [proj]


def _permute_module(model, path: str, heads: int, head_dim: int, perm: torch.Tensor) -> None:
    module = model.get_submodule(path)
    _check_module(module, path)
    HD = heads * head_dim
    with torch.no_grad():
        for name in _ROW_PROJ + _NORMS:
            sub = _get(module, name)
            if sub is None:
                continue
            for p in (getattr(sub, "weight", None), getattr(sub, "bias", None)):
                if p is None or p.shape[0] != HD or (name in _NORMS and p.dim() != 1):
                    continue
                p.copy_(p.view(heads, head_dim, *p.shape[1:]).index_select(0, perm.to(p.device)).view_as(p))
        for sub in _out_columns(model, path, module, HD):
            w = sub.weight[:, :HD]
            w.copy_(w.reshape(w.shape[0], heads, head_dim).index_select(1, perm.to(w.device)).view_as(w))


def _get(module, name):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def balance_heads(model: torch.nn.Module, degree: int, grid, *, video_start: int = 0, text_len: int = 0,
                  costs: dict | None = None) -> BalancePlan:
    """Permute the heads of every sparsified site so that each Ulysses rank gets about the same attention work.

    Ulysses gives rank `r` the heads `[r·H/P, (r+1)·H/P)`. Per site the heads are reordered (q/k/v rows,
    per-head-across norms, output-projection columns (a pre-only site's: its block's `proj_out`), and the site's
    recipe entries with them) so that each rank's slice has about equal cost (`head_costs`, or measured
    `costs`); the model's output is unchanged up to the reduction order of the output projection. Call it after
    `sparsify()`, before or after `enable_parallelism` (or xDiT's takeover), with the same arguments on every
    rank; `unsparsify()` (or `unbalance_heads`) undoes it exactly.

    Args:
        model: a model sparsified with `sparsify()` whose sites are diffusers attention modules.
        degree: the Ulysses degree P (each site's heads must divide by it).
        grid: `(T, H, W)` token grid to compute costs for (padding depends on it).
        video_start, text_len: the video span and the number of other tokens of the attention sequence.
        costs: optional `{site path: [cost per head]}` overriding the recipe-derived costs.

    Returns:
        The BalancePlan (permutations, and the balance ratio without and with them).

    Example:
        >>> # sparsify(transformer, recipe); plan = balance_heads(transformer, 4, grid=(21, 45, 80))
        >>> # transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=4))
        >>> # plan.ratio_before, plan.ratio_after  -> e.g. (1.62, 1.01)
    """
    inst = getattr(model, "_sparsify", None)
    if inst is None:
        raise RuntimeError("balance_heads: the model is not sparsified; call sparsify(model, recipe) first")
    if getattr(inst, "balance", None) is not None:
        raise RuntimeError("balance_heads: the heads of this model are already balanced; call unbalance_heads first")
    plan = BalancePlan(degree=degree)
    worst_before = worst_after = mean_total = 0.0
    moved = []
    for st in inst.sites:
        if st.heads % degree:
            raise ValueError(f"balance_heads: site '{st.path}' has {st.heads} heads, not divisible by degree={degree}")
        c = list(costs[st.path]) if costs is not None and st.path in costs else head_costs(
            st.configs, grid, video_start=video_start, text_len=text_len)
        if len(c) != st.heads:
            raise ValueError(f"balance_heads: costs['{st.path}'] has {len(c)} entries; the site has {st.heads} heads")
        perm = [h for b in assign_heads(c, degree) for h in b]
        before, after = balance_ratio(c, degree), balance_ratio(c, degree, perm)
        if after >= before:
            perm, after = list(range(st.heads)), before
        mean = sum(c) / degree
        worst_before += before * mean
        worst_after += after * mean
        mean_total += mean
        plan.site_ratios[st.path] = (before, after)
        if perm != list(range(st.heads)):
            plan.perms[st.path] = perm
            moved.append((st, perm))
    plan.ratio_before = worst_before / mean_total if mean_total else 1.0
    plan.ratio_after = worst_after / mean_total if mean_total else 1.0
    for st, _ in moved:
        module = model.get_submodule(st.path)
        _check_module(module, st.path)
        _out_columns(model, st.path, module, st.heads * st.head_dim)
    for st, perm in moved:
        _apply(model, st, perm)

    def undo():
        for st, perm in reversed(moved):
            inv = [0] * len(perm)
            for j, h in enumerate(perm):
                inv[h] = j
            _apply(model, st, inv)
        inst.balance = None

    inst.balance = plan
    inst.balance_undo = undo
    inst.undo.append(undo)
    return plan


def _apply(model, st, perm: list[int]) -> None:
    _permute_module(model, st.path, st.heads, st.head_dim, torch.tensor(perm))
    st.configs = [st.configs[h] for h in perm]
    st.cache.clear()


def unbalance_heads(model: torch.nn.Module) -> None:
    """Undo `balance_heads(model, ...)` exactly (weights and recipe entries back in their original head order).

    Example:
        >>> # plan = balance_heads(model, 2, grid); unbalance_heads(model)
    """
    inst = getattr(model, "_sparsify", None)
    if inst is None or getattr(inst, "balance", None) is None:
        raise RuntimeError("unbalance_heads: the heads of this model are not balanced")
    undo = inst.balance_undo
    inst.undo.remove(undo)
    undo()
