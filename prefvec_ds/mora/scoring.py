"""Dual feedback: every answer scored on every reward dimension, as signed vectors.

Scorers (prefvec_ds.eval.scorers) return `{axis: [value or None]}`; MORA needs one number per
dimension per answer, higher = better, so `DimensionTable` maps axes to dimensions (cost axes are
negated, None becomes the dimension's `missing` value). The embedded world gets its own scorer,
`rules_dual`, which defines helpful and harmless on every prompt, single- or multi-intent.
"""

from __future__ import annotations

from typing import Sequence

from prefvec_ds import PrefvecError
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages
from prefvec_ds.config.mora import DimensionConfig

Vector = dict[str, float]


class DualRuleScorer:
    """helpful and harmless by rule on every embedded prompt (embedded.score_dimensions):
    a harmful-only prompt has helpful 0, a benign-only one is harmless unless the answer
    complies with a harm, a fused prompt is scored intent by intent."""

    name = "rules_dual"
    axes = ("helpful", "harmless")

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]
              ) -> dict[str, list[float | None]]:
        out: dict[str, list[float | None]] = {a: [] for a in self.axes}
        for prompt, response in zip(prompts, responses, strict=True):
            values = embedded.score_dimensions(prompt[-1][1], response)
            for axis in self.axes:
                out[axis].append(values[axis])
        return out


class DimensionTable:
    """Scorer output -> one signed value per dimension, and the combined reward."""

    def __init__(self, dimensions: dict[str, DimensionConfig]):
        self.dims = dimensions

    def vectors(self, scores: dict[str, list[float | None]], n: int) -> list[Vector]:
        """n answers' dimension vectors from the scorers' axes."""
        out: list[Vector] = [{} for _ in range(n)]
        for name, dim in self.dims.items():
            if dim.axis not in scores:
                raise PrefvecError(f"config parameter pipeline.mora.dimensions.{name}.axis: no "
                                   f"scorer returns axis {dim.axis!r} (scored: "
                                   f"{', '.join(sorted(scores))})")
            sign = 1.0 if dim.higher_is_better else -1.0
            for vec, value in zip(out, scores[dim.axis], strict=True):
                vec[name] = dim.missing if value is None else sign * float(value)
        return out

    def combined(self, vec: Vector) -> float:
        """sum_d w_d * v_d: the reward the paper's Pass@N ceiling is about."""
        return sum(dim.weight * vec[name] for name, dim in self.dims.items())

    def reached(self, vec: Vector) -> list[str]:
        """Dimensions on which this answer is high."""
        return [name for name, dim in self.dims.items() if vec[name] >= dim.high]


def score_answers(scorers, table: DimensionTable, prompts: Sequence[Messages],
                  answers: Sequence[Sequence[str]]) -> list[list[Vector]]:
    """Per prompt, the dimension vectors of each of its answers (one scorer pass, flattened)."""
    from prefvec_ds.eval.scorers import score_all  # noqa: PLC0415

    flat_prompts = [p for p, group in zip(prompts, answers) for _ in group]
    flat = [a for group in answers for a in group]
    if not flat:
        return [[] for _ in prompts]
    vectors = table.vectors(score_all(scorers, flat_prompts, flat), len(flat))
    out, pos = [], 0
    for group in answers:
        out.append(vectors[pos:pos + len(group)])
        pos += len(group)
    return out


def build_scorers(specs: list) -> list:
    from prefvec_ds.eval.scorers import build_scorer  # noqa: PLC0415

    return [build_scorer(spec) for spec in specs]
