"""`prefvec run`, `prefvec submit`, `prefvec status`: the whole DAG, locally or on SLURM;
`prefvec compare`: Preference Vectors against the run's baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefvec_ds import PrefvecError


def add_parsers(sub) -> None:
    executors = (
        ("run", run_pipeline, "run the whole pipeline on this machine",
         "Run sft -> ref_logps -> dpo (directions concurrently) -> vectors -> merge -> eval "
         "here; finished stages are skipped, interrupted ones resume, stages whose inputs "
         "changed are redone.", "print the plan, run nothing"),
        ("submit", submit_pipeline, "submit the pipeline to SLURM (one job per stage)",
         "One sbatch per stage from slurm/job.sbatch.tmpl; the DPO directions as one job "
         "array; stages chained with afterok.", "print the plan, submit nothing"),
    )
    for name, func, help_text, description, dry_help in executors:
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("config", help="run config YAML (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.05")
        p.add_argument("--dry-run", action="store_true", help=dry_help)
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="state of every stage of a run folder",
                       description="Manifests plus squeue/sacct: done, running, pending, "
                       "failed (with exit code and last log lines), cancelled (and why).")
    p.add_argument("run_dir", help="the run folder (run_dir of the config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show_status)

    p = sub.add_parser("compare", help="Preference Vectors against theta_base and the baselines",
                       description="One row per system (theta_base, each merge, PV at the sweep's "
                       "choice, each baseline of pipeline.baselines), one column per eval score "
                       "and held-out margin, plus training cost; writes eval/comparison.{md,json,"
                       "png} and prints the table. Needs a finished eval stage.")
    p.add_argument("run_dir", help="the run folder")
    p.set_defaults(func=show_comparison)


def show_comparison(args: argparse.Namespace) -> int:
    from prefvec_ds.pipeline.compare import write_comparison  # noqa: PLC0415
    from prefvec_ds.pipeline.prepare import load_run  # noqa: PLC0415

    cfg, stages = load_run(args.run_dir)
    path = write_comparison(cfg, stages)
    print(path.read_text(), end="")
    return 0


def _prepare(args: argparse.Namespace):
    from prefvec_ds.pipeline.manifest import plan  # noqa: PLC0415
    from prefvec_ds.pipeline.prepare import prepare  # noqa: PLC0415

    cfg, stages = prepare(args.config, args.overrides, write=not args.dry_run)
    todo = plan(cfg.run_dir, stages)
    if args.dry_run:
        for stage in stages:
            what = f"run: {todo[stage.name]}" if stage.name in todo else "up to date"
            print(f"{stage.name:<24} {what}")
    return cfg, stages


def run_pipeline(args: argparse.Namespace) -> int:
    from prefvec_ds.pipeline.local import run_local  # noqa: PLC0415

    cfg, stages = _prepare(args)
    return 0 if args.dry_run else run_local(cfg, stages)


def submit_pipeline(args: argparse.Namespace) -> int:
    from prefvec_ds.pipeline import slurm  # noqa: PLC0415
    from prefvec_ds.pipeline.submit import format_submission, submit_run  # noqa: PLC0415

    cfg, stages = _prepare(args)
    if args.dry_run:
        return 0
    try:
        record = submit_run(cfg, stages)
    except slurm.SlurmError as err:
        raise PrefvecError(str(err)) from None
    print(format_submission(record))
    print(f"follow with: prefvec status {cfg.run_dir}")
    return 0


def show_status(args: argparse.Namespace) -> int:
    from prefvec_ds.pipeline.prepare import load_run  # noqa: PLC0415
    from prefvec_ds.pipeline.status import as_json, collect, format_status  # noqa: PLC0415

    _cfg, stages = load_run(args.run_dir)
    # DIR itself, not the run_dir recorded in its snapshot: a moved run is still found, and a
    # copy shows its own manifests, not the original's
    rows = collect(Path(args.run_dir), stages)
    print(json.dumps(as_json(rows), indent=2) if args.json else format_status(rows))
    return 0
