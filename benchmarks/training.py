"""Train the test-bed from scratch twice, dense and with VSA (gated coarse branch, sparsity ramp): loss and compute.

    python -m benchmarks.training --seconds-per-run 200 --compile     # one H100: smoke, then both runs
    python -m benchmarks.training --latent-shape 4 16 64 64 --batch 8 --steps 1100   # 16,384 tokens per video
    python -m benchmarks.training --tiny --results /tmp/t       # CPU smoke run: 3 steps each, 512 tokens

At the test-bed's own 4,096 tokens (64 tiles of 64 tokens per video) 90% sparsity keeps 7 key tiles per query
tile, fewer than a tile's 3x3x3 neighbourhood, and VSA trains 6-10% worse than dense; with 16,384 tokens (256
tiles, 26 kept) it trains as well as dense (RESULTS.md, "Training from scratch").

Both runs share the model init, data, seed, batch, step count and schedule (`tools.train_testbed`); they
differ only in `--attention`. A short smoke of both modes comes first (it aborts on failure, halves the batch
on an out-of-memory error, drops `--compile` if the compiled VSA step fails) and measures the steady step
time of each, from which the common step count is chosen to fit `--seconds-per-run` (`--steps` skips it). Writes
`training_<date>_<gpu>.json` (curves, summaries, comparison) and a side-by-side plot `.png` to --results,
and the two runs' logs next to them (`--logs`).

The comparison: training loss averaged over the last 10% of the common steps, and the held-out loss
(16 fixed videos x 5 fixed noise levels, fp32, as `tools.train_testbed` evaluates) of the raw and EMA
weights; the VSA model is evaluated with its sparse attention at the final density. Compute per step:
self-attention forward FLOPs computed (from the runtime's work counters, padding and coarse branch
counted) vs dense, and training FLOPs per step (backward counted as 2x forward) with the rest of the model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks._common import run_header


def _rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "train_log.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _run(cfg, log_path: Path) -> tuple[dict, list[dict], float]:
    """train(cfg) with its output in `log_path`; returns (summary, per-step rows, peak CUDA memory GiB)."""
    from tools.train_testbed import train

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            summary = train(cfg)
    finally:
        log_path.write_text(buf.getvalue())
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return summary, _rows(Path(cfg.out)), peak


def _steady(rows: list[dict], skip: int = 5) -> tuple[float, float]:
    """(seconds per step after the first `skip` steps, start-up seconds before that beyond the steady rate)."""
    if len(rows) <= skip + 1:
        raise RuntimeError("smoke run too short to time")
    a, b = rows[skip - 1], rows[-1]
    per = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
    return per, max(0.0, a["elapsed_s"] - skip * per)


def _heldout(summary: dict, key: str) -> float:
    ev = summary[key]
    return sum(ev.values()) / len(ev)


def _plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    win = max(1, res["steps"] // 50)
    for mode, color in (("dense", "tab:blue"), ("vsa", "tab:red")):
        rows = res["runs"][mode]["curve"]
        steps, loss = [r[0] for r in rows], [r[1] for r in rows]
        sm = [sum(loss[max(0, i - win + 1): i + 1]) / len(loss[max(0, i - win + 1): i + 1]) for i in range(len(loss))]
        a1.plot(steps, loss, color=color, alpha=0.15, lw=0.6)
        a1.plot(steps, sm, color=color, lw=1.6, label=f"{mode} (final {res['comparison'][mode]['train_loss_last10pct']:.4f})")
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel(f"flow-matching loss (per step; line: {win}-step mean)")
    a1.set_title("Training loss, same data / steps / seed")
    a1.legend()
    vsa = res["runs"]["vsa"]["curve"]
    a2.plot([r[0] for r in vsa], [r[2] for r in vsa], color="k", lw=1.4, label="VSA density set (ramp)")
    a2.plot([r[0] for r in vsa], [r[3] for r in vsa], color="tab:red", lw=1.0, ls="--",
            label="attention computed / dense (fwd)")
    a2.set_ylim(0, 1.05)
    a2.set_xlabel("step")
    a2.set_ylabel("fraction of dense attention")
    c = res["comparison"]
    a2.set_title(f"VSA compute: train FLOPs/step {c['vsa']['train_tflops_per_step']:.1f} vs "
                 f"{c['dense']['train_tflops_per_step']:.1f} TFLOP dense")
    a2.legend(loc="upper right")
    fig.suptitle(f"Test-bed Wan DiT trained from scratch: dense vs VSA (final density {res['final_density']}); "
                 f"held-out loss EMA {c['dense']['heldout_ema']:.4f} vs {c['vsa']['heldout_ema']:.4f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    p.add_argument("--seconds-per-run", type=float, default=200.0, help="training wall time budget of each run")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--steps", type=int, default=0, help="fixed step count (skips the smoke-based choice)")
    p.add_argument("--smoke-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-density", type=float, default=0.1)
    p.add_argument("--ramp-frac", type=float, default=0.3, help="ramp steps as a fraction of the steps")
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent-shape", type=int, nargs=4, default=None, metavar=("C", "F", "H", "W"))
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--work", default="/tmp/benchmarks_training", help="scratch directory of the runs")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--logs", default=None, help="where the run logs go (default: --results)")
    p.add_argument("--tag", default=None, help="file tag (default: <date>_<gpu>)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 3 steps per mode, batch 2, latent 4x8x16x16 "
                   "(512 tokens, 8 tiles), eager")
    a = p.parse_args(argv)
    if a.tiny:
        a.device, a.steps, a.batch, a.eval_batch, a.compile, a.latent_shape = "cpu", 3, 2, 2, False, [4, 8, 16, 16]

    from tools.train_testbed import TrainConfig

    work, results = Path(a.work), Path(a.results)
    logs = Path(a.logs) if a.logs else results
    for d in (work, results, logs):
        d.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    tag = a.tag or f"{datetime.date.today():%Y%m%d}_{'h100' if 'H100' in gpu else gpu.split()[-1].lower()}"
    extra = {"latent_shape": tuple(a.latent_shape)} if a.latent_shape else {}

    def cfg(mode, steps, batch, compile_, out, ramp, max_s=0.0, eval_batch=None):
        return TrainConfig(steps=steps, batch=batch, seed=a.seed, compile=compile_, out=str(out), log_every=1,
                           eval_every=0, warmup=min(a.warmup, max(1, steps // 10)), max_seconds=max_s,
                           device=a.device, attention=mode, final_density=a.final_density, ramp_steps=ramp,
                           eval_batch=eval_batch or a.eval_batch, **extra)

    print(f"[both] torch {torch.__version__}  device {gpu}  batch {a.batch}  compile {a.compile}", flush=True)
    smoke = {}
    batch, compile_ = a.batch, a.compile
    if not a.steps:
        n = a.smoke_steps
        while True:
            try:
                for mode in ("dense", "vsa"):
                    t0 = time.perf_counter()
                    s, rows, peak = _run(cfg(mode, n, batch, compile_, work / f"smoke_{mode}", ramp=n // 2, eval_batch=2),
                                         logs / f"training_{tag}_smoke_{mode}.log")
                    per, startup = _steady(rows)
                    smoke[mode] = {"s_per_step": per, "startup_s": startup, "peak_gib": peak, "batch": batch,
                                   "compile": compile_, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                                   "wall_s": time.perf_counter() - t0, "attn_work_last": rows[-1]["attn_work"]}
                    print(f"[both] smoke {mode}: {per * 1000:.0f} ms/step steady, start-up {startup:.1f} s, peak "
                          f"{peak:.1f} GiB, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, attn work "
                          f"{rows[-1]['attn_work']:.3f}, {smoke[mode]['wall_s']:.0f} s", flush=True)
                    if not all(math.isfinite(r["loss"]) for r in rows):
                        raise RuntimeError(f"smoke {mode}: non-finite loss")
                break
            except torch.cuda.OutOfMemoryError:
                if batch <= 4:
                    raise
                batch //= 2
                print(f"[both] out of memory: batch -> {batch} (both runs)", flush=True)
            except Exception:
                if not compile_:
                    traceback.print_exc()
                    sys.exit("[both] smoke failed: aborting")
                traceback.print_exc()
                compile_ = False
                print("[both] smoke failed compiled: retrying eager (both runs)", flush=True)
        per = max(smoke["dense"]["s_per_step"], smoke["vsa"]["s_per_step"])
        startup = max(smoke["dense"]["startup_s"], smoke["vsa"]["startup_s"])
        steps = max(20, min(a.max_steps, int(0.95 * (a.seconds_per_run - startup) / per)))
    else:
        steps = a.steps
    ramp = int(round(a.ramp_frac * steps))
    cap = a.seconds_per_run * 1.15 if not a.steps else 0.0
    print(f"[both] runs: {steps} steps, batch {batch}, compile {compile_}, ramp {ramp} steps to density "
          f"{a.final_density}, cap {cap:.0f} s each", flush=True)

    runs = {}
    for mode in ("dense", "vsa"):
        t0 = time.perf_counter()
        s, rows, peak = _run(cfg(mode, steps, batch, compile_, work / mode, ramp if mode == "vsa" else 0, cap),
                             logs / f"training_{tag}_{mode}.log")
        runs[mode] = {"summary": s, "peak_gib": peak, "wall_s": time.perf_counter() - t0,
                      "curve": [[int(r["step"]), r["loss"], r["density"], r["attn_work"], r["elapsed_s"]] for r in rows]}
        print(f"[both] {mode}: {s['steps_done']} steps in {s['wall_s']} s (peak {peak:.1f} GiB), last loss "
              f"{rows[-1]['loss']:.4f}, held-out raw {_heldout(s, 'eval_loss_final_raw'):.4f} ema "
              f"{_heldout(s, 'eval_loss_final_ema'):.4f}", flush=True)

    common = min(len(runs["dense"]["curve"]), len(runs["vsa"]["curve"]))
    tail = max(1, common // 10)
    comp = {}
    for mode, r in runs.items():
        losses = [row[1] for row in r["curve"][:common]]
        c = r["summary"]["compute"]
        comp[mode] = {
            "steps_done": r["summary"]["steps_done"],
            "train_loss_last10pct": sum(losses[-tail:]) / tail,
            "heldout_raw": _heldout(r["summary"], "eval_loss_final_raw"),
            "heldout_ema": _heldout(r["summary"], "eval_loss_final_ema"),
            "attn_fwd_fraction_final": c["attn_work_last_window"],
            "attn_fwd_fraction_mean": c["attn_work_mean"],
            "attn_fwd_tflops_per_step_final": c["fwd_flops_attention_per_step_last"] / 1e12,
            "attn_fwd_tflops_per_step_dense": c["fwd_flops_dense_attention_per_step"] / 1e12,
            "other_fwd_tflops_per_step": c["fwd_flops_other_per_step"] / 1e12,
            "train_tflops_per_step": c["train_flops_per_step_last"] / 1e12,
            "train_tflops_mean_per_step": 3.0 * (c["fwd_flops_dense_attention_per_step"] * c["attn_work_mean"]
                                                 + c["fwd_flops_other_per_step"]) / 1e12,
            "s_per_step": r["summary"]["wall_s"] / max(1, r["summary"]["steps_done"]),
        }
    rel = {k: comp["vsa"][k] / comp["dense"][k] - 1.0 for k in ("train_loss_last10pct", "heldout_raw", "heldout_ema")}
    res = {
        "what": "test-bed Wan DiT trained from scratch twice: dense vs VSA (gated coarse branch, sparsity ramp)",
        **run_header("training", argv), "device": gpu,
        "steps": steps, "batch": batch, "compile": compile_, "seed": a.seed, "final_density": a.final_density,
        "ramp_steps": ramp, "common_steps": common, "tail_steps": tail, "smoke": smoke,
        "comparison": {**comp, "relative_vsa_vs_dense": rel,
                       # the target: VSA's loss no more than 2% above dense (a lower loss meets it)
                       "target_at_most_2pct_above_dense": {k: v <= 0.02 for k, v in rel.items()}},
        "runs": runs,
    }
    out_json = results / f"training_{tag}.json"
    out_json.write_text(json.dumps(res, indent=1, default=str))
    _plot(results / f"training_{tag}.png", res)
    print(f"[both] wrote {out_json} and {results / f'training_{tag}.png'}", flush=True)
    print(f"{'':>8} {'steps':>6} {'loss last10%':>13} {'held-out raw':>13} {'held-out EMA':>13} {'attn fwd':>9} "
          f"{'train TFLOP/step':>17} {'s/step':>7}")
    for mode in ("dense", "vsa"):
        c = comp[mode]
        print(f"{mode:>8} {c['steps_done']:>6} {c['train_loss_last10pct']:>13.4f} {c['heldout_raw']:>13.4f} "
              f"{c['heldout_ema']:>13.4f} {c['attn_fwd_fraction_final']:>9.3f} {c['train_tflops_per_step']:>17.2f} "
              f"{c['s_per_step']:>7.3f}")
    print("[both] VSA vs dense: " + ", ".join(f"{k} {v * 100:+.2f}%" for k, v in rel.items())
          + f" (target: at most +2%: {'met' if all(v <= 0.02 for v in rel.values()) else 'missed'})", flush=True)
    return res


if __name__ == "__main__":
    main()
