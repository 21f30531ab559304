"""Per-head attention statistics of a Wan model (entropy, locality, temporal share): how heterogeneous its heads are.

    python -m tools.testbed_heads --weights sparsify/testbed/testbed_wan.safetensors --out heads.json
    python -m tools.testbed_heads --model testbed-16k --samples 2 --out heads16k.json   # on a GPU

For every self-attention layer and head, averaged over query tokens, samples and noise levels:

- entropy: -sum p log p of the attention row, divided by log S (1 = uniform, 0 = one key);
- local: attention mass within |dt| <= 1, |dh| <= 2, |dw| <= 2 token-grid units of the query (the radius is an
  argument);
- temporal: mass on the query's own (h, w) position in the other frames;
- frame: mass inside the query's own frame (dt = 0);
- sink: the largest share of all queries' attention that one key receives (mean over queries of p[q, k], maximized
  over k): about 1/S for a head without a sink, near 1 when every query attends to the same key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

STAT_NAMES = ("entropy", "local", "temporal", "frame", "sink")
_MASKED = ("local", "temporal", "frame")


def wan_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v `[B, S, H, D]` of a diffusers `WanAttention` self-attention after qk-norm and RoPE, as its processor."""
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:

        def rope(x, freqs_cos, freqs_sin):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            cos = freqs_cos[..., 0::2]
            sin = freqs_sin[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            return out.type_as(x)

        query = rope(query, *rotary_emb)
        key = rope(key, *rotary_emb)
    return query, key, value


class RecordingProcessor:
    """A dense Wan self-attention processor that hands (layer, q, k, v) to `fn` before attending; same output."""

    def __init__(self, layer: int, fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]):
        self.layer, self.fn = layer, fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError("RecordingProcessor is for self-attention (attn1) only")
        q, k, v = wan_qkv(attn, hidden_states, rotary_emb)
        self.fn(self.layer, q, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def recording(
    model: torch.nn.Module, fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Within the block, every `blocks[i].attn1` of a Wan model calls `fn(i, q, k, v)`; processors restored on exit."""
    saved = []
    for i, block in enumerate(model.blocks):
        saved.append(block.attn1.processor)
        block.attn1.set_processor(RecordingProcessor(i, fn))
    try:
        yield
    finally:
        for block, proc in zip(model.blocks, saved):
            block.attn1.set_processor(proc)


def region_masks(
    grid: tuple[int, int, int], radius: tuple[int, int, int] = (1, 2, 2), device=None
) -> dict[str, torch.Tensor]:
    """Float `[S, S]` masks (query row, key column) of the local window, the temporal line and the own frame."""
    T, H, W = grid
    t, h, w = torch.meshgrid(
        torch.arange(T, device=device), torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    t, h, w = t.flatten(), h.flatten(), w.flatten()
    dt = (t[:, None] - t[None, :]).abs()
    dh = (h[:, None] - h[None, :]).abs()
    dw = (w[:, None] - w[None, :]).abs()
    rt, rh, rw = radius
    return {
        "local": ((dt <= rt) & (dh <= rh) & (dw <= rw)).float(),
        "temporal": ((dt > 0) & (dh == 0) & (dw == 0)).float(),
        "frame": (dt == 0).float(),
    }


class HeadStats:
    """Accumulates per-(layer, head) attention statistics from recorded q, k (use as the `recording` callback)."""

    def __init__(self, grid: tuple[int, int, int], radius: tuple[int, int, int] = (1, 2, 2), chunk: int = 1024):
        self.grid, self.radius, self.chunk = tuple(grid), tuple(radius), chunk
        self.sums: dict[int, torch.Tensor] = {}
        self.rows: dict[int, int] = {}
        self._masks: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
        B, S, Hh, D = q.shape
        if S != math.prod(self.grid):
            raise ValueError(f"layer {layer}: {S} tokens but the grid {self.grid} has {math.prod(self.grid)}")
        if self._masks is None or self._masks["local"].device != q.device:
            self._masks = region_masks(self.grid, self.radius, device=q.device)
        acc = torch.zeros(len(STAT_NAMES), Hh, dtype=torch.float64, device=q.device)
        qf = q.float().transpose(1, 2)  # [B, H, S, D]
        kf = k.float().transpose(1, 2)
        scale = 1.0 / math.sqrt(D)
        for b in range(B):
            col = torch.zeros(Hh, S, dtype=torch.float64, device=q.device)  # attention each key receives
            for i0 in range(0, S, self.chunk):
                i1 = min(S, i0 + self.chunk)
                p = torch.softmax((qf[b, :, i0:i1] @ kf[b].transpose(-1, -2)) * scale, dim=-1)  # [H, c, S]
                ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(S)
                acc[0] += ent.sum(-1).double()
                for name in _MASKED:
                    acc[STAT_NAMES.index(name)] += (p * self._masks[name][i0:i1]).sum(-1).sum(-1).double()
                col += p.sum(1).double()
            acc[STAT_NAMES.index("sink")] += col.amax(-1)  # / S per sample, as every sum here, in result()
        self.sums[layer] = self.sums.get(layer, 0) + acc.cpu()
        self.rows[layer] = self.rows.get(layer, 0) + B * S

    def result(self) -> dict[str, torch.Tensor]:
        """`{stat: [layers, heads]}` means over every recorded query row."""
        layers = sorted(self.sums)
        stacked = torch.stack([self.sums[l] / self.rows[l] for l in layers], dim=1)  # [stats, L, H]
        return {name: stacked[j].float() for j, name in enumerate(STAT_NAMES)}


@torch.no_grad()
def head_stats(
    model: torch.nn.Module,
    inputs: Iterable[dict[str, Any]],
    grid: tuple[int, int, int],
    radius: tuple[int, int, int] = (1, 2, 2),
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Run `model(**x)` for every x in `inputs` and return `{stat: [layers, heads]}` (see the module docstring).

    Example:
        >>> from sparsify.testbed import build_testbed, example_inputs, grid
        >>> shape = (4, 2, 8, 8)  # a tiny latent for the example; the default grid is (16, 16, 16)
        >>> stats = head_stats(build_testbed(), [example_inputs(seed=s, latent_shape=shape) for s in range(2)],
        ...                    grid(shape))
        >>> stats["entropy"].shape
        torch.Size([8, 4])
    """
    acc = HeadStats(grid, radius)
    with recording(model, acc):
        for x in inputs:
            dev = x["hidden_states"].device
            with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                model(**x)
    return acc.result()


def format_table(stats: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor] | None = None) -> str:
    """Markdown table, one row per (layer, head); with `baseline`, its entropy and locality in extra columns."""
    cols = ["layer", "head", *STAT_NAMES]
    if baseline is not None:
        cols += ["init entropy", "init local"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    L, H = stats["entropy"].shape
    for l in range(L):
        for h in range(H):
            row = [str(l), str(h)] + [f"{stats[n][l, h].item():.3f}" for n in STAT_NAMES]
            if baseline is not None:
                row += [f"{baseline['entropy'][l, h].item():.3f}", f"{baseline['local'][l, h].item():.3f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """min / median / max over heads of each statistic."""
    return {
        n: {"min": v.min().item(), "median": v.flatten().median().item(), "max": v.max().item()}
        for n, v in stats.items()
    }


def main(argv: list[str] | None = None) -> None:
    from sparsify.testbed.model import build_testbed, example_inputs
    from sparsify.testbed.model import grid as testbed_grid

    p = argparse.ArgumentParser(prog="python -m tools.testbed_heads", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="testbed", help="test-bed variant: testbed or testbed-16k")
    p.add_argument("--weights", default=None, help="safetensors of the test-bed (default: the shipped weights)")
    p.add_argument("--out", default=None, help="write the statistics as JSON here")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--ts", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-init", action="store_true", help="skip the random-init baseline")
    args = p.parse_args(argv)

    def inputs():
        for s in range(args.samples):
            for t in args.ts:
                yield example_inputs(batch=1, seed=10_000 + s, device=args.device, t=t, name=args.model)

    grid = testbed_grid(name=args.model)
    model = build_testbed(pretrained=True, device=args.device, weights=args.weights, name=args.model)
    stats = head_stats(model, inputs(), grid)
    base = None if args.no_init else head_stats(build_testbed(pretrained=False, device=args.device, name=args.model),
                                                 inputs(), grid)
    print(format_table(stats, base))
    print("trained:", json.dumps(summarize(stats)))
    if base is not None:
        print("random init:", json.dumps(summarize(base)))
    if args.out:
        blob = {
            "model": args.model,
            "grid": list(grid),
            "radius": [1, 2, 2],
            "samples": args.samples,
            "ts": args.ts,
            "trained": {n: v.tolist() for n, v in stats.items()},
            "random_init": None if base is None else {n: v.tolist() for n, v in base.items()},
        }
        with open(args.out, "w") as f:
            json.dump(blob, f, indent=1)


if __name__ == "__main__":
    main()
