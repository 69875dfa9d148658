"""The training sets of the DPO-form baselines, built from the helpful and harmless pairs.

Each rule is a pure function over the two tokenized preference sets (in their + orientation)
and returns `Selected` rows: which set a pair came from and in which orientation it is trained,
so that the baseline reuses that set's reference log-probs (swapping the columns for a flipped
pair) instead of computing a table of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prefvec_ds.data.tokenize import TokenizedPair, direction_view


@dataclass(frozen=True)
class Selected:
    role: str
    """"helpful" or "harmless": the set (and reference table) the pair comes from."""
    sign: int
    """+1: as that set labels it; -1: chosen and rejected swapped."""
    pair: TokenizedPair
    """The pair as trained (already swapped when sign is -1)."""


def _take(role: str, pair: TokenizedPair, sign: int = 1) -> Selected:
    return Selected(role, sign, direction_view([pair], sign)[0])


def joint(helpful: list[TokenizedPair], harmless: list[TokenizedPair]) -> list[Selected]:
    """dpo_joint: every helpful and every harmless pair, as labelled (the naive union: a row
    in both sets with opposite orders is trained both ways)."""
    return [_take("helpful", p) for p in helpful] + [_take("harmless", p) for p in harmless]


def safe_first(helpful: list[TokenizedPair], harmless: list[TokenizedPair]) -> list[Selected]:
    """dpo_safe_first (the paper's definition): per row (prompt and its two responses), the
    helpfulness pair when both responses are safe, else the harmlessness pair. A row only the
    helpful set has, with a response unsafe, is ordered safe-over-unsafe by its labels; with
    both unsafe there is no harmlessness order and the row is dropped. Needs safety labels on
    the helpful pairs (see require_safety_labels)."""
    safer = {p.key: p for p in harmless}
    out, seen = [], set()
    for p in helpful:
        seen.add(p.key)
        if p.chosen_safe and p.rejected_safe:
            out.append(_take("helpful", p))
        elif p.key in safer:
            out.append(_take("harmless", safer[p.key]))
        elif p.chosen_safe != p.rejected_safe:
            out.append(_take("helpful", p, 1 if p.chosen_safe else -1))
    out += [_take("harmless", p) for p in harmless if p.key not in seen]
    return out


def helpful_labelled(helpful: list[TokenizedPair],
                     harmless: list[TokenizedPair]) -> list[Selected]:  # noqa: ARG001
    """bfpo: the helpfulness ranking; BFPO's loss reads the pairs' safety labels to move an
    unsafe chosen response down (Zhang et al., ICLR 2025)."""
    return [_take("helpful", p) for p in helpful]


#: baseline name -> its training set. The DPO-form baselines of pipeline.baselines.
BASELINE_DATA: dict[str, Callable[[list[TokenizedPair], list[TokenizedPair]], list[Selected]]] = {
    "dpo_joint": joint,
    "dpo_safe_first": safe_first,
    "bfpo": helpful_labelled,
}
