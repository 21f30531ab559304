"""Capture: run the dense model with an observer that measures every site's candidates, with checkpoints."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .. import runtime
from ..factorized import axis_tile, temporal_is_long
from .measure import SiteMeasurement, measure_site


class Capture:
    """Observer installed on the runtime while the dense model runs the calibration forwards.

    Each site call is measured (see `measure_site`) and accumulated per site. A factorized site is measured as
    the runtime runs it: on its per-sequence geometry (the observer receives it) with the tile `axis_tile` maps
    each candidate to; a temporal site's candidate that the runtime keeps dense (`temporal_is_long` is False)
    is recorded at cost 1 with no error, and a site whose every candidate is such is listed in `dense_only`.
    `work` holds each site's dense attention work per call, sequences times squared length. With a checkpoint
    directory every (call, site) result is written as it is produced; a rerun with the same settings
    loads those instead of measuring again, so an interrupted run loses nothing already measured.

    Args:
        tiles: candidate tile shapes.
        levels: candidate densities.
        methods: candidate selection methods.
        query_fraction: share of video query tokens measured per call (the same for every candidate).
        checkpoint_dir: where per-site results go (None: no checkpoints).
        config_key: a string identifying the settings; a checkpoint folder of other settings is moved aside
            (to `<dir>.old1`, ...) with a message on stderr, and measuring starts afresh.
        progress: an object with `update(site_path)` called after each measured site, or None.
    """

    def __init__(self, tiles, levels, *, methods=("vsa",), query_fraction=0.25, checkpoint_dir=None, config_key="",
                 progress=None):
        self.tiles, self.levels, self.methods = [tuple(t) for t in tiles], list(levels), list(methods)
        self.query_fraction = query_fraction
        self.results: dict[str, SiteMeasurement] = {}
        self.calls: dict[str, int] = {}
        self.seconds = 0.0
        self.loaded = 0
        self.progress = progress
        self.veda: dict[tuple, list] = {}  # (site path, tile) -> [sum of fitted estimator weights, calls]
        self.measured = 0
        self.grids: dict[tuple, int] = {}  # token grid (T, H, W) -> site calls observed on it
        self.work: dict[str, float] = {}  # site path -> dense attention work of its last call (B·S²)
        self.dense_only: set[str] = set()  # temporal sites the runtime runs dense for every candidate tile
        self.dir = Path(checkpoint_dir) if checkpoint_dir else None
        if self.dir is not None:
            self._open_checkpoints(hashlib.sha256(config_key.encode()).hexdigest()[:16])

    def _open_checkpoints(self, key: str) -> None:
        """Use the checkpoint folder; one holding another configuration's measurements is set aside, not mixed in."""
        meta = self.dir / "meta.json"
        if self.dir.exists() and any(self.dir.iterdir()):
            try:
                old = json.loads(meta.read_text()).get("config")
            except (OSError, ValueError, AttributeError):
                old = None
            if old != key:
                n = 1
                while (aside := self.dir.with_name(f"{self.dir.name}.old{n}")).exists():
                    n += 1
                self.dir.rename(aside)
                print(f"sparsify.calibrate: {self.dir} held measurements of another configuration (other model, "
                      f"inputs, candidates or query fraction); moved them to {aside} and measuring afresh",
                      file=sys.stderr)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"config": key}))

    @staticmethod
    def _load(f: Path) -> dict | None:
        """A checkpoint's contents, or None when it is missing or unreadable (then it is measured again)."""
        if not f.exists():
            return None
        try:
            saved = torch.load(f)
            return saved if isinstance(saved, dict) and {"sq_err", "energy", "cost", "calls"} <= set(saved) else None
        except Exception:  # a truncated or foreign file: measure this call again
            return None

    def _file(self, path: str, call: int) -> Path:
        return self.dir / f"{path.replace('/', '_')}.call{call}.pt"

    def __call__(self, st: runtime.SiteState, q, k, v, geom, scale, key_mask) -> None:
        call = self.calls.get(st.path, 0)
        self.calls[st.path] = call + 1
        self.grids[tuple(geom.grid)] = self.grids.get(tuple(geom.grid), 0) + 1
        B, _, S, _ = q.shape
        self.work[st.path] = float(B) * S * S
        runs_dense = [st.axis == "temporal" and not temporal_is_long(S, t) for t in self.tiles]
        if all(runs_dense):
            self.dense_only.add(st.path)
        f = self._file(st.path, call) if self.dir is not None else None
        saved = self._load(f) if f is not None else None
        if saved is not None:
            for tile, w in saved.pop("veda", {}).items():
                self._add_veda(st.path, tile, w)
            m = SiteMeasurement(**saved)
            self.loaded += 1
        else:
            self.measured += 1
            t0 = time.perf_counter()
            fitted = self._fit_veda(st.path, st.axis, q, k, geom, [t for t, d in zip(self.tiles, runs_dense) if not d]) \
                if "veda" in self.methods else {}
            m = self._measure(st, q, k, v, geom, scale, key_mask, call, runs_dense)
            self.seconds += time.perf_counter() - t0
            if f is not None:
                tmp = f.with_suffix(".tmp")
                torch.save({"sq_err": m.sq_err, "energy": m.energy, "cost": m.cost, "calls": m.calls, "veda": fitted}, tmp)
                tmp.replace(f)  # atomic: an interrupt never leaves a half-written checkpoint
        if st.path in self.results:
            self.results[st.path].add(m)
        else:
            self.results[st.path] = m
        if self.progress is not None:
            self.progress.update(st.path)

    def _measure(self, st, q, k, v, geom, scale, key_mask, call, runs_dense) -> SiteMeasurement:
        """Measure the candidate tiles the runtime runs sparse on this site's axis; the others are dense."""
        sparse = [i for i, d in enumerate(runs_dense) if not d]
        n_m, n_t, H = len(self.methods), len(self.tiles), q.shape[1]
        idx = [mi * n_t + i for mi in range(n_m) for i in sparse]
        sq_err = torch.zeros(H, n_m * n_t, len(self.levels), dtype=torch.float64)
        cost = torch.ones(n_m * n_t, len(self.levels), dtype=torch.float64)
        energy = torch.zeros(H, n_m * n_t, dtype=torch.float64)
        if sparse:
            rankers = self._veda_rankers(st.path)
            rankers = rankers and {(m, axis_tile(t, st.axis)): f for (m, t), f in rankers.items()}
            m = measure_site(q, k, v, geom, [axis_tile(self.tiles[i], st.axis) for i in sparse], self.levels,
                             methods=self.methods, scale=scale, key_mask=key_mask, query_fraction=self.query_fraction,
                             seed=call, rankers=rankers)
            sq_err[:, idx], cost[idx], energy[:, idx] = m.sq_err, m.cost, m.energy
        dense_rows = [c for c in range(n_m * n_t) if c not in idx]
        if dense_rows:  # the same per-head energy as a measured candidate: a head's share must not depend on it
            energy[:, dense_rows] = energy[:, idx].mean(1, keepdim=True) if idx else 1.0
        return SiteMeasurement(sq_err=sq_err, energy=energy, cost=cost, calls=1)

    def _add_veda(self, path, tile, weights):
        acc = self.veda.setdefault((path, tuple(tile)), [torch.zeros_like(weights), 0])
        acc[0] += weights
        acc[1] += 1

    def _fit_veda(self, path, axis, q, k, geom, tiles) -> dict:
        """Distill Veda's per-head estimator for every candidate tile (on the layout of the site's axis) from this
        call's full attention."""
        from ..runtime.op import _autograd_dispatch
        from ..geometry import tile_layout, to_tiles
        from ..methods.veda import FEATURES, fit_veda_estimator

        vs, vl = geom.video_start, geom.video_len
        out = {}
        for tile in tiles:
            lay = tile_layout(geom.grid, axis_tile(tile, axis), q.device)
            qt, kt = (to_tiles(x[:, :, vs:vs + vl].float(), lay) for x in (q, k))
            # the fit is an L-BFGS solve: calibration forwards run under no_grad and inside the custom op
            with torch.enable_grad(), _autograd_dispatch():
                est = fit_veda_estimator(qt, kt, lay)
            w = torch.zeros(est.weights.shape[0], len(FEATURES))
            w[:, [FEATURES.index(f) for f in est.features]] = est.weights.cpu()
            out[tuple(tile)] = w
            self._add_veda(path, tile, w)
        return out

    def veda_estimators(self) -> dict:
        """`{(site path, tile): VedaEstimator}`: the mean of the weights fitted on every call so far."""
        from ..methods.veda import FEATURES, VedaEstimator

        return {key: VedaEstimator(FEATURES, w / n) for key, (w, n) in self.veda.items()}

    def _veda_rankers(self, path) -> dict | None:
        if "veda" not in self.methods:
            return None
        from ..methods.veda import Veda

        ests = {tile: est for (p, tile), est in self.veda_estimators().items() if p == path}
        return {("veda", tile): (lambda h, e=est: Veda(e.subset([h]))) for tile, est in ests.items()}

    def __enter__(self):
        if runtime.STATE.observer is not None:
            raise RuntimeError("sparsify.calibrate: another calibration is already observing this process")
        runtime.STATE.observer = self
        return self

    def __exit__(self, *exc):
        runtime.STATE.observer = None
        return False
