"""`prefvec submit` on a real single-node SLURM cluster, with the shrunken quickstart.

One submission runs the whole DAG; one DPO array task is requeued mid-training and must finish
with the same result as the uninterrupted local run (`local_run`), which also shows that
`prefvec run` and `prefvec submit` produce the same outputs. A second run reuses the first
stages and makes one direction fail: its dependents are cancelled, never left pending, and
`prefvec status` names the failed direction and why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import (final_eval, local_run, prefvec, read_manifests,  # noqa: E402,F401
                               run_args)

from prefvec_ds.distributed.checkpoints import COMPLETE_MARKER
from prefvec_ds.pipeline import slurm  # noqa: E402

DIRECTIONS = ("helpful+", "helpful-", "harmless+", "harmless-")
REQUEUED = 2  # array index of dpo/harmless+: `scontrol requeue` (SIGTERM to the ranks)
SIGNALLED = 1  # dpo/helpful-: USR1 to the batch shell, as before a time limit


def submission(run_dir: Path) -> dict[str, dict]:
    record = json.loads((run_dir / "pipeline" / "jobs.json").read_text())["submissions"][-1]
    return {job["kind"]: job for job in record["jobs"]}


def task_window(log: Path) -> tuple[float, float, int]:
    """(first start, last end, restarts) from the template's own log lines."""
    text = log.read_text()
    starts = [float(t) for t in re.findall(r" start=([\d.]+)", text)]
    ends = [float(t) for t in re.findall(r" end=([\d.]+)", text)]
    return starts[0], ends[-1], len(starts) - 1


