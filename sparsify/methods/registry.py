"""The method registry: `@register_method("name")` on a class with a `select` method."""

from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Register a tile-selection method class under `name` (usable in recipes as `method: name`).

    The class implements `select(q, k, layout, budgets) -> (kv_indices, kv_counts)` where q and k are
    `[B, H, n_tiles*volume, D]` in tile order and `budgets` holds one `Budget` per head.

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


def get_method(name: str):
    """An instance of the method registered as `name`."""
    try:
        return _METHODS[name]()
    except KeyError:
        raise KeyError(f"unknown selection method '{name}'; registered: {', '.join(available_methods())}") from None
