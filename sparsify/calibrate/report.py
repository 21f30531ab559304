"""Calibration report: the summary table and PNG plots (density heatmap, tile map, error vs budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .solve import solve_allocation, uniform_allocation


def head_grid(result, values):
    """Arrange per-head values `[G]` as `[n_sites, max_heads]` (NaN where a site has fewer heads)."""
    n_sites = len(result.sites)
    hmax = max(s.heads for s in result.sites)
    out = np.full((n_sites, hmax), np.nan)
    g = 0
    for si, s in enumerate(result.sites):
        out[si, : s.heads] = values[g:g + s.heads]
        g += s.heads
    return out


def chosen(result):
    """Per head: (cost, error, option) of the solver's choice."""
    idx = np.arange(len(result.choice))
    return result.cost[idx, result.choice], result.error[idx, result.choice], [result.options[c] for c in result.choice]


def uniform_baseline(result, budget):
    """The uniform allocation at the same budget: one shared option (tile and density) for every head,
    the one of least total error among those that meet the budget."""
    return uniform_allocation(result.cost, result.error, budget, weight=result.weight)


def summary(result, budget) -> str:
    """A text summary: totals, the ILP against the uniform allocation, and per-site choices."""
    cost, err, opts = chosen(result)
    a = result.allocation
    lines = [
        f"calibrated {len(result.sites)} sites, {len(result.choice)} heads; budget {budget:.3f}",
        f"solver: {a.solver} ({a.status}), {a.solve_seconds:.2f}s",
        f"achieved density {a.density:.4f}  ->  predicted attention speedup {1 / a.density:.2f}x",
        f"predicted error: {a.total_error:.4g}" + (
            f"  (model-output relative squared error; measured with this recipe: "
            f"{result.recipe.calibration['measured_output_error']:.4g})"
            if "measured_output_error" in (result.recipe.calibration or {}) else
            "  (sum over sites of relative squared attention-output error)"),
    ]
    try:
        u = uniform_baseline(result, budget)
        gain = 1 - a.total_error / u.total_error if u.total_error > 0 else 0.0
        lines.append(f"uniform allocation at the same budget: density {u.density:.4f}, error {u.total_error:.4g} "
                     f"(ILP error {100 * gain:.0f}% lower)")
    except ValueError as e:
        lines.append(f"uniform allocation: not feasible at this budget ({e})")
    lines.append("")
    lines.append(f"{'site':34s} {'density':>8s}  heads (tile@density or dense)")
    g = 0
    for s in result.sites:
        w = cost[g:g + s.heads]
        multi = len({o[2] for o in result.options[1:]}) > 1
        desc = ["dense" if o[0] == "dense" else (f"{o[2]}:" if multi else "") + f"{'x'.join(map(str, o[0]))}@{o[1]:g}"
                for o in opts[g:g + s.heads]]
        lines.append(f"{s.path:34s} {w.mean():8.3f}  " + ", ".join(desc))
        g += s.heads
    return "\n".join(lines)


def plots(result, budget, out_prefix, budgets=None) -> list[Path]:
    """Write the three PNG plots next to the recipe; returns their paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_prefix = Path(out_prefix)
    paths = []
    cost, err, opts = chosen(result)
    labels = [s.path for s in result.sites]

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * head_grid(result, cost).shape[1], 1 + 0.35 * len(labels)))
    im = ax.imshow(head_grid(result, cost), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("head")
    ax.set_title(f"per-head density (budget {budget:g})")
    fig.colorbar(im, ax=ax)
    paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".density.png")))

    tile_names = sorted({"dense" if o[0] == "dense" else "x".join(map(str, o[0])) for o in result.options})
    codes = np.array([tile_names.index("dense" if o[0] == "dense" else "x".join(map(str, o[0]))) for o in opts], float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * head_grid(result, codes).shape[1], 1 + 0.35 * len(labels)))
    cmap = plt.get_cmap("tab10", len(tile_names))
    ax.imshow(head_grid(result, codes), cmap=cmap, vmin=-0.5, vmax=len(tile_names) - 0.5, aspect="auto")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("head")
    ax.set_title("tile shape per head")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(tile_names))]
    ax.legend(handles, tile_names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".tiles.png")))

    budgets = budgets or [b for b in (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5) if b >= result.cost.min(1).max() * 0.999]
    rows = []
    for b in budgets:
        try:
            ilp = solve_allocation(result.cost, result.error, b, weight=result.weight)
            uni = uniform_baseline(result, b)
            rows.append((b, ilp.density, ilp.total_error, uni.density, uni.total_error))
        except ValueError:
            continue
    if rows:
        r = np.array(rows)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(r[:, 1], r[:, 2], "o-", label="ILP (per-head budgets and tiles)")
        ax.plot(r[:, 3], r[:, 4], "s--", label="uniform (one density and tile)")
        ax.set_xlabel("achieved density")
        ax.set_ylabel("predicted error")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("error versus budget")
        paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".error_vs_budget.png")))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
