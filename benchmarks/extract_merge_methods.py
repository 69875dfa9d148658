"""extract_merge.py --methods: `prefvec merge --method ties|dare_ties` on the benchmark's ZeRO-3
checkpoints, next to task arithmetic, and (unless --only-ours) next to mergekit's ties on the
models gathered by the conventional route (a).

Both sides compute minus + trim(plus - minus): prefvec with the minus checkpoint as its base and
PLUS,MINUS as its one vector (read streaming, never gathered), mergekit with the gathered minus as
base_model and the gathered plus as its one model (its task vector is plus - minus), so the
outputs must agree; the largest difference is printed. Times and peak RSS are medians of
--repeats, cold cache each (as (b)).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import extract_merge as bench

METHODS = (("task_arithmetic", None), ("ties", 0.2), ("dare_ties", 0.2))


def ours_method(models: Path, work: Path, workers: int, method: str, density: float | None
                ) -> tuple[float, float, Path]:
    out = work / f"merged_prefvec_{method}"
    shutil.rmtree(out, ignore_errors=True)
    bench.evict(models / "plus", models / "minus")
    knobs = [] if density is None else ["--method", method, "--density", str(density)]
    cmd = [sys.executable, "-m", "prefvec_ds.cli", "merge", "--base", str(models / "minus"),
           "--vector", f"{models / 'plus'},{models / 'minus'}=1", "--out", str(out),
           "--workers", str(workers), "--config-from", str(models / "base"), *knobs]
    wall, rss = bench.measure(cmd, {"PYTHONPATH": str(bench.HERE.parents[1])})
    return wall, rss, out


def mergekit_ties(work: Path, venv: Path, density: float) -> tuple[float, float, Path]:
    """mergekit's ties on the gathered fp32 models that (a) wrote (plus_fp32, minus_fp32)."""
    cfg = work / "ties.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {work / 'minus_fp32'}\ndtype: float32\n"
                   f"parameters: {{normalize: true}}\nmodels:\n  - model: {work / 'plus_fp32'}\n"
                   f"    parameters: {{weight: 1.0, density: {density}}}\n")
    out = work / "merged_mergekit_ties"
    shutil.rmtree(out, ignore_errors=True)
    bench.evict(work / "plus_fp32", work / "minus_fp32")
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--out-shard-size", "5B",
           "--no-copy-tokenizer"]
    wall, rss = bench.measure(cmd)
    return wall, rss, out


def methods_next_to_task_arithmetic(args, models: Path, work: Path) -> dict:
    rows = {}
    for method, density in METHODS:
        wall, rss, out = bench._median_runs(
            lambda: ours_method(models, work, args.workers, method, density), args.repeats)
        label = method if density is None else f"{method} d={density}"
        print(f"(b) prefvec merge --method {label:18s} {wall:7.2f} s   peak RSS "
              f"{rss / 1e9:5.2f} GB")
        rows[label] = {"s": wall, "rss_GB": rss / 1e9}
        if method == "ties" and not args.only_ours:
            venv = bench.mergekit_venv(args.workdir)
            m_wall, m_rss, m_out = bench._median_runs(
                lambda: mergekit_ties(work, venv, density), args.repeats)
            diff = bench.max_difference(m_out, out)
            print(f"(a) mergekit ties d={density} on the gathered models {m_wall:7.2f} s   peak "
                  f"RSS {m_rss / 1e9:5.2f} GB (+ the two zero_to_fp32 runs of (a)); "
                  f"max |mergekit - prefvec| {diff:.3g} (at a magnitude tie on the threshold "
                  "prefvec keeps every tied value, mergekit exactly k: docs/merge-methods.md)")
            rows[f"mergekit {label}"] = {"s": m_wall, "rss_GB": m_rss / 1e9, "max_abs_diff": diff}
    return rows
