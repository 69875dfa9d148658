"""Process plumbing, once: the requeue exit code, signal forwarding from a launcher side to the
processes it started, and the `main()` wrapper that turns bad input into one line and exit 2.

Stdlib only: the stage job (`python -m prefvec_ds.pipeline.job`) imports this without paying for
torch (~4 CPU-s per job on a small node).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Callable

from prefvec_ds import PrefvecError

#: A rank (or MORA shard) that stopped on SIGUSR1/SIGTERM after checkpointing exits with this;
#: the stage is recorded as `preempted` and the next attempt resumes.
REQUEUE_EXIT_CODE = 99
#: What SLURM sends before the time limit (USR1, with `--signal`) and on requeue / scancel (TERM).
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_EARLY_SIGNALS: list[int] = []


def hold_signals() -> None:
    """Until the children exist, remember USR1/TERM instead of dying of them (USR1's default
    action is to terminate): a short in-process stage just finishes, and the job requeues."""
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))


def wait_forwarding(procs: list[subprocess.Popen], tag: str = "prefvec") -> list[int]:
    """Pass USR1/TERM (and any held by `hold_signals`) on to the running `procs`; wait for all
    of them and return their exit codes in order."""
    def forward(signum, frame):  # noqa: ARG001
        print(f"[{tag}] {signal.Signals(signum).name}: passing it on", flush=True)
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while _EARLY_SIGNALS:
        forward(_EARLY_SIGNALS.pop(0), None)
    codes = []
    for proc in procs:
        while True:
            try:
                codes.append(proc.wait())
                break
            except InterruptedError:  # a forwarded signal interrupted wait(): they run on
                continue
    return codes


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Popen with a clear error when the launcher is not installed."""
    try:
        return subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        raise PrefvecError(f"launcher {cmd[0]!r} not found on PATH") from None


def run_main(body: Callable[[], int]) -> int:
    """A command's body with the house rule for bad input: one `prefvec: error: ...` line on
    stderr and exit code 2 (nothing half-written is the body's business: atomic outputs)."""
    try:
        return int(body() or 0)
    except PrefvecError as err:
        print(f"prefvec: error: {err}", file=sys.stderr, flush=True)
        return 2
