"""The error and warning types of sparsify: one per layer (recipe content, call arguments), one warning category."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe is malformed or does not match the model.

    The message names the recipe's file (or `<dict>` for a dict, `<Recipe>` for an object built in
    code), the key path of the problem, and what would be valid.

    Attributes:
        source: the file, `<dict>`, `<Recipe>` or the argument name (`recipe`).
        key: the key path, e.g. `defaults.budget.density`, or None for the whole document.
        reason: the message without its location.

    Example:
        >>> str(RecipeError("must be a number in (0, 1]; got True", source="r.yaml", key="defaults.budget.density"))
        "r.yaml: key 'defaults.budget.density': must be a number in (0, 1]; got True"
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.reason = source, key, message
        where = []
        if source:
            where.append(str(source))
        if key:
            where.append(f"key '{key}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class SparsifyArgumentError(ValueError):
    """An argument of `sparsify()` / `find_sites()` is invalid: the message names it, its value and what is valid.

    Attributes:
        argument: the argument's name (`grid`, `video_start`, `example_inputs`, `adapter`, `mode`, `model`).
        value: the value that was passed (or what a callable argument returned).

    Example:
        >>> str(SparsifyArgumentError("grid", (4, 8), "must be three positive integers (T, H, W)"))
        'sparsify: grid=(4, 8): must be three positive integers (T, H, W)'
    """

    def __init__(self, argument: str, value, message: str, *, shown: str | None = None):
        self.argument, self.value = argument, value
        if shown is None:
            try:
                shown = repr(value)
            except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
                shown = f"<{type(value).__name__}>"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"sparsify: {argument}={shown}: {message}")


class SparsifyWarning(UserWarning):
    """Legal but probably unintended input (a rule that matches nothing, tokens outside the grid, ...).

    Each cause warns once. Silence them with
    `warnings.filterwarnings("ignore", category=sparsify.SparsifyWarning)`.
    """


class LatencyTableError(RecipeError):
    """A latency table (`sparsify.calibrate.latency`) is malformed or was measured for another model or shape.

    The message names the table's file, the key path and what would be valid, like a `RecipeError`.

    Example:
        >>> str(LatencyTableError("grid: table [16, 16, 16], model [16, 32, 32]", source="t.json", key="model"))
        "t.json: key 'model': grid: table [16, 16, 16], model [16, 32, 32]"
    """
