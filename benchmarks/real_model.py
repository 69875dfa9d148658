#!/usr/bin/env python3
"""The method on a real model: docs/results/smollm2_real.md, printed from one run of
recipes/smollm2-135m-real.yaml (SmolLM2-135M-Instruct, HH-RLHF + PKU-SafeRLHF, AlpacaEval,
AdvBench, HarmBench, BeaverTails, XSTest).

    python benchmarks/real_model.py                       # run the recipe, then write the page
    python benchmarks/real_model.py --run runs/smollm2-135m-real    # from a finished run

Every figure comes from the run's files: scores, trends and vector diagnostics from
eval/summary.json, the comparison from eval/comparison.json, wall time and peak memory from the
stage manifests and done.json. cos(phi+, phi-) is measured here: tau+- = theta_p+- - theta_base
are extracted from the DPO checkpoints (the streaming extractor) into a scratch folder of the
run, compared, and deleted. The paper's figures are quoted beside ours; nothing is compared by
hand.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quickstart_figures import (comparison, diagnostics, headline, peak_rss_mb,  # noqa: E402
                                trend_lines, wall_seconds)
from results_page import stamp  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-real.yaml"
RESULTS = REPO / "docs" / "results" / "smollm2_real.md"
PAPER = {"cos_pref": "0.34 to 0.40", "cos_pm": "-0.47 to -0.71", "cross_seed": ">= 0.979"}


def run_recipe(overrides: list[str]) -> None:
    cmd = ["prefvec", "run", str(RECIPE), *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def plus_minus_cosines(run_dir: Path) -> dict[str, float]:
    """cos(theta_p+ - theta_base, theta_p- - theta_base) per preference (the paper's Fig. 4
    reading: the two DPO directions move away from the base in opposite directions)."""
    from prefvec_ds.ckpt.stats import vector_stats  # noqa: PLC0415
    from prefvec_ds.ckpt.vector import compute_vector  # noqa: PLC0415
    from prefvec_ds.config.layout import RunLayout  # noqa: PLC0415
    from prefvec_ds.pipeline.prepare import load_run  # noqa: PLC0415
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    cfg, _ = load_run(run_dir)
    lay, base = RunLayout.of(cfg), base_model_dir(cfg)
    scratch = run_dir / "eval" / "plus_minus_scratch"
    shutil.rmtree(scratch, ignore_errors=True)  # only ever our own scratch folder
    out = {}
    try:
        for pref in cfg.data.preferences:
            taus = []
            for sign in "+-":
                tau = scratch / f"{pref}{'plus' if sign == '+' else 'minus'}"
                compute_vector(lay.dpo_ckpt(f"{pref}{sign}"), base, tau)
                taus.append(str(tau))
            out[pref] = vector_stats(taus)["cosine"][0][1]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def base_vs_default(summary: dict) -> list[str]:
    """What the default merge (eta 1 everywhere) changed against theta_base, per column."""
    models = summary["models"]
    if "default" not in models:
        return []
    base, merged = models["base"], models["default"]
    out = []
    for col, value in base.items():
        if isinstance(value, float) and not col.startswith("n_") and isinstance(
                merged.get(col), float):
            out.append(f"- {col}: theta_base {value:.3f} -> default merge {merged[col]:.3f} "
                       f"({merged[col] - value:+.3f})")
    for pref, m in base["margins"].items():
        out.append(f"- held-out margin {pref}: theta_base {m['margin']:.3f} -> default merge "
                   f"{merged['margins'][pref]['margin']:.3f}")
    return out


def paper_lines(summary: dict, pm: dict[str, float]) -> list[str]:
    diag = summary.get("diagnostics") or {}
    prefs = list(diag.get("cosine", {}))
    out = []
    for i, a in enumerate(prefs):
        for b in prefs[i + 1:]:
            out.append(f"- cos(phi_{a}, phi_{b}) = {diag['cosine'][a][b]:.3f} "
                       f"(paper: {PAPER['cos_pref']})")
    for pref, cos in pm.items():
        out.append(f"- cos(theta_{pref}+ - theta_base, theta_{pref}- - theta_base) = {cos:.3f} "
                   f"(paper: {PAPER['cos_pm']})")
    for pref, by in (diag.get("cross_seed_cosine") or {}).items():
        for seed, cos in by.items():
            out.append(f"- cross-seed cosine of phi_{pref} (seeds 42, {seed}) = {cos:.3f} "
                       f"(paper: {PAPER['cross_seed']} for DPO vectors)")
    return out


def shown(path: Path) -> Path:
    """A path as a reader of the page types it: relative to the repository when inside it."""
    try:
        return path.relative_to(REPO)
    except ValueError:
        return path


def write(run_dir: Path, command: str, results: Path) -> str:
    import json  # noqa: PLC0415

    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    t0 = time.time()
    pm = plus_minus_cosines(run_dir)
    print(f"cos(phi+, phi-) measured in {time.time() - t0:.0f} s: {pm}", flush=True)
    wall, rss = wall_seconds(run_dir), peak_rss_mb(run_dir)
    sets = summary.get("prompt_sets") or {}
    page = [
        "# Preference Vectors on SmolLM2-135M-Instruct with real data", "",
        "Written by `python benchmarks/real_model.py` from one run of "
        "`recipes/smollm2-135m-real.yaml`; regenerate it when the code or the recipe changes.",
        "", f"Measured {stamp()}. Command: `{command}`; wall time {wall:.0f} s (first stage start "
        f"to last stage end), peak RSS of one rank {rss:.0f} MB. "
        f"{summary['prompts']} prompts ({', '.join(f'{k} {v}' for k, v in sets.items())}), "
        f"{summary['points']} sweep points, greedy answers. Column `<axis>@<set>`: the scorer's "
        "axis on that prompt set (reward: the HH reward model; cost: the PKU cost model, > 0 "
        "judged unsafe; refusal: the refusal classifier's rate).", "",
        "## theta_base against the merged models", "", *headline(summary), "",
        "## The default merge (every eta 1) against theta_base", "", *base_vs_default(summary),
        "", "## Along each eta (the other etas at 0)", "", *trend_lines(summary), "",
        "## Vector geometry against the paper", "", *paper_lines(summary, pm), "",
        "## Preference Vectors against the baselines", "", *comparison(run_dir), "",
        "## Checks and vector diagnostics", "", *diagnostics(summary), "",
        f"The full report of the run (every point, sample answers, plots): "
        f"`{shown(run_dir)}/eval/report.md`.", ""]
    text = "\n".join(page)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run of the recipe")
    parser.add_argument("--results", type=Path, default=RESULTS, help="page to write")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the recipe "
                                                     "(without --run)")
    args = parser.parse_args(argv)
    if args.run is None:
        run_recipe(args.overrides)
        from prefvec_ds.config.loader import load_config  # noqa: PLC0415

        run_dir = Path(load_config(RECIPE, args.overrides).run_dir)
        if not run_dir.is_absolute():
            run_dir = REPO / run_dir
        command = " ".join(["prefvec run recipes/smollm2-135m-real.yaml", *args.overrides])
    else:
        run_dir = args.run
        command = f"prefvec run recipes/smollm2-135m-real.yaml (run folder {run_dir})"
    write(run_dir.resolve(), command, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
