"""Train a test-bed Wan DiT on procedural videos with rectified flow matching (as Wan is trained).

    python -m tools.train_testbed --steps 4000 --compile --out out/testbed --seed 0   # the shipped run (H100, 7 min)
    python -m tools.train_testbed --config 16k --compile --max-seconds 420 --out out/t16k        # testbed-16k, call 1
    python -m tools.train_testbed --resume out/t16k --compile --max-seconds 420 --out out/t16k  # ... calls 2, 3, ...
    python -m tools.train_testbed --attention vsa --final-density 0.1 --ramp-steps 600 --compile --out out/vsa

`--config` picks the variant (`testbed`, the default, or `testbed-16k` / `16k`; see `sparsify.testbed.variants`):
its model, latent shape, data generator, output file stem and training defaults (`TRAIN_DEFAULTS`; flags given
on the command line win).

Long runs are split into calls: `--steps` is the total of the learning-rate schedule, `--max-seconds` (or
`--run-steps`) stops this call, and the call then writes `checkpoint.pt` (raw weights, EMA, optimizer, step,
RNG states, config) and the shipped weights of the current state. `--resume DIR` continues from
`DIR/checkpoint.pt` with the checkpoint's config (only the per-call flags `RESUME_FLAGS` may change), appends to
the log, and gives the same weights as one uninterrupted run. `--max-seconds` counts from the start of `train()`
(model build and compilation included); leave about a minute of the call for the final evaluation and saving.

`--attention vsa` trains with Video Sparse Attention from scratch: every self-attention site is sparsified
with VSA's 4x4x4 tiles, gets VSA's learned gate (`sparsify.training.add_vsa_gates`), and its density follows
VSA's ramp (`SparsityRamp`: dense, then in stairs to `--final-density` over `--ramp-steps`). The log then
also records the density and the attention work actually computed per step (the runtime's counters).

x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0 (MSE), t from a logit-normal, the model sees
timestep t * 1000. AdamW with warm-up and cosine decay, bf16 autocast on CUDA, an EMA of the weights (saved).
Outputs in `--out`: `<stem>.safetensors` (fp16 EMA weights, or the raw ones if they evaluate better; stem
`testbed_wan` or `testbed16k`), `<stem>.json` (model config + training metadata), `train_log.csv` (step, loss,
lr, ...), `train_summary.json` and `checkpoint.pt`.

To train with a different attention (e.g. a sparse processor), pass `model_hook` to `train()` or
`--model-hook package.module:function` on the command line: it is called as `hook(model)` after the model is
built and moved to the device and before the optimizer and `torch.compile` see it; it may modify the model in
place (install attention processors, add gates) or return a replacement. `step_hook(step, model, loss)` (loss a
0-dim tensor, not synchronized) is called after each optimizer step.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsify.testbed.model import NUM_TRAIN_TIMESTEPS, build_testbed, count_params
from sparsify.testbed.variants import get_variant

#: Training defaults per variant; `TrainConfig` fields left at None take these.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "testbed": {"steps": 4000, "batch": 32, "lr": 1e-3, "warmup": 150, "ema": 0.999, "eval_every": 1000,
                "eval_batch": 16, "checkpoint_every": 0},
    "testbed-16k": {"steps": 2000, "batch": 8, "lr": 3e-4, "warmup": 200, "ema": 0.999, "eval_every": 0,
                    "eval_batch": 4, "checkpoint_every": 200},
}

#: Fields a resumed run may set differently from its checkpoint (everything else must match).
RESUME_FLAGS: tuple[str, ...] = ("out", "resume", "max_seconds", "run_steps", "compile", "device", "log_every",
                                 "eval_every", "eval_batch", "checkpoint_every", "steps")

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Training hyper-parameters; fields left at None take the variant's `TRAIN_DEFAULTS`.

    Example:
        >>> TrainConfig(config="16k", device="cpu").lr
        0.0003
    """

    config: str = "testbed"  # variant: "testbed" or "testbed-16k" (alias "16k")
    steps: int | None = None  # total steps of the learning-rate schedule
    out: str = "out/testbed"
    seed: int = 0
    batch: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.05
    warmup: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float | None = None
    cond_drop: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    compile: bool = False
    log_every: int = 25
    eval_every: int | None = None
    eval_batch: int | None = None  # held-out videos of every eval (5 noise levels each)
    max_seconds: float = 0.0  # stop this call (and still save) after this wall time; 0 = no limit
    run_steps: int = 0  # stop this call after this many steps; 0 = no limit
    checkpoint_every: int | None = None  # also write checkpoint.pt every this many steps; 0 = only when stopping
    resume: str = ""  # directory holding checkpoint.pt to continue from
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    model_hook: str = ""  # "package.module:function", see the module docstring
    model_overrides: dict[str, Any] = field(default_factory=dict)  # WanTransformer3DModel kwargs over the variant's
    latent_shape: tuple[int, int, int, int] | None = None  # [C, F, H, W]; default: the variant's
    attention: str = "dense"  # "dense" (the shipped run) or "vsa" (sparse attention with VSA's gates and ramp)
    final_density: float = 0.1  # --attention vsa: density after the ramp (0.1 = 90% sparsity)
    ramp_steps: int = 0  # --attention vsa: steps of the ramp from dense to final_density (0: sparse from step 0)

    def __post_init__(self):
        variant = get_variant(self.config)
        self.config = variant.name
        for k, v in TRAIN_DEFAULTS[variant.name].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.latent_shape is None:
            self.latent_shape = variant.latent_shape
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1; got steps={self.steps}, batch={self.batch}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1); got {self.cond_drop}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1); got {self.ema}")
        if self.run_steps < 0 or self.max_seconds < 0 or self.checkpoint_every < 0:
            raise ValueError(f"run_steps, max_seconds and checkpoint_every must be >= 0; got {self.run_steps}, "
                             f"{self.max_seconds}, {self.checkpoint_every}")
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        channels = {**variant.config, **self.model_overrides}["in_channels"]
        if len(self.latent_shape) != 4 or self.latent_shape[0] != channels:
            raise ValueError(f"latent_shape must be [C={channels}, F, H, W] for {variant.name}; got {self.latent_shape}")
        if self.attention not in ("dense", "vsa"):
            raise ValueError(f"attention must be 'dense' or 'vsa'; got {self.attention!r}")
        if not 0.0 < self.final_density <= 1.0 or self.ramp_steps < 0:
            raise ValueError(f"final_density must be in (0, 1] and ramp_steps >= 0; got {self.final_density}, "
                             f"{self.ramp_steps}")


