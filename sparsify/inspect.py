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
    """Format SiteInfo rows as a fixed-width table."""
    head = ("path", "kind", "heads", "head_dim", "q_len", "kv_len", "mask", "impl")
    rows = [head] + [(s.path, s.kind, str(s.heads), str(s.head_dim), str(s.q_len), str(s.kv_len),
                      "yes" if s.has_mask else "no", s.impl) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsify.inspect",
        description="List every attention site of a model: module path, kind (self/joint/cross/text), heads, "
                    "head_dim, q and kv lengths at small example inputs, mask, and implementation.")
    parser.add_argument("model", help="bundled name (" + ", ".join(BUNDLED_MODELS) + ") or import.path:factory")
    args = parser.parse_args(argv)
    from .api import find_sites

    model = load_model(args.model)
    sites, adapter = find_sites(model)
    print(f"{type(model).__name__}: {len(sites)} attention sites (adapter: {adapter.name})")
    print(site_table(sites))
    return 0


if __name__ == "__main__":
    sys.exit(main())
