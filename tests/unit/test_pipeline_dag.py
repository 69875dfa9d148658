"""The pipeline without launching anything: DAG shape, manifests and plans, slots, job specs."""

from __future__ import annotations

import json
import time

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config
from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.dag import build_dag, downstream, groups
from prefvec_ds.distributed.launch import RankJob
from prefvec_ds.pipeline.job import rank_command
from prefvec_ds.distributed.env import cpu_threads_per_rank
from prefvec_ds.pipeline.local import device_slots, format_summary, StageResult
from prefvec_ds.pipeline.slurm import JobState
from prefvec_ds.pipeline.status import StageStatus, _from_manifest, _merge_slurm
from prefvec_ds.pipeline.submit import group_spec
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "quickstart.yaml"


def cfg_for(tmp_path, *overrides):
    # without the recipe's diagnostic seed (tests/unit/test_eval_pipeline.py covers its stages)
    # and baselines (tests/unit/test_baselines.py)
    return load_config(RECIPE, [f"run_dir={tmp_path}", "pipeline.eval.diagnostic_seeds=[]",
                                "pipeline.baselines=[]", *overrides])


def finish_all(run_dir, stages, names=None):
    """Pretend stages ran: manifests say done and their done files exist."""
    for stage in stages:
        if names is not None and stage.name not in names:
            continue
        manifest.begin(run_dir, stage, manifest.input_fingerprint(run_dir, stage))
        done = run_dir / stage.done_file
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")
        manifest.finish(run_dir, stage, "done", 0)
        time.sleep(0.001)  # distinct finished_at -> distinct output ids


def test_dag_has_every_stage_in_dependency_order(tmp_path):
    stages = build_dag(cfg_for(tmp_path))
    names = [s.name for s in stages]
    assert names == ["sft", "ref_logps/helpful", "ref_logps/harmless", "dpo/helpful+",
                     "dpo/helpful-", "dpo/harmless+", "dpo/harmless-", "vectors/helpful",
                     "vectors/harmless", "merge/default", "eval"]
    for i, stage in enumerate(stages):
        assert all(names.index(d) < i for d in stage.deps)
    assert [k for k, _ in groups(stages)] == ["sft", "ref_logps", "dpo", "vectors", "merge",
                                              "eval"]


def test_third_preference_and_merges_extend_the_dag(tmp_path):
    cfg = cfg_for(tmp_path, "data.preferences.concise={source: embedded, "
                  "order_by: concise_response_id}",
                  "pipeline.merges=[{name: safe, eta: {harmless: 1.5}}, "
                  "{name: nohelp, eta: {helpful: 0}}]")
    stages = build_dag(cfg)
    names = {s.name for s in stages}
    assert {"dpo/concise+", "dpo/concise-", "vectors/concise", "merge/safe",
            "merge/nohelp"} <= names
    dpo = dict(groups(stages))["dpo"]
    assert len(dpo) == 6


def test_pipeline_config_errors_name_the_parameter(tmp_path):
    with pytest.raises(PrefvecError, match=r"pipeline.merges\[x\].eta: unknown preference"):
        build_dag(cfg_for(tmp_path, "pipeline.merges=[{name: x, eta: {honest: 1}}]"))
    with pytest.raises(PrefvecError, match="pipeline.slurm.time.dpo: expected a quoted string"):
        cfg_for(tmp_path, "pipeline.slurm.time.dpo=4:00:00")  # YAML: 14400
    with pytest.raises(PrefvecError, match="pipeline.slurm.time: expected keys"):
        cfg_for(tmp_path, "pipeline.slurm.time.train='01:00:00'")


def test_plan_skips_finished_and_redoes_a_deleted_direction_and_what_follows(tmp_path):
    stages = build_dag(cfg_for(tmp_path))
    assert set(manifest.plan(tmp_path, stages)) == {s.name for s in stages}
    finish_all(tmp_path, stages)
    assert manifest.plan(tmp_path, stages) == {}
    (tmp_path / "dpo" / "helpful-" / "done.json").unlink()
    todo = manifest.plan(tmp_path, stages)
    assert set(todo) == {"dpo/helpful-", "vectors/helpful", "merge/default", "eval"}
    assert todo["dpo/helpful-"].startswith("output missing")


