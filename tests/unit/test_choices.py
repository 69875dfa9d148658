"""The names config validates (prefvec_ds.config.choices) and the tables that implement them agree.

Config may not import the implementations (tests/unit/test_import_layers.py), so each table of
names is written twice: once as a Literal in config/choices.py, once as the keys of the code's
table. These tests are what ties the two together.
"""

from __future__ import annotations

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config import choices
from prefvec_ds.config.choices import names
from prefvec_ds.config.loader import load_config
from prefvec_ds.config.pipeline import DEFAULT_TIMES, STAGE_KINDS
from prefvec_ds.data.sources import PREFERENCE_LOADERS
from prefvec_ds.eval.scorers import SCORER_KINDS
from prefvec_ds.pipeline.dag import build_dag
from prefvec_ds.train.losses import LOSSES
from tests.conftest import REPO

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("choice, table", [
    (choices.LossType, LOSSES),
    (choices.PreferenceSource, PREFERENCE_LOADERS),
    (choices.ScorerKind, SCORER_KINDS),
    (choices.StageKind, DEFAULT_TIMES),
], ids=["losses", "preference sources", "scorers", "stage times"])
def test_literal_names_the_implementation_table(choice, table):
    assert set(names(choice)) == set(table), (
        f"config.choices and the implementation table disagree: only in config "
        f"{sorted(set(names(choice)) - set(table))}, only in the code "
        f"{sorted(set(table) - set(names(choice)))}")


def test_every_stage_kind_is_built_by_the_dag(tmp_path):
    cfg = load_config(REPO / "recipes" / "quickstart.yaml",
                      [f"run_dir={tmp_path}", "pipeline.mora.enabled=true"])
    built = [s.kind for s in build_dag(cfg)]
    assert set(built) == set(STAGE_KINDS)
    assert sorted(set(built), key=built.index) == list(STAGE_KINDS)  # STAGE_KINDS is DAG order


def test_pool_sources_follow_the_preference_sources():
    assert choices.POOL_SOURCES == ("embedded", "pku_saferlhf", "hh_rlhf", "jsonl", "prompts")


@pytest.mark.parametrize("override, message", [
    ("dpo.loss_type=kto", r"dpo.loss_type: expected sigmoid\|ipo\|hinge, got 'kto'"),
    ("data.preferences.helpful.source=csv",
     r"data.preferences.<name>.source: expected embedded\|pku_saferlhf\|hh_rlhf\|jsonl\|mora"),
    ("pipeline.eval.scorers=[judge]", r"pipeline.eval.scorers: expected rules \| reward_model"),
    ("pipeline.mora.scorers=[{kind: judge}]", r"pipeline.mora.scorers: expected rules \| "),
    ("pipeline.mora.pool.source=mora", r"pipeline.mora.pool.source: expected embedded \|"),
    ("pipeline.slurm.time.train='01:00:00'", r"pipeline.slurm.time: expected keys among sft,"),
])
def test_a_name_outside_the_table_is_one_clear_line(override, message):
    with pytest.raises(PrefvecError, match=message):
        load_config(None, [override])
