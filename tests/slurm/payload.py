"""Tiny job payloads for the SLURM tests: each appends one JSON line per event to a file.

    python payload.py stamp OUT SECONDS [EXIT]   start/end times around a sleep, then exit EXIT
    python payload.py hold OUT                   first run sleeps (to be requeued); a rerun ends
    python payload.py preempt OUT                first run waits for USR1; a rerun ends
    python payload.py rank OUT                   prefvec_ds.distributed.env.discover() of this task
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def record(out: str, event: str, **extra) -> None:
    line = {"event": event, "t": time.time(), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "job": os.environ.get("SLURM_JOB_ID"), "task": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "step": os.environ.get("SLURM_STEP_ID"), **extra}
    # One short write per line with O_APPEND: concurrent tasks never interleave inside a line.
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def stamp(out: str, seconds: str, exit_code: str = "0") -> None:
    record(out, "start")
    time.sleep(float(seconds))
    record(out, "end")
    sys.exit(int(exit_code))


def hold(out: str) -> None:
    record(out, "start")
    if int(os.environ.get("SLURM_RESTART_COUNT", 0)) == 0:
        time.sleep(120)  # the test requeues us long before this
    record(out, "end")


def preempt(out: str) -> None:
    """Stand-in for a trainer: on USR1 'save a checkpoint' and exit; the rerun finishes."""
    record(out, "start")
    if int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0:
        record(out, "end")
        return
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
    deadline = time.time() + 110
    while not got and time.time() < deadline:
        time.sleep(0.1)
    record(out, "usr1" if got else "no-signal")


def rank(out: str) -> None:
    from prefvec_ds.distributed.env import discover  # noqa: PLC0415 - payload runs in its own process

    info = discover()
    record(out, "rank", rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
           master_addr=info.master_addr, master_port=info.master_port, source=info.source)


if __name__ == "__main__":
    {"stamp": stamp, "hold": hold, "preempt": preempt, "rank": rank}[sys.argv[1]](*sys.argv[2:])
