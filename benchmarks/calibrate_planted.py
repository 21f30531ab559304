"""ILP against two uniform baselines on the planted-geometry model, by measured model-output error (CPU).

    python -m benchmarks.calibrate_planted

Baselines at the same achieved density: (a) one shared tile and density for every head, (b) one shared
density with each head's best tile. Prints predicted and measured errors.
"""

from __future__ import annotations

import time

import numpy as np

from sparsify.api import find_sites
from sparsify.calibrate import run_calibration
from sparsify.calibrate.core import _run_outputs, choice_configs, model_output_error
from sparsify.calibrate.solve import solve_allocation, uniform_allocation
from sparsify.geometry import tile_layout
from sparsify.testing.planted import CANDIDATE_TILES, PLANTED_GRID, build_planted_dit, planted_inputs

LEVELS = [1 / 32, 1 / 16, 1 / 8, 1 / 4]


def main():
    t0 = time.time()
    model, x = build_planted_dit(), planted_inputs(seed=0)
    loop = lambda m: m(*x)  # noqa: E731
    res = run_calibration(model, loop, budget=1 / 16, tiles=CANDIDATE_TILES, levels=LEVELS, example_inputs=x,
                          grid=PLANTED_GRID, progress=False, query_fraction=0.25)
    all_infos, adapter = find_sites(model, x, grid=PLANTED_GRID)
    dense = _run_outputs(model, loop)

    def measured(choice):
        return model_output_error(model, all_infos, adapter, choice_configs(res, choice), loop, dense)

    shared = uniform_allocation(res.cost, res.error, 1 / 16, weight=res.weight)
    level = np.array([-1] + [LEVELS.index(o[1]) for o in res.options[1:]])
    no_padding = np.broadcast_to(np.array([True] + [tile_layout(PLANTED_GRID, o[0]).padding_fraction == 0
                                                    for o in res.options[1:]]), res.cost.shape)
    best_tile = uniform_allocation(res.cost, res.error, 1 / 16, weight=res.weight, level=level, mask=no_padding)
    print("baseline | density | ILP density | predicted baseline / ILP | measured baseline / ILP | ILP lower by")
    for name, u in [("uniform: one tile and density", shared), ("uniform density, best tile per head", best_tile)]:
        ilp = solve_allocation(res.cost, res.error, u.density, weight=res.weight)
        mu, mi = measured(u.choice), measured(ilp.choice)
        print(f"{name} | {u.density:.4f} | {ilp.density:.4f} | {u.total_error:.3e} / {ilp.total_error:.3e} | "
              f"{mu:.3e} / {mi:.3e} | {100 * (1 - mi / mu):.0f}%")
    print(f"time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
