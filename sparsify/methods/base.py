"""The selection-method interface: what `select` returns, the optional `attend`, and versioned per-head params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch


@dataclass(frozen=True)
class TileStats:
    """Tile statistics the op's gather already computed (float32 `[B, H, n_tiles, D]`), or None where it did not.

    Attributes:
        q_means, k_means: mean of q's and k's valid slots per video tile.
        k_group_means: means of k's groups of `key_group` consecutive slots (Veda's `keys/G` peak).
    """

    q_means: torch.Tensor | None = None
    k_means: torch.Tensor | None = None
    k_group_means: torch.Tensor | None = None


class SelectionMethod:
    """Base class of tile-selection methods; register a subclass with `@register_method("name")`.

    A method implements `select`, or, when it needs its own token order (SVG2's clusters), `attend`
    (the runtime calls `attend` when the class defines it). Per-head parameters come from recipes as
    dicts: `check_params` validates one, `from_head_params` builds the method for a group of heads,
    `head_params` writes one back. `PARAMS_VERSION` is the version of that dict's schema: a recipe
    entry may carry `version: N`, and a recipe whose entry has another version is refused at load.

    Example:
        >>> from sparsify.methods import register_method
        >>> @register_method("all_keys")
        ... class AllKeys(SelectionMethod):
        ...     def select(self, q, k, layout, budgets, stats=None):
        ...         B, H, n = q.shape[0], q.shape[1], layout.n_tiles
        ...         idx = torch.arange(n, dtype=torch.int32).expand(B, H, n, n).contiguous()
        ...         return idx, torch.full((B, H, n), n, dtype=torch.int32)
    """

    name: ClassVar[str] = ""
    PARAMS_VERSION: ClassVar[int] = 1
    #: slots per key group whose means the op's gather should compute for `stats.k_group_means` (0: none)
    key_group: int = 0

    def select(self, q: torch.Tensor, k: torch.Tensor, layout, budgets: Sequence,
               stats: TileStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The key tiles each query tile attends to.

        Args:
            q, k: `[B, H, n_tiles*volume, D]` in tile order (the video tiles of one head group).
            layout: the `TileLayout`.
            budgets: one `Budget` per head.
            stats: tile statistics the gather computed (use them instead of pooling q and k again).

        Returns:
            `(kv_indices, kv_counts)`: int32 `[B, H, n_tiles, max_kv]` (the first `kv_counts` entries of
            each row are the selected key tiles, distinct) and int32 `[B, H, n_tiles]`.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither select nor attend")

    @classmethod
    def check_params(cls, params: dict) -> None:
        """Validate one head's recipe `params` (without `version`), raising ValueError with what is valid (default:
        none allowed)."""
        if params:
            raise ValueError(f"method '{cls.name}' takes no parameters; got {sorted(params)}")

    @classmethod
    def check_version(cls, params: dict) -> None:
        """Refuse params written for another schema version of this method (no `version` key: this one)."""
        v = params.get("version", cls.PARAMS_VERSION)
        if v != cls.PARAMS_VERSION or isinstance(v, bool):
            raise ValueError(f"params version {v!r} of method '{cls.name}' is not supported; "
                             f"this sparsify reads version {cls.PARAMS_VERSION}")

    @classmethod
    def from_head_params(cls, head_params: Sequence[dict | None]) -> "SelectionMethod":
        """The method for a group of heads given their params (None for a head without any)."""
        return cls()