def wait_for(path: Path, job_ids: list[str], timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        states = slurm.job_states(job_ids)
        if any(s.state in ("FAILED", "CANCELLED") for s in states.values()):
            pytest.fail(f"a job ended before {path} appeared: {states}")
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def status(run_dir: Path) -> dict[str, dict]:
    rows = json.loads(prefvec("status", str(run_dir), "--json").stdout)
    return {r["stage"]: r for r in rows}


def test_submit_runs_the_dag_and_a_requeued_direction_resumes(slurm_cluster, local_run,
                                                              tmp_path):
    run = tmp_path / "slurm"
    out = prefvec("submit", *run_args(run)).stdout
    jobs = submission(run)
    assert list(jobs) == ["sft", "ref_logps", "dpo", "vectors", "merge", "eval"], out
    dpo = jobs["dpo"]
    assert dpo["array"] and len(dpo["stages"]) == 4
    assert dpo["after"] == [jobs["ref_logps"]["job_id"]]
    assert f"job {dpo['job_id']}" in out

    # once they have a checkpoint and before they finish: requeue dpo/harmless+ (SIGTERM), and
    # send dpo/helpful- the time-limit warning (USR1 to the batch shell, which passes it on)
    all_ids = [j["job_id"] for j in jobs.values()]
    for index, cmd in ((REQUEUED, ["scontrol", "requeue"]),
                       (SIGNALLED, ["scancel", "--batch", "--signal=USR1"])):
        folder = run / "dpo" / dpo["stages"][str(index)].split("/")[1] / "ckpt"
        wait_for(folder / "global_step4" / COMPLETE_MARKER, all_ids)
        subprocess.run([*cmd, f"{dpo['job_id']}_{index}"], check=True)
        assert not (folder / "global_step16" / COMPLETE_MARKER).exists(), "finished too early"

    states = slurm.wait(all_ids, timeout=600, poll=1)
    assert all(s.state == "COMPLETED" for s in states.values()), states
    rows = status(run)
    assert all(r["state"] == "done" for r in rows.values()), rows

    windows = {i: task_window(run / "logs" / f"{dpo['job_name']}-{dpo['job_id']}_{i}.out")
               for i in range(4)}
    assert max(w[0] for w in windows.values()) < min(w[1] for w in windows.values()), windows
    assert windows[REQUEUED][2] >= 1 and windows[SIGNALLED][2] >= 1  # both really ran twice
    log = run / "logs" / f"{dpo['job_name']}-{dpo['job_id']}_{SIGNALLED}.out"
    assert "USR1" in log.read_text() and "stop requested: checkpoint" in log.read_text()
    manifests = read_manifests(run)
    assert manifests["dpo/harmless+"]["attempts"] >= 2
    assert manifests["dpo/helpful-"]["attempts"] >= 2
    for stage, m in manifests.items():  # afterok held: nothing started before its inputs ended
        deps = {"vectors/helpful": ["dpo/helpful+", "dpo/helpful-"], "eval": ["merge/default"],
                "dpo/helpful+": ["ref_logps/helpful"], "ref_logps/harmless": ["sft"]}.get(stage, [])
        assert all(m["started_at"] >= manifests[d]["finished_at"] for d in deps), stage

    # the resumed run and `prefvec run` computed the same thing
    for d in DIRECTIONS:
        assert final_eval(run, d) == pytest.approx(final_eval(local_run, d), rel=1e-5, abs=1e-6), d
    for p in ("helpful", "harmless"):
        a = json.loads((run / "vectors" / p / "prefvec_vector.json").read_text())
        b = json.loads((local_run / "vectors" / p / "prefvec_vector.json").read_text())
        assert a["norm"] == pytest.approx(b["norm"], rel=1e-5), p
    a = json.loads((run / "eval" / "summary.json").read_text())["models"]
    b = json.loads((local_run / "eval" / "summary.json").read_text())["models"]
    assert {k: v["helpful"] for k, v in a.items()} == {k: v["helpful"] for k, v in b.items()}


def test_a_failed_direction_cancels_its_dependents(slurm_cluster, local_run, tmp_path):
    run = tmp_path / "fail"
    # a copy of the finished run up to three directions: only dpo/harmless- and what follows
    # are submitted (fingerprints do not depend on the folder), and that direction fails
    kept = ["sft", "ref_logps/helpful", "ref_logps/harmless", "dpo/helpful+", "dpo/helpful-",
            "dpo/harmless+"]
    for rel in ("init_model", "sft", "ref_logps", "dpo/helpful+", "dpo/helpful-", "dpo/harmless+"):
        shutil.copytree(local_run / rel, run / rel)
    (run / "pipeline" / "manifests").mkdir(parents=True)
    for name in kept:
        shutil.copy2(local_run / "pipeline" / "manifests" / f"{name.replace('/', '_')}.json",
                     run / "pipeline" / "manifests")
    prefvec("submit", *run_args(run), env={"PREFVEC_FAIL_STAGES": "dpo/harmless-"})
    jobs = submission(run)
    assert list(jobs) == ["dpo", "vectors", "merge", "eval"]  # up-to-date stages not resubmitted
    assert jobs["dpo"]["stages"] == {"3": "dpo/harmless-"}  # --array=3

    states = slurm.wait([j["job_id"] for j in jobs.values()], timeout=300, poll=1)
    dpo_id = jobs["dpo"]["job_id"]
    assert states[f"{dpo_id}_3"].state == "FAILED", states
    later = [s for k, s in states.items() if not k.startswith(f"{dpo_id}_")]
    assert later and all(s.state == "CANCELLED" for s in later), states  # none left pending

    rows = status(run)
    failed = rows["dpo/harmless-"]
    assert failed["state"] == "failed" and "exit code 3" in failed["detail"]
    assert "PREFVEC_FAIL_STAGES" in failed["detail"]
    assert any("PREFVEC_FAIL_STAGES" in line for line in failed["log_tail"])
    assert all(rows[s]["state"] == "done" for s in kept)
    for stage in ("vectors/helpful", "vectors/harmless", "merge/default", "eval"):
        assert rows[stage]["state"] == "cancelled", rows[stage]
        assert "dpo/harmless-" in rows[stage]["detail"], rows[stage]
    text = prefvec("status", str(run)).stdout
    assert "dpo/harmless- failed (exit code 3" in text
