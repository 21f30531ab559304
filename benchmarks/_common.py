"""What every benchmark shares: Wan shapes and configs, do_bench medians, the run header and the JSON writer."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")

#: Wan2.1 attention shapes at 81 frames: name -> (label, B, H, S, D, latent token grid (T, H, W)).
WAN_SHAPES = {
    "wan1.3b": ("Wan-1.3B 480p", 1, 12, 32760, 128, (21, 30, 52)),
    "wan14b": ("Wan-14B 720p", 1, 40, 75600, 128, (21, 45, 80)),
}
#: CPU smoke shape of every `--tiny` run: 256 tokens, 2 heads of 64 (Triton interpreter sized).
TINY_SHAPE = ("tiny", 1, 2, 256, 64, (4, 8, 8))
GRID_480P = WAN_SHAPES["wan1.3b"][5]  # 81 frames at 480x832: 32,760 tokens
GRID_720P = WAN_SHAPES["wan14b"][5]  # 81 frames at 720x1280: 75,600 tokens

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def build_wan(config: dict, num_layers: int | None = None, device=None):
    """A diffusers `WanTransformer3DModel` of `config` with random bf16 weights built directly on `device`.

    Example:
        >>> # model = build_wan(WAN_14B, num_layers=2, device="cuda")   # two blocks of the 14B config
    """
    from diffusers import WanTransformer3DModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(config, num_layers=num_layers or config["num_layers"])
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never materialize fp32 weights (14B would need 56 GB)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def wan_1_3b():
    """Wan2.1-T2V-1.3B transformer config, random bf16 weights (`--model benchmarks._common:wan_1_3b`).

    Example:
        >>> # python -m sparsify.calibrate --model benchmarks._common:wan_1_3b --grid 21x30x52 --budget 0.1 ...
    """
    return build_wan(WAN_1_3B)


def wan_14b():
    """Wan2.1-T2V-14B transformer config, random bf16 weights (`--model benchmarks._common:wan_14b`).

    Example:
        >>> # python -m sparsify.calibrate --model benchmarks._common:wan_14b --grid 21x45x80 --budget 0.1 ...
    """
    return build_wan(WAN_14B)


def time_ms(fn, *, warmup_ms: float = 50.0, rep_ms: float = 200.0, min_reps: int = 10) -> float:
    """Median CUDA time of `fn()` in ms (`triton.testing.do_bench`, L2 flushed), over at least `min_reps` repeats.

    `do_bench` alone sizes its repeats as `rep_ms / estimate`: for a 15 ms function and `rep=20` that is one
    sample, taken right after a 256 MB cache flush and a short warm-up. This first times one call, then
    stretches the warm-up to at least two calls and the repeat window to at least `min_reps` calls. Without a
    GPU (the `--tiny` smoke runs) it returns the median wall time of three calls after one warm-up call.

    Example:
        >>> # t = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    """
    if not torch.cuda.is_available():
        return wall_ms(fn)
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    return float(triton.testing.do_bench(fn, warmup=max(warmup_ms, 2 * est), rep=max(rep_ms, 1.1 * min_reps * est),
                                         return_mode="median"))


def wall_ms(fn, reps: int = 3) -> float:
    """Median host wall time of `fn()` in ms over `reps` calls after one warm-up call (CPU smoke runs only).

    Example:
        >>> wall_ms(lambda: sum(range(10))) >= 0.0
        True
    """
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def alternated(calls: dict, rounds: int) -> tuple[dict, dict]:
    """Time each of `calls` (name -> zero-argument callable) once per round, in turn, for `rounds` rounds.

    Clock drift within a run then falls on every call alike. Returns `(times, medians)`: the `time_ms` of each
    round per name, and their median per name.

    Example:
        >>> times, med = alternated({"a": lambda: None, "b": lambda: None}, 2)
        >>> sorted(med), len(times["a"])
        (['a', 'b'], 2)
    """
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_ms(fn))
    return times, {name: statistics.median(t) for name, t in times.items()}


def run_header(module: str, argv=None) -> dict:
    """The header of every result JSON: device, versions, the exact command, and the UTC date.

    `module` is the benchmark's name under `benchmarks` (`python -m benchmarks.<module> <argv>`).

    Example:
        >>> h = run_header("op", ["--tiny"])
        >>> h["command"], {"device", "torch", "triton", "date"} <= set(h)
        ('python -m benchmarks.op --tiny', True)
    """
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    args = list(sys.argv[1:] if argv is None else argv)
    return {"device": torch.cuda.get_device_name() if cuda else cpu_name(),
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "command": " ".join(["python", "-m", f"benchmarks.{module}", *args]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one).

    Example:
        >>> isinstance(cpu_name(), str)
        True
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def write_result(result: dict, out: str | os.PathLike | None, stem: str) -> Path:
    """Write `result` as JSON to `out`, default `benchmarks/results/<stem>_<UTC date and time>.json`; print the path.

    Example:
        >>> # write_result({**run_header("e2e"), "rows": rows}, args.out, "e2e")
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M")
    path = Path(out) if out else RESULTS / f"{stem}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}", flush=True)
    return path


def parse_list(text: str, kind=float, arg: str = "--densities") -> list:
    """A comma list of numbers (`"0.05,0.1"`), with an error naming the argument.

    Example:
        >>> parse_list("5,10", int)
        [5, 10]
    """
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{arg}: '{text}' is not a comma list of {kind.__name__} values") from None
