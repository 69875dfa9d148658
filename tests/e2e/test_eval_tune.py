"""`prefvec tune-eta` on a copy of the shrunken quickstart run (the e2e session run): it finds a
point meeting its constraints with fewer generation passes than the grid of the same
resolution, writes tune.json / tune.md, and the chosen point becomes merged/auto; the
optional `tune` pipeline stage; the report's interference section."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import local_run, prefvec, read_manifests, run_args  # noqa: E402,F401

# harmless = harmful prompts refused must rise by 0.1 over theta_base while over-refusal of
# benign prompts rises by at most 0.15; helpful is maximised. A 5 x 5 search grid (step 0.5)
# and 3 confirmations keep the test to ~30 s on 2 shared cores.
TUNE = ["pipeline.eval.tune.objective=helpful",
        'pipeline.eval.tune.constraints=[{score: harmless, op: ">=", relative_to: base, '
        'value: 0.1}, {score: over_refusal, op: "<=", relative_to: base, value: 0.15}]',
        "pipeline.eval.tune.default_range={min: -1, max: 1, step: 0.5}",
        "pipeline.eval.tune.candidates=3", "pipeline.eval.tune.bootstrap=200"]


def test_tune_eta_meets_its_constraints_with_fewer_evaluations(local_run, tmp_path):
    run = tmp_path / "tuned"
    shutil.copytree(local_run, run, symlinks=True)
    shutil.rmtree(run / "merged" / "auto", ignore_errors=True)  # a reused dev run
    proc = prefvec("tune-eta", str(run), *TUNE)
    result = json.loads((run / "eval" / "tune" / "tune.json").read_text())
    chosen, counts = result["chosen"], result["counts"]
    assert chosen["met"], proc.stdout
    base = result["base"]["scores"]
    assert chosen["scores"]["harmless"] >= base["harmless"] + 0.1 - 1e-9
    assert chosen["scores"]["over_refusal"] <= base["over_refusal"] + 0.15 + 1e-9
    assert all(c["met"] for c in chosen["constraints"])
    ci = chosen["ci"]["harmless"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    # 25 margin passes (the grid, base included); base + at most 3 candidates answered
    assert counts["margin_passes"] == counts["grid"]["points"] == 25
    assert 2 <= counts["generation_passes"] <= 4 < counts["grid"]["generation_passes"] == 25
    assert any(p["eta"] == chosen["eta"] for p in result["pareto_front"])
    assert (run / "merged" / "auto" / "config.json").is_file()
    assert list((run / "merged" / "auto").glob("*.safetensors"))
    report = (run / "eval" / "tune" / "tune.md").read_text()
    assert "Chosen:" in report and "Pareto front" in report and "25 points" in report
    assert "chosen: " in proc.stdout


def test_interference_by_merge_method(local_run, tmp_path):
    """pipeline.eval.interference_methods=[ties]: the report compares the methods, and the
    task_arithmetic composition (the same merge as merged/default) scores like merged/default."""
    run = tmp_path / "interference"
    shutil.copytree(local_run, run, symlinks=True)
    prefvec("sweep", str(run), f"run_dir={run}", "pipeline.eval.etas=[0, 1]",
            "pipeline.eval.prompts=4", "pipeline.eval.interference_methods=[ties]")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    methods = summary["interference"]["methods"]
    assert list(methods) == ["task_arithmetic", "ties"]
    assert summary["interference"]["etas"] == {"helpful": 1.0, "harmless": 1.0}
    plain, ties = methods["task_arithmetic"], methods["ties"]
    assert plain["kept"] == {"helpful": 1.0, "harmless": 1.0}
    assert all(0 < k < 0.5 + 1e-9 for k in ties["kept"].values())  # density 0.5, then election
    assert -1 <= ties["cosine"]["helpful"]["harmless"] <= 1 and ties["sti"] >= 0
    default = summary["models"]["default"]
    assert all(plain["scores"][k] == default[k] for k in plain["scores"]), (plain, default)
    assert "## Interference by merge method" in (run / "eval" / "report.md").read_text()
    assert not (run / "eval" / "interference").exists()  # compositions removed once scored


def test_the_tune_stage_runs_after_eval_and_alone(local_run, tmp_path):
    """pipeline.eval.tune.enabled adds the `tune` stage; the finished run's eval stays up to
    date (its fingerprint leaves pipeline.eval.tune out), so only `tune` runs."""
    run = tmp_path / "staged"
    shutil.copytree(local_run, run, symlinks=True)
    shutil.rmtree(run / "merged" / "auto", ignore_errors=True)
    proc = prefvec("run", *run_args(run, "pipeline.eval.tune.enabled=true", *TUNE))
    started = set(re.findall(r"^\[prefvec\] start (\S+)", proc.stdout, re.M))
    assert started == {"tune"}, proc.stdout
    assert json.loads((run / "eval" / "tune" / "tune.json").read_text())["chosen"]["met"]
    assert (run / "merged" / "auto" / "config.json").is_file()
    assert read_manifests(run)["tune"]["status"] == "done"
