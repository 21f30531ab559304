"""GPU timing of the fused q/k RMSNorm + RoPE kernel against diffusers' unfused code, at the Wan-14B 720p width.

    python -m benchmarks.rope_bench [--out FILE]

Shape: q `[1, 75600, 5120]` bf16 (40 heads of 128), bf16 rotary tables `[1, 75600, 1, 128]`. Every candidate
is checked against `rmsnorm_rope_reference` first, then timed (CUDA events, 5 warm-up calls, median of 20,
fresh random input each call). Memory floor: one read and one write of q (1.55 GB).
(`rope_20261203_h200.json` also holds two rejected layouts, timed before the kernel took the faster one.)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from benchmarks import write_result

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


def stock(x, w, eps, cos, sin, heads):
    """diffusers Wan's unfused code (nn.RMSNorm over all heads, then apply_rotary_emb)."""
    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps).unflatten(2, (heads, -1))
    x1, x2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(y)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(y).flatten(2)


def candidates():
    from sparsify.kernels.rope import rmsnorm_rope

    return {"stock (diffusers, eager)": stock, "inductor (compiled reference)": torch.compile(stock, dynamic=False),
            "sparsify rmsnorm_rope": rmsnorm_rope}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=75600)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("rope_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    from sparsify.kernels.rope import rmsnorm_rope_reference

    S, H, D = args.tokens, args.heads, 128
    dt = torch.bfloat16
    w = torch.rand(H * D, device="cuda", dtype=dt) + 0.5
    ang = torch.randn(1, S, 1, D // 2, device="cuda").repeat_interleave(2, -1)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    x0 = torch.randn(1, S, H * D, device="cuda", dtype=dt)
    ref = rmsnorm_rope_reference(x0, w, 1e-6, cos, sin, H).float()
    floor = 2 * x0.numel() * x0.element_size()
    rows = []
    for name, fn in candidates().items():
        try:
            err = (fn(x0, w, 1e-6, cos, sin, H).float() - ref).abs().max().item()
            xs = [torch.randn_like(x0) for _ in range(4)]
            for i in range(5):
                fn(xs[i % 4], w, 1e-6, cos, sin, H)
            ts = []
            for i in range(20):
                xs[i % 4].normal_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(xs[i % 4], w, 1e-6, cos, sin, H)
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            ms = statistics.median(ts)
            rows.append(dict(name=name, ms=ms, max_abs_err=err, gbps=floor / ms / 1e6))
            print(f"{name:<34}{ms:9.3f} ms {floor / ms / 1e6:8.0f} GB/s  max|err| {err:.4f}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append(dict(name=name, error=f"{type(e).__name__}: {e}"[:300]))
            print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    write_result(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      command="python -m benchmarks.rope_bench " + " ".join(argv or sys.argv[1:]),
                      device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                      tokens=S, heads=H, rows=rows), args.out, "rope")
    return 0


if __name__ == "__main__":
    sys.exit(main())
