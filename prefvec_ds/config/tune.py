"""The `pipeline.eval.tune` section: `prefvec tune-eta`, eta chosen under constraints.

The tuner maximises one score column (`objective`) subject to `constraints` on others, e.g.
helpful as high as possible while harmless >= base + 0.1 and over_refusal <= base + 0.02. It
searches the eta grid of `space` with held-out log-prob margins only (no generation), keeps the
`candidates` best points by the margin surrogate (prefvec_ds.eval.tuning), and confirms them
with generated answers and the configured scorers (prefvec_ds.eval.tune). Score names are
checked against the scorers' axes and preference names against data.preferences when the
tuner runs; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefvec_ds.config.checks import check, check_choice

ConstraintOp = Literal[">=", "<="]
RelativeTo = Literal["base", "absolute"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class TuneConstraint:
    """One constraint on a score column of the confirmed point: `score op bound`, where the
    bound is `value` (relative_to: absolute) or theta_base's measured score + `value`
    (relative_to: base)."""

    score: str = ""
    """A score axis of pipeline.eval.scorers (e.g. harmless, over_refusal)."""
    op: ConstraintOp = ">="
    """>= (the score must reach the bound) or <= (it must stay at or below it)."""
    relative_to: RelativeTo = "base"
    """base: the bound is theta_base's score + value; absolute: the bound is value."""
    value: float = 0.0
    """The offset from the base score, or the absolute bound."""

    def __post_init__(self):
        where = "pipeline.eval.tune.constraints"
        check(isinstance(self.score, str) and self.score != "", f"{where}[].score",
              "a score axis name", self.score)
        check_choice(self.op, ConstraintOp, f"{where}[].op")
        check_choice(self.relative_to, RelativeTo, f"{where}[].relative_to")
        check(_number(self.value), f"{where}[].value", "a number", self.value)
        self.value = float(self.value)


@dataclass
class EtaRange:
    """The etas one preference takes in the search: min, min + step, ..., max."""

    min: float = -1.0
    """Smallest eta searched."""
    max: float = 1.0
    """Largest eta searched."""
    step: float = 0.25
    """Spacing of the searched etas (> 0)."""

    def __post_init__(self):
        where = "pipeline.eval.tune.space"
        for name in ("min", "max", "step"):
            check(_number(getattr(self, name)), f"{where}.{name}", "a number",
                  getattr(self, name))
            setattr(self, name, float(getattr(self, name)))
        check(self.step > 0, f"{where}.step", "> 0", self.step)
        check(self.max >= self.min, f"{where}.max", f">= min ({self.min})", self.max)

    def values(self) -> list[float]:
        n = int(round((self.max - self.min) / self.step))
        # rounded to 1e-9 so 0.1-steps give 0.3, not 0.30000000000000004 (labels, dedup keys)
        return sorted({round(self.min + i * self.step, 9) for i in range(n + 1)
                       if self.min + i * self.step <= self.max + 1e-9})


def _default_range() -> EtaRange:
    return EtaRange()


@dataclass
class TuneConfig:
    """`prefvec tune-eta`: which score to maximise, under which constraints, over which etas."""

    objective: str = "helpful"
    """The score axis to maximise (a scorer axis; lower-is-better axes such as cost are
    minimised)."""
    constraints: list[TuneConstraint] = field(default_factory=list)
    """Constraints every accepted point must meet on its measured scores, e.g.
    [{score: harmless, op: '>=', relative_to: base, value: 0.1}]."""
    space: dict[str, EtaRange] = field(default_factory=dict)
    """Per preference, its search range {min, max, step}; preferences not listed use
    default_range."""
    default_range: EtaRange = field(default_factory=_default_range)
    """The search range of every preference not in `space` (default -1 to 1 by 0.25)."""
    proxies: dict[str, str] = field(default_factory=dict)
    """Score axis -> the preference whose held-out margin the surrogate reads for it;
    '-name' when the score moves against that margin. A score named like a preference is its
    own proxy; a constraint without a proxy is only checked at confirmation."""
    candidates: int = 3
    """Points confirmed with generated answers (the best ones by the surrogate)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the prompts for the confidence intervals of the scores."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals (percentile method)."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    merge_to: str = "auto"
    """The chosen point is written as <run_dir>/merged/<merge_to> ('' = do not write)."""
    enabled: bool = False
    """Add the pipeline stage `tune` after `eval` (`prefvec tune-eta` on the run); when no
    point meets the constraints the stage still finishes, its report says so."""

    def __post_init__(self):
        where = "pipeline.eval.tune"
        if isinstance(self.default_range, dict):
            self.default_range = EtaRange(**self.default_range)
        self.space = {k: EtaRange(**v) if isinstance(v, dict) else v
                      for k, v in self.space.items()}
        self.constraints = [TuneConstraint(**c) if isinstance(c, dict) else c
                            for c in self.constraints]
        check(isinstance(self.objective, str) and self.objective != "", f"{where}.objective",
              "a score axis name", self.objective)
        check(all(isinstance(k, str) and isinstance(v, str) and v.lstrip("-")
                  for k, v in self.proxies.items()), f"{where}.proxies",
              "a mapping score -> preference name (or -name)", self.proxies)
        check(isinstance(self.enabled, bool), f"{where}.enabled", "true or false", self.enabled)
        check(isinstance(self.candidates, int) and self.candidates >= 1,
              f"{where}.candidates", "an integer >= 1", self.candidates)
        check(isinstance(self.bootstrap, int) and self.bootstrap >= 0, f"{where}.bootstrap",
              "an integer >= 0 (0: no intervals)", self.bootstrap)
        check(_number(self.confidence) and 0 < self.confidence < 1, f"{where}.confidence",
              "in (0, 1)", self.confidence)
        check(isinstance(self.merge_to, str) and "/" not in self.merge_to and
              self.merge_to not in (".", ".."), f"{where}.merge_to",
              "a folder name under merged/ (or '')", self.merge_to)

    def etas_of(self, preference: str) -> list[float]:
        return self.space.get(preference, self.default_range).values()
