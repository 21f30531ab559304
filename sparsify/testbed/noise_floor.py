"""Noise floor of a test-bed's sampler: how far bf16 (or another SDPA kernel) moves a dense trajectory from fp32."""

from __future__ import annotations

import copy
import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from .model import sample

#: Precisions of a run name `<precision>[-<backend>]` and their latents dtype. `bf16`/`fp16`: every weight in that
#: dtype (as `build_testbed(dtype=...)` casts); `bf16mixed`: bf16 except the model's `_keep_in_fp32_modules` (Wan:
#: rope, time embedder, modulation tables, norms; as diffusers' `from_pretrained(torch_dtype=...)` loads); `amp`:
#: fp32 weights and latents under bf16 autocast (as the test-beds are trained).
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                      "bf16mixed": torch.bfloat16, "amp": torch.float32}
#: SDPA backends of a run name, forced with `torch.nn.attention.sdpa_kernel`.
BACKENDS: tuple[str, ...] = ("flash", "cudnn", "efficient", "math")


@dataclass
class FloorRun:
    """One run against the fp32 reference trajectory.

    Attributes:
        name: `<precision>[-<backend>]`, e.g. `bf16`, `bf16-cudnn`, `amp`.
        psnr_db: PSNR of the final latents clamped to the data range [-1, 1] (data range 2), `inf` when equal.
        final_rel_err: ||x - x_ref|| / ||x_ref|| of the final latents.
        step_rel_err: the same after every Euler step (`steps` values, the last one is `final_rel_err`).
    """

    name: str
    psnr_db: float
    final_rel_err: float
    step_rel_err: list[float] = field(default_factory=list)


@dataclass
class NoiseFloor:
    """The result of `noise_floor`: the sampler settings and one `FloorRun` per compared run."""

    steps: int
    guidance_scale: float
    shift: float
    reference: str
    psnr_backend: str
    runs: list[FloorRun]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (`inf` PSNR as the string "inf")."""
        d = asdict(self)
        for r in d["runs"]:
            r["psnr_db"] = r["psnr_db"] if math.isfinite(r["psnr_db"]) else str(r["psnr_db"])
        return d

    def table(self) -> str:
        """A fixed-width table: run, PSNR, final relative error, relative error at 25/50/75% of the steps."""
        marks = sorted({max(1, round(self.steps * f)) for f in (0.25, 0.5, 0.75)})
        head = ["run", "PSNR dB", "final rel err"] + [f"rel err @{m}" for m in marks]
        rows = [head] + [[r.name, f"{r.psnr_db:.2f}", f"{r.final_rel_err:.2e}"]
                         + [f"{r.step_rel_err[m - 1]:.2e}" for m in marks] for r in self.runs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def psnr_video(pred: torch.Tensor, ref: torch.Tensor) -> tuple[float, str]:
    """PSNR (dB) of two latent videos clamped to [-1, 1] (data range 2), and the library that computed it.

    Uses `torchmetrics` when installed, else `skimage`, else the closed form `10 log10(4 / mse)`.

    Example:
        >>> db, lib = psnr_video(torch.zeros(1, 4, 2, 8, 8), torch.full((1, 4, 2, 8, 8), 0.02))   # mse 4e-4
        >>> round(db, 3)
        40.0
    """
    a, b = pred.detach().double().clamp(-1, 1).cpu(), ref.detach().double().clamp(-1, 1).cpu()
    if torch.equal(a, b):
        return math.inf, "exact"
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio

        return float(peak_signal_noise_ratio(a, b, data_range=2.0)), "torchmetrics"
    except ImportError:
        pass
    try:
        from skimage.metrics import peak_signal_noise_ratio as sk_psnr

        return float(sk_psnr(b.numpy(), a.numpy(), data_range=2.0)), "skimage"
    except ImportError:
        mse = torch.mean((a - b) ** 2).item()
        return 10.0 * math.log10(4.0 / mse), "closed form"


def parse_run(name: str) -> tuple[str, str | None]:
    """Split a run name `<precision>[-<backend>]` into (precision, backend or None), validating both.

    Example:
        >>> parse_run("bf16-cudnn")
        ('bf16', 'cudnn')
    """
    precision, _, backend = name.partition("-")
    if precision not in PRECISIONS or (backend and backend not in BACKENDS):
        raise ValueError(f"run {name!r}: expected <precision>[-<backend>] with precision in {list(PRECISIONS)} and "
                         f"backend in {list(BACKENDS)}, e.g. 'bf16' or 'bf16-flash'")
    return precision, backend or None


@contextlib.contextmanager
def _precision(device: torch.device, precision: str, backend: str | None) -> Iterator[None]:
    """Exact fp32 matmuls (TF32 off) for fp32 runs, bf16 autocast for "amp", and the forced SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with contextlib.ExitStack() as stack:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        stack.callback(_restore_tf32, tf32)
        if precision == "amp":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if backend is not None:
            stack.enter_context(sdpa_kernel(getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                                                                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
                                                    [backend])))
        yield


