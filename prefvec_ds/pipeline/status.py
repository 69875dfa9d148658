"""`prefvec status RUN_DIR`: each stage's state from its manifest and, when it was submitted,
from SLURM (squeue, then sacct); for a failed stage, its exit code, error and last log lines.

Manifests say what finished (they are written by the stage itself); SLURM says what is queued,
running, failed before the stage could write anything, or was cancelled because an upstream
job failed (afterok + kill-on-invalid-dep).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefvec_ds.pipeline import manifest, slurm
from prefvec_ds.pipeline.dag import Stage
from prefvec_ds.pipeline.submit import read_submissions

RUNNING_STATES = ("RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")
LOG_LINES = 12
# srun's account of a task that died: "srun: error: node2: task 1: Killed", or for several
# "srun: error: node1: tasks 0-1: Exited with exit code 3". The first one is the cause; with
# --kill-on-bad-exit the lines after it are the peers srun terminated because of it.
SRUN_TASK_ERROR = re.compile(
    r"srun: error: (?P<node>[^:\s]+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)")


@dataclass
class StageStatus:
    """One row of `prefvec status`."""

    stage: str
    """Stage name, e.g. dpo/harmless-."""
    state: str
    """done | skipped | running | pending | failed | cancelled | preempted | stale | not started"""
    job: str = ""
    """SLURM job (`123` or `123_2` for an array task) of the latest submission, if any."""
    detail: str = ""
    """Why: the pending reason, the exit code and error, the upstream stage that failed."""
    wall_s: float | None = None
    """Wall time of the last finished attempt (from the manifest)."""
    log_tail: list[str] = field(default_factory=list)
    """Last lines of the stage's log (failed stages only)."""
    failed_tasks: list[str] = field(default_factory=list)
    """srun's lines about tasks that died, first (the cause) first, e.g. `node2 rank 1:
    Killed`, from the whole log (failed stages only): they may lie before the last lines."""


def _latest_jobs(run_dir: Path) -> dict[str, dict]:
    """stage -> {job, name, log stem} from the newest submission that included it."""
    out = {}
    for sub in read_submissions(run_dir):
        for job in sub["jobs"]:
            for index, stage in job["stages"].items():
                task = f"{job['job_id']}_{index}" if job["array"] else job["job_id"]
                stem = f"{job['job_name']}-{job['job_id']}_{index}" if job["array"] else \
                    f"{job['job_name']}-{job['job_id']}"
                logs = [run_dir / "logs" / f"{stem}.{ext}" for ext in ("out", "err")]
                out[stage] = {"job": task, "base": job["job_id"], "logs": logs}
    return out


def _tail(paths: list[Path], lines: int = LOG_LINES) -> list[str]:
    text = []
    for path in paths:
        if path.is_file():
            text += path.read_text(errors="replace").splitlines()[-lines:]
    return text[-lines:]


def srun_task_errors(paths: list[Path]) -> list[str]:
    """`<node> rank <task ids>: <what>` for every srun task error in the logs, oldest first;
    srun's task ids are the ranks (SLURM_PROCID). Only the latest attempt of a requeued job
    counts: lines before its last `[prefvec] job=` start line belong to earlier runs."""
    found = []
    for path in paths:
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("[prefvec] job=")]
        for line in lines[starts[-1] if starts else 0:]:
            m = SRUN_TASK_ERROR.search(line)
            if m:
                found.append(f"{m['node']} rank {m['tasks']}: {m['what'].strip()}")
    return found


def _from_manifest(run_dir: Path, stage: Stage) -> StageStatus:
    m = manifest.read(run_dir, stage.name)
    ok, why = manifest.up_to_date(run_dir, stage)
    if ok:
        return StageStatus(stage.name, m["status"], wall_s=m.get("wall_s"))
    if m is None:
        return StageStatus(stage.name, "not started")
    state = m.get("status", "unknown")
    if state == "done":  # done once, but for other inputs, or its output was deleted
        state, m["error"] = "stale", why
    detail = m.get("error") or ""
    if state == "failed" and m.get("exit_code") is not None:
        detail = ": ".join(filter(None, (f"exit code {m['exit_code']}", detail)))
    return StageStatus(stage.name, state, detail=detail, wall_s=m.get("wall_s"))


