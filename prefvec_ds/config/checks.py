"""The validation helpers every config dataclass uses in `__post_init__`."""

from __future__ import annotations

import typing

from prefvec_ds import PrefvecError


def check(cond: bool, param: str, expected: str, got) -> None:
    """Raise a PrefvecError naming the dotted parameter, what was expected and what came."""
    if not cond:
        raise PrefvecError(f"config parameter {param}: expected {expected}, got {got!r}")


def check_choice(value, choices, param: str, sep: str = " | ") -> None:
    """`value` is one of `choices`: a Literal type (prefvec_ds.config.choices) or a tuple."""
    names = typing.get_args(choices) or tuple(choices)
    check(value in names, param, sep.join(names), value)
