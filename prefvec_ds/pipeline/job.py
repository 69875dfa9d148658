"""Run one stage of the DAG, with its manifest: `python -m prefvec_ds.pipeline.job`.

Both executors start stages through this module, so a stage behaves the same locally and under
SLURM:

    python -m prefvec_ds.pipeline.job RUN_CONFIG --stage dpo/helpful+ --launcher deepspeed
    python -m prefvec_ds.pipeline.job RUN_CONFIG --group dpo --index $SLURM_ARRAY_TASK_ID \
        --launcher srun

RUN_CONFIG is the resolved snapshot `<run_dir>/pipeline/config.yaml` that `prefvec run|submit`
writes. An up-to-date stage exits 0 at once (a requeued job that already finished, a re-run).
Training stages start their ranks with the given launcher (`python -m prefvec_ds.entry --job
JSON` per rank, see distributed/launch.RankJob) and pass SIGUSR1/SIGTERM on to them: the trainer
checkpoints and exits with REQUEUE_EXIT_CODE, recorded as `preempted`, and the next attempt
resumes.

Fault injection for tests: PREFVEC_FAIL_STAGES=dpo/harmless- (comma-separated stage names)
makes those stages fail with exit code 3 before they start their work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import link_atomic
from prefvec_ds.config.layout import RunLayout, split_seed
from prefvec_ds.config.loader import load_config
from prefvec_ds.config.schema import RunConfig
# stdlib only, no torch import here: the job is a light parent of the ranks
from prefvec_ds.distributed.env import timeout_env
from prefvec_ds.distributed.launch import LAUNCHERS, RankJob, launcher_command
from prefvec_ds.distributed.process import (REQUEUE_EXIT_CODE, hold_signals, run_main, start,
                                            wait_forwarding)
from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.dag import Stage, build_dag, groups, stage_by_name

INJECTED_FAILURE_EXIT = 3


def rank_job(cfg: RunConfig, stage: Stage) -> RankJob:
    """The job every rank of a training stage runs (see RankJob)."""
    if stage.kind == "sft":
        return RankJob("sft", cfg.source_path)
    if stage.kind == "ref_logps":
        return RankJob("ref-logps", cfg.source_path, preference=stage.key)
    if stage.kind == "baseline_dpo":
        return RankJob("baseline", cfg.source_path, baseline=stage.key)
    direction, seed = split_seed(stage.key)
    if seed is None:
        return RankJob("dpo", cfg.source_path, direction=direction)
    # a diagnostic seed: the same DPO in the run folder <run_dir>/seeds/<seed>, from the same
    # theta_base (and the same reference log-probs, see _share_ref_logps)
    from prefvec_ds.train.stage import base_model_dir  # noqa: PLC0415

    base = Path(base_model_dir(cfg, must_exist=False)).resolve()
    seed_dir = RunLayout.of(cfg).seed(seed).root.resolve()
    return RankJob("dpo", cfg.source_path, (f"seed={seed}", f"run_dir={seed_dir}",
                                            f"model.base={base}"), direction=direction)


def _share_ref_logps(cfg: RunConfig, stage: Stage) -> None:
    """A diagnostic-seed DPO reads the run's reference table (same theta_base, same pairs):
    link it into the seed's run folder instead of recomputing it."""
    direction, seed = split_seed(stage.key)
    if stage.kind != "dpo" or seed is None:
        return
    pref = direction[:-1]
    link_atomic(RunLayout.of(cfg).seed(seed).ref_logps(pref).resolve(),
                Path("..", "..", "..", "ref_logps", f"{pref}.pt"))


def rank_command(cfg: RunConfig, stage: Stage, launcher: str, port: int | None,
                 devices: list[int] | None = None) -> list[str]:
    """The command that starts the stage's ranks (on the physical GPUs `devices`, when given)."""
    return launcher_command(launcher, cfg.distributed.nproc_per_node, rank_job(cfg, stage),
                            port, devices, srun_args=cfg.pipeline.slurm.srun_args)


def _run_distributed(cfg: RunConfig, stage: Stage, launcher: str, port: int | None,
                     devices: list[int] | None) -> int:
    _share_ref_logps(cfg, stage)
    cmd = rank_command(cfg, stage, launcher, port, devices)
    print(f"[prefvec] {stage.name}: {' '.join(cmd)}", flush=True)
    if launcher == "srun":
        # the sbatch script already exported DS_ACCELERATOR and TORCH_EXTENSIONS_DIR; skipping
        # stage_env spares this process the torch import (~4 CPU-s per job)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    else:
        from prefvec_ds.distributed.launch import stage_env  # noqa: PLC0415

        # torchrun honours CUDA_VISIBLE_DEVICES; for deepspeed the --include above does the job
        # (devices are physical ids: pipeline.local.device_slots maps them)
        env = stage_env(devices=devices if launcher == "torchrun" else None)
    env.update(timeout_env(cfg.distributed.timeout_minutes))  # collective timeout of the ranks
    return wait_forwarding([start(cmd, env)])[0]