def _restore_tf32(saved: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cast_copy(model: torch.nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """A copy of `model` with its floating-point parameters and buffers in `dtype`, except those whose dotted name
    has a component in `keep` (left in fp32, like diffusers' `_keep_in_fp32_modules`).

    Example:
        >>> m = cast_copy(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)), torch.bfloat16, ("1",))
        >>> m[0].weight.dtype, m[1].weight.dtype
        (torch.bfloat16, torch.float32)
    """
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if set(name.split(".")) & set(keep) else dtype)
    return m


def _trajectory(model, noise, cond, null_cond, steps, guidance_scale, shift, precision, backend) -> list[torch.Tensor]:
    """The latents after every Euler step (fp32), for one precision/backend."""
    p = next(model.parameters())
    dtype = PRECISIONS[precision]
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if precision == "bf16mixed" else ()
    m = model if dtype == torch.float32 else cast_copy(model, dtype, keep)
    xs: list[torch.Tensor] = []
    with _precision(p.device, precision, backend):
        out = sample(m, noise.to(p.device, dtype), cond.to(p.device, dtype), steps=steps, shift=shift,
                     guidance_scale=guidance_scale, null_cond=None if null_cond is None else null_cond.to(p.device, dtype),
                     callback=lambda i, t, x: xs.append(x.float()) if i > 0 else None)
    return xs + [out.float()]


@torch.no_grad()
def noise_floor(
    model: torch.nn.Module,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 5.0,
    shift: float = 1.0,
    runs: tuple[str, ...] = ("bf16",),
    null_cond: torch.Tensor | None = None,
) -> NoiseFloor:
    """Sample the same noise and condition in fp32 and in each of `runs`; compare the trajectories to fp32.

    The model is dense (no sparsity): the result is the floor below which a sparse method's error against the
    dense fp32 sample cannot be told apart from precision noise. The comparison is decode-free: the latents
    are compared as videos (PSNR on [-1, 1], the procedural data's range) and by relative L2 error per step.
    The fp32 reference runs with TF32 off; every run uses Euler with classifier-free guidance
    (`sparsify.testbed.sample`).

    Args:
        model: an fp32 test-bed (`build_testbed(...)`); other precisions run on a cast copy.
        noise: x at t = 1, `[B, C, F, H, W]`.
        cond: the condition `[B, L, text_dim]`.
        steps: Euler steps.
        guidance_scale: classifier-free guidance scale (1.0: no unconditional pass).
        shift: time shift of the schedule.
        runs: names `<precision>[-<backend>]`: precision `fp32`, `bf16`, `fp16` (weights and latents in that
            dtype), `bf16mixed` (bf16 but the model's `_keep_in_fp32_modules` in fp32) or `amp` (fp32 weights and
            latents, bf16 autocast); backend `flash`, `cudnn`, `efficient` or
            `math` forces SDPA's kernel (`torch.nn.attention.sdpa_kernel`). `fp32` repeats the reference (a
            determinism check: `inf` dB when the runs are bit-identical).
        null_cond: the unconditional condition (zeros by default).

    Returns:
        A `NoiseFloor` with one `FloorRun` per entry of `runs`.

    Example (on a GPU, with the trained weights)::

        from sparsify.testbed import build_testbed16k
        from sparsify.testbed.data16k import class_embeddings

        model = build_testbed16k().cuda()
        noise = torch.randn(2, 4, 16, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
        nf = noise_floor(model, noise, class_embeddings(torch.tensor([0, 9])), runs=("bf16", "bf16-cudnn"))
        print(nf.table())
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    specs = [(name, *parse_run(name)) for name in runs]
    p = next(model.parameters())
    if p.dtype != torch.float32:
        raise ValueError(f"model parameters must be fp32 (the reference); got {p.dtype}")
    ref = _trajectory(model, noise, cond, null_cond, steps, guidance_scale, shift, "fp32", None)
    out, lib = [], "exact"
    for name, precision, backend in specs:
        traj = _trajectory(model, noise, cond, null_cond, steps, guidance_scale, shift, precision, backend)
        rel = [float((x - r).norm() / r.norm().clamp_min(1e-30)) for x, r in zip(traj, ref)]
        db, used = psnr_video(traj[-1], ref[-1])
        lib = used if used != "exact" else lib
        out.append(FloorRun(name=name, psnr_db=db, final_rel_err=rel[-1], step_rel_err=rel))
    return NoiseFloor(steps=steps, guidance_scale=guidance_scale, shift=shift, reference="fp32 (TF32 off)",
                      psnr_backend=lib, runs=out)
