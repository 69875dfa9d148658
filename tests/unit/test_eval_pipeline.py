"""The eval stage in the DAG: adding a preference, diagnostic seeds, what an eval change redoes."""

from __future__ import annotations

import pytest

from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.dag import build_dag, groups, stage_by_name
from prefvec_ds.distributed.launch import RankJob
from prefvec_ds.pipeline.arithmetic import vector_call
from prefvec_ds.pipeline.job import _share_ref_logps, rank_command
from tests.unit.test_pipeline_dag import cfg_for, finish_all

pytestmark = pytest.mark.unit
CONCISE = "data.preferences.concise={source: embedded, order_by: concise_response_id}"
SEEDS = ["pipeline.eval.diagnostic_seeds=[43]", "pipeline.eval.diagnostic_preferences=[helpful]"]


def test_adding_a_preference_keeps_the_existing_stages_up_to_date(tmp_path):
    finish_all(tmp_path, build_dag(cfg_for(tmp_path)))
    extended = build_dag(cfg_for(tmp_path, CONCISE))
    todo = manifest.plan(tmp_path, extended)
    # only the new pair is trained; the default merge gains eta_concise = 1, the sweep the
    # new axis
    assert set(todo) == {"ref_logps/concise", "dpo/concise+", "dpo/concise-",
                         "vectors/concise", "merge/default", "eval"}
    for name in ("sft", "ref_logps/helpful", "dpo/helpful+", "dpo/harmless-", "vectors/helpful"):
        assert manifest.up_to_date(tmp_path, stage_by_name(extended, name)) == (True, "")
    assert todo["eval"].startswith("after") or todo["eval"] == "inputs changed"


def test_an_eval_setting_redoes_only_the_eval_stage(tmp_path):
    finish_all(tmp_path, build_dag(cfg_for(tmp_path)))
    todo = manifest.plan(tmp_path, build_dag(cfg_for(tmp_path, "pipeline.eval.prompts=50")))
    assert todo == {"eval": "inputs changed"}


def test_diagnostic_seeds_add_dpo_and_vector_stages_in_their_own_run_folder(tmp_path):
    cfg = cfg_for(tmp_path, *SEEDS)
    stages = build_dag(cfg)
    dpo = [s.name for s in dict(groups(stages))["dpo"]]
    assert dpo[-2:] == ["dpo/helpful+@seed43", "dpo/helpful-@seed43"] and len(dpo) == 6
    seed = stage_by_name(stages, "dpo/helpful-@seed43")
    assert seed.outputs == ("seeds/43/dpo/helpful-",) and seed.deps == ("ref_logps/helpful",)
    assert seed.config_slice != stage_by_name(stages, "dpo/helpful-").config_slice
    job = RankJob.from_json(rank_command(cfg, seed, "deepspeed", 29611)[-1])
    run = tmp_path.resolve()
    assert "seed=43" in job.overrides and f"run_dir={run / 'seeds' / '43'}" in job.overrides
    assert f"model.base={run / 'sft' / 'model'}" in job.overrides and job.direction == "helpful-"
    vec = stage_by_name(stages, "vectors/helpful@seed43")
    call = vector_call(cfg, vec)
    assert call.plus == tmp_path / "seeds/43/dpo/helpful+/ckpt"
    assert call.out == tmp_path / "seeds/43/vectors/helpful"
    assert "vectors/helpful@seed43" in stage_by_name(stages, "eval").deps
    # the seed run reads the run's reference table through a link
    (tmp_path / "ref_logps").mkdir()
    (tmp_path / "ref_logps" / "helpful.pt").write_bytes(b"table")
    _share_ref_logps(cfg, seed)
    assert (tmp_path / "seeds/43/ref_logps/helpful.pt").read_bytes() == b"table"
    # turning seeds on leaves the main run up to date: only the new stages and eval run
    finish_all(tmp_path, build_dag(cfg_for(tmp_path)))  # cfg_for: no seeds
    todo = manifest.plan(tmp_path, stages)
    assert set(todo) == {"dpo/helpful+@seed43", "dpo/helpful-@seed43", "vectors/helpful@seed43",
                         "eval"}
