"""The one validation helper every config dataclass uses in `__post_init__`."""

from __future__ import annotations

from prefvec_ds import PrefvecError


def check(cond: bool, param: str, expected: str, got) -> None:
    """Raise a PrefvecError naming the dotted parameter, what was expected and what came."""
    if not cond:
        raise PrefvecError(f"config parameter {param}: expected {expected}, got {got!r}")
