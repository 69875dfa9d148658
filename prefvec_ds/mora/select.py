"""Max-margin selection: per rewritten prompt, the (chosen, rejected) pair of its K self-play
answers with the largest multi-dimensional margin, where chosen is never worse on any
dimension. Pure functions over score vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prefvec_ds.mora.scoring import DimensionTable, Vector


@dataclass(frozen=True)
class Selection:
    chosen: int | None
    """Index of the chosen answer (None: no pair kept)."""
    rejected: int | None
    margin: float
    """sum_d w_d (chosen_d - rejected_d) of the best pair (0.0 when there is none)."""
    reason: str = ""
    """Why no pair was kept."""


def never_worse(a: Vector, b: Vector, dims: Sequence[str]) -> bool:
    """a >= b on every dimension."""
    return all(a[d] >= b[d] for d in dims)


def margin(a: Vector, b: Vector, table: DimensionTable) -> float:
    return sum(dim.weight * (a[name] - b[name]) for name, dim in table.dims.items())


def select_pair(answers: Sequence[str], vectors: Sequence[Vector], table: DimensionTable,
                min_margin: float) -> Selection:
    """The largest-margin pair whose chosen answer dominates the rejected one (>= on every
    dimension, > in the weighted sum); ties go to the lowest (chosen, rejected) indices.
    Identical texts never pair. Below `min_margin` the prompt yields no pair."""
    dims = list(table.dims)
    best: tuple[float, int, int] | None = None
    for i, a in enumerate(vectors):
        for j, b in enumerate(vectors):
            if i == j or answers[i] == answers[j] or not never_worse(a, b, dims):
                continue
            m = margin(a, b, table)
            if m > 0 and (best is None or m > best[0]):
                best = (m, i, j)
    if best is None:
        return Selection(None, None, 0.0, "no answer dominates another")
    m, i, j = best
    if m < min_margin:
        return Selection(None, None, m, f"best margin {m:.3g} < min_margin {min_margin:g}")
    return Selection(i, j, m)