#: VSA's tile (4x4x4 = 64 tokens) for `--attention vsa`; the density is set by the ramp at every step.
VSA_TRAIN_RECIPE = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 1.0}}}


def attention_flops(model: torch.nn.Module, batch: int, latent_shape) -> dict[str, float]:
    """Forward FLOPs per step of a test-bed: dense self-attention and an estimate of everything else.

    Self-attention: `4 * S^2 * D` per (sample, head, layer) (q.kT and p.v). The rest: `2 * params * tokens`
    over the blocks, patch embedding and output projection (the cross-attention to the text tokens and the
    per-sample condition embedder are counted as if per token: a slight over-estimate).
    """
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    c = base.config
    _, f, h, w = latent_shape
    pt, ph, pw = c["patch_size"]
    S = (f // pt) * (h // ph) * (w // pw)
    heads, d, layers = c["num_attention_heads"], c["attention_head_dim"], c["num_layers"]
    per_token = sum(p.numel() for n, p in base.named_parameters()
                    if n.startswith(("blocks.", "patch_embedding.", "proj_out.")))
    return {"self_attention": 4.0 * S * S * d * heads * layers * batch, "other": 2.0 * per_token * S * batch}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at `cfg.steps` (a function of the step alone)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    prog = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def _resolve_hook(spec: str) -> Callable | None:
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"--model-hook must be 'package.module:function'; got {spec!r}")
    return getattr(importlib.import_module(mod), fn)


