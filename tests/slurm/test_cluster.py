"""prefvec_ds.pipeline.slurm against a real slurmctld/slurmd: arrays, dependencies, failure,
requeue and the USR1 preemption path of slurm/job.sbatch.tmpl.

Payloads are tests/slurm/payload.py; each records JSON events (with times) to a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefvec_ds.pipeline import slurm

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = Path(__file__).with_name("payload.py")
PY = f"{sys.executable} {PAYLOAD}"


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_spec(tmp_path: Path, name: str, command, **kw) -> slurm.SbatchSpec:
    kw.setdefault("time", "2")
    kw.setdefault("signal_seconds", 30)
    return slurm.SbatchSpec(job_name=name, command=command, run_dir=tmp_path / "run",
                            workdir=REPO, env={"PYTHONPATH": str(REPO)}, **kw)


def wait_for_event(path: Path, event: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in events(path):
            if ev["event"] == event:
                return ev
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} event in {path} after {timeout} s: {events(path)}")


def log_text(tmp_path: Path, name: str) -> str:
    return "\n".join(p.read_text() for p in sorted((tmp_path / "run" / "logs").glob(f"{name}-*")))


@pytest.fixture(scope="module", autouse=True)
def time_limit_job(slurm_cluster, tmp_path_factory):
    """A job that waits for the USR1 its time limit brings, submitted before the other tests.

    60 s limit, signal asked for 50 s before it. slurmctld checks time limits every 30 s, so
    the signal comes 0-30 s after the start; the job runs alongside the other tests instead of
    adding that wait to the tier. The payload stands in for a trainer (checkpoint on USR1, exit).
    """
    tmp_path = tmp_path_factory.mktemp("time_limit")
    out = tmp_path / "events.jsonl"
    spec = make_spec(tmp_path, "preempt", f"{PY} preempt {out}", time="1", signal_seconds=50,
                     launcher="srun")
    return slurm.submit(spec), out, tmp_path


def test_array_tasks_run_concurrently(slurm_cluster, tmp_path):
    out = tmp_path / "events.jsonl"
    job = slurm.submit(make_spec(tmp_path, "arr", f"{PY} stamp {out} 3", array="0-3"))
    states = slurm.wait([job], timeout=60)
    assert sorted(states) == [f"{job}_{i}" for i in range(4)]
    assert all(s.state == "COMPLETED" for s in states.values()), states
    evs = events(out)
    starts = [e["t"] for e in evs if e["event"] == "start"]
    ends = [e["t"] for e in evs if e["event"] == "end"]
    assert sorted(e["task"] for e in evs if e["event"] == "start") == ["0", "1", "2", "3"]
    # All four ran at the same time: the last one started before the first one finished.
    assert max(starts) < min(ends), evs


def test_afterok_waits_for_every_array_task(slurm_cluster, tmp_path):
    out = tmp_path / "events.jsonl"
    # Task i sleeps 1 + 2 i seconds (a shell command line: $SLURM_ARRAY_TASK_ID is expanded).
    first = slurm.submit(make_spec(tmp_path, "first",
                                   f"{PY} stamp {out} $((1 + 2 * SLURM_ARRAY_TASK_ID))", array="0-1"))
    second = slurm.submit(make_spec(tmp_path, "second", f"{PY} stamp {out} 0", after_ok=(first,)))
    waiting = slurm.job_states([second])[second]
    assert waiting.state == "PENDING" and waiting.reason == "Dependency", waiting
    states = slurm.wait([first, second], timeout=60)
    assert all(s.state == "COMPLETED" for s in states.values()), states
    evs = events(out)
    first_ends = [e["t"] for e in evs if e["event"] == "end" and e["task"] is not None]
    second_start = [e["t"] for e in evs if e["event"] == "start" and e["task"] is None]
    assert len(first_ends) == 2 and len(second_start) == 1, evs
    assert second_start[0] >= max(first_ends)


def test_failed_task_cancels_dependents(slurm_cluster, tmp_path):
    out = tmp_path / "events.jsonl"
    # Task 1 exits 1: one failed direction must cancel what depends on the array.
    first = slurm.submit(make_spec(tmp_path, "first",
                                   f"{PY} stamp {out} 1 $SLURM_ARRAY_TASK_ID", array="0-1"))
    second = slurm.submit(make_spec(tmp_path, "second", f"{PY} stamp {out} 0", after_ok=(first,)))
    third = slurm.submit(make_spec(tmp_path, "third", f"{PY} stamp {out} 0", after_ok=(second,)))
    states = slurm.wait([first, second, third], timeout=60)
    assert states[f"{first}_0"].state == "COMPLETED"
    assert states[f"{first}_1"].state == "FAILED"
    # Cancelled, not PENDING forever, and never started; the chain below it goes too.
    assert states[second].state == "CANCELLED", states[second]
    assert states[third].state == "CANCELLED", states[third]
    assert len([e for e in events(out) if e["event"] == "start"]) == 2  # the two array tasks only
    # sacct (the record once squeue forgets the job) agrees, after its lag.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        acct = {s.job_id: s for s in slurm._sacct_states([second])}
        if acct.get(second) and acct[second].state == "CANCELLED":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"sacct never showed {second} CANCELLED: {slurm._sacct_states([second])}")


def test_scontrol_requeue_runs_the_job_again(slurm_cluster, tmp_path):
    out = tmp_path / "events.jsonl"
    job = slurm.submit(make_spec(tmp_path, "hold", f"{PY} hold {out}"))
    wait_for_event(out, "start")
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    states = slurm.wait([job], timeout=90)
    assert states[job].state == "COMPLETED", states
    runs = [(e["event"], e["restart"]) for e in events(out)]
    assert runs == [("start", 0), ("start", 1), ("end", 1)], runs


def test_usr1_reaches_direct_command_and_requeues(slurm_cluster, tmp_path):
    out = tmp_path / "events.jsonl"
    job = slurm.submit(make_spec(tmp_path, "direct", f"{PY} preempt {out}", launcher="direct"))
    wait_for_event(out, "start")
    # Exactly what --signal=B:USR1 does at the time limit, without waiting for it.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)
    states = slurm.wait([job], timeout=60)
    assert states[job].state == "COMPLETED", states
    assert [(e["event"], e["restart"]) for e in events(out)] == [
        ("start", 0), ("usr1", 0), ("start", 1), ("end", 1)]


def test_template_srun_gives_two_ranks_with_one_master_port(slurm_cluster, tmp_path):
    from prefvec_ds.distributed.env import slurm_job_port

    out = tmp_path / "events.jsonl"
    job = slurm.submit(make_spec(tmp_path, "ranks", f"{PY} rank {out}", ntasks_per_node=2))
    states = slurm.wait([job], timeout=60)
    assert states[job].state == "COMPLETED", (states, log_text(tmp_path, "ranks"))
    ranks = sorted(events(out), key=lambda e: e["rank"])
    assert [(e["rank"], e["world_size"], e["source"]) for e in ranks] == [
        (0, 2, "slurm"), (1, 2, "slurm")]
    assert {e["master_port"] for e in ranks} == {slurm_job_port(job)}
    assert {e["master_addr"] for e in ranks} == {"localhost"}


def test_plain_srun_gives_discover_ranks(slurm_cluster, tmp_path):
    from prefvec_ds.distributed.env import slurm_job_port

    out = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run(["srun", "-n", "2", "--time=1", sys.executable, str(PAYLOAD), "rank", str(out)],
                   check=True, env=env, capture_output=True, timeout=60, cwd=REPO)
    ranks = sorted(events(out), key=lambda e: e["rank"])
    assert [(e["rank"], e["world_size"]) for e in ranks] == [(0, 2), (1, 2)]
    assert len({e["master_port"] for e in ranks}) == 1
    assert ranks[0]["master_port"] == slurm_job_port(ranks[0]["job"])


def test_usr1_before_time_limit_reaches_srun_step_and_requeues(time_limit_job):
    job, out, tmp_path = time_limit_job
    states = slurm.wait([job], timeout=110)
    assert states[job].state == "COMPLETED", states
    evs = events(out)
    assert [(e["event"], e["restart"]) for e in evs] == [
        ("start", 0), ("usr1", 0), ("start", 1), ("end", 1)], evs
    assert evs[1]["step"] == "0"  # delivered inside the srun step, not only to the batch shell
    log = log_text(tmp_path, "preempt")
    assert "USR1 at" in log and f"requeueing job {job}" in log
