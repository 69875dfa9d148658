"""The names a config may choose among, one Literal per table of pluggable parts.

Config validates against these names without importing the code that implements them (config
sits below data, train, eval and pipeline: see prefvec_ds/__init__.py). Each implementation
table is keyed by the same names, and tests/unit/test_choices.py fails when the two disagree, so
adding a loss, a preference source, a scorer or a stage kind is one name here plus its entry
(and its code) in the implementation table:

    LossType          prefvec_ds.train.losses.LOSSES
    PreferenceSource  prefvec_ds.data.sources.PREFERENCE_LOADERS (MORA's pool takes them too)
    PromptSource      prefvec_ds.data.prompts.PROMPT_LOADERS
    ScorerKind        prefvec_ds.eval.scorers.SCORER_KINDS
    RewriterKind      prefvec_ds.mora.rewrite.REWRITERS
    StageKind         prefvec_ds.config.pipeline.DEFAULT_TIMES and the stages of
                      prefvec_ds.pipeline.dag.build_dag
    BaselineKind      prefvec_ds.pipeline.baselines.BASELINES
"""

from __future__ import annotations

import typing
from typing import Literal

LossType = Literal["sigmoid", "ipo", "hinge", "bfpo"]
"""dpo.loss_type: sigmoid (DPO), ipo, hinge, bfpo (needs per-response safety labels)."""

PreferenceSource = Literal["embedded", "pku_saferlhf", "hh_rlhf", "safety_pairs", "jsonl", "mora"]
"""data.preferences.<name>.source; safety_pairs: {prompt, response: [safer, worse]} rows (the
PKU-SafeRLHF-derived safety pairs); mora: the pairs written by the MORA stage."""

PromptSource = Literal["alpaca_eval", "advbench", "harmbench", "beavertails", "xstest", "prompts"]
"""pipeline.eval.prompt_sets.<name>.source: the public eval prompt sets (readers:
prefvec_ds.data.prompts.PROMPT_LOADERS); prompts: a .txt with one prompt per line, or
json/jsonl rows with a `prompt` field."""

ScorerKind = Literal["rules", "reward_model", "cost_model", "refusal", "rules_dual", "judge",
                     "safety_classifier"]
"""pipeline.eval.scorers[].kind and pipeline.mora.scorers[].kind."""

RewriterKind = Literal["structured", "hf"]
"""pipeline.mora.rewriter.kind: structured (the embedded world) or hf (a prompted causal LM)."""

StageKind = Literal["sft", "mora", "ref_logps", "dpo", "vectors", "merge", "baseline_dpo",
                    "baseline_merge", "eval", "tune"]
"""Kinds of pipeline stages, in DAG order (`pipeline.slurm.time` has one limit per kind)."""

ZeroStage = Literal[1, 2, 3]
"""zero_optimization.stage of distributed.ds_config: the stages the trainers run and the
extractor reads (prefvec_ds.ckpt.sources.DEEPSPEED_READERS). Stage 0 (plain data parallel) is
not offered: ZeRO-1 takes the same step with the optimizer states sharded, and writes the
fp32 partitions the extractor streams."""

BaselineKind = Literal["dpo_joint", "dpo_safe_first", "bfpo", "dpo_soup", "positive_only"]
"""pipeline.baselines: systems trained or merged in the same run to compare Preference Vectors
with (see prefvec_ds.pipeline.baselines.BASELINES)."""


def names(choice_type) -> tuple[str, ...]:
    """The names of a Literal type, in declaration order."""
    return typing.get_args(choice_type)


#: MORA's pool (`pipeline.mora.pool.source`): the prompts of any preference source but MORA's
#: own pairs, or `prompts` (a .txt with one prompt per line, or rows with a `prompt` field).
POOL_SOURCES = tuple(s for s in names(PreferenceSource) if s != "mora") + ("prompts",)
