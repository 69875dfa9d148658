"""The MORA stage end to end in this process (mine -> rewrite -> self-play -> select -> gather):
pairs, mixed sets, the `mora` source, shard-layout invariance, and resumption after a torn write
or a kill -9 of a real shard process sampling from the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import PreferenceConfig
from prefvec_ds.data import embedded
from prefvec_ds.data.sources import load_preference
from prefvec_ds.mora import pairs_io, selfplay
from prefvec_ds.mora import stage as mora_stage
from prefvec_ds.mora.gather import gather
from prefvec_ds.mora.stage import check_fingerprint, run_shard, shard_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mora_fixtures import REPO, RECIPE, ScriptedSampler, mora_cfg, tiny_policy  # noqa: E402,F401


@pytest.fixture
def scripted(monkeypatch, tiny_policy) -> Path:
    """The scripted policy in place of sampling; returns a real policy folder for the config."""
    monkeypatch.setattr(selfplay, "Sampler", ScriptedSampler)
    return tiny_policy


def run_all(cfg, shards: int = 1) -> dict:
    check_fingerprint(cfg)
    for shard in range(shards):
        assert run_shard(cfg, shard, shards) == 0
    return gather(cfg)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stage_writes_pairs_that_the_data_layer_reads(tmp_path, scripted):
    cfg = mora_cfg(tmp_path / "run", scripted, "pipeline.mora.plots=true")
    summary = run_all(cfg)
    out = tmp_path / "run" / "mora"
    records = lines(out / "records.jsonl")
    assert [r["id"] for r in records] == list(range(24)) and summary["prompts"] == 24
    targets = [r for r in records if r["target"]]
    assert targets and all(r["category"] == "safety" for r in targets)  # refusals cap helpful
    assert all(r["mine"]["reach"]["helpful"] == 0.0 for r in targets)
    pairs = lines(out / "pairs.jsonl")
    assert len(pairs) == summary["pairs"] > 0
    for row in pairs:
        c, r = row["chosen_scores"], row["rejected_scores"]
        assert all(c[d] >= r[d] for d in ("helpful", "harmless"))  # never worse anywhere
        assert row["margin"] >= cfg.pipeline.mora.min_margin
        assert row["original_prompt"] in row["prompt"]  # the original-rewritten link
        assert len(embedded.split_intents(row["prompt"])) == 2
        assert embedded.score_dimensions(row["prompt"], row["chosen"]) == c
    # the paper's claim on this world: fused prompts lift the Pass@n ceiling of the targets
    top = summary["ceiling"]["safety"][str(cfg.pipeline.mora.selfplay_k)]
    assert top["original"]["max"] <= 1.0 < top["rewritten"]["max"]
    assert top["difference"]["mean"] > 0
    # own preference and mixed sets, through the `mora` source adapter
    own = load_preference("mora", PreferenceConfig(source="mora", path=str(out / "pairs.jsonl")),
                          cfg.data)
    assert [p.chosen for p in own] == [row["chosen"] for row in pairs]
    mixed = load_preference("helpful", cfg.data.preferences["helpful"], cfg.data)
    assert len(mixed) == cfg.data.embedded_size + len(pairs)
    assert summary["mixed"] == {"helpful": len(mixed), "harmless": len(mixed)}
    if not isinstance(summary["plots"], str):  # matplotlib is a test extra: normally here
        assert {"ceiling.png", "mining_pass_rate.png"} <= set(summary["plots"])
        assert all((out / "plots" / name).stat().st_size > 0 for name in summary["plots"])


def test_results_do_not_depend_on_the_shard_layout(tmp_path, scripted):
    one, three = tmp_path / "one", tmp_path / "three"
    run_all(mora_cfg(one, scripted))
    run_all(mora_cfg(three, scripted), shards=3)
    assert len(list((three / "mora" / "shards").glob("*.jsonl"))) == 3
    for name in ("records.jsonl", "pairs.jsonl", "mixed/harmless.jsonl"):
        assert (one / "mora" / name).read_bytes() == (three / "mora" / name).read_bytes()


def test_resume_after_a_torn_write_gives_the_same_result(tmp_path, scripted):
    cfg = mora_cfg(tmp_path / "run", scripted)
    run_all(cfg, shards=2)
    out = tmp_path / "run" / "mora"
    expected = (out / "records.jsonl").read_bytes()
    log = out / "shards" / "shard-00001-of-00002.jsonl"
    data = log.read_bytes()
    cut = [i for i, b in enumerate(data) if b == ord("\n")][3] + 40  # inside record 5
    log.write_bytes(data[:cut])
    (out / "records.jsonl").unlink()
    assert len(pairs_io.read_log(log)[0]) == 4  # the torn record does not count
    with pytest.raises(PrefvecError, match="have no record yet"):
        gather(cfg)
    assert run_shard(cfg, 1, 2) == 0
    assert all(line.endswith(b"}") for line in log.read_bytes().splitlines())
    gather(cfg)
    assert (out / "records.jsonl").read_bytes() == expected
    # a different layout resumes from the same logs: nothing left to do
    assert run_shard(cfg, 0, 1) == 0 and len(list((out / "shards").glob("*"))) == 2


def test_kill_9_of_a_real_shard_then_resume(tmp_path, tiny_policy):
    """A shard process sampling from the tiny model is killed mid-way; the re-run finishes
    only the missing prompts and the result equals an uninterrupted run."""
    over = ["pipeline.mora.pool.max_prompts=24", "pipeline.mora.prompts_per_batch=2",
            "pipeline.mora.max_new_tokens=8"]
    ref = mora_cfg(tmp_path / "ref", tiny_policy, *over)
    run_all(ref)
    run = tmp_path / "run"
    argv = [str(RECIPE), f"run_dir={run}", f"pipeline.mora.policy={tiny_policy}",
            "pipeline.mora.pass_n=8", "pipeline.mora.selfplay_k=8", "data.embedded_size=300",
            *over]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    proc = subprocess.Popen([sys.executable, "-m", "prefvec_ds.mora.stage", "shard", *argv,
                             "--no-array"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    log = run / "mora" / "shards" / "shard-00000-of-00001.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(pairs_io.read_log(log)[0])
    assert done_before >= 3
    cfg = mora_cfg(run, tiny_policy, *over)
    run_all(cfg)
    assert (run / "mora" / "records.jsonl").read_bytes() == \
        (tmp_path / "ref" / "mora" / "records.jsonl").read_bytes()
    print(f"killed after {done_before} of 24 prompts")


def test_other_settings_are_refused_and_restart_deletes(tmp_path, scripted):
    cfg = mora_cfg(tmp_path / "run", scripted)
    run_all(cfg)
    other = mora_cfg(tmp_path / "run", scripted, "pipeline.mora.pass_n=4")
    with pytest.raises(PrefvecError, match="--restart"):
        check_fingerprint(other)
    check_fingerprint(mora_cfg(tmp_path / "run", scripted, "pipeline.mora.mix_into={}"))
    check_fingerprint(other, restart=True)
    assert not (tmp_path / "run" / "mora" / "records.jsonl").exists()


def test_shards_come_from_ranks_and_array_tasks():
    assert shard_of({}) [:2] == (0, 1)
    assert shard_of({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    array = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "5",
             "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert shard_of(array)[:2] == (3, 6)
    assert shard_of(array, use_array=False)[:2] == (1, 2)
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "n1"}
    assert shard_of(srun)[:2] == (2, 4)


def test_mora_source_errors(tmp_path):
    with pytest.raises(PrefvecError, match=r"\{run_dir\} is filled in"):
        load_preference("m", PreferenceConfig(source="mora", path="{run_dir}/mora/pairs.jsonl"),
                        mora_cfg(tmp_path, tmp_path).data)
    with pytest.raises(PrefvecError, match="run `prefvec mora CONFIG`"):
        load_preference("m", PreferenceConfig(source="mora", path=str(tmp_path / "no.jsonl")),
                        mora_cfg(tmp_path, tmp_path).data)
    assert mora_stage.out_dir(mora_cfg(tmp_path, tmp_path)) == tmp_path / "mora"


def test_mora_stage_in_the_dag_and_on_slurm(tmp_path):
    from prefvec_ds.pipeline.dag import build_dag, groups
    from prefvec_ds.pipeline.submit import group_spec

    cfg = mora_cfg(tmp_path / "a", tmp_path, "pipeline.mora.policy=''",
                   "data.preferences.plain={source: embedded}")
    stages = {s.name: s for s in build_dag(cfg)}
    assert stages["mora"].deps == ("sft",) and stages["mora"].distributed
    assert stages["ref_logps/helpful"].deps == ("sft", "mora")
    assert stages["ref_logps/plain"].deps == ("sft",)
    assert [k for k, _ in groups(list(stages.values()))][:3] == ["sft", "mora", "ref_logps"]
    # the pairs path is in the slices relative to the run folder: a copy stays up to date
    moved = {s.name: s for s in build_dag(mora_cfg(tmp_path / "b", tmp_path,
                                                   "pipeline.mora.policy=''",
                                                   "data.preferences.plain={source: embedded}"))}
    assert all(moved[n].config_slice == s.config_slice for n, s in stages.items())
    spec = group_spec(cfg, "mora", [stages["mora"]], [0], [])
    assert spec.ntasks == cfg.distributed.nproc_per_node and spec.time == "04:00:00"
    assert "--group mora" in spec.command
    # an explicit policy needs no SFT first; without `enabled` there is no stage
    assert {s.name: s for s in build_dag(mora_cfg(tmp_path, tmp_path))}["mora"].deps == ()
    off = build_dag(mora_cfg(tmp_path, tmp_path, "pipeline.mora.enabled=false"))
    assert "mora" not in {s.name for s in off}
