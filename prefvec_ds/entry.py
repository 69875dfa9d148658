"""Per-rank entry point that launchers start on every rank.

    python -m prefvec_ds.entry --job '{"stage":"dpo","config":"run.yaml","direction":"helpful+"}'
    python -m prefvec_ds.entry dpo run.yaml --direction helpful+      # the same job, by hand

`prefvec train` and the pipeline pass the job as JSON (prefvec_ds.distributed.launch.RankJob,
the one contract across processes); the positional form is for people writing their own srun or
mpirun lines. deepspeed (`deepspeed --module prefvec_ds.entry`), torchrun, srun and mpirun all
start this; prefvec_ds.distributed.env works out the rank from whichever variables they set.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from prefvec_ds.config.loader import load_config
from prefvec_ds.distributed.launch import RANK_STAGES, RankJob
from prefvec_ds.distributed.process import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefvec_ds.entry")
    parser.add_argument("stage", nargs="?", choices=RANK_STAGES)
    parser.add_argument("config", nargs="?", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.05")
    parser.add_argument("--direction", help="dpo: e.g. helpful+ or harmless-")
    parser.add_argument("--preference", help="ref-logps: e.g. helpful")
    parser.add_argument("--baseline", help="baseline: e.g. dpo_safe_first")
    parser.add_argument("--job", help="the whole job as RankJob JSON (instead of the above)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed adds it
    return parser


def parse_job(argv: list[str] | None = None) -> RankJob:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job:
        if args.stage or args.config:
            parser.error("--job carries the whole job: no STAGE/CONFIG with it")
        return RankJob.from_json(args.job)
    if not (args.stage and args.config):
        parser.error("expected STAGE CONFIG [overrides] or --job JSON")
    return RankJob(args.stage, args.config, tuple(args.overrides), args.direction,
                   args.preference, args.baseline)


def run_stage(job: RankJob) -> None:
    """This process is one rank of `job`: join the group, train, leave the group."""
    from prefvec_ds.distributed import group  # noqa: PLC0415

    cfg = load_config(job.config, list(job.overrides))
    group.init(cfg.seed)
    # no shutdown on error: its barrier would wait for ranks that may have died; the launcher
    # tears the job down when any rank exits non-zero.
    if job.stage == "sft":
        from prefvec_ds.train.sft import train_sft  # noqa: PLC0415

        train_sft(cfg)
    elif job.stage == "ref-logps":
        from prefvec_ds.train.ref_logps import build_ref_logps  # noqa: PLC0415

        build_ref_logps(cfg, job.preference)
    elif job.stage == "dpo":
        from prefvec_ds.train.dpo import train_dpo  # noqa: PLC0415

        train_dpo(cfg, job.direction)
    else:
        from prefvec_ds.train.baselines import train_baseline  # noqa: PLC0415

        train_baseline(cfg, job.baseline)
    group.shutdown()


def run_rank(job: RankJob) -> NoReturn:
    """The rank's whole process: the stage, then `exit_process` (no interpreter teardown while
    the process group's threads still run). The training loop's requeue exit comes as
    SystemExit; bad input is one line and exit 2."""
    from prefvec_ds.distributed.group import exit_process  # noqa: PLC0415

    try:
        code = run_main(lambda: run_stage(job))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    exit_process(code)


def main(argv: list[str] | None = None) -> NoReturn:
    code = run_main(lambda: run_rank(parse_job(argv)))
    raise SystemExit(code)  # only a bad --job gets here: run_rank does not return


if __name__ == "__main__":
    main()
