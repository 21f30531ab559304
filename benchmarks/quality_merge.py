"""`python -m benchmarks.quality merge`: whole-block against key-side token merging, ratio by ratio.

On a learned test-bed (`--model`, default `testbed-16k`), `--videos` videos (seed 1234, classes 0, 1, ...) sampled
with `--steps` Euler steps and classifier-free guidance `--guidance` from the same noise, one row per variant:

- `dense`;
- `block r`: `sparsify.generation.merge.merge_blocks(model, r, tile)` in every block: r of each 3-D tile's tokens
  merged into their most similar token before norm1 and restored after the FFN (queries, keys, MLP: all fewer);
- `key r`: the `keymerge` recipe method at density 1 - r in every self-attention: r of each tile's keys and
  values merged (USV's rule, head-averaged keys), every query kept, a `+log(size)` bias per merged key;
- `key r, no size bias`: the same merge without the bias (the ablation of proportional attention).

Per row: the model-output error of single forwards (relative L2 against dense, the mean over a procedural video of
seed 3 noised to t = 0.3 and 0.7: `sparsify.testbed.example_inputs`; what one step's merging costs before 50 steps
compound it), PSNR and SSIM of the samples against dense (`torchmetrics`, all videos at once), the relative L2 error
of x_t against the dense trajectory at the middle step and of the sample, and the share of attention work (query-key
pairs over dense; block merging's own share is (1 - r)^2). On CUDA also the measured DiT time of the sampling run
(wall, synchronised, after a 2-step warm-up per row), and the median time of one block of the Wan-14B config (random
bf16 weights; `--no-wan` skips it) at `--wan-grid`: dense (cuDNN, and SDPA's default backend), block-merged and
key-merged at each ratio in `--wan-tile` tiles. Merging needs whole tiles and a recipe tile holds 64 or 128 tokens, so
the default grid is 20x44x80 (70,400 tokens), the largest under 720p and 81 frames (21x45x80) that 4x4x4 divides.
Key-merged attention runs SDPA with the bias on whichever backend takes it.
Writes `benchmarks/results/quality_merge_<date>.json`.
"""

from __future__ import annotations

import contextlib
import time

import torch

from sparsify.methods import register_method
from sparsify.methods.keymerge import KeyMerge


FORWARD_NOISE = (0.3, 0.7)  # noise levels of the single-forward probes


@register_method("keymerge-unbiased")
class UnbiasedKeyMerge(KeyMerge):
    """Key-side merging without the `+log(size)` bias: the ablation row (not a product method)."""

    proportional = False


def _triple(text: str, arg: str) -> tuple[int, int, int]:
    try:
        t = tuple(int(x) for x in text.split("x"))
    except ValueError:
        t = ()
    if len(t) != 3 or min(t) < 1:
        raise SystemExit(f"{arg}: three positive integers TxHxW (e.g. 4x4x4); got {text!r}")
    return t


def _keymerge_recipe(ratio: float, tile, method: str = "keymerge") -> dict:
    return {"version": 1, "defaults": {"method": method, "tile": list(tile), "budget": {"density": 1.0 - ratio}}}


def wan_block_times(ratios, grid, tile, device, reps: int) -> list[dict]:
    """Median ms of one Wan-14B block (random bf16 weights) at `grid`: dense, block-merged, key-merged.

    Example:
        >>> # wan_block_times([0.25, 0.5], (20, 44, 80), (4, 4, 4), torch.device("cuda"), reps=5)
    """
    from benchmarks._common import WAN_14B, build_wan
    from benchmarks.e2e import _block_inputs, _cudnn, timed
    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.adapters import adapter_for
    from sparsify.generation.merge import forward_geometry, merge_blocks

    model = build_wan(WAN_14B, num_layers=1, device=device)
    T, H, W = grid
    p = WAN_14B["patch_size"]

    def inputs():
        return dict(hidden_states=torch.randn(1, WAN_14B["in_channels"], T * p[0], H * p[1], W * p[2],
                                              device=device, dtype=torch.bfloat16),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=torch.randn(1, 512, WAN_14B["text_dim"], device=device,
                                                      dtype=torch.bfloat16), return_dict=False)

    kw = inputs()
    with torch.no_grad():
        bargs, bkw = _block_inputs(model, kw)  # captured unmerged: the mergers' pre-hooks would rewrite them
    geometry = forward_geometry(model, (), kw, adapter_for(model))

    def block_ms(cudnn: bool) -> float:
        with torch.no_grad(), (_cudnn(device) if cudnn else contextlib.nullcontext()):
            return timed(lambda: model.blocks[0](*bargs, **bkw), tuple, device, reps)

    rows = [{"variant": "dense (cuDNN)", "ratio": 0.0, "block_ms": block_ms(True)},
            {"variant": "dense (SDPA default backend)", "ratio": 0.0, "block_ms": block_ms(False)}]
    for r in ratios:
        merging = merge_blocks(model, r, tile=tile)
        try:
            merging.set_geometry(geometry)
            rows.append({"variant": f"block {r:g}", "ratio": r, "block_ms": block_ms(True)})
            assert merging.mergers[0].tokens_in[-1] < bargs[0].shape[1], "the block ran unmerged"
        finally:
            merging.remove()
        sparsify(model, _keymerge_recipe(r, tile))
        try:
            with torch.no_grad():
                model(**kw)  # one forward gives the runtime its token grid, then the block runs alone
            rows.append({"variant": f"key {r:g}", "ratio": r, "block_ms": block_ms(False)})
            site = next(s for s in installed_sites(model) if s.path == "blocks.0.attn1")
            assert site.work < site.dense_work, "the block's keys were not merged"
        finally:
            unsparsify(model)
    for row in rows:
        row["x_dense"] = round(rows[0]["block_ms"] / row["block_ms"], 3)
        row["block_ms"] = round(row["block_ms"], 3)
    return rows


