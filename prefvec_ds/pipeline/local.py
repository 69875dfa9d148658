"""`prefvec run`: execute the DAG on this machine.

Each stage is one `python -m prefvec_ds.pipeline.job` process (which starts the ranks with the
`deepspeed` launcher), so the four DPO directions run concurrently as separate launcher
processes, each with its own master port. Concurrency is bounded by slots: on a GPU node a slot
is a disjoint group of nproc_per_node GPUs (CUDA_VISIBLE_DEVICES); on CPU there are
`distributed.max_concurrent_jobs` slots, default one per direction. Logs go to
`<run_dir>/logs/<stage>.log`; a summary table ends the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefvec_ds import PrefvecError
from prefvec_ds.config.schema import RunConfig
from prefvec_ds.distributed.env import cpu_threads_per_rank, free_port
from prefvec_ds.pipeline import manifest
from prefvec_ds.pipeline.dag import Stage
from prefvec_ds.pipeline.prepare import snapshot_path

POLL_SECONDS = 0.5


@dataclass
class StageResult:
    """How one stage ended in this invocation."""

    state: str
    """up-to-date | done | failed | cancelled | interrupted | skipped"""
    wall_s: float = 0.0
    """Seconds this invocation spent on it."""
    note: str = ""
    """Why it ran or did not, or where its log is."""


def gpu_count() -> int:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return 0
    import torch  # noqa: PLC0415

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_slots(cfg: RunConfig, n_gpus: int, env=None) -> list[list[int] | None]:
    """One entry per job that may run at once: its GPUs as physical ids, or None on CPU.

    `n_gpus` counts the visible GPUs; slot k takes the visible GPUs k*nproc.. and names them by
    their physical ids (through a preset CUDA_VISIBLE_DEVICES), which is what the children
    need: `deepspeed --include` drops the inherited CUDA_VISIBLE_DEVICES, and torchrun / MORA
    shards get a CUDA_VISIBLE_DEVICES of their own.
    """
    from prefvec_ds.distributed.launch import physical_gpus  # noqa: PLC0415

    limit = cfg.distributed.max_concurrent_jobs
    if n_gpus == 0:
        return [None] * (limit or max(len(cfg.directions()), 1))
    nproc = cfg.distributed.nproc_per_node
    if nproc > n_gpus:
        raise PrefvecError(f"config parameter distributed.nproc_per_node={nproc}: this node has "
                           f"only {n_gpus} GPU(s)")
    slots = [physical_gpus(list(range(i * nproc, (i + 1) * nproc)), env)
             for i in range(n_gpus // nproc)]
    return slots[:limit] if limit else slots


@dataclass
class _Running:
    proc: subprocess.Popen
    slot: int
    started: float
    log: Path


class LocalExecutor:
    """Runs the stages of `todo` as their upstream stages finish, within the slots."""

    def __init__(self, cfg: RunConfig, stages: list[Stage], todo: dict[str, str]):
        self.cfg, self.stages, self.todo = cfg, stages, todo
        self.run_dir = Path(cfg.run_dir)
        self.slots = device_slots(cfg, gpu_count())
        self.free = list(range(len(self.slots)))
        self.running: dict[str, _Running] = {}
        self.results = {s.name: StageResult("up-to-date") for s in stages if s.name not in todo}
        self.pending = [s for s in stages if s.name in todo]

    def _start(self, stage: Stage, jobs: int) -> None:
        """Start `stage` in a free slot; `jobs` stages run at once once it has started."""
        slot = self.free.pop(0)
        log = self.run_dir / "logs" / f"{stage.log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        devices = self.slots[slot]
        cmd = [sys.executable, "-m", "prefvec_ds.pipeline.job", str(snapshot_path(self.run_dir)),
               "--stage", stage.name, "--launcher", self.cfg.distributed.launcher,
               "--port", str(free_port()), "--log", str(log)]
        env = None
        if devices is not None:
            cmd += ["--devices", ",".join(map(str, devices))]
        elif "OMP_NUM_THREADS" not in os.environ:  # a user's own setting wins
            # the stages running at once share the cores, as the ranks of one stage do
            threads = cpu_threads_per_rank(os.cpu_count() or 1,
                                           jobs * self.cfg.distributed.nproc_per_node)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            handle.flush()
            # own session: a Ctrl-C reaches only this process, which then stops the stages
            # cleanly (SIGTERM -> checkpoint) instead of killing them mid-save.
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
        where = f" on GPUs {devices}" if devices is not None else ""
        print(f"[prefvec] start {stage.name} ({self.todo[stage.name]}){where}: {log}", flush=True)
        self.running[stage.name] = _Running(proc, slot, time.monotonic(), log)

    def _blocked_by(self, stage: Stage) -> str | None:
        for dep in stage.deps:
            result = self.results.get(dep)
            if result is not None and result.state in ("failed", "cancelled", "interrupted"):
                return dep
        return None

    def _schedule(self) -> None:
        ready = []
        for stage in list(self.pending):
            blocker = self._blocked_by(stage)
            if blocker is not None:
                self.pending.remove(stage)
                self.results[stage.name] = StageResult("cancelled", 0.0,
                                                       f"{blocker} did not finish")
                print(f"[prefvec] cancel {stage.name}: {blocker} did not finish", flush=True)
            elif len(ready) < len(self.free) and all(d in self.results for d in stage.deps):
                ready.append(stage)
        jobs = len(self.running) + len(ready)  # what shares the cores once these have started
        for stage in ready:
            self.pending.remove(stage)
            self._start(stage, jobs)

    def _reap(self) -> None:
        for name, job in list(self.running.items()):
            rc = job.proc.poll()
            if rc is None:
                continue
            del self.running[name]
            self.free.append(job.slot)
            wall = time.monotonic() - job.started
            status = (manifest.read(self.run_dir, name) or {}).get("status")
            if rc == 0:
                state = "skipped" if status == "skipped" else "done"
                self.results[name] = StageResult(state, wall, self.todo[name])
            else:
                state = "interrupted" if status == "preempted" else "failed"
                self.results[name] = StageResult(state, wall, f"exit {rc}, log {job.log}")
            print(f"[prefvec] {state} {name} in {wall:.1f} s", flush=True)

    def stop(self) -> None:
        """SIGTERM to every running stage: trainers checkpoint and exit (REQUEUE_EXIT_CODE)."""
        for job in self.running.values():
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
        for job in self.running.values():
            job.proc.wait()
        self._reap()

    def run(self) -> dict[str, StageResult]:
        try:
            while self.pending or self.running:
                self._schedule()
                time.sleep(POLL_SECONDS)
                self._reap()
        except KeyboardInterrupt:
            print("[prefvec] interrupted: stopping running stages (they checkpoint)", flush=True)
            self.stop()
            for stage in self.pending:
                self.results[stage.name] = StageResult("cancelled", 0.0, "interrupted")
        return {s.name: self.results[s.name] for s in self.stages}


def format_summary(results: dict[str, StageResult], total_s: float) -> str:
    """The table printed at the end of `prefvec run`."""
    rows = [("stage", "state", "wall", "note")]
    rows += [(name, r.state, f"{r.wall_s:.1f}s" if r.wall_s else "-", r.note)
             for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3]
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    lines.append(f"total wall time {total_s:.1f} s")
    return "\n".join(line.rstrip() for line in lines)


def check_single_node(cfg: RunConfig) -> None:
    """The local executor starts every rank on this machine. With nnodes > 1 it would run
    nproc_per_node ranks where the config (its batch sizes, the DAG fingerprint) counts
    nnodes * nproc_per_node: the global batch would silently shrink."""
    if cfg.distributed.nnodes > 1:
        raise PrefvecError(f"config parameter distributed.nnodes={cfg.distributed.nnodes}: "
                           "`prefvec run` runs on this machine only; use `prefvec submit` for "
                           "multi-node stages, or set distributed.nnodes=1")


def run_local(cfg: RunConfig, stages: list[Stage]) -> int:
    """Plan, execute, summarise; exit code 0 when every stage is up to date at the end."""
    check_single_node(cfg)
    t0 = time.monotonic()
    todo = manifest.plan(Path(cfg.run_dir), stages)
    if not todo:
        print(f"[prefvec] {cfg.run_dir}: every stage is up to date, nothing to do", flush=True)
    results = LocalExecutor(cfg, stages, todo).run()
    print(format_summary(results, time.monotonic() - t0), flush=True)
    bad = [n for n, r in results.items() if r.state not in ("up-to-date", "done", "skipped")]
    return 1 if bad else 0
