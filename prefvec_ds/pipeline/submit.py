"""`prefvec submit`: one sbatch per stage group from the one template, chained with afterok.

Groups are the stage kinds (sft, ref_logps, dpo, vectors, merge, eval); a group with several
stages is one job array, so the four DPO directions are one `--array=0-3` job whose tasks run
at once. Every job runs `python -m prefvec_ds.pipeline.job SNAPSHOT --group KIND --index
$SLURM_ARRAY_TASK_ID --launcher srun`, which starts the ranks with srun. Only stages that are
not up to date are submitted; the job ids go to `<run_dir>/pipeline/jobs.json`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.pipeline import manifest, slurm
from prefvec_ds.pipeline.dag import Stage, groups
from prefvec_ds.pipeline.prepare import snapshot_path

JOBS_FILE = ("pipeline", "jobs.json")
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def jobs_path(run_dir: str | Path) -> Path:
    return Path(run_dir).joinpath(*JOBS_FILE)


def read_submissions(run_dir: str | Path) -> list[dict]:
    path = jobs_path(run_dir)
    return json.loads(path.read_text())["submissions"] if path.is_file() else []


def job_name(cfg: RunConfig, kind: str) -> str:
    """`pv-<run folder>-<kind>`: readable in squeue, and names the log files."""
    run = re.sub(r"[^A-Za-z0-9_.+\-]", "_", Path(cfg.run_dir).name)[:40]
    return f"pv-{run}-{kind}"


def group_spec(cfg: RunConfig, kind: str, members: list[Stage], indices: list[int],
               after: list[str]) -> slurm.SbatchSpec:
    """The SbatchSpec of one group; `indices` are the members to run (array task ids)."""
    s = cfg.pipeline.slurm
    distributed = members[0].distributed
    extra = []
    gpus = s.gpus_per_node if distributed else min(s.gpus_per_node, 1 if kind in ("eval", "tune") else 0)
    if gpus:
        # per node, not per task: every rank sees the node's GPUs and picks one by LOCAL_RANK
        extra.append(f"--gpus-per-node={gpus}")
    if s.mem:
        extra.append(f"--mem={s.mem}")
    if s.qos:
        extra.append(f"--qos={s.qos}")
    array = None
    if len(members) > 1:
        array = ",".join(map(str, indices)) + (
            f"%{s.array_parallelism}" if s.array_parallelism else "")
    command = (f"{shlex.quote(sys.executable)} -m prefvec_ds.pipeline.job "
               f"{shlex.quote(str(snapshot_path(cfg.run_dir)))} --group {kind} --index "
               + ("$SLURM_ARRAY_TASK_ID" if array else str(indices[0])) + " --launcher srun")
    pythonpath = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return slurm.SbatchSpec(
        job_name=job_name(cfg, kind), command=command, run_dir=Path(cfg.run_dir),
        nodes=cfg.distributed.nnodes if distributed else 1,
        ntasks_per_node=cfg.distributed.nproc_per_node if distributed else 1,
        cpus_per_task=s.cpus_per_task, time=s.time[kind],
        signal_seconds=min(s.signal_seconds, max(slurm._time_limit_seconds(s.time[kind]) - 1, 0)),
        array=array, launcher="direct", env={"PYTHONPATH": pythonpath},
        partition=(s.cpu_partition if not gpus and s.cpu_partition else s.partition) or None,
        account=s.account or None,
        extra_sbatch=tuple(extra + s.extra_sbatch + (s.training_sbatch if distributed else [])),
        after_ok=tuple(after))


def check_no_active_jobs(run_dir: Path) -> None:
    """Two submissions of one run would train the same stages into the same folders."""
    subs = read_submissions(run_dir)
    if not subs:
        return
    ids = [job["job_id"] for job in subs[-1]["jobs"]]
    active = sorted({s.job_id for s in slurm.job_states(ids).values()
                     if not s.done and s.state != "UNKNOWN"})
    if active:
        raise PrefvecError(f"{run_dir} already has jobs in the queue ({', '.join(active)}): "
                           f"wait for them (`prefvec status {run_dir}`) or scancel them first")


def check_accelerator_env(cfg: RunConfig, env=None) -> None:
    """sbatch exports the submitting shell's environment, and the job scripts export its
    DS_ACCELERATOR: a `DS_ACCELERATOR=cpu` left from CPU work would run GPU jobs on the CPU."""
    env = os.environ if env is None else env
    gpus = cfg.pipeline.slurm.gpus_per_node
    if gpus > 0 and env.get("DS_ACCELERATOR") == "cpu":
        raise PrefvecError(f"config parameter pipeline.slurm.gpus_per_node={gpus} but this shell "
                           "has DS_ACCELERATOR=cpu, which the jobs would inherit (GPU jobs on "
                           "CPU): unset DS_ACCELERATOR, or set pipeline.slurm.gpus_per_node=0")


def submit_run(cfg: RunConfig, stages: list[Stage]) -> dict:
    """Submit every group with work to do; return (and record) the submission."""
    check_accelerator_env(cfg)
    slurm.check_client("sbatch")
    run_dir = Path(cfg.run_dir)
    check_no_active_jobs(run_dir)
    todo = manifest.plan(run_dir, stages)
    kind_of = {s.name: s.kind for s in stages}
    job_of_kind: dict[str, str] = {}
    record = {"time": time.time(), "jobs": []}
    for kind, members in groups(stages):
        indices = [i for i, s in enumerate(members) if s.name in todo]
        if not indices:
            continue
        after = sorted({job_of_kind[kind_of[d]] for i in indices for d in members[i].deps
                        if kind_of[d] in job_of_kind}, key=int)
        spec = group_spec(cfg, kind, members, indices, after)
        job_id = slurm.submit(spec)
        job_of_kind[kind] = job_id
        record["jobs"].append({
            "kind": kind, "job_id": job_id, "job_name": spec.job_name, "array": bool(spec.array),
            "stages": {str(i): members[i].name for i in indices}, "after": after,
            "script": str(spec.script_path)})
    if record["jobs"]:
        path = jobs_path(run_dir)
        history = read_submissions(run_dir)
        write_json_atomic(path, {"submissions": [*history, record]})
    return record


def format_submission(record: dict) -> str:
    if not record["jobs"]:
        return "every stage is up to date: nothing submitted"
    lines = []
    for job in record["jobs"]:
        after = f"  (afterok {','.join(job['after'])})" if job["after"] else ""
        if job["array"]:
            tasks = " ".join(f"{job['job_id']}_{i}={n}" for i, n in job["stages"].items())
            lines.append(f"{job['kind']:<10} job {job['job_id']}  array: {tasks}{after}")
        else:
            lines.append(f"{job['kind']:<10} job {job['job_id']}{after}")
    return "\n".join(lines)