def merge_quality(a, argv) -> dict:
    """The `merge` subcommand (see the module docstring)."""
    from benchmarks._common import parse_list, run_header, write_result
    from benchmarks.quality import sample_trajectory, step_errors, video_metrics
    from sparsify import installed_sites, sparsify, unsparsify
    from sparsify.generation.merge import merge_blocks
    from sparsify.testbed import build_testbed, example_inputs, get_variant

    psnr, ssim = video_metrics()
    latent = None
    if a.tiny:
        a.model, a.steps, a.videos, a.ratios, a.device, a.no_wan = "testbed", 2, 1, "0.25", "cpu", True
        latent = (4, 8, 16, 16)  # 512 tokens, 8 tiles of 4x4x4
    ratios = parse_list(a.ratios, float, "--ratios")
    if not ratios or not all(0.0 < r <= 0.5 for r in ratios):
        raise SystemExit(f"--ratios: comma-separated numbers in (0, 0.5] (the share of each tile merged); "
                         f"got {a.ratios!r}")
    tile, wan_tile, wan_grid = (_triple(v, arg) for v, arg in ((a.tile, "--tile"), (a.wan_tile, "--wan-tile"),
                                                                (a.wan_grid, "--wan-grid")))
    if any(g % t for g, t in zip(wan_grid, wan_tile)):
        raise SystemExit(f"--wan-tile {a.wan_tile} must divide --wan-grid {a.wan_grid} (merging needs whole tiles)")
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    variant = get_variant(a.model)
    data = variant.data_module()
    latent = latent or variant.latent_shape
    model = build_testbed(device=dev, name=variant.name, weights=a.weights, dtype=dtype)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(a.videos, *latent, generator=g).to(dev, dtype)
    cond = data.class_embeddings(torch.arange(a.videos) % data.NUM_CLASSES).to(dev, dtype)
    t_start = time.perf_counter()

    def sample():
        if dev.type == "cuda":
            sample_trajectory(model, noise, cond, steps=2, guidance=a.guidance, shift=a.shift)  # warm-up
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, traj = sample_trajectory(model, noise, cond, steps=a.steps, guidance=a.guidance, shift=a.shift)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return x, traj, (time.perf_counter() - t0) * 1e3 if dev.type == "cuda" else None

    probes = [example_inputs(1, seed=3, device=dev, dtype=dtype, t=t, latent_shape=latent, name=variant.name)
              for t in FORWARD_NOISE]

    def forwards():
        with torch.no_grad():
            return [model(**kw)[0].float() for kw in probes]

    dense, dense_traj, dense_ms = sample()
    dense_out = forwards()
    rows = []

    def row(name, ratio, x, traj, ms, work, outs):
        err = sum(float((o - d).norm() / d.norm()) for o, d in zip(outs, dense_out)) / len(outs)
        steps_err = step_errors(traj, dense_traj)
        rows.append({"variant": name, "ratio": ratio, "forward_error": round(err, 4),
                     "psnr_db": round(psnr(x, dense), 2), "ssim": round(ssim(x, dense), 4),
                     "error_mid": round(steps_err[a.steps // 2], 4), "error_final": round(steps_err[-1], 4),
                     "attention_work": round(work, 4), "dit_ms": None if ms is None else round(ms, 1),
                     "x_dense": None if ms is None else round(dense_ms / ms, 3)})
        print({k: v for k, v in rows[-1].items()}, flush=True)

    row("dense", 0.0, dense, dense_traj, dense_ms, 1.0, dense_out)
    for r in ratios:
        merging = merge_blocks(model, r, tile=tile)
        try:
            x, traj, ms = sample()
            outs = forwards()
        finally:
            merging.remove()
        kept = 1.0 - int(r * tile[0] * tile[1] * tile[2]) / (tile[0] * tile[1] * tile[2])
        row(f"block {r:g}", r, x, traj, ms, kept * kept, outs)
        for method, label in (("keymerge", f"key {r:g}"), ("keymerge-unbiased", f"key {r:g}, no size bias")):
            sparsify(model, _keymerge_recipe(r, tile, method))
            try:
                x, traj, ms = sample()
                sites = installed_sites(model)
                work = sum(s.work for s in sites) / sum(s.dense_work for s in sites)
                outs = forwards()
            finally:
                unsparsify(model)
            row(label, r, x, traj, ms, work, outs)
    wan = None
    if not a.no_wan and dev.type == "cuda":
        model = None
        torch.cuda.empty_cache()
        wan = {"grid": list(wan_grid), "tile": list(wan_tile),
               "rows": wan_block_times(ratios, wan_grid, wan_tile, dev, a.reps)}
    lines = ["| variant | forward error | PSNR dB | SSIM | x_t error, mid step | final error | attention work | DiT ms "
             "| x dense |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "- | -" if r["dit_ms"] is None else f"{r['dit_ms']:.1f} | {r['x_dense']:.2f}"
        lines.append(f"| {r['variant']} | {r['forward_error']:.4f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                     f"{r['error_mid']:.4f} | {r['error_final']:.4f} | {r['attention_work']:.3f} | {t} |")
    if wan:
        lines += ["", f"Wan-14B block, grid {'x'.join(map(str, wan_grid))}, tile {'x'.join(map(str, wan_tile))}:",
                  "| variant | block ms | x dense (cuDNN) |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['block_ms']:.2f} | {r['x_dense']:.2f} |" for r in wan["rows"]]
    table = "\n".join(lines)
    print(table)
    meta = {"benchmark": "quality merge", **run_header("quality", argv), "model": variant.name,
            "latent_shape": list(latent), "dtype": a.dtype, "steps": a.steps, "videos": a.videos,
            "guidance_scale": a.guidance, "shift": a.shift, "tile": list(tile), "ratios": ratios,
            "wall_s": round(time.perf_counter() - t_start, 1), "table": table, "rows": rows, "wan14b_block": wan}
    write_result(meta, a.out, "quality_merge")
    return meta


def add_arguments(sub) -> None:
    """The `merge` subcommand's parser under `python -m benchmarks.quality`."""
    p = sub.add_parser("merge", help="token merging through whole blocks against key-side merging with "
                       "proportional attention (PSNR / SSIM vs dense; block times at the Wan-14B shape on CUDA)")
    p.add_argument("--model", default="testbed-16k", help="test-bed variant: testbed-16k (default) or testbed")
    p.add_argument("--weights", default=None, help="a safetensors file of the variant (default: the shipped one)")
    p.add_argument("--ratios", default="0.125,0.25,0.5", help="shares of each tile merged, in (0, 0.5]")
    p.add_argument("--tile", default="4x4x4", help="the 3-D tile merging happens in on the test-bed")
    p.add_argument("--videos", type=int, default=2, help="videos per row (seed 1234, classes 0, 1, ...)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of every sampling run")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the schedule")
    p.add_argument("--wan-grid", default="20x44x80", help="token grid of the Wan-14B block timing (default: the "
                   "largest under 720p and 81 frames, 21x45x80, that 4x4x4 tiles divide)")
    p.add_argument("--wan-tile", default="4x4x4", help="merge tile of the Wan-14B block timing (must divide the grid; "
                   "a recipe tile of 64 or 128 tokens)")
    p.add_argument("--reps", type=int, default=5, help="timed repeats of each Wan-14B block")
    p.add_argument("--no-wan", action="store_true", help="skip the Wan-14B block timing (always skipped without CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and latents")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the 4k test-bed at 512 tokens, 2 steps, one "
                   "video, ratio 0.25")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_merge_<date>.json)")
