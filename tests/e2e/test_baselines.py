"""pipeline.baselines on a copy of the shrunken quickstart run: dpo_safe_first and bfpo train as
stages of the same DAG (nothing of Preference Vectors is redone), dpo_soup merges, the eval scores
them, and the comparison table and plot have a row / point per system."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import local_run, prefvec, run_args  # noqa: E402,F401

BASELINES = ("dpo_safe_first", "bfpo", "dpo_soup")


@pytest.fixture(scope="module")
def baseline_run(local_run, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("baselines") / "run"
    shutil.copytree(local_run, run, symlinks=True)  # fingerprints do not include the folder
    proc = prefvec("run", *run_args(run, f"pipeline.baselines=[{','.join(BASELINES)}]",
                                    "pipeline.eval.etas=[0, 1]", "pipeline.eval.prompts=4"),
                   timeout=1800)
    return run, proc.stdout


def test_baselines_run_as_stages_and_nothing_else_is_redone(baseline_run):
    run, stdout = baseline_run
    started = set(re.findall(r"^\[prefvec\] start (\S+)", stdout, re.M))
    assert started == {f"baseline/{b}" for b in BASELINES} | {"eval"}, stdout
    for name in BASELINES:
        assert (run / "baselines" / name / "model" / "config.json").is_file(), name
    done = {b: json.loads((run / "baselines" / b / "done.json").read_text())
            for b in ("dpo_safe_first", "bfpo")}
    assert done["bfpo"]["loss_type"] == "bfpo" and done["dpo_safe_first"]["loss_type"] == "sigmoid"
    # safe-first takes harmless pairs where a response is unsafe: both sets contribute
    assert all(n > 0 for n in done["dpo_safe_first"]["selected"].values())
    assert done["bfpo"]["selected"]["harmless"] == 0 and done["bfpo"]["steps"] > 0


def test_comparison_has_a_row_and_a_point_per_system(baseline_run):
    run, _ = baseline_run
    table = json.loads((run / "eval" / "comparison.json").read_text())
    systems = [r["system"] for r in table["rows"]]
    assert systems[0] == "theta_base" and systems[-3:] == list(BASELINES)
    assert any(s.startswith("PV default") for s in systems)
    assert any(s.startswith("PV sweep choice") for s in systems)
    trained = {r["system"]: r for r in table["rows"]}
    assert trained["bfpo"]["wall_s"] > 0 and trained["bfpo"]["peak_rss_mb"] > 0
    assert (run / "eval" / "comparison.png").stat().st_size > 0
    printed = prefvec("compare", str(run)).stdout
    assert all(f"| {s} |" in printed for s in systems), printed