def _merge_slurm(row: StageStatus, job: dict, js: slurm.JobState | None) -> StageStatus:
    row.job = job["job"]
    if row.state in ("done", "skipped") or js is None:
        return row
    if js.state == "UNKNOWN":  # purged from the controller and no accounting, or another cluster
        row.detail = row.detail or "job not known to SLURM (SLURM_CONF?)"
        return row
    if js.state == "PENDING":
        if js.reason == "DependencyNeverSatisfied":
            row.state = "cancelled"
        else:
            row.state, row.detail = "pending", js.reason
    elif js.state in RUNNING_STATES:
        row.state = "running"
    elif js.state == "CANCELLED":
        row.state = "cancelled"
        row.detail = row.detail or (js.reason if js.reason not in ("", "None") else "")
    elif js.state != "COMPLETED":  # FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...
        if row.state != "failed" or not row.detail:
            row.detail = f"SLURM {js.state}, exit code {js.exit_code or '?'}"
        row.state = "failed"
    return row


def _cancel_reason(stage: Stage, rows: dict[str, StageStatus]) -> str:
    """Which upstream stage failed. A job waits on whole arrays (afterok), so a stage can be
    cancelled by a failed task that is not its own input: then name that one."""
    blocked = [d for d in stage.deps if rows[d].state in ("failed", "cancelled")]
    failed = [name for name, r in rows.items() if r.state == "failed"]
    if blocked and rows[blocked[0]].state == "failed":
        return f"upstream {blocked[0]} failed"
    if blocked:
        return f"upstream {blocked[0]} cancelled" + (f"; failed: {', '.join(failed)}"
                                                     if failed else "")
    return f"an upstream job failed: {', '.join(failed)}" if failed else ""


def collect(run_dir: Path, stages: list[Stage]) -> list[StageStatus]:
    """The status of every stage, upstream first."""
    run_dir = Path(run_dir)
    jobs = _latest_jobs(run_dir)
    states = {}
    if jobs:
        try:
            states = slurm.job_states(sorted({j["base"] for j in jobs.values()}, key=int))
        except slurm.SlurmError as err:  # no cluster here: manifests only
            print(f"[prefvec] SLURM not reachable ({err}); showing manifests only")
    rows: dict[str, StageStatus] = {}
    for stage in stages:
        row = _from_manifest(run_dir, stage)
        if stage.name in jobs:
            job = jobs[stage.name]
            row = _merge_slurm(row, job, states.get(job["job"]) or states.get(job["base"]))
        if row.state == "cancelled":
            row.detail = _cancel_reason(stage, rows) or row.detail
        if row.state == "failed" and stage.name in jobs:
            row.log_tail = _tail(jobs[stage.name]["logs"])
            row.failed_tasks = srun_task_errors(jobs[stage.name]["logs"])
            if row.failed_tasks:
                row.detail = f"{row.detail}; first failed task: {row.failed_tasks[0]}"
        elif row.state == "failed":
            log = (manifest.read(run_dir, stage.name) or {}).get("log")
            row.log_tail = _tail([Path(log)]) if log else []
        rows[stage.name] = row
    return list(rows.values())


def format_status(rows: list[StageStatus]) -> str:
    table = [("stage", "state", "job", "wall", "detail")]
    table += [(r.stage, r.state, r.job or "-", f"{r.wall_s:.1f}s" if r.wall_s else "-", r.detail)
              for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t[:4], widths)) + "  " + t[4] for t in table]
    for r in rows:
        if r.state == "failed":
            lines.append(f"\n{r.stage} failed ({r.detail})")
            lines += [f"  srun: {t}" for t in r.failed_tasks]
            lines.append("  last log lines:")
            lines += [f"  | {line}" for line in r.log_tail] or ["  | (no log)"]
    return "\n".join(line.rstrip() for line in lines)


def as_json(rows: list[StageStatus]) -> list[dict]:
    return [asdict(r) for r in rows]
