"""One manifest per stage: what it was computed from, whether it finished, how long it took.

`<run_dir>/pipeline/manifests/<stage>.json` holds
    status       new | running | done | failed | preempted | skipped
    fingerprint  hash of the stage's config slice and of every upstream stage's `output_id`
    output_id    set when the stage finishes: a new id whenever the stage is (re)done, so every
                 downstream fingerprint changes with it and the redo propagates
    started_at, finished_at, wall_s, attempts, exit_code, error, host, slurm_job, log
A stage is up to date when its manifest says done, its fingerprint equals the one computed now
and its done file exists. `plan` turns that into the list of stages to (re)run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import write_json_atomic
from prefvec_ds.pipeline.dag import Stage

MANIFEST_DIR = ("pipeline", "manifests")
#: Statuses that satisfy a downstream stage. `skipped`: an optional stage whose tool is absent.
FINISHED = ("done", "skipped")


def manifest_path(run_dir: Path, name: str) -> Path:
    """Manifest of the stage called `name` (`dpo/helpful+` -> manifests/dpo_helpful+.json)."""
    return Path(run_dir).joinpath(*MANIFEST_DIR, f"{name.replace('/', '_')}.json")


def read(run_dir: Path, name: str) -> dict | None:
    """The stage's manifest, None when it has none. A torn write cannot happen (atomic), but a
    user edit, a disk error or a copy cut short can: an unreadable manifest is an error naming
    it, never a silent "not started" (which would redo a finished stage)."""
    path = manifest_path(run_dir, name)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are both
        raise PrefvecError(f"manifest {path}: not a readable stage manifest ({err}); delete it "
                           f"to run stage {name} again") from None
    if not isinstance(manifest, dict):
        raise PrefvecError(f"manifest {path}: expected a JSON object, found a "
                           f"{type(manifest).__name__}; delete it to run stage {name} again")
    return manifest


def update(run_dir: Path, stage: Stage, **fields) -> dict:
    """Merge `fields` into the stage's manifest (atomically: written to a temp file, renamed)."""
    manifest = read(run_dir, stage.name) or {"stage": stage.name, "attempts": 0}
    manifest.update(fields)
    write_json_atomic(manifest_path(run_dir, stage.name), manifest)
    return manifest


def input_fingerprint(run_dir: Path, stage: Stage) -> str | None:
    """Hash of the stage's config slice and its upstream results; None while an upstream stage
    has not finished."""
    h = hashlib.sha256(stage.config_slice.encode())
    by_name = {}
    for dep in stage.deps:
        m = read(run_dir, dep)
        if m is None or m.get("status") not in FINISHED:
            return None
        by_name[dep] = m.get("output_id", m["status"])
    h.update(json.dumps(by_name, sort_keys=True).encode())
    return h.hexdigest()[:24]


def up_to_date(run_dir: Path, stage: Stage) -> tuple[bool, str]:
    """(True, '') when the stage need not run; else (False, why it must)."""
    manifest = read(run_dir, stage.name)
    if manifest is None:
        return False, "new"
    fingerprint = input_fingerprint(run_dir, stage)
    if fingerprint is None:
        return False, "upstream not finished"
    if manifest.get("fingerprint") != fingerprint:
        return False, "inputs changed"
    status = manifest.get("status")
    if status == "skipped":
        return True, ""
    if status != "done":
        return False, {"running": "interrupted", "preempted": "interrupted"}.get(status, status)
    if not (Path(run_dir) / stage.done_file).exists():
        return False, f"output missing ({stage.done_file})"
    return True, ""


def plan(run_dir: Path, stages: list[Stage]) -> dict[str, str]:
    """Stage name -> why it must run, for every stage that must (upstream first)."""
    todo: dict[str, str] = {}
    for stage in stages:
        upstream = [d for d in stage.deps if d in todo]
        if upstream:
            todo[stage.name] = f"after {upstream[0]}"
            continue
        ok, why = up_to_date(run_dir, stage)
        if not ok:
            todo[stage.name] = why
    return todo


def begin(run_dir: Path, stage: Stage, fingerprint: str, log: str = "") -> dict:
    """Mark the stage running. A changed fingerprint first removes its old outputs, because a
    trainer would otherwise resume from a checkpoint made for other inputs."""
    old = read(run_dir, stage.name)
    if old is not None and old.get("fingerprint") not in (None, fingerprint):
        clear_outputs(run_dir, stage)
    return update(run_dir, stage, status="running", fingerprint=fingerprint,
                  started_at=time.time(), finished_at=None, exit_code=None, error=None,
                  attempts=(old or {}).get("attempts", 0) + 1, host=socket.gethostname(),
                  slurm_job=_slurm_job_id(), log=log)


def finish(run_dir: Path, stage: Stage, status: str, exit_code: int, error: str = "") -> dict:
    """Record the end of an attempt; a `done` stage gets a fresh output_id."""
    m = read(run_dir, stage.name) or {}
    now = time.time()
    fields = {"status": status, "exit_code": exit_code, "error": error or None,
              "finished_at": now, "wall_s": round(now - m.get("started_at", now), 2)}
    if status in FINISHED:
        fields["output_id"] = hashlib.sha256(
            f"{m.get('fingerprint')}|{now}".encode()).hexdigest()[:16]
    return update(run_dir, stage, **fields)


def clear_outputs(run_dir: Path, stage: Stage) -> None:
    for rel in stage.outputs:
        path = Path(run_dir) / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _slurm_job_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")
