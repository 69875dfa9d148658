"""The pipeline's eval stage: `prefvec sweep` on the run (prefvec_ds.eval.runner).

theta_base is swept over the eta grid of `pipeline.eval` with every vector applied in place,
the merged models of `pipeline.merges` are scored as written, and the vector diagnostics and the
report are added. `<run_dir>/eval/summary.json` stays the stage's contract (scores of `base` and
of every merged model under `models`, plus `report`, the path of eval/report.md).
"""

from __future__ import annotations

from pathlib import Path

from prefvec_ds.config.layout import RunLayout
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.pipeline.dag import Stage


def run_eval(cfg: RunConfig, stages: list[Stage]) -> dict:
    """Sweep, diagnostics and report of the run; writes <run_dir>/eval/summary.json."""
    from prefvec_ds.eval.runner import evaluate_run  # noqa: PLC0415

    lay = RunLayout.of(cfg)
    # a merge stage that was skipped (ckpt tools absent) leaves no folder to score
    models = {s.key: lay.merged(s.key) for s in stages
              if s.kind == "merge" and (lay.root / s.done_file).is_file()}
    models.update({s.key: lay.baseline_model(s.key) for s in stages
                   if s.kind.startswith("baseline") and (lay.root / s.done_file).is_file()})
    summary = evaluate_run(cfg, models=models)
    if cfg.pipeline.baselines:
        from prefvec_ds.pipeline.compare import write_comparison  # noqa: PLC0415

        summary["comparison"] = str(write_comparison(cfg, stages))
    return summary
