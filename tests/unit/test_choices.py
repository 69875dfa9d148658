"""The names config validates (prefvec_ds.config.choices) and the tables that implement them agree.

Config may not import the implementations (tests/unit/test_import_layers.py), so each table of
names is written twice: once as a Literal in config/choices.py, once as the keys of the code's
table. These tests are what ties the two together.
"""

from __future__ import annotations

import re

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config import choices
from prefvec_ds.config.choices import names
from prefvec_ds.config.loader import load_config
from prefvec_ds.config.pipeline import DEFAULT_TIMES, STAGE_KINDS
from prefvec_ds.data.prompts import PROMPT_LOADERS
from prefvec_ds.data.sources import PREFERENCE_LOADERS
from prefvec_ds.eval.scorers import SCORER_KINDS
from prefvec_ds.mora.rewrite import REWRITERS
from prefvec_ds.pipeline.baselines import BASELINES
from prefvec_ds.pipeline.dag import build_dag
from prefvec_ds.train.losses import LOSSES
from tests.conftest import REPO

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("choice, table", [
    (choices.LossType, LOSSES),
    (choices.PreferenceSource, PREFERENCE_LOADERS),
    (choices.PromptSource, PROMPT_LOADERS),
    (choices.ScorerKind, SCORER_KINDS),
    (choices.RewriterKind, REWRITERS),
    (choices.StageKind, DEFAULT_TIMES),
    (choices.BaselineKind, BASELINES),
], ids=["losses", "preference sources", "prompt sources", "scorers", "rewriters", "stage times", "baselines"])
def test_literal_names_the_implementation_table(choice, table):
    assert set(names(choice)) == set(table), (
        f"config.choices and the implementation table disagree: only in config "
        f"{sorted(set(names(choice)) - set(table))}, only in the code "
        f"{sorted(set(table) - set(names(choice)))}")


def test_every_stage_kind_is_built_by_the_dag(tmp_path):
    cfg = load_config(REPO / "recipes" / "quickstart.yaml",
                      [f"run_dir={tmp_path}", "pipeline.mora.enabled=true",
                       "pipeline.baselines=[dpo_joint,dpo_soup]",
                       "pipeline.eval.tune.enabled=true"])
    built = [s.kind for s in build_dag(cfg)]
    assert set(built) == set(STAGE_KINDS)
    assert sorted(set(built), key=built.index) == list(STAGE_KINDS)  # STAGE_KINDS is DAG order


def test_pool_takes_every_preference_source_but_mora():
    preference_sources = set(names(choices.PreferenceSource))
    assert set(choices.POOL_SOURCES) == preference_sources - {"mora"} | {"prompts"}


def expected(choice, sep: str = " | ") -> str:
    """The names of a Literal (or a tuple) as the error message lists them, as a regex."""
    return re.escape(sep.join(choice if isinstance(choice, tuple) else names(choice)))


@pytest.mark.parametrize("override, message", [
    ("dpo.loss_type=kto",
     rf"dpo.loss_type: expected {expected(choices.LossType, '|')}, got 'kto'"),
    ("data.preferences.helpful.source=csv", r"data.preferences.<name>.source: expected "
     rf"{expected(choices.PreferenceSource, '|')}, got 'csv'"),
    ("pipeline.eval.scorers=[oracle]",
     rf"pipeline.eval.scorers: expected {expected(choices.ScorerKind)}, got 'oracle'"),
    ("pipeline.mora.scorers=[{kind: oracle}]",
     rf"pipeline.mora.scorers: expected {expected(choices.ScorerKind)}, got 'oracle'"),
    ("pipeline.mora.rewriter.kind=llm",
     rf"pipeline.mora.rewriter.kind: expected {expected(choices.RewriterKind)}, got 'llm'"),
    ("pipeline.mora.pool.source=mora",
     rf"pipeline.mora.pool.source: expected {expected(choices.POOL_SOURCES)}, got 'mora'"),
    ("pipeline.slurm.time.train='01:00:00'",
     rf"pipeline.slurm.time: expected keys among {expected(choices.StageKind, ', ')}"),
])
def test_a_name_outside_the_table_is_one_clear_line(override, message):
    with pytest.raises(PrefvecError, match=message):
        load_config(None, [override])