def test_changed_inputs_redo_the_stage_and_everything_downstream(tmp_path):
    stages = build_dag(cfg_for(tmp_path))
    finish_all(tmp_path, stages)
    changed = build_dag(cfg_for(tmp_path, "dpo.beta=0.2"))
    todo = manifest.plan(tmp_path, changed)
    dpo = {s.name for s in changed if s.kind == "dpo"}
    assert set(todo) == downstream(changed, dpo)
    assert all(todo[n] == "inputs changed" for n in dpo)
    # a redone upstream stage gives a new output id: downstream fingerprints change with it
    before = manifest.input_fingerprint(tmp_path, changed[-1])
    finish_all(tmp_path, changed, {"merge/default"})
    assert manifest.input_fingerprint(tmp_path, changed[-1]) != before


def test_begin_clears_outputs_made_for_other_inputs(tmp_path):
    stage = next(s for s in build_dag(cfg_for(tmp_path)) if s.name == "sft")
    manifest.begin(tmp_path, stage, "old")
    (tmp_path / "sft" / "ckpt").mkdir(parents=True)
    manifest.begin(tmp_path, stage, "old")  # same inputs: resume, keep the checkpoint
    assert (tmp_path / "sft" / "ckpt").is_dir()
    manifest.begin(tmp_path, stage, "new")
    assert not (tmp_path / "sft").exists()
    assert json.loads(manifest.manifest_path(tmp_path, "sft").read_text())["attempts"] == 3


def test_slots_give_disjoint_gpus_or_cpu_jobs(tmp_path):
    assert device_slots(cfg_for(tmp_path), 0) == [None] * 4
    assert device_slots(cfg_for(tmp_path, "distributed.max_concurrent_jobs=2"), 0) == [None] * 2
    slots = device_slots(cfg_for(tmp_path, "distributed.nproc_per_node=2"), 8)
    assert slots == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(PrefvecError, match="nproc_per_node=4"):
        device_slots(cfg_for(tmp_path, "distributed.nproc_per_node=4"), 2)


def test_concurrent_cpu_stages_share_the_cores_instead_of_each_taking_them_all():
    assert cpu_threads_per_rank(2, 1 * 1) == 2  # alone: every core
    assert cpu_threads_per_rank(2, 4 * 1) == 1  # four 1-rank directions on 2 cores
    assert cpu_threads_per_rank(16, 4 * 2) == 2
    assert cpu_threads_per_rank(16, 2 * 1) == 8
    assert cpu_threads_per_rank(1, 8 * 2) == 1  # never zero


def test_rank_commands_per_launcher(tmp_path):
    cfg = cfg_for(tmp_path)
    dpo = next(s for s in build_dag(cfg) if s.name == "dpo/harmless-")
    ds = rank_command(cfg, dpo, "deepspeed", 29611, [2, 3])
    assert ds[:5] == ["deepspeed", "--include", "localhost:2,3", "--master_port", "29611"]
    assert ds[-2] == "--job" and RankJob.from_json(ds[-1]).direction == "harmless-"
    srun = rank_command(cfg, dpo, "srun", None)
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and "prefvec_ds.entry" in srun


def test_group_spec_for_an_8_gpu_cluster(tmp_path):
    cfg = cfg_for(tmp_path, "distributed.nproc_per_node=8", "pipeline.slurm.gpus_per_node=8",
                  "pipeline.slurm.partition=h100", "pipeline.slurm.array_parallelism=2",
                  "pipeline.slurm.time.dpo='08:00:00'")
    members = dict(groups(build_dag(cfg)))["dpo"]
    spec = group_spec(cfg, "dpo", members, [0, 1, 2, 3], ["17"])
    assert (spec.array, spec.ntasks_per_node, spec.time, spec.partition) == \
        ("0,1,2,3%2", 8, "08:00:00", "h100")
    assert "--gpus-per-node=8" in spec.extra_sbatch and spec.after_ok == ("17",)
    assert "--index $SLURM_ARRAY_TASK_ID --launcher srun" in spec.command
    merge = group_spec(cfg, "merge", dict(groups(build_dag(cfg)))["merge"], [0], [])
    assert merge.array is None and merge.ntasks_per_node == 1
    assert not any(x.startswith("--gpus") for x in merge.extra_sbatch)


