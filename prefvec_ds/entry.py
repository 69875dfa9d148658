"""Per-rank entry point that launchers start: `python -m prefvec_ds.entry STAGE CONFIG ...`.

deepspeed (`deepspeed --module prefvec_ds.entry`), torchrun, srun and mpirun all start this on
every rank; prefvec_ds.distributed.env works out the rank from whichever variables they set.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config

STAGES = ("sft", "ref-logps", "dpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefvec_ds.entry")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.05")
    parser.add_argument("--direction", help="dpo: e.g. helpful+ or harmless-")
    parser.add_argument("--preference", help="ref-logps: e.g. helpful")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed adds it
    return parser


def run_stage(args: argparse.Namespace) -> None:
    from prefvec_ds.distributed import engine as dist  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)
    dist.init(cfg.seed)
    # no shutdown on error: its barrier would wait for ranks that may have died; the launcher
    # tears the job down when any rank exits non-zero.
    if args.stage == "sft":
        from prefvec_ds.train.sft import train_sft  # noqa: PLC0415

        train_sft(cfg)
    elif args.stage == "ref-logps":
        from prefvec_ds.train.ref_logps import build_ref_logps  # noqa: PLC0415

        build_ref_logps(cfg, args.preference)
    else:
        from prefvec_ds.train.dpo import train_dpo  # noqa: PLC0415

        train_dpo(cfg, args.direction)
    dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_stage(args)
    except PrefvecError as err:
        print(f"prefvec: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def run(argv: list[str] | None = None) -> NoReturn:
    """The rank's whole process: `main`, then `exit_process` (no interpreter teardown while the
    process group's threads still run). The training loop's requeue exit comes as SystemExit."""
    from prefvec_ds.distributed.engine import exit_process  # noqa: PLC0415

    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    exit_process(code)


if __name__ == "__main__":
    run()
