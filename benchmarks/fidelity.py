"""Sampled-video fidelity on the learned test-bed: PSNR against dense sampling, and temporal mask reuse.

    python -m benchmarks.fidelity [--steps 50] [--videos 4] [--densities 0.2,0.1,0.05]

For each density: a uniform recipe (VSA, 4x4x4, one density for all heads) and a calibrated recipe
(`sparsify.calibrate` at that budget, on inputs disjoint from the sampled ones) sample from the same
noise as dense sampling; PSNR is against the dense sample (same noise, same steps, CFG off). Then the
calibrated recipe at the middle density runs again with temporal mask reuse, which reports the share
of selection calls saved and its PSNR. Writes benchmarks/results/fidelity_<date>.json.
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
    p.add_argument("--reuse-threshold", type=float, default=0.02)
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

    def run(label):
        runtime.new_generation()
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample(model, noise, cond, steps=a.steps)
        return x, time.perf_counter() - t0

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
    reuse_recipe = base.to_dict()
    reuse_recipe["defaults"]["mask_reuse"] = {"threshold": a.reuse_threshold, "max_age": a.reuse_max_age}
    sparsify(model, reuse_recipe)
    x_reuse, secs = run("reuse")
    sites = installed_sites(model)
    sel, reused = sum(s.selections for s in sites), sum(s.reused for s in sites)
    unsparsify(model)
    fresh = next(r for r in rows if r["recipe"] == "calibrated" and r["density_target"] == d_mid)
    reuse_row = {"recipe": "calibrated + mask reuse", "density_target": d_mid, "psnr_db": round(psnr(x_reuse, dense), 2),
                 "selections": sel, "reused": reused, "reuse_share": round(reused / max(1, sel + reused), 3),
                 "psnr_fresh_db": fresh["psnr_db"], "seconds": round(secs, 2)}
    rows.append(reuse_row)
    print(reuse_row, flush=True)
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
