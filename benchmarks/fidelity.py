"""Sampled-video fidelity on the learned test-bed: PSNR against dense sampling, and temporal mask reuse.

    python -m benchmarks.fidelity [--steps 50] [--videos 4] [--densities 0.2,0.1,0.05]

For each density: a uniform recipe (VSA, 4x4x4, one density for all heads) and a calibrated recipe
(`sparsify.calibrate` at that budget, on inputs disjoint from the sampled ones) sample from the same
noise as dense sampling; PSNR is against the dense sample (same noise, same steps, CFG off). Then the
calibrated recipe at the middle density gets its temporal-mask-reuse threshold from
`sparsify.calibrate.calibrate_mask_reuse` (on a trajectory from other noise, or `--reuse-threshold`)
and samples again with reuse: the share of selection calls saved, the PSNR, and the relative L2 error
of x_t against the dense trajectory at every step, fresh selection vs reuse (the final-output error
growth is the last step's ratio). Writes benchmarks/results/fidelity_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--densities", default="0.2,0.1,0.05")
    p.add_argument("--reuse-threshold", type=float, default=None, help="fixed threshold (default: calibrated)")
    p.add_argument("--reuse-steps", type=int, default=20, help="steps of the reuse-calibration trajectory")
    p.add_argument("--reuse-max-age", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from sparsify import installed_sites, runtime, sparsify, unsparsify
    from sparsify.calibrate import run_calibration
    from sparsify.testbed import build_testbed, example_inputs, psnr, sample
    from sparsify.testbed.data import class_embeddings

    dev = torch.device(a.device)
    model = build_testbed(device=dev)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(a.videos, 4, 16, 32, 32, generator=g).to(dev)
    cond = class_embeddings(torch.arange(a.videos) % 8).to(dev)

    traj: dict = {}

    def run(label):
        runtime.new_generation()
        xs = traj[label] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample(model, noise, cond, steps=a.steps, callback=lambda i, t, x: xs.append(x.float().cpu()))
        xs.append(x.float().cpu())
        return x, time.perf_counter() - t0

    def step_errors(label):  # relative L2 error of x_t against the dense trajectory, per step (last = output)
        return [float((x - d).norm() / d.norm()) for x, d in zip(traj[label], traj["dense"])]

    dense, t_dense = run("dense")
    rows = []

    def loop(m):  # calibration inputs: seeds 100.. (the sampled noise is seed 1234), 2 noise levels
        for seed in (100, 101):
            for t in (0.8, 0.4):
                m(**example_inputs(seed=seed, t=t, device=dev))

    calibrated = {}
    for d in [float(x) for x in a.densities.split(",")]:
        uniform = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": d}}}
        res = run_calibration(model, loop, budget=d, example_inputs=example_inputs(device=dev), progress=False)
        calibrated[d] = res.recipe
        for name, recipe in (("uniform 4x4x4", uniform), ("calibrated", res.recipe)):
            sparsify(model, recipe)
            x, secs = run(name)
            density = sum(s.work for s in installed_sites(model)) / sum(s.dense_work for s in installed_sites(model))
            unsparsify(model)
            rows.append({"recipe": name, "density_target": d, "density_achieved": round(density, 4),
                         "psnr_db": round(psnr(x, dense), 2), "seconds": round(secs, 2)})
            print(rows[-1], flush=True)

    d_mid = sorted(calibrated)[len(calibrated) // 2]
    base = calibrated[d_mid]
    sparsify(model, base)
    x_fresh, _ = run("fresh")  # the calibrated recipe again, recording its trajectory
    unsparsify(model)
    reuse_cal = None
    if a.reuse_threshold is None:
        from sparsify.calibrate import calibrate_mask_reuse

        g2 = torch.Generator().manual_seed(4321)
        noise2 = torch.randn(1, 4, 16, 32, 32, generator=g2).to(dev)
        cond2 = class_embeddings(torch.tensor([3])).to(dev)
        rc = calibrate_mask_reuse(model, base, lambda m: sample(m, noise2, cond2, steps=a.reuse_steps),
                                  max_age=a.reuse_max_age)
        threshold = rc.threshold
        reuse_cal = {"threshold": rc.threshold, "max_age": rc.max_age, "trajectory_steps": a.reuse_steps,
                     "reuse_share": rc.reuse_share, "least_overlap": rc.min_overlap, "tried": rc.tried,
                     "calibration_error_growth": rc.error_growth}
        print("reuse calibration:", reuse_cal, flush=True)
    else:
        threshold = a.reuse_threshold
    reuse_recipe = base.to_dict()
    reuse_recipe["defaults"]["mask_reuse"] = {"threshold": threshold, "max_age": a.reuse_max_age}
    sparsify(model, reuse_recipe)
    x_reuse, secs = run("reuse")
    sites = installed_sites(model)
    sel, reused = sum(s.selections for s in sites), sum(s.reused for s in sites)
    unsparsify(model)
    fresh = next(r for r in rows if r["recipe"] == "calibrated" and r["density_target"] == d_mid)
    err_fresh, err_reuse = step_errors("fresh"), step_errors("reuse")
    reuse_row = {"recipe": "calibrated + mask reuse", "density_target": d_mid, "psnr_db": round(psnr(x_reuse, dense), 2),
                 "threshold": threshold, "max_age": a.reuse_max_age, "calibration": reuse_cal,
                 "selections": sel, "reused": reused, "reuse_share": round(reused / max(1, sel + reused), 3),
                 "psnr_fresh_db": round(psnr(x_fresh, dense), 2), "psnr_fresh_first_run_db": fresh["psnr_db"],
                 "output_error_fresh": err_fresh[-1], "output_error_reuse": err_reuse[-1],
                 "output_error_growth": err_reuse[-1] / err_fresh[-1] - 1.0,
                 "step_error_fresh": err_fresh, "step_error_reuse": err_reuse, "seconds": round(secs, 2)}
    rows.append(reuse_row)
    print({k: v for k, v in reuse_row.items() if not k.startswith("step_error")}, flush=True)
    print("step  error fresh  error reuse  (relative L2 of x_t vs the dense trajectory)")
    for i in sorted(set(range(0, len(err_fresh), max(1, len(err_fresh) // 10))) | {len(err_fresh) - 1}):
        print(f"{i:4d}  {err_fresh[i]:11.5f}  {err_reuse[i]:11.5f}")
    date = datetime.datetime.now(datetime.timezone.utc)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "command": "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": date.strftime("%Y-%m-%d %H:%M UTC"), "steps": a.steps, "videos": a.videos,
            "dense_seconds": round(t_dense, 2), "rows": rows}
    out = Path(a.out or Path(__file__).parent / "results" / f"fidelity_{date.strftime('%Y%m%d_%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
