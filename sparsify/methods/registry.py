"""The method registry: `@register_method("name")` on a class with a `select` method."""

from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Register a tile-selection method class under `name` (usable in recipes as `method: name`).

    The class implements `select(q, k, layout, budgets) -> (kv_indices, kv_counts)` where q and k are
    `[B, H, n_tiles*volume, D]` in tile order and `budgets` holds one `Budget` per head.

    A method that needs its own token order (e.g. SVG2's clusters) may instead implement
    `attend(q, k, v, geometry, budgets, *, scale, key_mask, cache, block_fn) -> (out, work)`: q, k, v
    are `[B, h, S, D]` in the original token order (the heads of one group), `out` is `[B, h, S, D]`,
    `work` is the attention work computed relative to one dense head, summed over `B x h` (as
    `runtime.sparse_work`), and `cache` is a dict kept per site, head group, grid, batch and call of the
    step for the current generation (for warm starts across denoising steps). Text tokens outside
    `geometry`'s video span must stay dense in both directions.

    Example:
        >>> @register_method("my_method")
        ... class MyMethod:
        ...     def select(self, q, k, layout, budgets): ...
    """

    def deco(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a selection method named '{name}' is already registered ({_METHODS[name].__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def available_methods() -> tuple[str, ...]:
    """Names of all registered methods."""
    return tuple(sorted(_METHODS))


def method_class(name: str) -> type:
    """The class registered as `name`."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown selection method '{name}'; registered: {', '.join(available_methods())}") from None


def get_method(name: str, head_params=None):
    """An instance of the method registered as `name`.

    Args:
        name: a registered method.
        head_params: optional per-head parameter dicts (None for a head without parameters), as a recipe's
            head entries give them; the class builds itself from them with `from_head_params(head_params)`.
            A class that takes parameters also defines `check_params(params)`, raising ValueError.

    Example:
        >>> type(get_method("vsa")).__name__
        'VSA'
    """
    cls = method_class(name)
    if head_params is not None and any(p for p in head_params):
        return cls.from_head_params(list(head_params))
    return cls()
