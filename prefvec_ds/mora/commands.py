"""`prefvec mora CONFIG`: MORA data synthesis on this machine, or one shard of a SLURM array.

    prefvec mora recipes/quickstart-mora.yaml                # nproc shards here, then gather
    prefvec mora CONFIG --shard-only                         # in an sbatch --array task / srun
    prefvec mora CONFIG --gather-only                        # after every shard finished
"""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "mora", help="MORA: multi-intent rewriting of single-reward prompts -> DPO pairs",
        description="Mine single-reward prompts at Pass@N, rewrite them with several intents, "
        "let the policy answer them K times, keep each prompt's max-margin pair. Settings: "
        "the pipeline.mora section of the run config. Interrupted runs resume.")
    p.add_argument("config", help="run config YAML with a pipeline.mora section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.mora.pass_n=64")
    p.add_argument("--nproc", type=int, help="shard processes here (default "
                   "distributed.nproc_per_node)")
    p.add_argument("--shard-only", action="store_true",
                   help="run this process's shard (launcher rank x SLURM array task) and stop")
    p.add_argument("--gather-only", action="store_true",
                   help="merge finished shards into pairs, summary and figures")
    p.add_argument("--restart", action="store_true",
                   help="delete records made with other settings instead of refusing them")
    p.set_defaults(func=run_mora)


def run_mora(args: argparse.Namespace) -> int:
    from prefvec_ds import PrefvecError  # noqa: PLC0415
    from prefvec_ds.config.loader import load_config  # noqa: PLC0415
    from prefvec_ds.mora import stage  # noqa: PLC0415
    from prefvec_ds.mora.gather import gather  # noqa: PLC0415
    from prefvec_ds.data.sources import expand_preference_paths  # noqa: PLC0415

    if args.shard_only and args.gather_only:
        raise PrefvecError("--shard-only and --gather-only exclude each other")
    cfg = load_config(args.config, args.overrides)
    expand_preference_paths(cfg)
    stage.validate(cfg)
    stage.policy_dir(cfg)  # a missing policy fails here, before any shard starts
    if not args.gather_only:
        if args.shard_only:  # concurrent array tasks: never delete, only check
            if args.restart:
                raise PrefvecError("--restart deletes shared records: not with --shard-only")
            stage.check_fingerprint(cfg)
            return stage.run_shard(cfg, *stage.shard_of())
        stage.check_fingerprint(cfg, args.restart)
        nproc = args.nproc or cfg.distributed.nproc_per_node
        if nproc == 1:
            rc = stage.run_shard(cfg, 0, 1)
        else:
            rc = stage.launch_local([args.config, *args.overrides], nproc)
        if rc != 0:
            return rc
    gather(cfg)
    return 0