def _run_mora(cfg: RunConfig, launcher: str, devices: list[int] | None) -> int:
    """MORA shards as ranks (srun tasks, or local processes), then the gather in this process."""
    from prefvec_ds.mora import stage as mora  # noqa: PLC0415
    from prefvec_ds.mora.gather import gather  # noqa: PLC0415

    mora.check_fingerprint(cfg)
    argv = [cfg.source_path]
    if launcher == "srun":
        rc = mora.launch_srun(argv, cfg.pipeline.slurm.srun_args)
    else:
        rc = mora.launch_local(argv, cfg.distributed.nproc_per_node, devices)
    if rc == 0:
        gather(cfg)
    return rc


def _run_in_process(cfg: RunConfig, stage: Stage) -> int:
    print(f"[prefvec] {stage.name}: in this process", flush=True)
    if stage.kind == "eval":
        from prefvec_ds.pipeline.evaluate import run_eval  # noqa: PLC0415

        run_eval(cfg, build_dag(cfg))
    elif stage.kind == "tune":
        from prefvec_ds.eval.tune import tune_eta  # noqa: PLC0415

        tune_eta(cfg)
    else:
        from prefvec_ds.pipeline.arithmetic import run_arithmetic  # noqa: PLC0415

        run_arithmetic(cfg, stage)
    return 0


def ckpt_tools_available() -> bool:
    """`prefvec vector` and `prefvec merge` come from prefvec_ds.ckpt.commands."""
    return importlib.util.find_spec("prefvec_ds.ckpt.commands") is not None


def execute(cfg: RunConfig, stage: Stage, launcher: str, port: int | None = None,
            devices: list[int] | None = None, log: str = "") -> int:
    """Run `stage` unless it is up to date; keep its manifest; return the exit code."""
    run_dir = Path(cfg.run_dir)
    fingerprint = manifest.input_fingerprint(run_dir, stage)
    if fingerprint is None:
        raise PrefvecError(f"stage {stage.name}: upstream stage(s) {', '.join(stage.deps)} "
                           "have not finished")
    ok, why = manifest.up_to_date(run_dir, stage)
    if ok:
        print(f"[prefvec] {stage.name}: up to date, nothing to do", flush=True)
        return 0
    print(f"[prefvec] {stage.name}: running ({why}) at {time.strftime('%H:%M:%S')}", flush=True)
    manifest.begin(run_dir, stage, fingerprint, log)
    if stage.name in os.environ.get("PREFVEC_FAIL_STAGES", "").split(","):
        msg = "failure injected by PREFVEC_FAIL_STAGES"
        print(f"[prefvec] {stage.name}: {msg}", file=sys.stderr, flush=True)
        manifest.finish(run_dir, stage, "failed", INJECTED_FAILURE_EXIT, msg)
        return INJECTED_FAILURE_EXIT
    if stage.kind in ("vectors", "merge", "baseline_merge") and not ckpt_tools_available():
        msg = "skipped: `prefvec vector`/`prefvec merge` are not installed (prefvec_ds.ckpt)"
        print(f"[prefvec] {stage.name}: {msg}", flush=True)
        manifest.finish(run_dir, stage, "skipped", 0, msg)
        return 0
    try:
        if stage.kind == "mora":
            rc = _run_mora(cfg, launcher, devices)
        else:
            rc = (_run_distributed(cfg, stage, launcher, port, devices) if stage.distributed
                  else _run_in_process(cfg, stage))
    except BaseException as err:  # noqa: BLE001 - record why, then let it propagate
        manifest.finish(run_dir, stage, "failed", 1, f"{type(err).__name__}: {err}")
        raise
    if rc == 0 and (run_dir / stage.done_file).exists():
        manifest.finish(run_dir, stage, "done", 0)
    elif rc == REQUEUE_EXIT_CODE:
        manifest.finish(run_dir, stage, "preempted", rc, "checkpointed on a signal; resumes")
    else:
        # a bare non-zero exit is in exit_code already: no error text to repeat it
        error = "" if rc else f"exited 0 but {stage.done_file} is missing"
        manifest.finish(run_dir, stage, "failed", rc or 1, error)
        rc = rc or 1
    print(f"[prefvec] {stage.name}: exit {rc} at {time.strftime('%H:%M:%S')}", flush=True)
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prefvec_ds.pipeline.job")
    p.add_argument("config", help="<run_dir>/pipeline/config.yaml")
    p.add_argument("--stage", help="stage name, e.g. dpo/helpful+")
    p.add_argument("--group", help="stage kind (with --index: one task of a job array)")
    p.add_argument("--index", type=int, default=0, help="position in --group")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument("--port", type=int, help="master port (deepspeed/torchrun)")
    p.add_argument("--devices", help="CUDA_VISIBLE_DEVICES of this stage, e.g. 0,1")
    p.add_argument("--log", default="", help="log file, recorded in the manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hold_signals()
    return run_main(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    stages = build_dag(cfg)
    if args.stage:
        stage = stage_by_name(stages, args.stage)
    else:
        members = dict(groups(stages)).get(args.group) or []
        if not 0 <= args.index < len(members):
            raise PrefvecError(f"--group {args.group} --index {args.index}: the group has "
                               f"{len(members)} stage(s)")
        stage = members[args.index]
    devices = [int(d) for d in args.devices.split(",")] if args.devices else None
    return execute(cfg, stage, args.launcher, args.port, devices, args.log)


if __name__ == "__main__":
    sys.exit(main())
