"""Calibration report: the summary table and PNG plots (density heatmap, tile map, error vs budget)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .solve import pareto_curve, uniform_allocation


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


def site_attention_error(result) -> np.ndarray:
    """`[n_sites]` relative L2 error of each site's attention output under the chosen options (predicted from the
    measurements: the heads' shares of the site's relative squared error, summed, square-rooted)."""
    att = result.attention_error if result.attention_error is not None else result.error
    per_head = att[np.arange(len(result.choice)), result.choice]
    return np.sqrt(np.bincount(result.layer, weights=per_head, minlength=len(result.sites)))


def summary(result, budget) -> str:
    """A text summary: the allocation, the GPU speedup it predicts, its errors as relative L2, per-site choices."""
    cost, err, opts = chosen(result)
    a = result.allocation
    cal = result.recipe.calibration or {}
    output_error = result.config.output_error
    site_err = site_attention_error(result)
    worst = int(np.argmax(site_err))
    lines = [
        f"calibrated {len(result.sites)} sites, {len(result.choice)} heads; budget {budget:g}",
        f"solver: {a.solver} ({a.status}), {a.solve_seconds:.2f}s",
        f"achieved density {a.density:.4f}  ->  predicted attention speedup {1 / a.density:.1f}x for the GPU "
        "block-sparse kernel (1/density; measured kernel speeds: RESULTS.md)",
        "  the CPU path is the pure-PyTorch reference: it checks the numbers and is not faster, so no CPU speedup "
        "is implied",
        "error, as relative L2 ||sparse - dense|| / ||dense|| (0 = exact):",
        f"  attention output (per site, predicted from the measured candidates): mean {site_err.mean():.4f}, worst "
        f"{site_err[worst]:.4f} at {result.sites[worst].path}",
    ]
    if output_error:
        line = f"  model output (final prediction of the DiT): predicted {np.sqrt(a.total_error):.4f}"
        if "measured_output_error" in cal:
            line += f", measured with this recipe {np.sqrt(cal['measured_output_error']):.4f}"
        lines.append(line)
    else:
        lines.append("  model output: not measured (--no-output-error); the solver minimised the attention errors")
    try:
        u = uniform_baseline(result, budget)
        gain = 1 - np.sqrt(a.total_error / u.total_error) if u.total_error > 0 else 0.0
        what = "model-output" if output_error else "summed attention-output"
        lines.append(f"uniform allocation at the same budget (one tile and density for every head): density "
                     f"{u.density:.4f}, predicted {what} error {np.sqrt(u.total_error):.4f} (the ILP's is "
                     f"{100 * gain:.0f}% lower)")
    except ValueError as e:
        lines.append(f"uniform allocation: not feasible at this budget ({e})")
    sch = cal.get("schedule")
    if sch:
        chosen_steps = result.recipe.defaults.schedule
        shape = ("flat (no schedule)" if not chosen_steps else
                 ", ".join(f"x{e.scale:.4g} from step {e.from_step}" for e in chosen_steps))
        eligible = sum(1 for t in sch["tried"] if t["eligible"])
        lines.append(f"budget schedule over {sch['steps']} sampling steps: {shape} ({len(sch['tried'])} candidates "
                     f"tried, {eligible} eligible); final-sample error against dense {sch['error_flat']:.4f} flat -> "
                     f"{sch['error']:.4f} chosen, achieved density {sch['density_flat']:.4f} -> {sch['density']:.4f}")
    secs = result.extras.get("seconds")
    if secs:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    lines.append("")
    lines.append(f"{'site':34s} {'density':>8s} {'att.err':>8s}  heads (tile@density or dense)")
    g = 0
    multi = len({o[2] for o in result.options[1:]}) > 1
    for si, s in enumerate(result.sites):
        w = cost[g:g + s.heads]
        desc = ["dense" if o[0] == "dense" else (f"{o[2]}:" if multi else "") + f"{'x'.join(map(str, o[0]))}@{o[1]:g}"
                for o in opts[g:g + s.heads]]
        lines.append(f"{s.path:34s} {w.mean():8.3f} {site_err[si]:8.4f}  " + ", ".join(desc))
        g += s.heads
    return "\n".join(lines)


def plots(result, budget, out_prefix, budgets=None) -> list[Path]:
    """Write `<out>.density.png`, `<out>.tiles.png` (per head) and `<out>.error_vs_budget.png` (ILP and uniform
    allocation) beside the recipe; returns their paths (empty without matplotlib)."""
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

    grid = head_grid(result, cost)
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    if hi - lo < 1e-6:
        lo, hi = lo * 0.9, hi * 1.1 + 1e-6
    def head_map(grid, width, title, **kw):
        fig, ax = plt.subplots(figsize=(width + 0.6 * grid.shape[1], 1 + 0.35 * len(labels)))
        im = ax.imshow(grid, aspect="auto", **kw)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("head")
        ax.set_title(title)
        return fig, ax, im

    fig, ax, im = head_map(grid, 2.2, f"per-head density (budget {budget:g}, achieved {result.allocation.density:.3f})",
                           cmap="viridis", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=ax, label="density (attention work / dense)")
    paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".density.png")))

    tile_names = sorted({"dense" if o[0] == "dense" else "x".join(map(str, o[0])) for o in result.options})
    codes = np.array([tile_names.index("dense" if o[0] == "dense" else "x".join(map(str, o[0]))) for o in opts], float)
    cmap = plt.get_cmap("tab10", len(tile_names))
    fig, ax, _ = head_map(head_grid(result, codes), 1.2, "tile shape per head", cmap=cmap, vmin=-0.5,
                          vmax=len(tile_names) - 0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(tile_names))]
    ax.legend(handles, tile_names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".tiles.png")))

    budgets = sorted(set(budgets or (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)) | {float(budget)})
    curve = pareto_curve(result.cost, result.error, budgets, weight=result.weight)
    ok = ~np.isnan(curve.ilp_error)
    if ok.any():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(curve.ilp_density[ok], np.sqrt(curve.ilp_error[ok]), "o-", label="ILP (per-head budgets and tiles)")
        uok = ~np.isnan(curve.uniform_error)
        ax.plot(curve.uniform_density[uok], np.sqrt(curve.uniform_error[uok]), "s--",
                label="uniform (one density and tile)")
        a = result.allocation
        ax.axvline(budget, color="tab:red", lw=1, ls=":", label=f"chosen budget {budget:g}")
        ax.plot([a.density], [np.sqrt(max(a.total_error, 1e-30))], "*", color="tab:red", ms=14, label="this recipe")
        ax.set_xlabel("achieved density")
        what = "model output" if result.config.output_error else "attention output (summed)"
        ax.set_ylabel(f"predicted error, relative L2\n({what})")
        if (curve.ilp_error[ok] > 0).all():
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("error versus budget")
        paths.append(_save(fig, out_prefix.with_name(out_prefix.name + ".error_vs_budget.png")))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
