"""Latency tables: measured forward, block (per merge ratio) and attention (per tile and density) times of one model shape."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LatencyTableError, RecipeError

LATENCY_VERSION = 1
KIND = "sparsify-latency-table"
DEFAULT_RATIOS = (0.125, 0.25, 0.375, 0.5)


@dataclass(frozen=True)
class ModelShape:
    """What a latency table was measured on: a table holds for this model class, size and input shape only.

    Example:
        >>> a = ModelShape("WanTransformer3DModel", 8, 4, 64, (16, 16, 16), 4096, 1, "float32")
        >>> a.mismatch(ModelShape("WanTransformer3DModel", 8, 4, 64, (16, 32, 32), 16384, 1, "float32"))
        ['grid: table [16, 16, 16], model [16, 32, 32]', 'seq_len: table 4096, model 16384']
    """

    model: str
    blocks: int
    heads: int
    head_dim: int
    grid: tuple[int, int, int]
    seq_len: int
    batch: int
    dtype: str

    def to_dict(self) -> dict:
        return {"class": self.model, "blocks": self.blocks, "heads": self.heads, "head_dim": self.head_dim,
                "grid": list(self.grid), "seq_len": self.seq_len, "batch": self.batch, "dtype": self.dtype}

    def mismatch(self, other: "ModelShape") -> list[str]:
        """`'field: table X, model Y'` for every field in which `other` (the model's shape) differs."""
        out = []
        for key, a, b in zip(self.to_dict(), self.to_dict().values(), other.to_dict().values()):
            if a != b:
                out.append(f"{key}: table {a}, model {b}")
        return out


def _tile_name(tile) -> str:
    return "x".join(map(str, tile))


@dataclass
class LatencyTable:
    """Measured times (ms, one denoiser call of `shape.batch` inputs) of one model shape on one device.

    Attributes:
        shape: the model and input shape measured.
        device: the device name (`torch.cuda.get_device_name()` or `cpu`).
        forward_ms: one dense forward: embeddings, every block, the output head.
        block_ms: `{merge ratio: ms}` of one block with dense attention; ratio 0 is the unmerged block.
        attention_ms: `{tile: {density: ms}}` of one self-attention call (all heads) at that density.
        dense_attention_ms: `{merge ratio: ms}` of one dense self-attention call inside a block merged at that
            ratio; ratio 0 is the model's dense attention.
        merge_tile: the tile token merging ran in.
        meta: how it was measured (date, torch version, timer, warm-up and repetitions).

    Times between measured densities are interpolated linearly (`attention_call_ms`); 1.0 is dense attention.

    Example:
        >>> t = LatencyTable(ModelShape("WanTransformer3DModel", 2, 4, 64, (4, 8, 8), 256, 1, "float32"), "cpu",
        ...                  forward_ms=10.0, block_ms={0.0: 4.0, 0.5: 2.5}, attention_ms={(4, 4, 4): {0.1: 0.5}},
        ...                  dense_attention_ms={0.0: 2.0, 0.5: 0.6})
        >>> t.outside_ms, t.non_attention_ms, t.attention_call_ms((4, 4, 4), 0.55)
        (2.0, 6.0, 1.25)
    """

    shape: ModelShape
    device: str
    forward_ms: float
    block_ms: dict[float, float]
    attention_ms: dict[tuple[int, int, int], dict[float, float]]
    dense_attention_ms: dict[float, float]
    merge_tile: tuple[int, int, int] = (4, 4, 4)
    meta: dict = field(default_factory=dict)

    @property
    def outside_ms(self) -> float:
        """The forward's time outside its blocks (patch embedding, time and text embedding, output head)."""
        return self.forward_ms - self.shape.blocks * self.block_ms[0.0]

    @property
    def non_attention_ms(self) -> float:
        """The dense forward's time outside self-attention: what attention sparsity alone cannot reduce."""
        return self.forward_ms - self.shape.blocks * self.dense_attention_ms[0.0]

    @property
    def ratios(self) -> tuple[float, ...]:
        """The merge ratios measured (0 included)."""
        return tuple(sorted(self.block_ms))

    def attention_call_ms(self, tile, density: float) -> float:
        """One self-attention call at `density` with `tile`: linear between measured densities and dense (1.0);
        below the sparsest measured density, that density's time (a selection's fixed cost does not shrink).

        Raises:
            LatencyTableError: `tile` was not measured (the message lists those that were).
        """
        tile = tuple(tile)
        if tile not in self.attention_ms:
            raise LatencyTableError(f"tile {_tile_name(tile)} was not measured; measured tiles: "
                                    f"{', '.join(map(_tile_name, self.attention_ms)) or 'none'}",
                                    source=self.meta.get("file"), key="ms.attention")
        pts = {**self.attention_ms[tile], 1.0: self.dense_attention_ms[0.0]}
        xs = sorted(pts)
        return float(np.interp(min(max(density, xs[0]), 1.0), xs, [pts[x] for x in xs]))

    def to_dict(self) -> dict:
        num = lambda d: {f"{k:g}": v for k, v in sorted(d.items())}  # noqa: E731
        meta = {k: v for k, v in self.meta.items() if k != "file"}
        return {"version": LATENCY_VERSION, "kind": KIND, "model": self.shape.to_dict(), "device": self.device,
                "merge_tile": list(self.merge_tile), "measured": meta,
                "ms": {"forward": self.forward_ms, "outside": self.outside_ms, "non_attention": self.non_attention_ms,
                       "block": num(self.block_ms), "dense_attention": num(self.dense_attention_ms),
                       "attention": {_tile_name(t): num(d) for t, d in self.attention_ms.items()}}}

    def save(self, path) -> Path:
        """Write the table as JSON to `path`; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def carried_to(self, shape: ModelShape) -> "LatencyTable":
        """This table's costs for a model of another `shape`, by share of a forward (`--carry-costs`).

        A plan for `shape` is then costed as if it ran on this table's model: plan a small proxy (the test-bed)
        with the costs of the model the plan is for. Block times (per merge ratio) and attention call times (per
        tile and density) are kept as measured; the time outside the blocks is scaled by the block counts, so
        every cost keeps its share of a dense forward. A head of `shape` then saves `1 / shape.heads` of a block's
        attention saving. `meta["carried_from"]` names the measured shape.

        Example:
            >>> t = LatencyTable(ModelShape("WanTransformer3DModel", 40, 40, 128, (21, 45, 80), 75600, 1, "bfloat16"),
            ...                  "H100", forward_ms=12210.0, block_ms={0.0: 305.0}, attention_ms={(4, 4, 4): {0.1: 27.0}},
            ...                  dense_attention_ms={0.0: 204.0})
            >>> c = t.carried_to(ModelShape("WanTransformer3DModel", 12, 8, 32, (16, 32, 32), 16384, 1, "bfloat16"))
            >>> c.outside_ms, c.forward_ms, c.attention_call_ms((4, 4, 4), 0.1)
            (3.0, 3663.0, 27.0)
        """
        outside = self.outside_ms * shape.blocks / self.shape.blocks
        return dataclasses.replace(self, shape=shape, forward_ms=outside + shape.blocks * self.block_ms[0.0],
                                   meta={**self.meta, "carried_from": self.shape.to_dict()})

    def check_shape(self, shape: ModelShape) -> None:
        """Raise LatencyTableError naming every field in which the model's `shape` differs from the table's."""
        diff = self.shape.mismatch(shape)
        if diff:
            raise LatencyTableError(f"the table was measured for another model or input shape ({'; '.join(diff)}); "
                                    "measure one for this model (python -m sparsify.calibrate --measure-latency OUT "
                                    "with the same --model and --grid)", source=self.meta.get("file"), key="model")


def table_from_dict(data, source: str | None = None) -> LatencyTable:
    """Validate a latency table mapping (LatencyTableError naming the file, the key path and what is valid).

    Example:
        >>> d = {"version": 1, "kind": "sparsify-latency-table", "device": "cpu", "merge_tile": [4, 4, 4],
        ...      "model": {"class": "M", "blocks": 2, "heads": 4, "head_dim": 64, "grid": [4, 8, 8], "seq_len": 256,
        ...                "batch": 1, "dtype": "float32"},
        ...      "ms": {"forward": 10, "block": {"0": 4}, "dense_attention": {"0": 2}, "attention": {"4x4x4": {"0.1": 1}}}}
        >>> table_from_dict(d).attention_ms
        {(4, 4, 4): {0.1: 1.0}}
        >>> table_from_dict({**d, "version": 3})
        Traceback (most recent call last):
        ...
        sparsify.errors.LatencyTableError: key 'version': unsupported latency table version 3; this sparsify reads version 1
    """
    from ..recipe import _expect_map, _fail, _int, check_tile

    try:
        d = _expect_map(data, "", {"version", "kind", "model", "device", "merge_tile", "measured", "ms"},
                        required=("version", "model", "device", "ms"))
        if d["version"] != LATENCY_VERSION:
            _fail("version", f"unsupported latency table version {d['version']!r}; this sparsify reads version "
                             f"{LATENCY_VERSION}")
        if d.get("kind", KIND) != KIND:
            _fail("kind", f"must be '{KIND}'; got {d['kind']!r}")
        m = _expect_map(d["model"], "model", {"class", "blocks", "heads", "head_dim", "grid", "seq_len", "batch",
                                              "dtype"}, required=("class", "blocks", "heads", "head_dim", "grid",
                                                                  "seq_len", "batch", "dtype"))
        grid = m["grid"]
        if not (isinstance(grid, list) and len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid)):
            _fail("model.grid", f"must be three positive integers [T, H, W]; got {grid!r}")
        shape = ModelShape(str(m["class"]), _int(m["blocks"], "model.blocks", 1), _int(m["heads"], "model.heads", 1),
                           _int(m["head_dim"], "model.head_dim", 1), tuple(grid), _int(m["seq_len"], "model.seq_len", 1),
                           _int(m["batch"], "model.batch", 1), str(m["dtype"]))
        ms = _expect_map(d["ms"], "ms", {"forward", "outside", "non_attention", "block", "dense_attention",
                                         "attention"}, required=("forward", "block", "dense_attention", "attention"))
        forward = _ms(ms["forward"], "ms.forward")
        block = _by_number(ms["block"], "ms.block", "merge ratio", 0.0, 0.5)
        dense_attention = _by_number(ms["dense_attention"], "ms.dense_attention", "merge ratio", 0.0, 0.5)
        for key, table in (("ms.block", block), ("ms.dense_attention", dense_attention)):
            if 0.0 not in table:
                _fail(key, "must hold ratio \"0\" (the unmerged time)")
        att = _expect_map(ms["attention"], "ms.attention", set(ms["attention"]) if isinstance(ms["attention"], dict)
                          else set())
        attention = {}
        for name, per in att.items():
            try:
                dims = [int(x) for x in str(name).split("x")]
            except ValueError:
                _fail(f"ms.attention.{name}", "the key must be a tile name TxHxW, e.g. 4x4x4")
            tile = check_tile(dims, f"ms.attention.{name}")
            attention[tile] = _by_number(per, f"ms.attention.{name}", "density", 0.0, 1.0)
        merge_tile = check_tile(d.get("merge_tile", [4, 4, 4]), "merge_tile")
    except LatencyTableError:
        raise
    except RecipeError as e:
        raise LatencyTableError(e.reason, source=source, key=e.key) from None
    meta = dict(d.get("measured") or {})
    if source:
        meta["file"] = source
    return LatencyTable(shape, str(d["device"]), forward, block, attention, dense_attention, merge_tile, meta)


def _ms(v, key: str) -> float:
    from ..recipe import _fail, _in_range

    if not _in_range(v, 0.0, math.inf, True):
        _fail(key, f"must be a time in milliseconds > 0; got {v!r}")
    return float(v)


def _by_number(raw, key: str, what: str, lo: float, hi: float) -> dict[float, float]:
    """`{"0.25": ms}` -> `{0.25: ms}`; keys must be numbers in [lo, hi]."""
    from ..recipe import _fail

    if not isinstance(raw, dict) or not raw:
        _fail(key, f"must be a non-empty mapping {{{what}: milliseconds}}; got {raw!r}")
    out = {}
    for k, v in raw.items():
        try:
            x = float(k)
        except (TypeError, ValueError):
            x = math.nan
        if not lo <= x <= hi:
            _fail(f"{key}.{k}", f"the key must be a {what} in [{lo:g}, {hi:g}]")
        out[x] = _ms(v, f"{key}.{k}")
    return out


def load_latency_table(path) -> LatencyTable:
    """Read a latency table written by `LatencyTable.save` / `python -m sparsify.calibrate --measure-latency`.

    Raises:
        LatencyTableError: the file is missing, not JSON, or a key is invalid (the message names the file, the
            key path and what is valid).

    Example:
        >>> # table = load_latency_table("testbed_h100.latency.json"); table.forward_ms
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise LatencyTableError(f"cannot read the latency table: {e.strerror or e}", source=str(path)) from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LatencyTableError(f"not JSON ({e}); a latency table is the JSON file --measure-latency writes",
                                source=str(path)) from None
    return table_from_dict(data, source=str(path))


def model_shape(model: torch.nn.Module, example_inputs: dict, site=None) -> ModelShape:
    """The `ModelShape` of `model` on `example_inputs` (a dict of forward kwargs; `site`: its first self site).

    Example:
        >>> # model_shape(model, inputs).grid
    """
    from ..adapters import adapter_for
    from ..adapters.base import device_dtype
    from ..api import SPARSE_KINDS, find_sites

    adapter = adapter_for(model)
    if adapter is None:
        raise ValueError(f"sparsify.calibrate: no adapter knows {type(model).__name__}: its token grid is unknown")
    geo = adapter.geometry(model, (), example_inputs)
    if site is None:
        site = next(i for i in find_sites(model)[0] if i.kind in SPARSE_KINDS)
    x = example_inputs["hidden_states"]
    seq = math.prod(geo.grid) + max(geo.video_start, 0)
    return ModelShape(type(model).__name__, len(model.blocks), site.heads, site.head_dim, tuple(geo.grid), seq,
                      int(x.shape[0]), str(device_dtype(model)[1]).removeprefix("torch."))


FORWARD_MS = 30_000.0  # wall time the whole forward's repeats may take in a latency table (at least 3 runs)


def _median_ms(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median wall time of `fn()` in ms: CUDA events on a GPU, `time.perf_counter` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _forward_and_stack_ms(model, inputs: dict, warmup: int, reps: int, device: torch.device) -> tuple[float, float]:
    """Median ms of the whole forward and of its block stack (first block's start to last block's end), timed
    in the same runs so that their difference, the time outside the blocks, is not the difference of noises."""
    cuda = device.type == "cuda"
    marks: list = []

    def mark(*_):
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    hooks = [model.blocks[0].register_forward_pre_hook(mark), model.blocks[-1].register_forward_hook(mark)]
    try:
        for _ in range(warmup):
            model(**inputs)
        fwd, stack = [], []
        for _ in range(reps):
            marks.clear()
            mark()
            model(**inputs)
            mark()
            if cuda:
                marks[-1].synchronize()
                t = [marks[0].elapsed_time(e) for e in marks]
            else:
                t = [(x - marks[0]) * 1e3 for x in marks]
            fwd.append(t[-1])
            stack.append(t[2] - t[1])
    finally:
        for h in hooks:
            h.remove()
    return float(np.median(fwd)), float(np.median(stack))


class _Inputs:
    """The arguments of the latest call of a module (a forward pre-hook)."""

    def __init__(self, module):
        self.args, self.kwargs = (), {}
        self._h = module.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, mod, args, kwargs):
        self.args, self.kwargs = args, dict(kwargs)

    def call(self, module):
        return module(*self.args, **self.kwargs)

    def remove(self):
        self._h.remove()


@torch.no_grad()
def measure_latency_table(model: torch.nn.Module, example_inputs: dict, *, tiles=((4, 4, 4),),
                          densities=(0.05, 0.1, 0.2, 0.5), ratios=DEFAULT_RATIOS, merge_tile=(4, 4, 4),
                          method: str = "vsa", warmup: int | None = None, reps: int | None = None) -> LatencyTable:
    """Measure a latency table for `model` on `example_inputs` on the model's device.

    The whole dense forward is timed as is, with its block stack inside the same runs (a block's time is the
    stack's over the number of blocks). One block (the first) and its self-attention are timed on the arguments
    they received in that forward: the block at every merge ratio (token merging in `merge_tile`; the in-forward
    block time is scaled by the ratio of these),
    the dense attention inside each merged block, and the attention with every head at each (tile, density)
    through sparsify's op (`method` selection). Each time is the median of `reps` runs after `warmup` runs
    (CUDA events on a GPU; `time.perf_counter` on the CPU, where the numbers do not represent a GPU).

    Args:
        model: a diffusers Wan-style transformer (a ModuleList `blocks`, an adapter for its grid), not sparsified.
        example_inputs: forward kwargs at the generation's shape (`hidden_states`, `timestep`, ...).
        tiles, densities: the sparse attention points measured (a density of 1.0 is the dense call).
        ratios: merge ratios measured (0 is always measured); others need the grid divisible by `merge_tile`.
        merge_tile: the tile of token merging (the plan's tile).
        method: the tile selection method timed.
        warmup, reps: per measured point; default 3 and 10 on CUDA, 0 and 1 on the CPU (one warm-up forward first).
            The whole forward runs them while they fit `FORWARD_MS` (30 s), else no warm-up and as many runs as
            fit (at least 3, at most `reps`).

    Returns:
        A `LatencyTable`.

    Example:
        >>> from sparsify.testing.dits import tiny_wan
        >>> from sparsify.adapters import adapter_for
        >>> m = tiny_wan(layers=1, heads=2, head_dim=16)
        >>> x = adapter_for(m).example_inputs(m, grid=(4, 8, 8))
        >>> t = measure_latency_table(m, x, densities=(0.5,), ratios=(0.25,))
        >>> sorted(t.block_ms), sorted(t.attention_ms[(4, 4, 4)])
        ([0.0, 0.25], [0.5])
    """
    from ..adapters import adapter_for
    from ..api import SPARSE_KINDS, find_sites, installed_sites, sparsify, unsparsify
    from ..generation.merge import merge_blocks
    from ..recipe import Budget, HeadConfig

    if getattr(model, "_sparsify", None) is not None:
        raise ValueError("sparsify.calibrate: measure the latency table on the model before sparsify() (it is "
                         "sparsified now: unsparsify it first)")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"sparsify.calibrate: a latency table needs a model with a ModuleList `blocks`; "
                         f"{type(model).__name__} has none")
    device = next(model.parameters()).device
    warmup = (3 if device.type == "cuda" else 0) if warmup is None else warmup
    reps = (10 if device.type == "cuda" else 1) if reps is None else reps
    site = next(i for i in find_sites(model)[0] if i.kind in SPARSE_KINDS and i.path.startswith("blocks.0."))
    shape = model_shape(model, example_inputs, site)
    attn = model.get_submodule(site.path)
    time_it = lambda fn: _median_ms(fn, warmup, reps, device)  # noqa: E731
    block_in, attn_in = _Inputs(blocks[0]), _Inputs(attn)
    merged = sorted({float(r) for r in ratios} - {0.0})
    if merged and any(g % t for g, t in zip(shape.grid, merge_tile)):
        raise ValueError(f"sparsify.calibrate: token merging at ratio(s) {', '.join(f'{r:g}' for r in merged)} needs "
                         f"the grid {'x'.join(map(str, shape.grid))} divisible by the merge tile "
                         f"{'x'.join(map(str, merge_tile))}; measure this grid without merging (ratios 0: "
                         "--merge-ratios 0) or at a grid the tile divides")
    try:
        t0 = time.perf_counter()
        model(**example_inputs)  # warm-up, and the block's and attention's arguments
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = (time.perf_counter() - t0) * 1e3
        # a long forward (a 14B model at 720p: ~12 s) is repeated as often as fits FORWARD_MS, at least 3 times
        # (at most `reps`)
        f_warmup, f_reps = ((warmup, reps) if first * (warmup + reps) <= FORWARD_MS
                            else (0, min(reps, max(3, int(FORWARD_MS // first)))))
        forward, stack = _forward_and_stack_ms(model, example_inputs, f_warmup, f_reps, device)
        alone = {0.0: time_it(lambda: block_in.call(blocks[0]))}
        dense_attention = {0.0: time_it(lambda: attn_in.call(attn))}
        for r in merged:
            merging = merge_blocks(model, {0: r}, tile=merge_tile)
            merging.set_geometry(adapter_for(model).geometry(model, (), example_inputs))  # the block runs alone
            try:
                block_in.call(blocks[0])  # the attention's arguments at the merged length
                alone[r] = time_it(lambda: block_in.call(blocks[0]))
                dense_attention[r] = time_it(lambda: attn_in.call(attn))
            finally:
                merging.remove()
    finally:
        block_in.remove()
        attn_in.remove()
    # a block's time inside the forward (the stack's share), scaled per ratio by the block timed alone
    block_ms = {r: stack / len(blocks) * t / alone[0.0] for r, t in alone.items()}
    attention: dict = {}
    sparsify(model, {"version": 1, "defaults": {"method": "dense"}})
    attn_in = _Inputs(attn)
    try:
        model(**example_inputs)  # the attention's arguments, and the runtime's geometry for them
        st = next(s for s in installed_sites(model) if s.path == site.path)
        for tile in tiles:
            for d in (d for d in densities if d < 1.0):
                st.configs = [HeadConfig(method=method, tile=tuple(tile), budget=Budget(density=float(d)))] * st.heads
                st.cache.clear()
                attention.setdefault(tuple(tile), {})[float(d)] = time_it(lambda: attn_in.call(attn))
    finally:
        attn_in.remove()
        unsparsify(model)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": str(torch.__version__), "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
            "warmup": warmup, "reps": reps, "forward_warmup": f_warmup, "forward_reps": f_reps, "statistic": "median",
            "method": method}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return LatencyTable(shape, name, forward, block_ms, attention, dense_attention, tuple(merge_tile), meta)
