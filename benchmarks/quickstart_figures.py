#!/usr/bin/env python3
"""The quickstart's published figures, printed from a run: docs/results/quickstart.md + README.

    python benchmarks/quickstart_figures.py                          # run the quickstart, then write
    python benchmarks/quickstart_figures.py --run runs/quickstart    # from a finished run

Without --run it runs `prefvec run recipes/quickstart.yaml` into a fresh folder (the README's
main command). Every number written comes from that run's files: wall time from the stage
manifests (first start to last finish), scores and margins from eval/summary.json, the trend
words from the report's own trend rule, peak memory from the stages' done.json. The README's
block between the quickstart-figures markers is replaced with the headline table, so README and
docs/results/quickstart.md always hold the same run's figures, with date and versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results_page import stamp  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "quickstart.md"
README = REPO / "README.md"
BEGIN, END = "<!-- quickstart-figures:begin -->", "<!-- quickstart-figures:end -->"
HINT = {"helpful": "benign prompts answered correctly", "harmless": "harmful prompts refused",
        "over_refusal": "benign prompts refused", "verbosity": "words per answer"}


def run_quickstart(run_dir: Path) -> None:
    cmd = ["prefvec", "run", str(REPO / "recipes" / "quickstart.yaml"), f"run_dir={run_dir}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def wall_seconds(run_dir: Path) -> float:
    manifests = [json.loads(p.read_text()) for p in
                 (run_dir / "pipeline" / "manifests").glob("*.json")]
    starts = [m["started_at"] for m in manifests if m.get("started_at")]
    ends = [m["finished_at"] for m in manifests if m.get("finished_at")]
    return max(ends) - min(starts)


def peak_rss_mb(run_dir: Path) -> float | None:
    peaks = [max(json.loads(p.read_text()).get("peak_rss_mb_per_rank") or [0])
             for p in run_dir.glob("**/done.json")]
    return max(peaks) if peaks else None


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def score_columns(models: dict) -> list[str]:
    base = models["base"]
    return [c for c, v in base.items() if isinstance(v, float) and not c.startswith("n_")]


def headline(summary: dict) -> list[str]:
    """theta_base against every merged model: each score and held-out margin."""
    models, etas = summary["models"], summary.get("eta", {})
    cols = score_columns(models)
    prefs = list(models["base"]["margins"])
    header = ["model", *cols, *[f"margin {p}" for p in prefs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in models.items():
        label = "theta_base" if name == "base" else name
        if name in etas:
            label += " (" + ", ".join(f"eta_{p}={e:g}" for p, e in etas[name].items()) + ")"
        cells = [row[c] for c in cols] + [row["margins"][p]["margin"] for p in prefs]
        lines.append("| " + " | ".join([label, *map(_f, cells)]) + " |")
    return lines


def trend_lines(summary: dict) -> list[str]:
    out = []
    for pref, cols in summary["trends"].items():
        for col, d in cols.items():
            if col.startswith("n_"):
                continue
            vals = " / ".join(_f(v) for v in d["values"])
            etas = " / ".join(f"{e:+g}" for e in d["etas"])
            hint = f" ({HINT[col]})" if col in HINT else ""
            out.append(f"- along eta_{pref} ({etas}): **{col}**{hint} {vals}: {d['trend']}")
    return out


def diagnostics(summary: dict) -> list[str]:
    diag, drift = summary.get("diagnostics") or {}, summary["drift"]
    out = [f"- eta = 0 after {drift['cycles']} apply/remove cycles: "
           f"{drift['zero_point_same_answers']} of {drift['prompts']} prompts with identical "
           f"answers, largest parameter drift {drift['max_abs_param_diff']:.2g}"]
    prefs = list(diag.get("cosine", {}))
    for i, a in enumerate(prefs):
        for b in prefs[i + 1:]:
            out.append(f"- cos(phi_{a}, phi_{b}) = {diag['cosine'][a][b]:.3f}")
    for pref, by in (diag.get("cross_seed_cosine") or {}).items():
        for seed, cos in by.items():
            out.append(f"- cross-seed cosine of phi_{pref} (seed {seed}) = {cos:.3f}")
    if "sti" in diag:
        out.append(f"- STI {diag['sti']['sti']:.3f} (random subspaces: "
                   f"{diag['sti']['sti_chance']:.3f})")
    return out


def comparison(run_dir: Path) -> list[str]:
    """eval/comparison.md's table (every system with its training cost), when the run has
    baselines; written by the eval stage (prefvec_ds.pipeline.compare)."""
    path = run_dir / "eval" / "comparison.json"
    if not path.is_file():
        return ["(no baselines in this run)"]
    from prefvec_ds.pipeline.compare import markdown  # noqa: PLC0415

    table = json.loads(path.read_text())
    return [f"PV sweep choice: {table['chosen_by']}. Cost: wall time and rank-hours summed over "
            "the stages each system needs (theta_base's SFT excluded), peak RSS of any rank; "
            "the stages ran concurrently on 2 shared cores, so wall times overlap.", "",
            markdown(table)]


def write(run_dir: Path, command: str) -> None:
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    wall, rss = wall_seconds(run_dir), peak_rss_mb(run_dir)
    block = [f"Measured {stamp()}. Command: `{command}`; wall time {wall:.0f} s (first stage start "
             f"to last stage end), peak RSS of one rank {rss:.0f} MB. "
             f"{summary['prompts']} held-out prompts, {summary['points']} sweep points.", "",
             *headline(summary)]
    page = ["# Quickstart figures", "",
            "Written by `python benchmarks/quickstart_figures.py` from one run of the quickstart; "
            "regenerate it when the code changes what the quickstart measures.", "", *block, "",
            "## Trends along each eta (the other etas at 0)", "", *trend_lines(summary), "",
            "## Preference Vectors against the baselines", "", *comparison(run_dir), "",
            "## Checks and vector diagnostics", "", *diagnostics(summary), "",
            f"The full report of the run (every point, plots): `{run_dir}/eval/report.md`.", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(page))
    text = README.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(head + BEGIN + "\n" + "\n".join(block) + "\n" + END + tail)
    print("\n".join(page))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished quickstart run folder")
    args = parser.parse_args(argv)
    if args.run is None:
        run_dir = Path(tempfile.mkdtemp(prefix="prefvec-quickstart-")) / "quickstart"
        run_quickstart(run_dir)
        command = "prefvec run recipes/quickstart.yaml"
    else:
        run_dir = args.run
        command = f"prefvec run recipes/quickstart.yaml (run folder {run_dir})"
    write(run_dir.resolve(), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
