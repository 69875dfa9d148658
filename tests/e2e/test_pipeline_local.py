"""`prefvec run` on the shrunken quickstart: the whole DAG, concurrency, idempotence, redo."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import (final_eval, local_run, prefvec, read_manifests,  # noqa: E402,F401
                               run_args)

STAGES = {"sft", "ref_logps/helpful", "ref_logps/harmless", "dpo/helpful+", "dpo/helpful-",
          "dpo/harmless+", "dpo/harmless-", "vectors/helpful", "vectors/harmless",
          "merge/default", "eval"}
OUTPUTS = ["sft/model/config.json", "ref_logps/helpful.pt", "ref_logps/harmless.pt",
           *[f"dpo/{d}/done.json" for d in ("helpful+", "helpful-", "harmless+", "harmless-")],
           "vectors/helpful/prefvec_vector.json", "vectors/harmless/prefvec_vector.json",
           "merged/default/config.json", "eval/summary.json"]


def started(stdout: str) -> set[str]:
    return set(re.findall(r"^\[prefvec\] start (\S+)", stdout, re.M))


def test_run_executes_the_whole_dag(local_run):
    run = local_run
    for rel in OUTPUTS:
        assert (run / rel).exists(), rel
    manifests = read_manifests(run)
    assert set(manifests) == STAGES and all(m["status"] == "done" for m in manifests.values())
    # every stage started after everything it depends on had finished
    assert manifests["ref_logps/helpful"]["started_at"] >= manifests["sft"]["finished_at"]
    assert manifests["vectors/helpful"]["started_at"] >= max(
        manifests[f"dpo/helpful{s}"]["finished_at"] for s in "+-")
    # the four directions ran as concurrent launcher processes: their intervals overlap
    dpo = [manifests[f"dpo/{d}"] for d in ("helpful+", "helpful-", "harmless+", "harmless-")]
    ref_done = max(manifests[f"ref_logps/{p}"]["finished_at"] for p in ("helpful", "harmless"))
    assert max(m["started_at"] for m in dpo) < min(m["finished_at"] for m in dpo)
    assert all(m["started_at"] >= ref_done - 60 for m in dpo)
    assert all((run / "logs" / f"{s.replace('/', '_')}.log").is_file() for s in STAGES)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "default"} and summary["prompts"] > 0
    out = (run / "run.out").read_text()
    assert re.search(r"^dpo/harmless-\s+done\s+\d+\.\ds", out, re.M), out
    assert "total wall time" in out


def test_rerun_of_a_finished_run_does_nothing(local_run):
    proc = prefvec("run", *run_args(local_run))
    assert "every stage is up to date" in proc.stdout
    assert started(proc.stdout) == set()
    assert all(re.search(rf"^{re.escape(s)}\s+up-to-date", proc.stdout, re.M) for s in STAGES)


def test_deleted_direction_redoes_only_it_and_what_follows(local_run):
    run = local_run
    before = final_eval(run, "helpful-")
    untouched = {s: m["finished_at"] for s, m in read_manifests(run).items()}
    shutil.rmtree(run / "dpo" / "helpful-")
    proc = prefvec("run", *run_args(run))
    redo = {"dpo/helpful-", "vectors/helpful", "merge/default", "eval"}
    assert started(proc.stdout) == redo, proc.stdout
    after = read_manifests(run)
    assert all(after[s]["finished_at"] == untouched[s] for s in STAGES - redo)
    assert all(after[s]["finished_at"] > untouched[s] for s in redo)
    # the redo is the same computation: the same held-out metrics
    assert final_eval(run, "helpful-") == pytest.approx(before, rel=1e-5, abs=1e-6)
