"""Scorers: pluggable pieces that score (prompt, response) pairs on named axes.

Every scorer has a `name`, the `axes` it returns, and
`score(prompts, responses) -> {axis: [value or None per response]}`; None means the axis does not
apply to that prompt (e.g. over-refusal of a harmful prompt). Higher is better on every axis
except those listed in LOWER_IS_BETTER (cost, over_refusal, refusal rates are plain rates).

Built from a spec `{kind: ..., **options}` (YAML in eval configs); kinds resolve lazily so that a
run which only uses rules never imports a reward-model backbone:
- `rules`: the embedded world's rule scores (helpful, harmless, over_refusal, verbosity);
- `reward_model` / `cost_model`: a trained preference model (`prefvec train rm|cost`) or any HF
  sequence-classification reward model;
- `refusal`: the refusal detector (refused = 1.0);
- `judge`: an LLM judge on any OpenAI-compatible server, the paper's two-step protocol
  (judge_helpful, judge_harmless, 1-10; prefvec_ds.eval.judge);
- `safety_classifier`: a causal LM as a Llama-Guard-style classifier (guard_safe = P(safe) of
  its next token; prefvec_ds.eval.safety_classifier).
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Protocol, Sequence

from prefvec_ds import PrefvecError
from prefvec_ds.data import embedded
from prefvec_ds.data.pairs import Messages

Scores = dict[str, list[float | None]]
LOWER_IS_BETTER = frozenset({"cost", "over_refusal"})


class Scorer(Protocol):
    name: str
    axes: tuple[str, ...]

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Scores: ...


class RuleScorer:
    """The embedded default's axes, by rule (prefvec_ds.data.embedded.score)."""

    name = "rules"
    axes = ("helpful", "harmless", "over_refusal", "verbosity")

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Scores:
        out: Scores = {a: [] for a in self.axes}
        for prompt, response in zip(prompts, responses, strict=True):
            values = embedded.score(prompt[-1][1], response)
            for axis in self.axes:
                out[axis].append(values[axis])
        return out


#: kind -> "module:Class"; the class is built with the spec's other keys as keyword arguments.
SCORER_KINDS = {
    "rules": "prefvec_ds.eval.scorers:RuleScorer",
    "reward_model": "prefvec_ds.eval.preference_model:RewardModelScorer",
    "cost_model": "prefvec_ds.eval.preference_model:CostModelScorer",
    "refusal": "prefvec_ds.eval.refusal:RefusalScorer",
    "rules_dual": "prefvec_ds.mora.scoring:DualRuleScorer",  # helpful+harmless on every prompt
    "judge": "prefvec_ds.eval.judge:JudgeScorer",
    "safety_classifier": "prefvec_ds.eval.safety_classifier:SafetyClassifierScorer",
}
#: kind -> "module:Dataclass" of its options (torch-free), checked when a config is loaded, so a
#: bad judge option fails before hours of training rather than at the eval stage.
SCORER_OPTIONS = {
    "judge": "prefvec_ds.eval.judge:JudgeConfig",
    "safety_classifier": "prefvec_ds.eval.safety_classifier:SafetyClassifierConfig",
}


def check_scorer_options(spec: dict | str) -> None:
    """Build the options dataclass of a spec whose kind has one (its __post_init__ checks)."""
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", None)
    if kind not in SCORER_OPTIONS:
        return
    module, cls = SCORER_OPTIONS[kind].split(":")
    options_cls = getattr(importlib.import_module(module), cls)
    known = [f.name for f in fields(options_cls)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise PrefvecError(f"scorer {kind}: unknown option(s) {', '.join(unknown)}; expected "
                           f"some of {', '.join(known)}")
    options_cls(**spec)


def build_scorer(spec: dict | str) -> Scorer:
    """A scorer from `{kind: ..., **options}` (or just the kind)."""
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", None)
    if kind not in SCORER_KINDS:
        raise PrefvecError(f"scorer kind {kind!r}: expected one of {', '.join(SCORER_KINDS)}")
    module, cls = SCORER_KINDS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**spec)
    except TypeError as err:
        raise PrefvecError(f"scorer {kind}: bad options {sorted(spec)}: {err}") from None


def score_all(scorers: Sequence[Scorer], prompts: Sequence[Messages],
              responses: Sequence[str], sets: Sequence[str] = (),
              set_axes: dict[str, Sequence[str]] | None = None) -> Scores:
    """Every scorer's axes on the same responses; two scorers may not claim one axis.

    With `sets` (the prompt set of each response, pipeline.eval.prompt_sets), the columns are
    `<axis>@<set>` instead: the axis on that set's responses, None on the others; `set_axes`
    names the axes kept per set (absent or empty: all)."""
    out: Scores = {}
    for scorer in scorers:
        for axis, values in scorer.score(prompts, responses).items():
            if axis in out:
                raise PrefvecError(f"scorer {scorer.name}: axis {axis} is already scored by "
                                   "another scorer")
            out[axis] = values
    return split_by_set(out, sets, set_axes or {}) if sets else out


def set_columns(axes: Sequence[str], set_axes: dict[str, Sequence[str]]) -> list[str]:
    """The `<axis>@<set>` columns of score_all for prompt sets `set_axes` (set -> kept axes)."""
    return [f"{axis}@{name}" for name, kept in set_axes.items() for axis in axes
            if not kept or axis in kept]


def split_by_set(scores: Scores, sets: Sequence[str], set_axes: dict[str, Sequence[str]]
                 ) -> Scores:
    out: Scores = {}
    for name in dict.fromkeys(sets):
        kept = set_axes.get(name) or list(scores)
        for axis in kept:
            if axis not in scores:
                raise PrefvecError(f"config parameter pipeline.eval.prompt_sets.{name}.axes: "
                                   f"{axis!r} is no scorer's axis; the scorers give "
                                   f"{', '.join(scores)}")
            out[f"{axis}@{name}"] = [v if s == name else None
                                     for v, s in zip(scores[axis], sets, strict=True)]
    return out


def mean_scores(scores: Scores) -> dict[str, float | None]:
    """Mean of each axis over the responses it applies to, plus n_<axis> counts."""
    out: dict[str, float | None] = {}
    for axis, values in scores.items():
        kept = [v for v in values if v is not None]
        out[axis] = sum(kept) / len(kept) if kept else None
        out[f"n_{axis}"] = len(kept)
    return out
