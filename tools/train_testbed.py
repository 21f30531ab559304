"""Train the test-bed Wan DiT on procedural videos with rectified flow matching (as Wan is trained).

    python -m tools.train_testbed --steps 4000 --compile --out out/testbed --seed 0   # the shipped run (H100, 7 min)
    python -m tools.train_testbed --attention vsa --final-density 0.1 --ramp-steps 600 --compile --out out/vsa

`--attention vsa` trains with Video Sparse Attention from scratch: every self-attention site is sparsified
with VSA's 4x4x4 tiles, gets VSA's learned gate (`sparsify.training.add_vsa_gates`), and its density follows
VSA's ramp (`SparsityRamp`: dense, then in stairs to `--final-density` over `--ramp-steps`). The log then
also records the density and the attention work actually computed per step (the runtime's counters).

x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0 (MSE), t from a logit-normal, the model sees
timestep t * 1000. AdamW with warm-up and cosine decay, bf16 autocast on CUDA, an EMA of the weights (saved).
Outputs in `--out`: `testbed_wan.safetensors` (fp16 EMA weights, or the raw
ones if they evaluate better), `testbed_wan.json` (model config + training
metadata), `train_log.csv` (step, loss, lr, ...) and `train_summary.json`.

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsify.testbed.data import class_embeddings, make_batch, render, sample_params
from sparsify.testbed.model import LATENT_SHAPE, NUM_TRAIN_TIMESTEPS, TESTBED_CONFIG, build_testbed, count_params


@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults: the shipped test-bed run, which added `--compile`)."""

    steps: int = 4000
    out: str = "out/testbed"
    seed: int = 0
    batch: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    cond_drop: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    compile: bool = False
    log_every: int = 25
    eval_every: int = 1000
    eval_batch: int = 16  # held-out videos of every eval (5 noise levels each)
    max_seconds: float = 0.0  # stop (and still save) after this wall time; 0 = no limit
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    model_hook: str = ""  # "package.module:function", see the module docstring
    latent_shape: tuple[int, int, int, int] = LATENT_SHAPE  # [C, F, H, W]; C must be the model's in_channels
    attention: str = "dense"  # "dense" (the shipped run) or "vsa" (sparse attention with VSA's gates and ramp)
    final_density: float = 0.1  # --attention vsa: density after the ramp (0.1 = 90% sparsity)
    ramp_steps: int = 0  # --attention vsa: steps of the ramp from dense to final_density (0: sparse from step 0)

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1; got steps={self.steps}, batch={self.batch}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1); got {self.cond_drop}")
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        if len(self.latent_shape) != 4 or self.latent_shape[0] != TESTBED_CONFIG["in_channels"]:
            raise ValueError(
                f"latent_shape must be [C={TESTBED_CONFIG['in_channels']}, F, H, W]; got {self.latent_shape}"
            )
        if self.attention not in ("dense", "vsa"):
            raise ValueError(f"attention must be 'dense' or 'vsa'; got {self.attention!r}")
        if not 0.0 < self.final_density <= 1.0 or self.ramp_steps < 0:
            raise ValueError(f"final_density must be in (0, 1] and ramp_steps >= 0; got {self.final_density}, "
                             f"{self.ramp_steps}")


#: VSA's tile (4x4x4 = 64 tokens) for `--attention vsa`; the density is set by the ramp at every step.
VSA_TRAIN_RECIPE = {"version": 1, "defaults": {"method": "vsa", "tile": [4, 4, 4], "budget": {"density": 1.0}}}


def attention_flops(model: torch.nn.Module, batch: int, latent_shape) -> dict[str, float]:
    """Forward FLOPs per step of the test-bed: dense self-attention and an estimate of everything else.

    Self-attention: `4 * S^2 * D` per (sample, head, layer) (q.kT and p.v). The rest: `2 * params * tokens`
    over the blocks, patch embedding and output projection (the cross-attention to the 8 text tokens and the
    per-sample condition embedder are counted as if per token: a slight over-estimate).
    """
    c = TESTBED_CONFIG
    _, f, h, w = latent_shape
    pt, ph, pw = c["patch_size"]
    S = (f // pt) * (h // ph) * (w // pw)
    heads, d, layers = c["num_attention_heads"], c["attention_head_dim"], c["num_layers"]
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    per_token = sum(p.numel() for n, p in base.named_parameters()
                    if n.startswith(("blocks.", "patch_embedding.", "proj_out.")))
    return {"self_attention": 4.0 * S * S * d * heads * layers * batch, "other": 2.0 * per_token * S * batch}


def _lr_at(step: int, cfg: TrainConfig) -> float:
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
    g = torch.Generator().manual_seed(int(seed) + 1)
    params = sample_params(batch, seed, latent_shape=cfg.latent_shape)
    x0 = render(params, device=device, latent_shape=cfg.latent_shape)
    drop = torch.rand(batch, generator=g) < cfg.cond_drop
    cond = class_embeddings(params["labels"], drop=drop).to(device)
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
    latent_shape: tuple[int, int, int, int] = LATENT_SHAPE,
) -> dict[float, float]:
    """Flow-matching MSE on a fixed held-out batch at fixed noise levels (same videos and noise for every model)."""
    stance = torch.compiler.set_stance("force_eager")  # no recompiles of a compiled model for eval shapes
    with stance:
        return _eval_loss(model, ts, batch, seed, device, autocast, latent_shape)


