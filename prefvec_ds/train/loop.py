"""The optimizer loop shared by SFT and DPO: exact resume, logging, checkpoints, preemption.

A stage supplies `compute(indices) -> (loss, metrics, n_tokens)` for one micro-batch; the loop
owns everything else. On SIGUSR1/SIGTERM (SLURM's warning before the time limit, or a
preemption) it saves a checkpoint at the next step boundary and exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import record_function

from prefvec_ds.atomic import write_text_atomic
from prefvec_ds.config.schema import OptimConfig
from prefvec_ds.distributed import checkpoints, collectives, group
from prefvec_ds.distributed.process import REQUEUE_EXIT_CODE
from prefvec_ds.train.schedule import rank_micro_batches

_STOP = {"requested": False}


def _request_stop(signum, frame):  # noqa: ARG001
    _STOP["requested"] = True


def install_signal_handlers() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _request_stop)


@dataclass
class LoopSpec:
    stage: OptimConfig
    n_examples: int
    total_steps: int
    seed: int
    folder: Path
    """Stage folder: ckpt/ (ZeRO-3 checkpoints), tb/ (TensorBoard), metrics.jsonl."""
    compute: Callable[[list[int]], tuple[torch.Tensor, dict[str, float], int]]
    evaluate: Callable[[int], dict[str, float]] | None = None
    eval_every: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.folder / "ckpt"


class MetricsLog:
    """metrics.jsonl on rank 0: survives restarts, so a resumed run keeps its whole history.

    Rows logged after the checkpoint a run resumes from are dropped (they will be redone).
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows: list[dict] = []
        if group.rank() != 0:
            return
        if path.is_file():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines())
                         if r["step"] <= resume_step]
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        self.tb = SummaryWriter(str(path.parent / "tb"))
        self._flush()

    def add(self, step: int, prefix: str, row: dict[str, float]) -> None:
        if group.rank() != 0:
            return
        for key, value in row.items():
            self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()
        self.rows.append({"step": step, **{f"{prefix}/{k}": v for k, v in row.items()}})
        self._flush()
        print(f"{prefix} step {step} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())),
              flush=True)

    def _flush(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def close(self) -> None:
        if group.rank() == 0:
            self.tb.close()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _save(engine, spec: LoopSpec, step: int, resumed_from: str | None = None) -> None:
    """Checkpoint, then drop complete tags beyond stage.keep_checkpoints (never the resumed
    one)."""
    checkpoints.save_checkpoint(engine, spec.ckpt_dir, step, {"step": step, "rng": _rng_state()})
    protect = {resumed_from} if resumed_from else set()
    gone = checkpoints.prune_checkpoints(spec.ckpt_dir, spec.stage.keep_checkpoints, protect)
    if gone:
        print(f"checkpoints pruned (keep_checkpoints={spec.stage.keep_checkpoints}): "
              f"{', '.join(gone)}", flush=True)


def _reduce_train_metrics(sums: dict[str, float], elapsed: float, steps: int,
                          engine) -> dict[str, float]:
    """Means over ranks and micro-batches; tokens/s and s/step over the wall time since the
    previous row (logging included, evaluation excluded)."""
    totals = collectives.all_reduce_sum(sums)
    n = totals.pop("_micro_batches")
    tokens = totals.pop("_tokens")
    row = {k: v / n for k, v in totals.items()}
    row["tokens/s"] = tokens / max(elapsed, 1e-9)
    row["s/step"] = elapsed / max(steps, 1)
    row["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()
    row["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    return row


def run_loop(engine, spec: LoopSpec) -> list[dict[str, float]]:
    """Train from the newest complete checkpoint (or step 0) to spec.total_steps; returns the
    whole metrics history (train/... and eval/... rows), including rows from before a resume."""
    install_signal_handlers()
    client = checkpoints.load_checkpoint(engine, spec.ckpt_dir)
    step = int(client["step"]) if client else 0
    resumed_from = f"global_step{step}" if client else None
    if client:
        _set_rng_state(client["rng"])
    log = MetricsLog(spec.folder / "metrics.jsonl", step)
    if spec.evaluate is not None and step == 0:
        log.add(0, "eval", spec.evaluate(0))
    sums: dict[str, float] = defaultdict(float)
    t0, logged_step = time.perf_counter(), step
    engine.train()
    while step < spec.total_steps:
        for idx in rank_micro_batches(step, spec.n_examples, spec.stage, group.world_size(),
                                      group.rank(), spec.seed):
            with record_function("loop/forward"):
                loss, metrics, n_tokens = spec.compute(idx)
            with record_function("loop/backward"):
                engine.backward(loss)
            with record_function("loop/step"):
                engine.step()
            for key, value in metrics.items():
                sums[key] += float(value)
            sums["loss"] += loss.item()
            sums["_tokens"] += n_tokens
            sums["_micro_batches"] += 1
        step += 1
        if step % spec.stage.log_every == 0 or step == spec.total_steps:
            now = time.perf_counter()  # logging counts towards the next row's wall time
            row = _reduce_train_metrics(sums, now - t0, step - logged_step, engine)
            sums, t0, logged_step = defaultdict(float), now, step
            log.add(step, "train", row)
        evaluated = bool(spec.evaluate and spec.eval_every and step % spec.eval_every == 0)
        if evaluated:
            t_eval = time.perf_counter()
            log.add(step, "eval", spec.evaluate(step))
            engine.train()
            t0 += time.perf_counter() - t_eval  # held-out evaluation is not training time
        saved = bool(spec.stage.save_every and step % spec.stage.save_every == 0)
        if saved:
            _save(engine, spec, step, resumed_from)
        if _stop_agreed():
            if not saved:
                _save(engine, spec, step, resumed_from)
            print(f"stop requested: checkpoint at step {step} saved, exiting for requeue",
                  flush=True)
            group.shutdown()
            sys.exit(REQUEUE_EXIT_CODE)
    # rank 0 reads the (shared) folder and decides: every rank must agree to enter the save
    if checkpoints.resume_tag(spec.ckpt_dir) != f"global_step{step}":
        _save(engine, spec, step, resumed_from)
    # only rank 0 holds the log: it decides, every rank follows (eval forwards are collective)
    final_eval = spec.evaluate is not None and not any(
        r["step"] == step and "eval/loss" in r for r in log.rows)
    if collectives.all_gather_objects(final_eval)[0]:
        log.add(step, "eval", spec.evaluate(step))
    log.close()
    return collectives.all_gather_objects(log.rows)[0]


def _stop_agreed() -> bool:
    """Every rank stops at the same step: a signal seen by any rank counts for all."""
    return collectives.all_reduce_sum({"stop": float(_STOP["requested"])})["stop"] > 0
