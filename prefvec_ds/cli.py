"""`prefvec` command line: each pipeline package registers its own subcommands.

A package contributes a `commands.py` with `add_parsers(subparsers)`; handlers import their heavy
dependencies (torch, deepspeed) lazily so `prefvec --help` stays fast. A PrefvecError becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from prefvec_ds import __version__
from prefvec_ds.atomic import Interrupted, signals_raise
from prefvec_ds.distributed.process import run_main

COMMAND_MODULES = [
    "prefvec_ds.train.commands",
    "prefvec_ds.ckpt.commands",
    "prefvec_ds.pipeline.commands",
    "prefvec_ds.eval.commands",
    "prefvec_ds.eval.scorer_commands",
    "prefvec_ds.mora.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefvec", description="Multi-preference alignment with Preference Vectors.")
    parser.add_argument("--version", action="version", version=f"prefvec-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not an absent command module
                raise
            continue
        module.add_parsers(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but KEY=VALUE overrides may also come after options
    (`prefvec train dpo cfg.yaml --direction helpful+ dpo.beta=0.05`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x
                                                 for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        with signals_raise():  # SIGTERM/SIGHUP unwind like Ctrl-C: temporaries are removed
            return args.func(args)

    try:
        return run_main(body)
    except (KeyboardInterrupt, Interrupted) as err:
        # the handlers' finally blocks and atomic_output_dir have removed their temporaries
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"prefvec: interrupted by {signal.Signals(signum).name}; no partial output was "
              "left", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
