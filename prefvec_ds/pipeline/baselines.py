"""The baselines of pipeline.baselines as stages of the run's DAG: one table, one entry each.

A trained baseline (`baseline_dpo` stage: ranks, like a DPO direction) reads the reference
tables of the helpful and harmless preferences; a merged one (`baseline_merge` stage: in this
process, like a merge) reads the + DPO checkpoints. Both write <run_dir>/baselines/<name>/model,
which the eval stage scores next to the Preference Vectors merges.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefvec_ds import PrefvecError
from prefvec_ds.config.choices import StageKind
from prefvec_ds.config.layout import merge_etas
from prefvec_ds.config.schema import RunConfig


@dataclass(frozen=True)
class Baseline:
    kind: StageKind
    """baseline_dpo (trained, see prefvec_ds.train.baselines) or baseline_merge."""
    summary: str
    """One line for reports and docs."""


BASELINES: dict[str, Baseline] = {
    "dpo_joint": Baseline("baseline_dpo", "one DPO on the union of the helpful and harmless pairs"),
    "dpo_safe_first": Baseline("baseline_dpo", "DPO on the helpful pair when both responses are "
                                               "safe, else the harmless pair"),
    "bfpo": Baseline("baseline_dpo", "BFPO's loss (b1=3, alpha=0.5) on the helpful pairs with "
                                     "safety labels"),
    "dpo_soup": Baseline("baseline_merge", "average of the helpful+ and harmless+ models"),
    "positive_only": Baseline("baseline_merge", "theta_base + sum eta (theta_p+ - theta_base), "
                                                "eta of the first merge"),
}


def check_baselines(cfg: RunConfig) -> None:
    """pipeline.baseline_roles name preferences of the run; no merge shares a baseline's name
    (both are models of the eval table)."""
    if not cfg.pipeline.baselines:
        return
    for role, pref in cfg.pipeline.baseline_roles.items():
        if pref not in cfg.data.preferences:
            raise PrefvecError(f"config parameter pipeline.baseline_roles.{role}: {pref!r} is not "
                               f"a preference of data.preferences "
                               f"({', '.join(cfg.data.preferences)})")
    clash = sorted(set(cfg.pipeline.baselines) & {m.name for m in cfg.pipeline.merges})
    if clash:
        raise PrefvecError(f"config parameter pipeline.merges: name {clash[0]!r} is also a "
                           "baseline of pipeline.baselines; rename the merge")


def soup_etas(cfg: RunConfig, name: str) -> dict[str, float]:
    """preference -> weight of its + model's move from theta_base, for a merged baseline."""
    roles = list(cfg.pipeline.baseline_roles.values())
    if name == "dpo_soup":
        return {pref: 1.0 / len(roles) for pref in roles}
    first = merge_etas(cfg)[cfg.pipeline.merges[0].name]
    return {pref: first[pref] for pref in roles}