def flow_matching_batch(
    batch: int, seed: int, device: str | torch.device, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch: (x_t, timestep*1000, cond, target v = eps - x0), deterministic for `seed`."""
    data = get_variant(cfg.config).data_module()
    g = torch.Generator().manual_seed(int(seed) + 1)
    params = data.sample_params(batch, seed, latent_shape=cfg.latent_shape)
    x0 = data.render(params, device=device, latent_shape=cfg.latent_shape)
    drop = torch.rand(batch, generator=g) < cfg.cond_drop
    cond = data.class_embeddings(params["labels"], drop=drop).to(device)
    t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=g)).to(device)
    gd = torch.Generator(device=device).manual_seed(int(seed) + 2)
    eps = torch.randn(x0.shape, generator=gd, device=device)
    tb = t[:, None, None, None, None]
    return (1 - tb) * x0 + tb * eps, t * NUM_TRAIN_TIMESTEPS, cond, eps - x0


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    ts: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    batch: int = 16,
    seed: int = 10**6,
    device: str | torch.device = "cpu",
    autocast: bool = False,
    latent_shape: tuple[int, int, int, int] | None = None,
    name: str = "testbed",
) -> dict[float, float]:
    """Flow-matching MSE on a fixed held-out batch at fixed noise levels (same videos and noise for every model)."""
    stance = torch.compiler.set_stance("force_eager")  # no recompiles of a compiled model for eval shapes
    with stance:
        return _eval_loss(model, ts, batch, seed, device, autocast, latent_shape, name)


def _eval_loss(model, ts, batch, seed, device, autocast, latent_shape, name) -> dict[float, float]:
    variant = get_variant(name)
    latent_shape = variant.latent_shape if latent_shape is None else latent_shape
    x0, _, cond = variant.data_module().make_batch(batch, seed=seed, device=device, latent_shape=latent_shape)
    g = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn(x0.shape, generator=g).to(device)
    out = {}
    for t in ts:
        xt = (1 - t) * x0 + t * eps
        timestep = torch.full((batch,), t * NUM_TRAIN_TIMESTEPS, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            pred = model(hidden_states=xt, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        out[t] = F.mse_loss(pred.float(), eps - x0).item()
    return out


def save_weights(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any], stem: str = "testbed_wan") -> Path:
    """Save fp16 weights `<stem>.safetensors` and `<stem>.json` (config + metadata) into `out_dir`."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{stem}.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    (out_dir / f"{stem}.json").write_text(json.dumps({"config": cfg, **meta}, indent=1, default=str))
    return path


def save_checkpoint(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    step: int, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Write the full training state (resumable with `--resume`) to `path` atomically."""
    state = {
        "step": step,  # the next step to run
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.items()},
        "optimizer": opt.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": asdict(cfg),
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(directory: str | Path, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Read `directory/checkpoint.pt`; when `cfg` is given, check it matches except for `RESUME_FLAGS`."""
    path = Path(directory) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--resume {directory}: no {CHECKPOINT} there (a run writes it into its --out)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if cfg is not None:
        saved = ck["config"]
        mine = asdict(cfg)
        diff = [k for k in mine if k not in RESUME_FLAGS and _norm(mine[k]) != _norm(saved.get(k))]
        if diff:
            raise ValueError(f"--resume {directory}: config differs from the checkpoint's in {diff} "
                             f"(checkpoint: {[saved.get(k) for k in diff]}, now: {[mine[k] for k in diff]}); only "
                             f"{', '.join(RESUME_FLAGS)} may change on resume")
    return ck


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def train(
    cfg: TrainConfig,
    model_hook: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None,
    step_hook: Callable[[int, torch.nn.Module, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Train a test-bed from a seeded random init or a checkpoint; see the module docstring. Returns the summary.

    Example (on a GPU; about 7 minutes on an H100)::

        summary = train(TrainConfig(steps=4000, out="out/testbed", compile=True))
        summary = train(TrainConfig(config="16k", max_seconds=420, compile=True, out="out/t16k"))  # call 1
        summary = train(TrainConfig(config="16k", max_seconds=420, compile=True, out="out/t16k",
                                    resume="out/t16k"))                                           # call 2
    """
    t_start = time.perf_counter()
    variant = get_variant(cfg.config)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def build():
        return build_testbed(pretrained=False, device=device, seed=cfg.seed, name=variant.name,
                             overrides=cfg.model_overrides)

    model = build().train()
    hook = model_hook or _resolve_hook(cfg.model_hook)
    if hook is not None:
        model = hook(model) or model
    ramp = None
    if cfg.attention == "vsa":
        from sparsify.api import sparsify
        from sparsify.training import SparsityRamp, add_vsa_gates

        sparsify(model, VSA_TRAIN_RECIPE)
        add_vsa_gates(model)
        ramp = SparsityRamp(final_density=cfg.final_density, ramp_steps=cfg.ramp_steps)
    flops = attention_flops(model, cfg.batch, cfg.latent_shape)
    n_params = count_params(model)
    ema = {k: p.detach().clone().float() for k, p in model.named_parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    start, evals, init_ev, wall_before = 0, [], None, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        with torch.no_grad():
            for k, v in ck["ema"].items():
                ema[k].copy_(v)
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and ck["rng_cuda"]:
            torch.cuda.set_rng_state_all(ck["rng_cuda"])
        start, evals, init_ev = ck["step"], ck.get("evals", []), ck.get("eval_loss_random_init")
        wall_before = ck.get("wall_s_total", 0.0)
        if start >= cfg.steps:
            raise ValueError(f"--resume {cfg.resume}: the checkpoint is at step {start}, the schedule has "
                             f"{cfg.steps} steps; nothing to do (pass a larger --steps to extend it)")
    params, ema_list = list(model.parameters()), [ema[k] for k, _ in model.named_parameters()]
    fwd = model
    if cfg.compile:
        model.compile_repeated_blocks(fullgraph=True)
    use_amp = device.type == "cuda"
    print(f"[train] {variant.name}  params {n_params:,}  device {device}  batch {cfg.batch}  steps {start}->"
          f"{cfg.steps}  amp {use_amp}  fwd TFLOP/step {(flops['self_attention'] + flops['other']) / 1e12:.3g}",
          flush=True)

    log_path = out_dir / "train_log.csv"
    new_log = not (ck is not None and log_path.exists())
    log_f = open(log_path, "w" if new_log else "a", newline="")
    log = csv.writer(log_f)
    if new_log:
        log.writerow(["step", "loss", "lr", "grad_norm", "elapsed_s", "samples_per_s", "density", "attn_work"])
    ck_path = out_dir / CHECKPOINT

    def checkpoint(next_step: int) -> None:
        save_checkpoint(ck_path, model, ema, opt, next_step, cfg, {
            "evals": evals, "eval_loss_random_init": init_ev,
            "wall_s_total": wall_before + time.perf_counter() - t_start})

    t_win, win_loss, win_n, win_gn = time.perf_counter(), 0.0, 0, 0.0
    work_sum = dense_sum = win_work = win_dense = 0.0
    step = start - 1
    stop = ""
    density = 1.0
    for step in range(start, cfg.steps):
        lr = _lr_at(step, cfg)
        for gr in opt.param_groups:
            gr["lr"] = lr
        if ramp is not None:
            density = ramp.apply(model, step)
            w0, d0 = _work(model)
        xt, timestep, cond, target = flow_matching_batch(cfg.batch, cfg.seed * 1_000_003 + step, device, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = fwd(hidden_states=xt, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        if ramp is not None:
            w1, d1 = _work(model)
            win_work, win_dense = win_work + w1 - w0, win_dense + d1 - d0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, [p.detach().float() for p in params], 1 - d)
        if step_hook is not None:
            step_hook(step, model, loss.detach())
        win_loss += loss.detach()
        win_gn += gn.detach()
        win_n += 1
        if step + 1 == cfg.steps:
            stop = "done"
        elif cfg.run_steps and step + 1 - start >= cfg.run_steps:
            stop = f"--run-steps {cfg.run_steps} reached"
        elif cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds:
            stop = f"time budget {cfg.max_seconds}s reached"
        if (step + 1) % cfg.log_every == 0 or stop:
            now = time.perf_counter()
            l, g_ = (win_loss / win_n).item(), (win_gn / win_n).item()
            sps = win_n * cfg.batch / (now - t_win)
            aw = win_work / win_dense if win_dense else 1.0  # attention computed / dense in this window
            work_sum, dense_sum = work_sum + (win_work if win_dense else win_n), dense_sum + (win_dense or win_n)
            log.writerow([step + 1, f"{l:.5f}", f"{lr:.3e}", f"{g_:.3f}", f"{wall_before + now - t_start:.1f}",
                          f"{sps:.1f}", f"{density:.4f}", f"{aw:.4f}"])
            log_f.flush()
            print(f"[train] step {step + 1:5d}  loss {l:.4f}  lr {lr:.2e}  gnorm {g_:.2f}  "
                  f"{sps:7.1f} samples/s  {now - t_start:6.1f}s" + (f"  density {density:.3f} (attn work {aw:.3f})"
                                                                    if ramp is not None else ""), flush=True)
            t_win, win_loss, win_n, win_gn, win_work, win_dense = now, 0.0, 0, 0.0, 0.0, 0.0
        if stop:
            break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            model.eval()
            ev = eval_loss(model, device=device, autocast=use_amp, latent_shape=cfg.latent_shape,
                           batch=cfg.eval_batch, name=variant.name)
            model.train()
            evals.append({"step": step + 1, "raw": ev})
            print(f"[train] eval step {step + 1}: " + " ".join(f"t={t}:{v:.4f}" for t, v in ev.items()), flush=True)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            checkpoint(step + 1)
    log_f.close()
    if stop != "done":
        print(f"[train] {stop} at step {step + 1} of {cfg.steps}: stopping (resume with --resume {out_dir})",
              flush=True)
    wall = time.perf_counter() - t_start
    model.eval()
    if init_ev is None:
        init = build()
        init_ev = eval_loss(init, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch,
                            name=variant.name)
        del init
    checkpoint(step + 1)  # the raw training state, before the EMA is swapped in for shipping

    # Final evaluation of raw and EMA weights (fp32, no autocast), then ship the EMA weights.
    raw_ev = eval_loss(model, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch, name=variant.name)
    raw_state = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(ema[k])
    ema_ev = eval_loss(model, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch, name=variant.name)
    use_ema = sum(ema_ev.values()) <= sum(raw_ev.values())
    last_aw = float(rows_last["attn_work"]) if (rows_last := _last_row(log_path)) else 1.0
    mean_aw = work_sum / dense_sum if dense_sum else 1.0
    compute = {
        "attention": cfg.attention,
        "final_density": cfg.final_density if ramp is not None else 1.0,
        "ramp_steps": cfg.ramp_steps if ramp is not None else 0,
        "attn_work_last_window": last_aw,  # attention computed / dense (forward; padding and coarse branch counted)
        "attn_work_mean": mean_aw,
        "fwd_flops_dense_attention_per_step": flops["self_attention"],
        "fwd_flops_other_per_step": flops["other"],
        "fwd_flops_attention_per_step_last": flops["self_attention"] * last_aw,
        "train_flops_per_step_last": 3.0 * (flops["self_attention"] * last_aw + flops["other"]),  # bwd = 2x fwd
        "train_flops_per_step_dense": 3.0 * (flops["self_attention"] + flops["other"]),
    }
    if not use_ema:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(raw_state[k])
    summary = {
        "variant": variant.name,
        "params": n_params,
        "steps_done": step + 1,
        "steps_this_call": step + 1 - start,
        "stopped_early": stop != "done",
        "wall_s": round(wall, 1),
        "wall_s_total": round(wall_before + wall, 1),
        "final_train_loss_window": None,
        "eval_loss_final_raw": raw_ev,
        "eval_loss_final_ema": ema_ev,
        "eval_loss_random_init": init_ev,
        "shipped": "ema" if use_ema else "raw",
        "compute": compute,
        "evals": evals,
        "train_config": asdict(cfg),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if rows:
        summary["final_train_loss_window"] = float(rows[-1]["loss"])
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    save_weights(base, out_dir, {"training": {k: v for k, v in summary.items() if k != "evals"}}, stem=variant.stem)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if ramp is not None:  # release the runtime sites and the SDPA patch (the gates stay in the saved weights)
        from sparsify.api import unsparsify

        unsparsify(base)
    print(f"[train] {'done' if stop == 'done' else 'stopped'}: step {step + 1} of {cfg.steps} ({step + 1 - start} "
          f"in {wall:.1f}s); eval (fp32) raw {raw_ev}, ema {ema_ev}, random init {init_ev}; shipped "
          f"{summary['shipped']} to {out_dir / variant.stem}.safetensors", flush=True)
    return summary


def _work(model) -> tuple[float, float]:
    from sparsify.training import attention_work

    return attention_work(model._orig_mod if hasattr(model, "_orig_mod") else model)


def _last_row(log_path: Path) -> dict | None:
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.train_testbed", description=__doc__.split("\n")[0])
    v1 = {**asdict(TrainConfig(device="cpu")), **TRAIN_DEFAULTS["testbed"]}
    for f in fields(TrainConfig):
        flag, val = "--" + f.name.replace("_", "-"), v1[f.name]
        kw: dict[str, Any] = {"default": argparse.SUPPRESS}
        if f.name == "config":
            kw.update(choices=sorted({n for v in map(get_variant, TRAIN_DEFAULTS) for n in (v.name, *v.aliases)}))
        elif isinstance(val, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        elif f.name == "latent_shape":
            kw.update(type=int, nargs=4, metavar=("C", "F", "H", "W"))
        elif f.name == "model_overrides":
            kw.update(type=json.loads, metavar="JSON")
        else:
            kw.update(type=type(val))
        p.add_argument(flag, **kw)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: flags not given take the variant's defaults, or the checkpoint's with `--resume`."""
    args = vars(_parser().parse_args(argv))
    if args.get("resume"):
        saved = load_checkpoint(args["resume"])["config"]
        given = {k: v for k, v in args.items() if k not in RESUME_FLAGS}
        if "config" in given:
            given["config"] = get_variant(given["config"]).name
        diff = {k: v for k, v in given.items() if _norm(v) != _norm(saved.get(k))}
        if diff:
            raise SystemExit(f"--resume {args['resume']}: {sorted(diff)} differ from the checkpoint's config; only "
                             f"{', '.join(RESUME_FLAGS)} may change on resume")
        args = {**saved, **{k: v for k, v in args.items() if k in RESUME_FLAGS}}
    return train(TrainConfig(**args))


if __name__ == "__main__":
    main()
