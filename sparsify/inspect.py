"""`python -m sparsify.inspect <model spec>`: print the attention-site table of a model."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

BUNDLED_MODELS = {
    "testbed": "sparsify.testbed:build_testbed",
    "testbed-16k": "sparsify.testbed:build_testbed16k",
    "tiny-wan": "sparsify.inspect:tiny_wan",
}


def tiny_wan():
    """A tiny random diffusers WanTransformer3DModel (2 layers, 2 heads of 32) for demos and tests."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32).eval()


def load_model(spec: str) -> torch.nn.Module:
    """Build a model from `import.path:factory`, or a bundled name (`testbed`, `testbed-16k`, `tiny-wan`).

    Example:
        >>> m = load_model("tiny-wan")
    """
    target = BUNDLED_MODELS.get(spec, spec)
    if ":" not in target:
        raise SystemExit(
            f"sparsify: model spec '{spec}' is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor "
            "'import.path:factory'")
    mod_name, fn_name = target.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"sparsify: cannot load model factory '{target}': {e}") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"sparsify: '{target}' returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def site_table(sites) -> str:
    """Format SiteInfo rows as a fixed-width table; `axis` tells how a self site covers the video grid (`full`,
    or factorized: `spatial` within one frame, `temporal` along one pixel's frames)."""
    head = ("path", "kind", "axis", "heads", "head_dim", "q_len", "kv_len", "mask", "impl")
    rows = [head] + [(s.path, s.kind, s.axis if s.kind == "self" else "-", str(s.heads), str(s.head_dim),
                      str(s.q_len), str(s.kv_len), "yes" if s.has_mask else "no", s.impl) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def coverage_row(name: str) -> dict:
    """Check one diffusers video transformer built from its tiny config (`sparsify.testing.dits.DIFFUSERS_VIDEO`):
    sites and kinds, geometry inferred without `grid=` or a family adapter, the video span the runtime will use at
    every full self or joint site equal to the family's (`sparsify.testing.dits.coverage_video_span`), output at
    density 1.0 equal to the original (fp32, eager, 1e-5), output at density 0.25 finite and different.

    Returns:
        `{"class", "sites" ({kind: n}, factorized self sites as `self/spatial`, `self/temporal`), "geometry" (source
        and grid), "video_spans" ({path: (start, length)} at the full self and joint sites), "expected_span",
        "status" ("ok" or the failure), "error" (max abs difference at density 1.0), "changed" (at 0.25)}`.

    Example:
        >>> # coverage_row("WanTransformer3DModel")["status"]  -> 'ok'
    """
    from collections import Counter

    from .adapters.infer import find_sites_inferred
    from .api import sparsify, unsparsify
    from .testing import dits

    row = {"class": name, "sites": {}, "geometry": "", "video_spans": {}, "expected_span": None, "status": "",
           "error": None, "changed": None}
    torch.manual_seed(0)
    m, kw = dits.DIFFUSERS_VIDEO[name]()
    m = m.eval()
    sites, adapter = find_sites_inferred(m, kw)
    row["sites"] = dict(Counter(s.kind if s.axis == "full" else f"{s.kind}/{s.axis}" for s in sites))
    if adapter is None:
        row["status"] = "geometry not inferred"
        return row
    g = adapter.geometry(m, (), kw)
    row["geometry"] = f"inferred from {adapter.source}: grid {g.grid}, video_start {g.video_start}"
    if not any(s.kind in ("self", "joint") for s in sites):
        row["status"] = "no video site found"
        return row
    row["video_spans"] = {s.path: (s.q_len - g.video_len if g.video_start < 0 else g.video_start, g.video_len)
                          for s in sites if s.kind in ("self", "joint") and s.axis == "full"}
    row["expected_span"] = dits.coverage_video_span(name, kw)
    wrong = {p: span for p, span in row["video_spans"].items() if span != row["expected_span"]}

    def out():
        with torch.no_grad():
            o = m(**kw)
        return o[0] if isinstance(o, (tuple, list)) else getattr(o, "sample", o)

    ref = out()
    outs = {}
    for density in (1.0, 0.25):
        rec = {"version": 1, "defaults": {"method": "vsa", "tile": [1, 8, 8], "budget": {"density": density}}}
        sparsify(m, rec, example_inputs=kw, adapter=adapter)
        try:
            outs[density] = out()
        finally:
            unsparsify(m)
    row["error"] = float((outs[1.0] - ref).abs().max())
    row["changed"] = float((outs[0.25] - ref).abs().max())
    ok = row["error"] <= 1e-5 and row["changed"] > 1e-4 and bool(torch.isfinite(outs[0.25]).all())
    row["status"] = "ok" if ok else f"FAILED (density 1.0 error {row['error']:.2e}, 0.25 change {row['changed']:.2e})"
    if wrong:
        path, span = next(iter(wrong.items()))
        row["status"] = (f"FAILED (video span (start, length) {span} at '{path}' and {len(wrong) - 1} other sites, "
                         f"expected {row['expected_span']})")
    return row


def coverage_table() -> str:
    """The `--all-diffusers` table: every installed diffusers video transformer, checked or listed with the reason."""
    from .testing import dits

    lines = []
    for name in dits.diffusers_video_classes():
        if name in dits.DIFFUSERS_VIDEO:
            try:
                r = coverage_row(name)
            except Exception as e:  # noqa: BLE001 - report the failure in the table
                r = {"class": name, "sites": {}, "geometry": "", "status": f"error: {type(e).__name__}: {e}"}
            sites = ", ".join(f"{k} {v}" for k, v in sorted(r["sites"].items())) or "-"
            lines.append((name, sites, r["geometry"] or "-", r["status"]))
        else:
            lines.append((name, "-", "-", "not covered: " + dits.DIFFUSERS_VIDEO_UNSUPPORTED.get(name, "unknown class")))
    head = ("class", "sites by kind", "geometry", "status")
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(3)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify.inspect",
        description="List every attention site of a model: module path, kind (self/joint/cross/text), heads, "
                    "head_dim, q and kv lengths at small example inputs, mask, and implementation.")
    parser.add_argument("model", nargs="?", help="bundled name (" + ", ".join(BUNDLED_MODELS) + ") or import.path:factory")
    parser.add_argument("--all-diffusers", action="store_true",
                        help="build every installed diffusers video transformer from a tiny config and print the "
                             "coverage table (sites by kind, geometry source, status)")
    args = parser.parse_args(argv)
    if args.all_diffusers:
        print(coverage_table())
        return 0
    if args.model is None:
        parser.error("give a model spec, or --all-diffusers")
    from .api import find_sites

    model = load_model(args.model)
    sites, adapter = find_sites(model)
    print(f"{type(model).__name__}: {len(sites)} attention sites (adapter: {adapter.name})")
    print(site_table(sites))
    return 0


if __name__ == "__main__":
    sys.exit(main())
