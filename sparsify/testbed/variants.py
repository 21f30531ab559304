"""The test-bed variants by name: `testbed` (4,096 tokens) and `testbed-16k` (16,384 tokens), their configs and files."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .model import LATENT_SHAPE, TESTBED_CONFIG, TEXT_DIM

#: Latent video shape [C, F, H, W] of `testbed-16k`; patch (1, 2, 2) gives a 16 x 32 x 32 = 16,384-token grid.
LATENT_SHAPE_16K: tuple[int, int, int, int] = (4, 16, 64, 64)

#: `WanTransformer3DModel(**TESTBED16K_CONFIG)`: dim 256 = 8 heads x 32, 12 blocks, ffn 1024, 13,228,304 parameters
#: (25.2 MiB as fp16).
TESTBED16K_CONFIG: dict[str, Any] = {
    **TESTBED_CONFIG,
    "num_attention_heads": 8,
    "attention_head_dim": 32,
    "ffn_dim": 1024,
    "num_layers": 12,
    "text_dim": TEXT_DIM,
}

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class Variant:
    """One test-bed: its model config, latent shape, data generator module and shipped file stem.

    Attributes:
        name: the public name (`sparsify.inspect.load_model(name)`).
        config: `WanTransformer3DModel` kwargs of a random init.
        latent_shape: [C, F, H, W] the model is trained on.
        data: module under `sparsify.testbed` with `make_batch`, `class_embeddings`, `NUM_CLASSES`, `TEXT_LEN`.
        stem: file stem of the weights `<stem>.safetensors` and config `<stem>.json` beside this file.
        aliases: other accepted spellings (e.g. `16k` for `--config 16k`).
    """

    name: str
    config: dict[str, Any]
    latent_shape: tuple[int, int, int, int]
    data: str
    stem: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def weights_path(self) -> Path:
        """The shipped fp16 safetensors file."""
        return _HERE / f"{self.stem}.safetensors"

    @property
    def config_path(self) -> Path:
        """The shipped JSON (model config + training metadata)."""
        return _HERE / f"{self.stem}.json"

    def data_module(self) -> ModuleType:
        """The procedural data generator of this variant."""
        return importlib.import_module(f"{__package__}.{self.data}")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("testbed", TESTBED_CONFIG, LATENT_SHAPE, "data", "testbed_wan", aliases=("v1",)),
        Variant("testbed-16k", TESTBED16K_CONFIG, LATENT_SHAPE_16K, "data16k", "testbed16k", aliases=("16k", "v2")),
    )
}


def get_variant(name: str | Variant) -> Variant:
    """Look a test-bed variant up by name or alias.

    Example:
        >>> get_variant("16k").latent_shape
        (4, 16, 64, 64)
    """
    if isinstance(name, Variant):
        return name
    for v in VARIANTS.values():
        if name == v.name or name in v.aliases:
            return v
    valid = ", ".join(f"{v.name} (or {', '.join(v.aliases)})" for v in VARIANTS.values())
    raise ValueError(f"unknown test-bed variant {name!r}; valid: {valid}")