def test_status_says_a_dependent_was_cancelled():
    row = _merge_slurm(StageStatus("vectors/harmless", "not started"), {"job": "4_1"},
                       JobState("4_1", "CANCELLED", "DependencyNeverSatisfied"))
    assert row.state == "cancelled" and row.job == "4_1"
    row = _merge_slurm(StageStatus("dpo/harmless-", "running"), {"job": "3_3"},
                       JobState("3_3", "FAILED", "", "3:0"))
    assert row.state == "failed" and "3:0" in row.detail


def test_failed_stage_detail_names_the_exit_code_once(tmp_path):
    stages = build_dag(cfg_for(tmp_path))
    sft, ref = stages[0], stages[1]
    for stage, error in ((sft, ""), (ref, "rank 1: out of memory")):  # as pipeline.job records
        manifest.begin(tmp_path, stage, "x")
        manifest.finish(tmp_path, stage, "failed", 137, error)
    assert _from_manifest(tmp_path, sft).detail == "exit code 137"
    assert _from_manifest(tmp_path, ref).detail == "exit code 137: rank 1: out of memory"


def test_summary_table_lists_every_stage():
    text = format_summary({"sft": StageResult("up-to-date"),
                           "dpo/helpful+": StageResult("done", 12.34, "new")}, 12.5)
    assert "dpo/helpful+  done" in text and "12.3s" in text and "total wall time 12.5 s" in text


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from prefvec_ds.cli import main

    assert main(["status", str(tmp_path)]) == 2
    assert "not a pipeline run folder" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    assert main(["submit", str(RECIPE), f"run_dir={tmp_path / 'r'}"]) == 2
    assert "SLURM_CONF" in capsys.readouterr().err
    assert main(["run", str(RECIPE), f"run_dir={tmp_path / 'r'}",
                 "pipeline.merges=[{name: x, eta: {honest: 1}}]"]) == 2
    assert "unknown preference(s) honest" in capsys.readouterr().err


def test_a_new_merge_output_dtype_redoes_only_the_merges_and_eval(tmp_path):
    stages = build_dag(cfg_for(tmp_path))
    finish_all(tmp_path, stages)
    changed = build_dag(cfg_for(tmp_path, "pipeline.merge_dtype=bf16"))
    todo = manifest.plan(tmp_path, changed)
    merges = {s.name for s in changed if s.kind == "merge"}
    assert merges and set(todo) == downstream(changed, merges)
    assert all(todo[n] == "inputs changed" for n in merges)


def test_whole_nodes_and_gpu_partitions_only_for_the_jobs_that_use_them(tmp_path):
    cfg = cfg_for(tmp_path, "pipeline.slurm.gpus_per_node=8", "pipeline.slurm.partition=h100",
                  "pipeline.slurm.cpu_partition=cpu", "pipeline.slurm.training_sbatch=[--exclusive]",
                  "pipeline.slurm.extra_sbatch=[--constraint=ib]")
    by_kind = dict(groups(build_dag(cfg)))
    specs = {kind: group_spec(cfg, kind, by_kind[kind], [0], []) for kind in
             ("dpo", "eval", "merge", "vectors")}
    assert "--exclusive" in specs["dpo"].extra_sbatch and specs["dpo"].partition == "h100"
    assert "--exclusive" not in specs["eval"].extra_sbatch and specs["eval"].partition == "h100"
    for kind in ("merge", "vectors"):
        assert "--exclusive" not in specs[kind].extra_sbatch and specs[kind].partition == "cpu"
    assert all("--constraint=ib" in spec.extra_sbatch for spec in specs.values())
