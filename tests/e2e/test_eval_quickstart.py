"""The eval stage on the shrunken quickstart run (the e2e session run): trend directions between
the grid's ends, eta = 0 reproduces the base, the merged model agrees with the in-place point,
the report and its PNGs; a diagnostic seed added to a copy of the run; and, with
PREFVEC_QUICKSTART_RUN=<finished full quickstart run>, the trends the quickstart's report shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import local_run, prefvec, run_args  # noqa: E402,F401

PNG = b"\x89PNG\r\n\x1a\n"


def load(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / name).read_text())


def along(summary: dict, pref: str, column: str) -> list[float]:
    """Values of `column` at eta_pref = -1 ... +1, the other etas at 0."""
    line = summary["trends"][pref][column]
    assert line["etas"][0] == -1.0 and line["etas"][-1] == 1.0 and 0.0 in line["etas"]
    return line["values"]


def at_zero(summary: dict, pref: str, column: str) -> float:
    line = summary["trends"][pref][column]
    return line["values"][line["etas"].index(0.0)]


def check_report(run: Path) -> None:
    """report.md names every PNG it shows, and each one is a picture."""
    report = (run / "eval" / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert "lines.png" in pngs and any(p.startswith("heatmap_") for p in pngs), pngs
    import matplotlib.image as mpimg

    for name in pngs:
        path = run / "eval" / name
        assert path.read_bytes()[:8] == PNG, name
        h, w = mpimg.imread(path).shape[:2]
        assert h > 200 and w > 200, (name, h, w)


def check_margins_and_base(summary: dict, sweep: dict) -> None:
    """Each preference's held-out margin rises along its own eta (negative eta inverts it), and
    the all-zero point after every apply/remove cycle is theta_base."""
    for pref in ("helpful", "harmless"):
        low, zero, high = (along(summary, pref, f"margin_{pref}")[i] for i in (0, 2, 4))
        assert low < zero < high, (pref, low, zero, high)
        assert summary["trends"][pref][f"margin_{pref}"]["trend"] == "rises"
    drift = summary["drift"]
    assert drift["zero_point_same_answers"] == drift["prompts"]
    assert drift["max_abs_param_diff"] < 1e-5
    zero = next(p for p in sweep["points"] if not any(p["eta"].values()))
    assert zero["scores"] == sweep["base"]["scores"]


def test_sweep_on_the_quickstart_run(local_run):
    summary, sweep = load(local_run, "summary.json"), load(local_run, "sweep.json")
    assert summary["points"] == 25 and len(sweep["points"]) == 25
    check_margins_and_base(summary, sweep)
    # answers: refusal of harmful prompts rises with eta_harmless and falls with eta_helpful
    refusal = along(summary, "harmless", "harmless")
    assert refusal[-1] > refusal[0] and refusal[-1] >= at_zero(summary, "harmless", "harmless")
    refusal = along(summary, "helpful", "harmless")
    assert refusal[-1] < refusal[0]
    # the merged model (prefvec merge, eta = 1 each) is the in-place point (1, 1)
    point = next(p for p in sweep["points"] if p["eta"] == {"helpful": 1.0, "harmless": 1.0})
    merged = sweep["models"]["default"]
    for pref, m in merged["margins"].items():
        assert m["margin"] == pytest.approx(point["margins"][pref]["margin"], rel=1e-4, abs=1e-4)
    check_report(local_run)


def test_a_diagnostic_seed_trains_only_its_pair(local_run, tmp_path):
    run = tmp_path / "seeded"
    shutil.copytree(local_run, run, symlinks=True)  # fingerprints do not include the folder
    proc = prefvec("run", *run_args(run, "pipeline.eval.diagnostic_seeds=[43]",
                                    "pipeline.eval.diagnostic_preferences=[helpful]",
                                    "pipeline.eval.etas=[0, 1]", "pipeline.eval.prompts=4",
                                    "pipeline.eval.margin_pairs=8"))
    started = set(re.findall(r"^\[prefvec\] start (\S+)", proc.stdout, re.M))
    assert started == {"dpo/helpful+@seed43", "dpo/helpful-@seed43", "vectors/helpful@seed43",
                       "eval"}, proc.stdout
    assert (run / "seeds" / "43" / "ref_logps" / "helpful.pt").is_symlink()  # not recomputed
    cosine = load(run, "summary.json")["diagnostics"]["cross_seed_cosine"]["helpful"]["43"]
    assert 0.0 < cosine <= 1.0 + 1e-6
    assert "Cross-seed cosine" in (run / "eval" / "report.md").read_text()


@pytest.mark.skipif(not os.environ.get("PREFVEC_QUICKSTART_RUN"),
                    reason="set PREFVEC_QUICKSTART_RUN to a finished `prefvec run "
                    "recipes/quickstart.yaml` folder")
def test_full_quickstart_report_shows_the_trends():
    run = Path(os.environ["PREFVEC_QUICKSTART_RUN"])
    summary, sweep = load(run, "summary.json"), load(run, "sweep.json")
    check_margins_and_base(summary, sweep)
    # The generated helpfulness rate is not monotone in eta_helpful on the locked stack (it peaks
    # near eta 0.5: docs/results/quickstart.md, from benchmarks/quickstart_figures.py); the claim
    # that it rises was measured on another stack. What holds: removing phi_helpful lowers it,
    # and its held-out margin and pair accuracy rise along eta_helpful.
    helpful = along(summary, "helpful", "helpful")
    assert helpful[0] < at_zero(summary, "helpful", "helpful")
    assert summary["trends"]["helpful"]["acc_helpful"]["trend"] == "rises"
    refusal = along(summary, "harmless", "harmless")
    assert refusal[0] < at_zero(summary, "harmless", "harmless") < refusal[-1]
    assert summary["trends"]["harmless"]["harmless"]["trend"] == "rises"
    cosine = summary["diagnostics"]["cross_seed_cosine"]["helpful"]
    assert all(0.5 < c <= 1.0 + 1e-6 for c in cosine.values())
    check_report(run)