def _eval_loss(model, ts, batch, seed, device, autocast, latent_shape) -> dict[float, float]:
    x0, _, cond = make_batch(batch, seed=seed, device=device, latent_shape=latent_shape)
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


def save_weights(model: torch.nn.Module, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Save fp16 weights `testbed_wan.safetensors` and `testbed_wan.json` (config + metadata) into `out_dir`."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out_dir / "testbed_wan.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    (out_dir / "testbed_wan.json").write_text(json.dumps({"config": cfg, **meta}, indent=1, default=str))
    return path


def train(
    cfg: TrainConfig,
    model_hook: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None,
    step_hook: Callable[[int, torch.nn.Module, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Train the test-bed from a seeded random init; see the module docstring. Returns the summary dict.

    Example (on a GPU; about 7 minutes on an H100)::

        summary = train(TrainConfig(steps=4000, out="out/testbed", compile=True))
    """
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_testbed(pretrained=False, device=device, seed=cfg.seed).train()
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
    params, ema_list = list(model.parameters()), list(ema.values())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    fwd = model
    if cfg.compile:
        model.compile_repeated_blocks(fullgraph=True)
    use_amp = device.type == "cuda"
    print(f"[train] params {n_params:,}  device {device}  batch {cfg.batch}  steps {cfg.steps}  amp {use_amp}",
          flush=True)

    log_path = out_dir / "train_log.csv"
    log_f = open(log_path, "w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "loss", "lr", "grad_norm", "elapsed_s", "samples_per_s", "density", "attn_work"])
    evals = []
    t_start = time.perf_counter()
    t_win, win_loss, win_n, win_gn = t_start, 0.0, 0, 0.0
    work_sum = dense_sum = win_work = win_dense = 0.0
    step = 0
    stopped_early = False
    density = 1.0
    for step in range(cfg.steps):
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
        last = step == cfg.steps - 1
        if (step + 1) % cfg.log_every == 0 or last:
            now = time.perf_counter()
            l, g_ = (win_loss / win_n).item(), (win_gn / win_n).item()
            sps = win_n * cfg.batch / (now - t_win)
            aw = win_work / win_dense if win_dense else 1.0  # attention computed / dense in this window
            work_sum, dense_sum = work_sum + (win_work if win_dense else win_n), dense_sum + (win_dense or win_n)
            log.writerow([step + 1, f"{l:.5f}", f"{lr:.3e}", f"{g_:.3f}", f"{now - t_start:.1f}", f"{sps:.1f}",
                          f"{density:.4f}", f"{aw:.4f}"])
            log_f.flush()
            print(f"[train] step {step + 1:5d}  loss {l:.4f}  lr {lr:.2e}  gnorm {g_:.2f}  "
                  f"{sps:7.1f} samples/s  {now - t_start:6.1f}s" + (f"  density {density:.3f} (attn work {aw:.3f})"
                                                                    if ramp is not None else ""), flush=True)
            t_win, win_loss, win_n, win_gn, win_work, win_dense = now, 0.0, 0, 0.0, 0.0, 0.0
            if cfg.max_seconds and now - t_start > cfg.max_seconds and not last:
                print(f"[train] time budget {cfg.max_seconds}s reached at step {step + 1}: stopping", flush=True)
                stopped_early = True
                break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            model.eval()
            ev = eval_loss(
                model, device=device, autocast=use_amp, latent_shape=cfg.latent_shape, batch=cfg.eval_batch
            )
            model.train()
            evals.append({"step": step + 1, "raw": ev})
            print(f"[train] eval step {step + 1}: " + " ".join(f"t={t}:{v:.4f}" for t, v in ev.items()), flush=True)
    wall = time.perf_counter() - t_start
    log_f.close()

    # Final evaluation of raw and EMA weights (fp32, no autocast), then ship the EMA weights.
    model.eval()
    raw_ev = eval_loss(model, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch)
    raw_state = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(ema[k])
    ema_ev = eval_loss(model, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch)
    init = build_testbed(pretrained=False, device=device, seed=cfg.seed)
    init_ev = eval_loss(init, device=device, latent_shape=cfg.latent_shape, batch=cfg.eval_batch)
    del init
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
        "params": n_params,
        "steps_done": step + 1,
        "stopped_early": stopped_early,
        "wall_s": round(wall, 1),
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
    save_weights(base, out_dir, {"training": {k: v for k, v in summary.items() if k != "evals"}})
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if ramp is not None:  # release the runtime sites and the SDPA patch (the gates stay in the saved weights)
        from sparsify.api import unsparsify

        unsparsify(base)
    print(f"[train] done: {step + 1} steps in {wall:.1f}s; eval (fp32) raw {raw_ev}, ema {ema_ev}, "
          f"random init {init_ev}; shipped {summary['shipped']}", flush=True)
    return summary


def _work(model) -> tuple[float, float]:
    from sparsify.training import attention_work

    return attention_work(model._orig_mod if hasattr(model, "_orig_mod") else model)


def _last_row(log_path: Path) -> dict | None:
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tools.train_testbed", description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    for name, val in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        elif isinstance(val, tuple):
            p.add_argument(flag, type=int, nargs=len(val), default=val, metavar=("C", "F", "H", "W"))
        else:
            p.add_argument(flag, type=type(val), default=val)
    args = p.parse_args(argv)
    return train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
